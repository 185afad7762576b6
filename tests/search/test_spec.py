from __future__ import annotations

import re
from pathlib import Path

import pytest

from autoquant.search import StudyFileError, load_study_spec, mask_password

ROOT = Path(__file__).resolve().parents[2]

GOOD = """
[study]
name = "t"
trials = 3
[task]
name = "digits-cnn"
[space]
w_bits = [4, 8]
"""


@pytest.mark.parametrize("name", ["digits", "mnist_lenet5", "cifar10_resnet20"])
def test_shipped_study_files_load(name: str) -> None:
    spec = load_study_spec(ROOT / "studies" / f"{name}.toml")
    assert spec.name == name and spec.trials > 0
    assert spec.directions[0] == "maximize"


def test_defaults_fill_missing_tables(tmp_path: Path) -> None:
    f = tmp_path / "t.toml"
    f.write_text(GOOD)
    spec = load_study_spec(f)
    assert (spec.trials, spec.sampler, spec.space.w_bits, spec.qat.steps) == (3, "tpe", (4, 8), 50)
    assert spec.objectives == ("accuracy", "size", "latency")


def test_missing_study_file(tmp_path: Path) -> None:
    with pytest.raises(StudyFileError, match="study file not found"):
        load_study_spec(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgresql://aq:s3cr3t@localhost:5432/db", "postgresql://aq:***@localhost:5432/db"),
        ("postgresql+psycopg2://u:p@h/db", "postgresql+psycopg2://u:***@h/db"),
        ("sqlite:///x.db", "sqlite:///x.db"),
    ],
)
def test_mask_password(url: str, masked: str) -> None:
    assert mask_password(url) == masked


# -- allowed values come from the registries ------------------------------------------------


def test_a_registered_latency_backend_is_accepted_by_study_files(tmp_path: Path) -> None:
    from autoquant.measure import BACKENDS, register_backend

    f = tmp_path / "t.toml"
    f.write_text(GOOD + "[latency]\nbackend = 'my-npu'\n")
    with pytest.raises(StudyFileError, match=r"latency.backend = 'my-npu' is not allowed"):
        load_study_spec(f)

    class MyBackend:  # only its name matters to a study file
        name = "my-npu"

    register_backend(MyBackend())  # type: ignore[arg-type]
    try:
        assert load_study_spec(f).latency.backend == "my-npu"
        f.write_text(GOOD + "[latency]\nbackend = 'tensorrt'\n")
        with pytest.raises(
            StudyFileError, match=r"allowed values: 'onnxruntime', 'torch-x86', 'my-npu'"
        ):
            load_study_spec(f)
    finally:
        BACKENDS.pop("my-npu")


