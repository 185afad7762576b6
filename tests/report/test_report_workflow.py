"""Reports of failed and empty studies, escaping, atomic folders, deployment flags, and the
tolerance rule of ``best`` and the recommendations."""

from __future__ import annotations

import errno
import math
import re
from collections.abc import Callable
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from autoquant.report import (
    best_choice,
    best_trial,
    front_frame,
    recommendations,
    trials_frame,
    write_report,
)
from autoquant.search import (
    DeploymentCheck,
    FloatBaseline,
    OutputFolderError,
    StudyRecord,
    TrialRecord,
    read_float_baseline,
    read_record,
    record_attrs,
    write_deployed_check,
    write_study_record,
)
from autoquant.types import LayerPlan, QuantPlan, QuantSpec

pytest.importorskip("matplotlib")
DIRECTIONS = ["maximize", "minimize", "minimize"]
LAYERS = [{"name": "fc", "type_name": "Linear", "params": 100, "macs": 100}]
PLAN = QuantPlan({"fc": LayerPlan(weight=QuantSpec(bits=4), activation=QuantSpec(bits=8))})


def _failed_study(*, baseline: bool) -> optuna.Study:
    """What a search whose task is broken leaves: (a float baseline,) layers, failed trials."""
    study = optuna.create_study(directions=DIRECTIONS)
    write_study_record(
        study,
        StudyRecord(
            spec={"name": "broken", "max_accuracy_drop": 0.01},
            layers=LAYERS,
            float_baseline=FloatBaseline(0.9, 400, 1.0) if baseline else None,
        ),
    )
    for i in range(3):
        study.add_trial(
            optuna.trial.create_trial(
                state=TrialState.FAIL,
                user_attrs=record_attrs(
                    TrialRecord(run="run-1", fail_reason=f"ValueError: broken task {i}")
                ),
            )
        )
    return study


@pytest.mark.parametrize("baseline", [True, False], ids=["all-failed", "no-baseline"])
def test_a_study_without_complete_trials_gets_a_report_that_says_so(
    tmp_path: Path, baseline: bool
) -> None:
    paths = write_report(_failed_study(baseline=baseline), tmp_path / "r")
    page = paths["html"].read_text(encoding="utf-8")
    md = paths["markdown"].read_text(encoding="utf-8")
    for text in (page, md):
        assert "This study has no complete trial yet (3 failed, 0 pruned, 0 running)" in text
        assert "ValueError: broken task 2" in text and "run-1" in text
    assert page.count("No trial qualifies.") == 3
    if baseline:
        assert page.count("<svg") == 5
    else:
        assert page.count("<svg") == 0 and page.count("Not drawn: the study has no float") == 5
        assert "not measured yet" in page
        assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [
            "front.csv",
            "plots",
            "report.html",
            "report.md",
            "trials.csv",
        ]
    assert len(pd.read_csv(paths["trials_csv"])) == 3


def test_stored_values_are_escaped_in_both_reports(tmp_path: Path) -> None:
    study = optuna.create_study(directions=DIRECTIONS)
    write_study_record(
        study, StudyRecord(layers=LAYERS, float_baseline=FloatBaseline(0.9, 400, 1.0))
    )
    evil = "<script>alert(1)</script>"
    for acc, size in ((0.9, 100), (0.89, 50)):
        study.add_trial(
            optuna.trial.create_trial(
                values=[acc, size, 1.0],
                user_attrs=record_attrs(
                    TrialRecord(
                        plan=PLAN.to_dict(),
                        plan_summary=evil,
                        baseline="<b>w8a8</b>",
                        accuracy=acc,
                        accuracy_drop=0.9 - acc,
                        size_bytes=size,
                        latency_ms=1.0,
                    )
                ),
            )
        )
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.FAIL,
            user_attrs=record_attrs(TrialRecord(fail_reason="<img src=x onerror=alert(2)>")),
        )
    )
    paths = write_report(study, tmp_path / "r")
    for key in ("html", "markdown"):
        text = paths[key].read_text(encoding="utf-8")
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text and "&lt;img src=x" in text
        assert not re.search(r"<(script|img|b)\b", text), key


