"""Liveness of workers: heartbeat settings, lost trials failed with a reason, and their retries.

A worker records its running trial's heartbeat every ``AUTOQUANT_HEARTBEAT_S`` seconds (the
worker loop, :mod:`autoquant.search._worker`). A running trial without a heartbeat for
``AUTOQUANT_GRACE_S`` seconds is failed with the ``fail_reason`` "worker lost: ..." and queued
again (up to :data:`MAX_RETRY` times) by whichever worker notices first
(:func:`fail_lost_trials`); the retry keeps the plan and the ``baseline`` mark and records
``retry_of``.
"""

from __future__ import annotations

import logging
import os
from datetime import datetime

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from . import _optuna_compat as compat
from ._record import WORKER_LOST, TrialRecord, read_record, record_attrs, retry_record, write_record

log = logging.getLogger("autoquant")

HEARTBEAT_S = 10.0  # default of AUTOQUANT_HEARTBEAT_S: how often a worker proves it is alive
GRACE_S = 60.0  # default of AUTOQUANT_GRACE_S: a trial silent this long is failed and retried
CLAIM_TIMEOUT_S = 600.0  # default of AUTOQUANT_CLAIM_TIMEOUT_S: longest wait for another worker
MAX_RETRY = 2  # times a trial whose worker was lost is queued again


def env_seconds(name: str, default: float) -> float:
    """A duration from the environment variable ``name`` (> 0), else ``default``."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{name}={raw!r} is not allowed; allowed values: a number of seconds > 0")
    return value


def heartbeat_s() -> float:
    """Seconds between heartbeats: ``AUTOQUANT_HEARTBEAT_S`` (default 10)."""
    return env_seconds("AUTOQUANT_HEARTBEAT_S", HEARTBEAT_S)


def grace_s() -> float:
    """Seconds without a heartbeat before a trial counts as lost: ``AUTOQUANT_GRACE_S`` (60).

    Raises:
        ValueError: it is less than 2 × ``AUTOQUANT_HEARTBEAT_S``: one late beat would fail a
            healthy trial as "worker lost".
    """
    grace, beat = env_seconds("AUTOQUANT_GRACE_S", GRACE_S), heartbeat_s()
    if grace < 2 * beat:
        raise ValueError(
            f"AUTOQUANT_GRACE_S={grace:g} is not allowed with AUTOQUANT_HEARTBEAT_S={beat:g}; "
            f"allowed values: >= 2 x AUTOQUANT_HEARTBEAT_S = {2 * beat:g} seconds (a healthy "
            "trial must be able to miss one heartbeat)"
        )
    return grace


def claim_timeout_s() -> float:
    """Longest wait for another worker's result: ``AUTOQUANT_CLAIM_TIMEOUT_S`` (600)."""
    return env_seconds("AUTOQUANT_CLAIM_TIMEOUT_S", CLAIM_TIMEOUT_S)


def _retry_attrs(lost: FrozenTrial) -> dict[str, object]:
    return record_attrs(retry_record(read_record(lost), lost.number))


def retry_lost_trial(max_retry: int | None = MAX_RETRY) -> compat.RetryStaleTrial:
    """The storage's callback for a lost trial: queue it again, minus the lost run's outcome."""
    return compat.RetryStaleTrial(max_retry, _retry_attrs)


def fail_lost_trials(study: optuna.Study) -> list[int]:
    """Fail running trials whose worker stopped beating, with a reason, and queue retries.

    Like :func:`optuna.storages.fail_stale_trials` (same stale test, same retry callback),
    but it records the ``fail_reason`` first. Trials created but never beaten (a worker killed
    between creating a trial and its first heartbeat) count as lost after 5 grace periods.

    Returns:
        The numbers of the trials failed here.
    """
    if not compat.beats_enabled(study):
        return []
    grace = grace_s()
    lost = {t.number: t for t in compat.stale_trials(study)}
    now = datetime.now()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        started = t.datetime_start
        if (
            read_record(t).worker is None
            and started
            and (now - started).total_seconds() > max(5 * grace, 300)
        ):
            lost[t.number] = t
    reason = (
        f"{WORKER_LOST}: no heartbeat for {grace:g} s (worker killed, crashed or "
        f"disconnected); queued again up to {MAX_RETRY} times"
    )
    failed = []
    for number in sorted(lost):
        trial = lost[number]
        try:
            write_record(compat.TrialAttrWriter(study, trial), TrialRecord(fail_reason=reason))
            if compat.set_failed(study, trial):
                failed.append(trial)
        except UpdateFinishedTrialError:  # finished meanwhile, or failed by another worker
            continue
    for trial in failed:
        log.warning("trial %d: %s", trial.number, reason)
        compat.retry_stale_trial(study, trial)
    return [t.number for t in failed]
