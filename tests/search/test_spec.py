from __future__ import annotations

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