def test_samplers_come_from_the_sampler_map(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import optuna

    from autoquant.search import SAMPLERS, make_sampler

    f = tmp_path / "t.toml"
    f.write_text(GOOD.replace("trials = 3", "trials = 3\nsampler = 'qmc'"))
    with pytest.raises(StudyFileError, match=r"study.sampler = 'qmc' is not allowed.*'random'"):
        load_study_spec(f)

    class QMC(optuna.samplers.RandomSampler):  # any factory: seed -> sampler
        pass

    monkeypatch.setitem(SAMPLERS, "qmc", lambda seed: QMC(seed=seed))
    spec = load_study_spec(f)
    assert isinstance(make_sampler(spec, 0), QMC)
    monkeypatch.delitem(SAMPLERS, "qmc")
    with pytest.raises(ValueError, match=r"sampler='qmc' is not allowed; allowed values: 'tpe'"):
        make_sampler(spec, 0)


def test_objectives_come_from_the_objective_map(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from autoquant.search import OBJECTIVES, Objective

    f = tmp_path / "t.toml"
    f.write_text(GOOD + "[objectives]\nuse = ['accuracy', 'throughput']\n")
    with pytest.raises(
        StudyFileError, match=r"'throughput' is not allowed; allowed values: 'accuracy'"
    ):
        load_study_spec(f)
    monkeypatch.setitem(OBJECTIVES, "throughput", Objective("maximize", "samples_per_s"))
    spec = load_study_spec(f)
    assert spec.objectives == ("accuracy", "throughput")
    assert spec.directions == ["maximize", "maximize"]
    f.write_text(GOOD + "[objectives]\nuse = ['throughput', 'size']\n")
    with pytest.raises(StudyFileError, match=r"at least one of 'size', 'latency', 'throughput'"):
        load_study_spec(f)


# -- validation gaps: every error names the file, the key and the allowed values ------------

T = "[task]\nname = 'digits-cnn'\n"
INVALID = [
    ("[latency]\nthreads = 100000", "latency.threads = 100000 is not allowed; allowed values: 1.."),
    ("[qat]\nlr = nan", "qat.lr = nan is not allowed; allowed values: a finite number > 0"),
    ("[qat]\nlr = inf", "qat.lr = inf is not allowed; allowed values: a finite number > 0"),
    ("[latency]\nbudget_s = inf", "latency.budget_s = inf is not allowed"),
    ("[latency]\nbatch_sizes = []", "latency.batch_sizes is empty; allowed values: a list of one"),
    ("[latency]\nbatch_sizes = [1, 0]", "latency.batch_sizes[] = 0 must be > 0"),
    (
        "[space]\nlr = [1e-4, inf]",
        "space.lr = [0.0001, inf] is not allowed; allowed values: finite",
    ),
    ("[space]\npercentile = nan", "space.percentile = nan is not allowed"),
    (
        "[study]\nseed = -1",
        "study.seed = -1 is not allowed; allowed values: an integer 0..4294967295",
    ),
    ("[study]\nseed = 4294967296", "study.seed = 4294967296 is not allowed"),
    (
        "[study]\nname = '..'",
        "study.name = '..' is not allowed; allowed: letters, digits and '_.-'",
    ),
    ("[study]\nname = '.'", "study.name = '.' is not allowed"),
    ("[study]\nname = '.hidden'", "not starting with '.'"),
    ("[study]\nname = 'a/b'", "study.name = 'a/b' is not allowed"),
]


@pytest.mark.parametrize(("text", "message"), INVALID, ids=[i[1][:32] for i in INVALID])
def test_values_outside_their_range_are_refused(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(T + text)
    with pytest.raises(StudyFileError) as info:
        load_study_spec(f)
    assert str(info.value).startswith(f"{f}: ") and message in str(info.value), str(info.value)


def test_the_threads_bound_is_four_times_the_cpus(tmp_path: Path) -> None:
    import os

    top = 4 * (os.cpu_count() or 1)
    f = tmp_path / "t.toml"
    f.write_text(T + f"[latency]\nthreads = {top}\n")
    assert load_study_spec(f).latency.threads == top
    f.write_text(T + f"[latency]\nthreads = {top + 1}\n")
    with pytest.raises(StudyFileError, match=rf"allowed values: 1..{top} \(4 × the"):
        load_study_spec(f)


def test_edge_values_are_accepted(tmp_path: Path) -> None:
    f = tmp_path / "t.toml"
    f.write_text("[study]\nname = 'v1.2_x-y'\nseed = 4294967295\n" + T)
    spec = load_study_spec(f)
    assert (spec.name, spec.seed) == ("v1.2_x-y", 2**32 - 1)


def test_a_spec_built_in_python_or_replaced_is_checked_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dataclasses import replace

    from autoquant.search import StudySpec, runs_dir, storage_url

    with pytest.raises(StudyFileError, match=r"<study>: study.name = '\.\.' is not allowed"):
        StudySpec(name="..", task="digits-cnn")
    spec = StudySpec(name="ok", task="digits-cnn")
    with pytest.raises(StudyFileError, match="study.seed = -1 is not allowed"):
        replace(spec, seed=-1)
    with pytest.raises(StudyFileError, match="study.trials = 0 must be >= 1"):
        replace(spec, trials=0)
    # Every name that is allowed stays one folder inside the runs folder.
    monkeypatch.setenv("AUTOQUANT_RUNS", str(tmp_path / "runs"))
    for name in ("ok", "a.b", "-x", "_", "x..y"):
        url = storage_url(replace(spec, name=name))
        db = Path(url.removeprefix("sqlite:///"))
        assert db.parent.parent == runs_dir().resolve() and db.parent.name == name


@pytest.mark.parametrize("name", ["digits", "mnist_lenet5", "cifar10_resnet20"])
def test_shipped_study_comments_do_not_claim_tie_groups_they_lack(name: str) -> None:
    path = ROOT / "studies" / f"{name}.toml"
    comments = " ".join(
        line for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("#")
    )
    claims_sharing = (
        bool(re.search(r"\bshares? one\b", comments)) and "no tie group" not in comments
    )
    assert not claims_sharing or load_study_spec(path).space.tie, comments
