"""Optuna's internals are used in ``autoquant/search/_optuna_compat.py`` only, and what that
module wraps still works with the installed Optuna (lost trials failed and retried)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from autoquant.search import TrialRecord, open_storage, read_record, write_record
from autoquant.search._liveness import MAX_RETRY, fail_lost_trials
from autoquant.search._record import WORKER_LOST

PACKAGE = Path(__file__).resolve().parents[2] / "autoquant"
COMPAT = PACKAGE / "search" / "_optuna_compat.py"

# The grep, over the code that uses Optuna (search, report, cli).
LITERAL = re.compile(r"\._storage\b|_study_id|_trial_id|_heartbeat|_rng")
# Optuna's private names and implementation details, over the whole package.
PRIVATE = re.compile(
    r"\._(storage|study_id|trial_id|rng|random_sampler|independent_sampler|backend)\b"
    r"|optuna(\.\w+)*\._\w+"  # a private Optuna module, e.g. optuna.storages._heartbeat
    r"|from optuna[\w.]* import \(?\s*_"  # a private name imported from Optuna
    r"|_get_stale_trial_ids|get_heartbeat_stale_trial_callback|record_heartbeat"
    r"|[\"'](_rng|_random_sampler|_independent_sampler|failed_trial|retry_history)[\"']"
    r"|\bsystem_attrs\b|\bscoped_session\b"
)


def _hits(pattern: re.Pattern[str], files: list[Path]) -> list[str]:
    return [
        f"{path.relative_to(PACKAGE.parent)}:{i}: {line.strip()}"
        for path in files
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.search(line)
    ]


def test_optuna_internals_appear_only_in_the_compat_module() -> None:
    optuna_users = [
        *sorted((PACKAGE / "search").glob("*.py")),
        *sorted((PACKAGE / "report").glob("*.py")),
        PACKAGE / "cli.py",
    ]
    others = [p for p in optuna_users if p != COMPAT]
    assert _hits(LITERAL, others) == []
    assert _hits(PRIVATE, [p for p in sorted(PACKAGE.rglob("*.py")) if p != COMPAT]) == []
    # The patterns are not vacuous: they find what the compat module wraps.
    compat_text = COMPAT.read_text(encoding="utf-8")
    for name in ("._storage", "._study_id", "._trial_id", "_heartbeat", "_rng"):
        assert name in compat_text and LITERAL.search(name)
    assert len(_hits(PRIVATE, [COMPAT])) >= 8


@pytest.mark.parametrize(
    "line",
    [
        "storage = study._storage",
        "trial._trial_id",
        "from optuna.storages._heartbeat import is_heartbeat_enabled",
        "from optuna.samplers import _lazy_random_state",
        'getattr(sampler, "_rng")',
        'trial.system_attrs.get("failed_trial")',
    ],
)
def test_the_scan_catches_each_kind_of_internal(line: str) -> None:
    assert PRIVATE.search(line)


@pytest.mark.filterwarnings(
    "ignore:Heartbeat of storage is supposed to be used with Study.optimize"
)
def test_a_lost_trial_is_failed_with_its_reason_and_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTOQUANT_HEARTBEAT_S", "0.2")
    monkeypatch.setenv("AUTOQUANT_GRACE_S", "1")
    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path / 'lost.db'}"))
    trial = study.ask({"x": optuna.distributions.IntDistribution(0, 9)})
    write_record(trial, TrialRecord(worker="dead:1", baseline="w8a8", accuracy=0.5))
    from autoquant.search import _optuna_compat as compat

    compat.trial_beat(study, trial)()  # one heartbeat, then the worker "dies"
    assert fail_lost_trials(study) == []  # still within the grace period
    time.sleep(2.2)  # SQLite times heartbeats to the second: stale once 2 s have passed
    assert fail_lost_trials(study) == [trial.number]
    assert fail_lost_trials(study) == []  # failed once, by whoever noticed first

    lost, retry = study.get_trials()
    assert lost.state == TrialState.FAIL
    assert read_record(lost).fail_reason == (
        f"{WORKER_LOST}: no heartbeat for 1 s (worker killed, crashed or disconnected); "
        f"queued again up to {MAX_RETRY} times"
    )
    assert retry.state == TrialState.WAITING and retry.params == lost.params
    # The retry keeps the plan and the baseline mark, not the lost run's outcome.
    assert read_record(retry) == TrialRecord(baseline="w8a8", retry_of=lost.number)
    assert compat.retried_number(retry) == lost.number and compat.retries_used(retry) == 1
