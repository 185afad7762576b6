"""The exact budget: which trials hold one of the study's ``trials`` slots; the time budget.

``trials`` counts the plans *judged*: complete trials, and trials stopped early by the pruning
rule (:mod:`autoquant.search._pruning`, a ``pruned`` record). A trial pruned because the
budget was already full (no ``pruned`` record, a ``fail_reason`` "budget of ...") judged
nothing and holds no slot.

A trial counts the *slots* taken before it: trials with a lower number (a retry has the
number of the trial it retries) that are judged, running, queued, or waiting for their
retry. When those fill the budget, the trial is pruned before any work; so the number of
judged trials equals the budget exactly, however many workers there are. Without pruning,
judged means complete.

``trials = None`` is no count limit (a study file with a ``timeout`` and no ``trials``): no
slot is ever full. :class:`Deadline` is the wall-clock budget (``[study] timeout``,
``--timeout``): no trial starts after it; the trial in flight finishes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from datetime import datetime

import optuna
from optuna.trial import FrozenTrial, TrialState

from ._liveness import MAX_RETRY
from ._optuna_compat import retried_number, retries_used
from ._record import read_record
from ._strategy import format_duration

log = logging.getLogger("autoquant")

RETRY_WINDOW_S = 60.0  # how long a lost trial keeps its budget slot before its retry appears


def slot(trial: FrozenTrial) -> int:
    """The budget slot of a trial: its number, or for a retry the number of the original."""
    original = retried_number(trial)
    return trial.number if original is None else original


def judged(trial: FrozenTrial) -> bool:
    """Complete, or stopped early by the pruning rule: a plan judged, holding a budget slot.

    Example:
        >>> import optuna
        >>> judged(optuna.trial.create_trial(value=1.0))
        True
    """
    if trial.state == TrialState.COMPLETE:
        return True
    return trial.state == TrialState.PRUNED and read_record(trial).pruned is not None


def _holds_slot(trial: FrozenTrial, now: datetime) -> bool:
    if trial.state in (TrialState.RUNNING, TrialState.WAITING) or judged(trial):
        return True
    record = read_record(trial) if trial.state == TrialState.FAIL else None
    if record is not None and (record.worker_lost or record.infrastructure):
        # Lost, or stopped by the storage, and queued again (or about to be).
        will_retry = retries_used(trial) < MAX_RETRY
        ended = trial.datetime_complete
        return will_retry and (ended is None or (now - ended).total_seconds() < RETRY_WINDOW_S)
    return False


def taken_slots(trials: Sequence[FrozenTrial], before: int | None = None) -> int:
    """Budget slots held by judged, running, queued or about-to-be-retried trials.

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


def full(taken: int, budget: int | None) -> bool:
    """Whether ``taken`` slots fill ``budget`` (never without a count limit)."""
    return budget is not None and taken >= budget


class Deadline:
    """The wall-clock budget of one worker: ``seconds`` from its creation (None: none).

    Example:
        >>> now = [0.0]
        >>> d = Deadline(10.0, clock=lambda: now[0])
        >>> d.expired(), d.remaining()
        (False, 10.0)
        >>> now[0] = 10.0; d.expired()
        True
    """

    def __init__(self, seconds: float | None, clock: Callable[[], float] = time.monotonic):
        if seconds is not None and not seconds > 0:
            raise ValueError(f"timeout={seconds!r} is not allowed; allowed values: seconds > 0")
        self.seconds = seconds
        self.clock = clock
        self.start = clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def remaining(self) -> float | None:
        return None if self.seconds is None else self.seconds - self.elapsed()

    def expired(self) -> bool:
        return self.seconds is not None and self.elapsed() >= self.seconds

    def reached(self, study: optuna.Study) -> bool:
        """:meth:`expired`, saying so in one log line (the trials judged so far)."""
        if not self.expired():
            return False
        done = sum(judged(t) for t in study.get_trials(deepcopy=False))
        log.info(
            "time budget of %s reached: %d trials judged; no new trial starts (rerun to "
            "continue the study)",
            format_duration(self.seconds or 0.0),
            done,
        )
        return True
