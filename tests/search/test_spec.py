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


BAD = [
    # (toml snippet appended or replacing, expected message parts)
    (
        "[study]\nname='t'\ntrails=3\n[task]\nname='x'",
        ["unknown key(s) ['trails'] in [study]", "allowed keys: device, name"],
    ),
    (
        "[study]\ntrials='many'\n[task]\nname='x'",
        ["study.trials = 'many' is str", "expected an integer"],
    ),
    (
        "[study]\nsampler='cma'\n[task]\nname='x'",
        ["study.sampler = 'cma' is not allowed", "'tpe', 'nsga2', 'gp', 'random'"],
    ),
    (
        "[task]\nname='x'\n[space]\nw_bits=[1, 8]",
        ["[space]", "space.w_bits has 1", "allowed values: 2, 3"],
    ),
    ("[task]\nname='x'\n[space]\na_bits=[16]", ["space.a_bits has 16", "'fp16', 'fp32'"]),
    ("[task]\nname='x'\n[space]\nw_bits=[]", ["space.w_bits is empty"]),
    (
        "[task]\nname='x'\n[constraint]\nmax_accuracy_drop=1.5",
        ["constraint.max_accuracy_drop = 1.5 is outside [0, 1]"],
    ),
    ("[task]\nname='x'\n[constraint]\nmax_accuracy_drop=-0.1", ["outside [0, 1]"]),
    ("[task]\nname='x'\n[qat]\nsteps='ten'", ["qat.steps = 'ten' is str"]),
    (
        "[task]\nname='x'\n[qat]\noptimizer='lion'",
        ["qat.optimizer = 'lion' is not allowed", "'sgd', 'adam'"],
    ),
    (
        "[task]\nname='x'\n[latency]\nbackend='tensorrt'",
        ["latency.backend = 'tensorrt'", "'onnxruntime', 'torch-x86'"],
    ),
    ("[task]\nname='x'\n[objectives]\nuse=['size']", ["objectives.use"]),
    ("[study]\nname='t'", ["missing [task]"]),
    ("[task]\nname='x'\n[bogus]\na=1", ["unknown key(s) ['bogus'] in the top level"]),
    ("[task\nname='x'", ["not valid TOML"]),
]


@pytest.mark.parametrize(("text", "parts"), BAD, ids=[b[1][0][:40] for b in BAD])
def test_bad_study_file_names_file_key_and_allowed_values(
    tmp_path: Path, text: str, parts: list[str]
) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(StudyFileError) as info:
        load_study_spec(f)
    msg = str(info.value)
    assert msg.startswith(str(f))
    for part in parts:
        assert part in msg


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
