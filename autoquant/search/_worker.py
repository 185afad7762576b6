"""The worker loop: ask a trial, run it with heartbeats, tell the result; nothing else.

Any number of workers (processes, on one machine or many) may run :func:`run_search` on the
same study in a shared storage (PostgreSQL, or SQLite on one machine):

* **Budget.** A trial counts the *slots* taken before it: trials with a lower number (a retry
  has the number of the trial it retries) that are judged (complete, or stopped by the
  pruning rule), running, queued, or waiting for their retry. When those fill the budget, the
  trial is pruned before any work; so the number of judged trials equals the budget exactly,
  however many workers there are (:mod:`autoquant.search._budget`). A ``timeout`` stops
  starting trials after that wall time (the trial in flight finishes).
* **Strategy.** After the baselines, the sensitivity pre-pass (once per study,
  :mod:`autoquant.search._prepass`), then solver-proposed plans, refreshed as trials complete
  (:mod:`autoquant.search._proposals`); trials may stop early (:mod:`autoquant.search._pruning`).
* **Liveness.** A worker records its trial's heartbeat every ``AUTOQUANT_HEARTBEAT_S``
  seconds. A running trial without a heartbeat for ``AUTOQUANT_GRACE_S`` seconds is failed
  with the ``fail_reason`` "worker lost: ..." and queued again (up to ``MAX_RETRY`` times) by
  whichever worker notices first; workers stay until the budget is complete, so the last live
  worker cleans up after dead ones (:mod:`autoquant.search._liveness`).
* **Shared measurements.** The float baseline and every latency measurement are claimed
  through the storage (see :mod:`autoquant.search._locks`): one worker measures, the others
  wait for its result (:mod:`autoquant.search._baselines`).
* **Faults.** Ctrl-C (or SIGTERM) fails the trial in flight with the ``fail_reason``
  "interrupted (...)" and stops; a rerun resumes (:mod:`autoquant.search._signals`). An
  exception in the trial (task code, NaN loss, out of memory) fails that trial with its
  reason, and the search goes on (:mod:`autoquant.search._trial`).

What a trial runs is :func:`autoquant.search._trial.make_objective`; what it stores is a
:class:`~autoquant.search.TrialRecord`.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import warnings
from collections.abc import Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from autoquant.measure import LatencyCache

from . import _optuna_compat as compat
from ._baselines import enqueue_baselines, ensure_float_baseline
from ._budget import Deadline, full, judged, taken_slots
from ._context import SearchContext, build_context
from ._driver import StrategyDriver
from ._liveness import (
    claim_timeout_s,
    fail_lost_trials,
    grace_s,
    heartbeat_s,
    mark_owner,
    queue_retry,
    reap_dead_workers,
)
from ._locks import Beater, ClaimingAttrStore, Claims
from ._progress import Progress
from ._record import TrialRecord, read_record, write_record
from ._remeasure import remeasure_front
from ._resume import check_space_unchanged
from ._runs import failure_limit, new_run_id, run_failures
from ._signals import InfrastructureError, abandon_reason, sigterm_as_interrupt
from ._spec import StudySpec
from ._storages import load_study
from ._trial import make_objective

log = logging.getLogger("autoquant")

Objective = Callable[[optuna.Trial], list[float]]


def run_search(
    spec: StudySpec,
    *,
    trials: int | None = None,
    storage: str | None = None,
    progress: bool = True,
    ctx: SearchContext | None = None,
    run: str | None = None,
    timeout: float | None = None,
) -> optuna.Study:
    """Run, resume or join a study until exactly ``trials`` trials are judged, or ``timeout``.

    Any number of processes may call this on the same study and storage (see the module
    docstring). A trial that fails (NaN loss, an exception in task code, out of memory) is
    recorded as FAIL with its ``fail_reason`` and the search goes on; Ctrl-C fails the trial
    in flight as "interrupted" and raises KeyboardInterrupt. Rerunning resumes.

    Args:
        spec: the study.
        trials: plans to judge (default the study file's; None there: no count limit).
        storage: storage URL (default the study file's, else SQLite under ``runs_dir()``).
        progress: show a progress bar.
        ctx: a prepared search context (tests, benchmarks); its ``spec`` is the one the
            trials and the strategy follow.
        run: names this run (default: a new id, see :mod:`autoquant.search._runs`); the
            search stops after ``max(5, trials)`` failures of this run, and
            :func:`run_outcome` tells whether it did.
        timeout: seconds of wall time after which no trial starts (default the study
            file's ``[study] timeout``); the trial in flight finishes.

    A study file whose search space differs from the stored study's stops before any trial
    with :class:`SpaceChangedError`.

    Example:
        >>> study = run_search(load_study_spec("studies/digits.toml"), trials=4)  # doctest: +SKIP
    """
    deadline = Deadline(timeout if timeout is not None else spec.timeout)
    budget = trials or spec.trials
    if budget is None and deadline.seconds is None:
        raise ValueError(
            f"study {spec.name!r} has neither a trial count nor a timeout: set [study] trials "
            "or timeout (or pass trials= / timeout=)"
        )
    run = run or new_run_id()
    study = load_study(spec, storage)
    beater = Beater(heartbeat_s())
    claims = Claims(
        compat.storage_of(study),
        spec.name,
        beater=beater,
        grace_s=grace_s(),
        timeout_s=claim_timeout_s(),
    )
    worker = f"{socket.gethostname()}:{os.getpid()}"
    bar: Progress | None = None
    try:
        with sigterm_as_interrupt():
            reap_dead_workers(study, claims)  # a rerun after kill -9 need not wait
            ctx = ctx or build_context(spec, LatencyCache(store=ClaimingAttrStore(study, claims)))
            check_space_unchanged(study, ctx)  # before any trial: Optuna cannot mix spaces
            baseline = ensure_float_baseline(study, ctx, claims)
            enqueue_baselines(study, ctx, claims)  # again: earlier ones may be interrupted
            driver = StrategyDriver(study, ctx, claims, budget, baseline)  # the pre-pass
            objective = make_objective(
                study, ctx, budget, worker, baseline=baseline, run=run, pruner=driver.pruner
            )
            if progress:
                bar = Progress(study, spec, budget)
            _work(study, objective, beater, claims, budget, bar, spec, run, deadline, driver)
            if bar:
                bar.close()
                bar = None
            if spec.latency.remeasure_front and "latency" in spec.objectives:
                remeasure_front(study, ctx, claims)
    finally:
        claims.release_all()
        beater.close()
        if bar:
            bar.close()
    return study


def _work(
    study: optuna.Study,
    objective: Objective,
    beater: Beater,
    claims: Claims,
    budget: int | None,
    bar: Progress | None,
    spec: StudySpec,
    run: str,
    deadline: Deadline,
    driver: StrategyDriver,
) -> None:
    """The worker loop: run trials while budget slots are free; else wait for other workers."""
    heartbeats = compat.beats_enabled(study)
    poll_s = min(heartbeat_s(), 2.0)
    waiting_since: float | None = None
    while True:
        if deadline.reached(study):
            return
        fail_lost_trials(study)
        trials = study.get_trials(deepcopy=False)
        done = sum(judged(t) for t in trials)
        running = any(t.state == TrialState.RUNNING for t in trials)
        if full(done, budget):
            # Stay a moment for trials still running: a worker killed while its trial was
            # about to be pruned leaves it RUNNING; fail it rather than leave it forever.
            if not (running and heartbeats):
                return
            waiting_since = waiting_since or time.monotonic()
            if time.monotonic() - waiting_since > grace_s() + 2 * heartbeat_s():
                return
            time.sleep(poll_s)
            continue
        max_failures = failure_limit(budget, done)
        if run_failures(trials, run) >= max_failures:  # earlier runs' failures do not count
            log.error(
                "stopping: %d trials of this run failed; see `autoquant front %s --failed`",
                max_failures,
                spec.source or spec.name,
            )
            return
        queued = any(t.state == TrialState.WAITING for t in trials)
        if queued or not full(taken_slots(trials), budget):
            waiting_since = None
            driver.before_trial()  # a proposal round, when one is due
            frozen = _run_trial(study, objective, beater, claims)
            if bar:
                bar(study, frozen)
            continue
        # Running trials fill the budget. Without heartbeats a dead worker's trial cannot be
        # told from a live one: leave. With them, stay until they end, to retry the trials
        # of workers that die (the last live worker cleans up after the dead).
        if not heartbeats:
            return
        if waiting_since is None:
            waiting_since = time.monotonic()
            log.info("waiting for the running trials of other workers to finish")
        if bar:
            bar(study, None)
        time.sleep(poll_s)


def _run_trial(
    study: optuna.Study, objective: Objective, beater: Beater, claims: Claims
) -> FrozenTrial:
    """Ask, run with heartbeats, tell. Ctrl-C or SIGTERM fails the trial as interrupted."""
    trial: optuna.Trial | None = None
    try:
        with warnings.catch_warnings():  # "Heartbeat ... supposed to be used with optimize"
            warnings.filterwarnings("ignore", message="Heartbeat")
            trial = study.ask()
        mark_owner(trial)  # first: a rerun on this machine fails it at once if we die
        beat = f"trial:{trial.number}"
        if compat.beats_enabled(study):
            beater.add(beat, compat.trial_beat(study, trial))
        values: list[float] | None = None
        try:
            values = objective(trial)
            state = TrialState.COMPLETE
        except optuna.TrialPruned:
            state = TrialState.PRUNED
        except Exception as e:
            state = TrialState.FAIL
            if read_record(compat.stored_trial(study, trial)).fail_reason is None:
                write_record(trial, TrialRecord(fail_reason=f"{type(e).__name__}: {e}"[:2000]))
            log.warning("trial %d failed: %s: %s", trial.number, type(e).__name__, e)
        finally:
            beater.remove(beat)
            claims.release_all()
        frozen = study.tell(trial, values, state=state, skip_if_finished=True)
        if frozen.state != state:
            log.warning(
                "trial %d was marked %s by another worker (heartbeat lost?); its result "
                "is not recorded",
                frozen.number,
                frozen.state.name,
            )
        return frozen
    except BaseException as e:
        if trial is not None:
            _abandon(study, trial, e)
        raise


def _abandon(study: optuna.Study, trial: optuna.Trial, e: BaseException) -> None:
    """Fail a trial left by an interrupt or an error outside the objective, if still running.

    A trial stopped by the storage ("infrastructure: ...") is queued again; when the storage
    cannot even record that, the trial stays RUNNING for the lost-trial logic.
    """
    reason = abandon_reason(e)
    attempts = 5
    for attempt in range(attempts):
        try:
            if compat.stored_trial(study, trial).state == TrialState.RUNNING:
                write_record(trial, TrialRecord(fail_reason=reason))
                study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                log.warning("trial %d failed: %s", trial.number, reason)
                if isinstance(e, InfrastructureError):
                    queue_retry(study, trial)
            return
        except (Exception, InfrastructureError) as cleanup_error:
            if attempt == attempts - 1:  # storage gone: the heartbeat timeout fails it later
                log.warning(
                    "could not mark trial %d failed (%s); it stays RUNNING until a worker "
                    "fails it as lost (a rerun on this machine does so at once)",
                    trial.number,
                    cleanup_error,
                )
                return
            # An interrupt inside a storage call can leave this thread's session
            # mid-transaction, and SQLite may be briefly locked by a reader: start a fresh
            # session and try again.
            compat.reset_session(study)
            time.sleep(0.2 * (attempt + 1))
