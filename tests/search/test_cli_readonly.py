"""Read-only commands never create a study; they work on studies without a float baseline or a
front; ``best --tolerance``; commands printed with ``--storage``; metric names."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest

from autoquant.cli import main
from autoquant.search import (
    FloatBaseline,
    StudyNotFoundError,
    StudyRecord,
    TrialRecord,
    load_existing_study,
    load_study,
    load_study_spec,
    record_attrs,
    write_study_record,
)
from autoquant.types import LayerPlan, QuantPlan, QuantSpec

DIRECTIONS = ["maximize", "minimize", "minimize"]
PLAN = QuantPlan({"fc": LayerPlan(weight=QuantSpec(bits=4), activation=QuantSpec(bits=8))})


def _file(tmp_path: Path, name: str, extra: str = "") -> Path:
    f = tmp_path / f"{name}.toml"
    f.write_text(f"[study]\nname = '{name}'\n{extra}[task]\nname = 'digits-cnn'\n")
    return f


def _add(study: optuna.Study, acc: float, size: int, lat: float, **record: object) -> None:
    study.add_trial(
        optuna.trial.create_trial(
            values=[acc, size, lat],
            user_attrs=record_attrs(
                TrialRecord(
                    accuracy=acc,
                    accuracy_drop=round(0.91 - acc, 6),
                    size_bytes=size,
                    size_ratio=size / 4000,
                    latency_ms=lat,
                    plan=PLAN.to_dict(),
                    plan_summary=PLAN.summary(),
                    **record,  # type: ignore[arg-type]
                )
            ),
        )
    )


@pytest.mark.parametrize(
    "command",
    [
        ["front"],
        ["front", "--failed"],
        ["best"],
        ["report", "--out", "{tmp}/r"],
        ["export", "--trial", "0", "--out", "{tmp}/e"],
        ["bench-latency", "--trial", "0"],
    ],
    ids=lambda c: c[0] + ("-failed" if "--failed" in c else ""),
)
def test_read_only_commands_on_a_missing_study_create_nothing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: list[str],
) -> None:
    runs = tmp_path / "runs"
    monkeypatch.setenv("AUTOQUANT_RUNS", str(runs))
    f = _file(tmp_path, "ghost")
    args = [command[0], str(f), *(a.format(tmp=tmp_path) for a in command[1:])]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"study 'ghost' not found: sqlite:///{runs.resolve()}/ghost/study.db does not exist" in (
        err
    )
    assert not runs.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ghost.toml"]

    # A storage that holds other studies: they are listed, and none is added.
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    for name in ("b", "a"):
        optuna.create_study(study_name=name, storage=url, directions=DIRECTIONS)
    assert main([*args, "--storage", url]) == 2
    err = capsys.readouterr().err
    assert f"study 'ghost' not found in {url}; studies there: a, b" in err
    assert sorted(optuna.get_all_study_names(url)) == ["a", "b"]


def test_report_compare_with_a_missing_study_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(study_name="real", storage=url, directions=DIRECTIONS)
    write_study_record(study, StudyRecord(float_baseline=FloatBaseline(0.91, 4000, 1.0)))
    real, ghost = _file(tmp_path, "real"), _file(tmp_path, "ghost")
    out = tmp_path / "r"
    args = ["report", str(real), "--storage", url, "--out", str(out), "--compare", str(ghost)]
    assert main([*args, "--compare-storage", url]) == 2
    assert "study 'ghost' not found in" in capsys.readouterr().err
    assert optuna.get_all_study_names(url) == ["real"] and not out.exists()


def test_load_existing_study_opens_what_load_study_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTOQUANT_RUNS", str(tmp_path))
    spec = load_study_spec(_file(tmp_path, "s"))
    with pytest.raises(StudyNotFoundError):
        load_existing_study(spec)
    made = load_study(spec)
    assert load_existing_study(spec).study_name == made.study_name == "s"
    # The metric names are set at creation...
    assert made.metric_names == ["accuracy", "size_bytes", "latency_ms"]
    # ... and on resume when missing (a study created by an earlier version).
    url = f"sqlite:///{tmp_path / 'old.db'}"
    optuna.create_study(study_name="s", storage=url, directions=DIRECTIONS)
    assert optuna.load_study(study_name="s", storage=url).metric_names is None
    assert load_study(spec, url).metric_names == ["accuracy", "size_bytes", "latency_ms"]
    assert load_existing_study(spec, url).metric_names == ["accuracy", "size_bytes", "latency_ms"]


def test_front_without_a_float_baseline_or_a_front_prints_a_plain_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AUTOQUANT_RUNS", str(tmp_path))
    f = _file(tmp_path, "new")
    study = load_study(load_study_spec(f))  # created, never measured
    assert main(["front", str(f)]) == 0
    assert capsys.readouterr().out.strip() == (
        "no trial is on the Pareto front: study 'new' has no complete trial"
    )
    study.add_trial(
        optuna.trial.create_trial(
            state=optuna.trial.TrialState.FAIL,
            user_attrs=record_attrs(TrialRecord(run="r1", fail_reason="ValueError: boom")),
        )
    )
    assert main(["front", str(f), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["front", str(f), "--failed", "--format", "json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["trial"], row["run"], row["fail_reason"]) == (0, "r1", "ValueError: boom")
    # Complete trials with their stored drop, still without a float baseline.
    _add(study, 0.90, 1000, 1.0)
    assert main(["front", str(f), "--format", "json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["drop"] == pytest.approx(0.01) and row["speedup"] is None


def _best_study(tmp_path: Path) -> tuple[Path, str]:
    url = f"sqlite:///{tmp_path / 'best.db'}"
    study = optuna.create_study(study_name="best", storage=url, directions=DIRECTIONS)
    write_study_record(study, StudyRecord(float_baseline=FloatBaseline(0.91, 4000, 1.0)))
    _add(study, 0.900, 1000, 2.0)  # 0: the smallest
    _add(study, 0.902, 1004, 2.0)  # 1: +0.2 points for +4 bytes (within 1 %)
    _add(study, 0.950, 1200, 1.0)  # 2: much more accurate, 20 % larger
    _add(study, 0.800, 900, 1.0)  # 3: smaller still, but over the accuracy limit
    return _file(tmp_path, "best"), url


@pytest.mark.parametrize(
    ("tolerance", "chosen", "words"),
    [
        (None, 1, "most accurate within 1 % of the smallest size: trial 1, +0.2 points for +4 "),
        ("0", 0, "most accurate within 0 % of the smallest size: trial 0, which has the "),
        ("0.25", 2, "most accurate within 25 % of the smallest size: trial 2, +5 points for +200"),
    ],
)
def test_best_takes_the_most_accurate_trial_within_the_tolerance_and_says_so(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    tolerance: str | None,
    chosen: int,
    words: str,
) -> None:
    f, url = _best_study(tmp_path)
    extra = [] if tolerance is None else ["--tolerance", tolerance]
    args = ["best", str(f), "--storage", url, "--max-drop", "0.02", *extra]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith(words), out
    assert f"\ntrial {chosen}\n" in out
    # The storage is not the study file's: the export command names it.
    assert f"export: autoquant export {f} --trial {chosen} --out export-trial{chosen} " in out
    assert f"--storage {url}" in out
    assert main([*args, "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["trial"] == chosen and payload["choice"].startswith(words)


def test_export_commands_mask_the_storage_password() -> None:
    from autoquant.report import export_command

    command = export_command("s.toml", 3, "postgresql://u:s3cr3t@h:5432/db")
    assert command.endswith("--storage 'postgresql://u:***@h:5432/db'")
    assert "s3cr3t" not in command
