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
