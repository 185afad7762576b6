"""Time budgets: ``[study] timeout`` and ``--timeout`` stop starting trials after that wall
time; the trial in flight finishes; ``trials`` may then be omitted."""

from __future__ import annotations

import functools
import logging
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from autoquant.cli import build_parser, main
from autoquant.search import (
    SearchContext,
    StudyFileError,
    _worker,
    load_study_spec,
    parse_duration,
    read_record,
    run_search,
    study_spec_from_dict,
)
from autoquant.search._budget import Deadline, full
from autoquant.search._runs import failure_limit

STUDY = """
[study]
name = "t"
{study}
[task]
name = "digits-cnn"
[space]
w_bits = [4, 8]
"""


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(90, 90.0), (2.5, 2.5), ("90s", 90.0), ("10m", 600.0), ("2h", 7200.0), ("45", 45.0)],
)
def test_durations_parse_to_seconds(value: object, seconds: float) -> None:
    assert parse_duration(value, "study.timeout") == seconds


@pytest.mark.parametrize("value", [0, -5, "soon", "10 minutes", "", True, [10], "1d"])
def test_a_bad_duration_names_the_key_and_the_allowed_values(value: object) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(value, "study.timeout")
    assert str(info.value).startswith(f"study.timeout = {value!r} is not allowed")
    assert '"90s", "10m", "2h"' in str(info.value)


def test_a_timeout_alone_is_a_budget_and_trials_stay_optional(tmp_path: Path) -> None:
    f = tmp_path / "t.toml"
    f.write_text(STUDY.format(study='timeout = "10m"'))
    spec = load_study_spec(f)
    assert (spec.trials, spec.timeout) == (None, 600.0)
    f.write_text(STUDY.format(study="timeout = 30\ntrials = 5"))
    assert (load_study_spec(f).trials, load_study_spec(f).timeout) == (5, 30.0)
    f.write_text(STUDY.format(study=""))
    assert (load_study_spec(f).trials, load_study_spec(f).timeout) == (20, None)
    f.write_text(STUDY.format(study="timeout = 0"))
    with pytest.raises(StudyFileError, match=r"t.toml: study.timeout = 0 is not allowed"):
        load_study_spec(f)


def test_without_count_or_timeout_the_search_refuses_to_start() -> None:
    spec = study_spec_from_dict({"study": {"name": "n"}, "task": {"name": "digits-cnn"}})
    # The spec refuses it when built, before any storage is touched.
    with pytest.raises(ValueError, match="study.trials is missing and there is no study.timeout"):
        run_search(replace(spec, trials=None), storage="sqlite:///:memory:")


def test_budget_helpers_without_a_count_limit() -> None:
    assert not full(10**6, None) and full(3, 3) and not full(2, 3)
    assert failure_limit(None, 2) == 5 and failure_limit(None, 40) == 40
    assert failure_limit(12, 40) == 12


def test_the_cli_takes_timeouts_as_durations() -> None:
    args = build_parser().parse_args(["search", "s.toml", "--timeout", "10m"])
    assert args.timeout == 600.0
    args = build_parser().parse_args(["worker", "s.toml", "--storage", "x://", "--timeout", "90"])
    assert args.timeout == 90.0
    assert build_parser().parse_args(["search", "s.toml"]).timeout is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["search", "s.toml", "--timeout", "soon"])


SPEC = {
    "study": {"name": "timeout", "trials": 10, "seed": 0},
    "task": {"name": "digits-cnn"},
    "space": {"w_bits": [2, 4, 8], "a_bits": [4, 8]},
    "qat": {"steps": 3, "calib_batches": 1},
    "latency": {"warmup": 1, "repeats": 3, "budget_s": 0.05},
    "strategy": {"sensitivity": "off", "prune": False},
}


@pytest.mark.slow
def test_no_trial_starts_after_the_timeout_and_the_one_in_flight_finishes(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A fake clock: each trial takes exactly one "second"; the budget is 2.5 of them.
    now = [0.0]
    monkeypatch.setattr(_worker, "Deadline", functools.partial(Deadline, clock=lambda: now[0]))
    spec = study_spec_from_dict(SPEC, "timeout.toml")
    ctx = SearchContext(spec)
    run_plan = ctx.run_plan

    def one_second_trial(*args: object, **kwargs: object) -> object:
        now[0] += 1.0
        return run_plan(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ctx, "run_plan", one_second_trial)
    caplog.set_level(logging.INFO, logger="autoquant")
    study = run_search(spec, storage="sqlite:///:memory:", ctx=ctx, progress=False, timeout=2.5)
    states = [t.state for t in study.get_trials()]
    # Trials start at t = 0, 1, 2; the third runs past 2.5 s and still completes.
    assert states[:3] == [TrialState.COMPLETE] * 3
    assert TrialState.RUNNING not in states and states.count(TrialState.COMPLETE) == 3
    assert [read_record(t).baseline for t in study.get_trials()][:2] == ["w8a8", "w4a8"]
    messages = [r.getMessage() for r in caplog.records]
    assert any("time budget of 2.5 s reached: 3 trials judged" in m for m in messages)


@pytest.mark.slow
def test_cli_search_with_a_timeout_exits_zero_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("AUTOQUANT_RUNS", str(tmp_path))
    f = tmp_path / "t.toml"
    f.write_text(
        STUDY.format(study='timeout = "1h"')
        + "[qat]\nsteps = 2\ncalib_batches = 1\n[strategy]\nsensitivity = 'off'\nprune = false\n"
    )
    caplog.set_level(logging.INFO, logger="autoquant")
    assert main(["search", str(f), "-q", "--timeout", "0.001"]) == 0  # --timeout wins
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{tmp_path / 't' / 'study.db'}")
    assert not study.get_trials(states=(TrialState.COMPLETE, TrialState.RUNNING))
    lines = [r.getMessage() for r in caplog.records if "time budget" in r.getMessage()]
    assert len(lines) == 1 and "rerun to continue" in lines[0] and "\n" not in lines[0]
