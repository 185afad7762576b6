"""The exact budget: which trials hold one of the study's ``trials`` slots.

A trial counts the *slots* taken before it: trials with a lower number (a retry has the
number of the trial it retries) that are complete, running, queued, or waiting for their
retry. When those fill the budget, the trial is pruned before any work; so the number of
complete trials equals the budget exactly, however many workers there are.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from optuna.trial import FrozenTrial, TrialState

from ._liveness import MAX_RETRY
from ._optuna_compat import retried_number, retries_used
from ._record import read_record

RETRY_WINDOW_S = 60.0  # how long a lost trial keeps its budget slot before its retry appears


def slot(trial: FrozenTrial) -> int:
    """The budget slot of a trial: its number, or for a retry the number of the original."""
    original = retried_number(trial)
    return trial.number if original is None else original


def _holds_slot(trial: FrozenTrial, now: datetime) -> bool:
    if trial.state in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING):
        return True
    record = read_record(trial) if trial.state == TrialState.FAIL else None
    if record is not None and (record.worker_lost or record.infrastructure):
        # Lost, or stopped by the storage, and queued again (or about to be).
        will_retry = retries_used(trial) < MAX_RETRY
        ended = trial.datetime_complete
        return will_retry and (ended is None or (now - ended).total_seconds() < RETRY_WINDOW_S)
    return False


def taken_slots(trials: Sequence[FrozenTrial], before: int | None = None) -> int:
    """Budget slots held by complete, running, queued or about-to-be-retried trials.

    Args:
        trials: the study's trials.
        before: count only slots lower than this one.

    Example:
        >>> import optuna
        >>> done = optuna.trial.create_trial(value=1.0)
        >>> taken_slots([done])
        1
    """
    now = datetime.now()
    return len(
        {slot(t) for t in trials if (before is None or slot(t) < before) and _holds_slot(t, now)}
    )


def counted_failure(trial: FrozenTrial) -> bool:
    """A failure that counts towards the stop after max(5, trials) failures: not a lost
    worker's trial (it is retried), not an interrupted one (a rerun resumes) and not one the
    storage failed under ("infrastructure: ...", retried).

    Example:
        >>> import optuna
        >>> from autoquant.search import TrialRecord, record_attrs
        >>> def failed(reason):
        ...     attrs = record_attrs(TrialRecord(fail_reason=reason))
        ...     return optuna.trial.create_trial(state=TrialState.FAIL, user_attrs=attrs)
        >>> counted_failure(failed("ValueError: x")), counted_failure(failed("infrastructure: x"))
        (True, False)
    """
    if trial.state != TrialState.FAIL:
        return False
    record = read_record(trial)
    return not (record.worker_lost or record.interrupted or record.infrastructure)
