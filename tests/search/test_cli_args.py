"""Bad arguments and settings stop with exit code 2 and a message naming the value and the
allowed values; the exit codes are documented in ``--help``."""

from __future__ import annotations

from pathlib import Path

import pytest

from autoquant.cli import EPILOG, main
from autoquant.search import MAX_SEED, max_threads
from autoquant.search._liveness import grace_s


@pytest.fixture
def study_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("AUTOQUANT_RUNS", str(tmp_path / "runs"))
    f = tmp_path / "s.toml"
    f.write_text("[study]\nname = 's'\n[task]\nname = 'digits-cnn'\n")
    return f


BAD_ARGS = [
    (["search", "{f}", "--trials", "0"], "argument --trials: 0 is not allowed; allowed values: "),
    (["worker", "{f}", "--storage", "sqlite://", "--trials", "-3"], "-3 is not allowed"),
    (["search", "{f}", "--trials", "many"], "'many' is not an integer; allowed values: an int"),
    (
        ["search", "{f}", "--seed", "-1"],
        f"-1 is not allowed; allowed values: an integer 0..{MAX_SEED}",
    ),
    (["search", "{f}", "--seed", str(MAX_SEED + 1)], f"allowed values: an integer 0..{MAX_SEED}"),
    (["search", "{f}", "--threads", "100000"], f"allowed values: 1..{max_threads()} (4 × the"),
    (["worker", "{f}", "--storage", "sqlite://", "--threads", "0"], "0 is not allowed"),
    (["search", "{f}", "--fork", ".."], "'..' is not allowed; allowed: letters, digits"),
    (["search", "{f}", "--fork", ".x"], "not starting with '.'"),
    (["best", "{f}", "--tolerance", "nan"], "argument --tolerance: nan is not allowed"),
    (["best", "{f}", "--tolerance", "-0.01"], "allowed values: a number >= 0"),
    (["best", "{f}", "--max-drop", "1.5"], "allowed values: a number >= 0 and <= 1"),
    (["report", "{f}", "--out", "r", "--size-fraction", "0"], "allowed values: a number > 0"),
    (["export", "{f}", "--trial", "-1", "--out", "x"], "argument --trial: -1 is not allowed"),
    (["bench-latency", "{f}", "--trial", "0", "--repeats", "0"], "--repeats: 0 is not allowed"),
    (["bench-latency", "{f}", "--trial", "0", "--budget-s", "inf"], "inf is not allowed"),
]


@pytest.mark.parametrize(("args", "message"), BAD_ARGS, ids=[" ".join(a[0][2:4]) for a in BAD_ARGS])
def test_bad_arguments_exit_2_naming_the_allowed_values(
    study_file: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main([a.format(f=study_file) for a in args]) == 2
    assert message in capsys.readouterr().err
    assert not (study_file.parent / "runs").exists()


def test_help_documents_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    codes = [
        line.split()[0]
        for line in EPILOG.split("exit codes:")[1].splitlines()
        if line[2:3].isdigit()
    ]
    assert codes == ["0", "1", "2", "3", "4", "130"]
    assert "exit codes:" in out and "stopped short" in out and "deployed model failed" in out


def test_a_grace_period_shorter_than_two_heartbeats_is_refused(
    study_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AUTOQUANT_HEARTBEAT_S", "10")
    monkeypatch.setenv("AUTOQUANT_GRACE_S", "15")
    with pytest.raises(ValueError, match=r"AUTOQUANT_GRACE_S=15 is not allowed with "):
        grace_s()
    assert main(["search", str(study_file), "-q"]) == 2
    err = capsys.readouterr().err
    assert "AUTOQUANT_HEARTBEAT_S=10; allowed values: >= 2 x AUTOQUANT_HEARTBEAT_S = 20" in err
    monkeypatch.setenv("AUTOQUANT_GRACE_S", "20")
    assert grace_s() == 20.0
    monkeypatch.delenv("AUTOQUANT_GRACE_S")
    monkeypatch.setenv("AUTOQUANT_HEARTBEAT_S", "31")  # the default grace (60) is too short
    with pytest.raises(ValueError, match="AUTOQUANT_GRACE_S=60 .* = 62 seconds"):
        grace_s()