def test_report_folders_are_refused_replaced_and_written_atomically(
    make_toy_study: Callable[..., optuna.Study],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    study = make_toy_study(None, n_random=2)
    out = tmp_path / "r"
    write_report(study, out)
    (out / "report.md").write_text("old")
    with pytest.raises(OutputFolderError, match=r"--out .* is not empty \(front.csv, plots/"):
        write_report(study, out)
    assert (out / "report.md").read_text() == "old"
    write_report(study, out, force=True)  # a previous report: replaced
    assert (out / "report.md").read_text().startswith("# autoquant report: toy")
    (out / "plots" / "mine.svg").write_text("x")
    with pytest.raises(OutputFolderError, match=r"not part of an autoquant report \(plots/mine"):
        write_report(study, out, force=True)
    assert (out / "plots" / "mine.svg").read_text() == "x"
    with pytest.raises(OutputFolderError, match="is a file, not a folder"):
        write_report(study, out / "report.md")

    def full_disk(self: object, *args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_report(study, tmp_path / "full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_failed_deployment_checks_are_flagged_in_front_and_report(
    make_toy_study: Callable[..., optuna.Study], tmp_path: Path
) -> None:
    study = make_toy_study(None, n_random=2)
    front = front_frame(study, 0.01)
    assert set(front["deployed"]) == {""}
    bad, good = (int(n) for n in front["trial"][:2])
    acc = read_record(study.trials[bad]).accuracy
    fb = read_float_baseline(study)
    failing = DeploymentCheck(bad, "onnxruntime", acc - 0.0111, acc, fb.accuracy, 0.01)
    write_deployed_check(study, bad, failing.to_dict())
    write_deployed_check(study, good, {**failing.to_dict(), "ok": True})
    front = front_frame(study, 0.01).set_index("trial")
    assert front.loc[bad, "deployed"] == "FAILED: mismatch, over limit"
    assert front.loc[good, "deployed"] == "ok"
    assert trials_frame(study).set_index("trial").loc[bad, "deployed"].startswith("FAILED")
    paths = write_report(study, tmp_path / "r")
    page = paths["html"].read_text(encoding="utf-8")
    assert 'id="deployed-warnings"' in page
    assert f"trial {bad}: WARNING: the deployed model failed its check" in page
    assert "1.11 points apart" in page and f"trial {good}: WARNING" not in page


def test_deployment_check_conditions() -> None:
    def check(deployed: float, simulated: float = 0.9, max_drop: float | None = 0.01):
        return DeploymentCheck(0, "onnxruntime", deployed, simulated, 0.905, max_drop)

    assert check(0.9).ok
    assert check(0.895).ok  # exactly 0.5 points apart, drop exactly 1 point
    assert check(0.8949).mismatch and check(0.8949).over_limit
    assert check(0.9051, 0.9).mismatch and not check(0.9051, 0.9).over_limit  # too good
    assert check(0.894, 0.896).over_limit and not check(0.894, 0.896).mismatch
    assert check(0.5, 0.5, None).ok and check(0.5, 0.5, None).problems() == []


# -- best within a tolerance --------------------------------------------------------------------


def _reference(study: optuna.Study, max_drop: float, attr: str, tol: float) -> int | None:
    """Independent reference: the optimum by brute force, then the most accurate within it."""
    other = "latency_ms" if attr == "size_bytes" else "size_bytes"
    base = read_float_baseline(study).accuracy
    rows = []
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        r = read_record(t)
        if base - r.accuracy <= max_drop + 1e-9:
            rows.append((getattr(r, attr), r.accuracy, getattr(r, other), t.number))
    if not rows:
        return None
    best = min(rows, key=lambda x: (x[0], -x[1], x[2], x[3]))[0]
    within = [x for x in rows if x[0] <= (1 + tol) * best * (1 + 1e-12)]
    return min(within, key=lambda x: (-x[1], x[0], x[2], x[3]))[3]


@pytest.mark.parametrize("tol", [0.0, 0.01, 0.05, 0.3])
@pytest.mark.parametrize(("minimize", "attr"), [("size", "size_bytes"), ("latency", "latency_ms")])
@pytest.mark.parametrize("max_drop", [0.004, 0.01, 0.03])
def test_best_within_tolerance_matches_brute_force(
    large_toy: optuna.Study, tol: float, minimize: str, attr: str, max_drop: float
) -> None:
    t = best_trial(large_toy, max_drop=max_drop, minimize=minimize, tolerance=tol)
    assert (None if t is None else t.number) == _reference(large_toy, max_drop, attr, tol)


@pytest.fixture(scope="module")
def large_toy(make_toy_study: Callable[..., optuna.Study]) -> optuna.Study:
    return make_toy_study(None, n_random=40, seed=5)


def test_the_tolerance_changes_the_choice_on_the_toy_study(large_toy: optuna.Study) -> None:
    # Not vacuous: on this study some tolerance picks another trial than the optimum.
    study = large_toy
    picks = {
        tol: best_trial(study, max_drop=0.03, minimize="size", tolerance=tol).number
        for tol in (0.0, 0.05, 0.3)
    }
    assert len(set(picks.values())) > 1, picks


def test_recommendations_use_the_same_rule_and_say_so() -> None:
    study = optuna.create_study(directions=DIRECTIONS)
    write_study_record(
        study, StudyRecord(layers=LAYERS, float_baseline=FloatBaseline(0.91, 4000, 1.0))
    )
    for acc, size, lat in [(0.900, 1000, 2.0), (0.902, 1004, 2.0), (0.95, 1200, 1.0)]:
        study.add_trial(
            optuna.trial.create_trial(
                values=[acc, size, lat],
                user_attrs=record_attrs(
                    TrialRecord(
                        plan=PLAN.to_dict(),
                        accuracy=acc,
                        accuracy_drop=0.91 - acc,
                        size_bytes=size,
                        latency_ms=lat,
                    )
                ),
            )
        )
    (smallest, fastest, _) = recommendations(study, max_drop=0.02, storage="sqlite:///x.db")
    assert smallest["trial"] == 1
    assert smallest["choice"] == (
        "most accurate within 1 % of the smallest size: trial 1, +0.2 points for +4 bytes "
        "(trial 0 has the smallest size)"
    )
    assert smallest["command"].endswith("--out export-trial1 --storage sqlite:///x.db")
    assert fastest["trial"] == 2 and fastest["choice"].endswith(
        "which has the lowest latency itself"
    )
    exact = recommendations(study, max_drop=0.02, tolerance=0.0)[0]
    assert exact["trial"] == 0 and "command" in exact and "--storage" not in exact["command"]
    with pytest.raises(ValueError, match=r"tolerance=inf is not allowed; allowed values: a"):
        best_choice(study, max_drop=0.02, minimize="size", tolerance=math.inf)
