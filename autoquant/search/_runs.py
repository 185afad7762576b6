"""Runs: one call of :func:`run_search` (one ``autoquant search`` or ``worker`` process).

Each run has an id, recorded on every trial it starts (``TrialRecord.run``). The search stops
after ``max(5, trials)`` failures *of its own run*: failures of earlier runs (a task that was
broken and has since been fixed) do not stop a rerun, and ``autoquant front STUDY --failed``
still lists them all with their run. Lost workers' trials (retried) and interrupted ones
(resumed) never count.

Example:
    >>> import optuna
    >>> from autoquant.search import TrialRecord, record_attrs
    >>> old = optuna.trial.create_trial(
    ...     state=optuna.trial.TrialState.FAIL,
    ...     user_attrs=record_attrs(TrialRecord(run="r1", fail_reason="ValueError: x")),
    ... )
    >>> run_failures([old], "r1"), run_failures([old], "r2")
    (1, 0)
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial

from ._budget import counted_failure, judged
from ._record import read_record

MIN_FAILURE_LIMIT = 5


def new_run_id() -> str:
    """A unique, readable run id: start time plus a random suffix, e.g.
    ``2026-11-30T09:12:03-1f2e3d``."""
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S')}-{uuid.uuid4().hex[:6]}"


def failure_limit(budget: int | None, judged_so_far: int = 0) -> int:
    """Failed trials of one run after which it stops: ``max(5, trials)``; without a count
    limit, ``max(5, judged trials so far)`` (a search that fails more often than not stops)."""
    return max(MIN_FAILURE_LIMIT, budget if budget is not None else judged_so_far)


def run_failures(trials: Sequence[FrozenTrial], run: str) -> int:
    """Failures of run ``run`` that count towards its stop (see the module docstring)."""
    return sum(counted_failure(t) and read_record(t).run == run for t in trials)


@dataclass(frozen=True)
class RunOutcome:
    """How a run ended: the study's judged trials (complete, or stopped by the pruning rule)
    against the budget (None: no count limit), and the failures of this run.

    Example:
        >>> RunOutcome("r1", budget=10, complete=3, failed=10).stopped_on_failures
        True
    """

    run: str
    budget: int | None
    complete: int  # judged trials of the study
    failed: int  # counted failures of this run

    @property
    def limit(self) -> int:
        return failure_limit(self.budget, self.complete)

    @property
    def stopped_on_failures(self) -> bool:
        """The run stopped short of the budget because too many of its trials failed."""
        short = self.budget is None or self.complete < self.budget
        return short and self.failed >= self.limit

    def summary(self, front_failed: str) -> str:
        """One line for a run that stopped on failures; ``front_failed`` is the command that
        lists them (``autoquant front STUDY --failed``)."""
        of = "" if self.budget is None else f" of {self.budget}"
        return (
            f"stopped short: {self.complete}{of} trials judged, and "
            f"{self.failed} trials of this run failed (the limit is max(5, trials) = "
            f"{self.limit}); see `{front_failed}`, fix the cause and rerun: earlier "
            "failures do not count against the rerun"
        )


def run_outcome(study: optuna.Study, run: str, budget: int | None) -> RunOutcome:
    """The outcome of run ``run`` on ``study`` with ``budget`` judged trials wanted."""
    trials = study.get_trials(deepcopy=False)
    return RunOutcome(
        run=run,
        budget=budget,
        complete=sum(judged(t) for t in trials),
        failed=run_failures(trials, run),
    )
