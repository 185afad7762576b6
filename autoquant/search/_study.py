"""The only place that creates and runs Optuna studies: storage, sampler and the worker loop.

Any number of workers (processes, on one machine or many) may run :func:`run_search` on the
same study in a shared storage (PostgreSQL, or SQLite on one machine):

* **Budget.** A trial counts the *slots* taken before it: trials with a lower number (a retry
  has the number of the trial it retries) that are complete, running, queued, or waiting for
  their retry. When those fill the budget, the trial is pruned before any work; so the number
  of complete trials equals the budget exactly, however many workers there are.
* **Liveness.** A worker records its trial's heartbeat every ``AUTOQUANT_HEARTBEAT_S``
  seconds. A running trial without a heartbeat for ``AUTOQUANT_GRACE_S`` seconds is failed
  with the ``fail_reason`` "worker lost: ..." and queued again (up to :data:`MAX_RETRY`
  times) by whichever worker notices first; workers stay until the budget is complete, so the
  last live worker cleans up after dead ones.
* **Shared measurements.** The float baseline and every latency measurement are claimed
  through the storage (see :mod:`autoquant.search._locks`): one worker measures, the others
  wait for its result.
* **Faults.** Ctrl-C (or SIGTERM) fails the trial in flight with the ``fail_reason``
  "interrupted (...)" and stops; a rerun resumes. An exception in the trial (task code, NaN
  loss, out of memory) fails that trial with its reason, and the search goes on.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import os
import signal
import socket
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import optuna
import torch
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import is_heartbeat_enabled  # what Optuna itself checks
from optuna.trial import FrozenTrial, TrialState

from autoquant.measure import LatencyCache, machine_info
from autoquant.space import baseline_params
from autoquant.tasks import TaskError
from autoquant.train import NonFiniteLossError
from autoquant.types import PlanError

from ._locks import Beater, ClaimingAttrStore, Claims
from ._locks import OptunaAttrStore as OptunaAttrStore  # re-exported by autoquant.search
from ._objective import SearchContext, objective_values
from ._pareto import pareto_front
from ._spec import StudyFileError, StudySpec, mask_password

log = logging.getLogger("autoquant")

BASELINES = (("w8a8", 8, 8), ("w4a8", 4, 8))
HEARTBEAT_S = 10.0  # default of AUTOQUANT_HEARTBEAT_S: how often a worker proves it is alive
GRACE_S = 60.0  # default of AUTOQUANT_GRACE_S: a trial silent this long is failed and retried
CLAIM_TIMEOUT_S = 600.0  # default of AUTOQUANT_CLAIM_TIMEOUT_S: longest wait for another worker
MAX_RETRY = 2  # times a trial whose worker was lost is queued again
WORKER_LOST = "worker lost"
INTERRUPTED = "interrupted"
_RETRY_WINDOW_S = 60.0  # how long a lost trial keeps its budget slot before its retry appears
_KEEP_ON_RETRY = ("baseline",)  # user attrs a retry inherits; the rest is the lost run's outcome


class StorageError(RuntimeError):
    """The study storage cannot be opened; the message masks any password."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: the trial in flight fails as interrupted."""


def _env_seconds(name: str, default: float) -> float:
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
    return _env_seconds("AUTOQUANT_HEARTBEAT_S", HEARTBEAT_S)


def grace_s() -> float:
    """Seconds without a heartbeat before a trial counts as lost: ``AUTOQUANT_GRACE_S`` (60)."""
    return _env_seconds("AUTOQUANT_GRACE_S", GRACE_S)


def runs_dir() -> Path:
    """Where default SQLite studies live: ``AUTOQUANT_RUNS`` or ``./autoquant-runs``."""
    return Path(os.environ.get("AUTOQUANT_RUNS", "autoquant-runs"))


def storage_url(spec: StudySpec, override: str | None = None) -> str:
    """The storage URL: the override, the study file's ``storage``, or a SQLite file."""
    url = override or spec.storage
    if url:
        return url
    path = runs_dir() / spec.name / "study.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path.resolve()}"


def _scrub(text: str, url: str) -> str:
    """``text`` with every form of ``url``'s password replaced by ``***``."""
    text = text.replace(url, mask_password(url))
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    for secret in {password, unquote(password)} if password else ():
        if secret:
            text = text.replace(secret, "***")
    return text


def _with_driver(url: str) -> str:
    """``postgresql://`` with the PostgreSQL driver that is installed (SQLAlchemy's default
    driver differs between versions: psycopg2 in 2.0, psycopg 3 in 2.1)."""
    scheme, sep, rest = url.partition("://")
    if scheme not in ("postgresql", "postgres"):
        return url
    import importlib.util

    for module, driver in (("psycopg", "psycopg"), ("psycopg2", "psycopg2")):
        if importlib.util.find_spec(module) is not None:
            return f"postgresql+{driver}{sep}{rest}"
    raise StorageError(
        f"storage {mask_password(url)} needs a PostgreSQL driver: "
        "pip install 'autoquant[postgres]' (psycopg)"
    )


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """Open an Optuna storage with heartbeats, so killed workers' trials are retried.

    Raises:
        StorageError: not a URL, no driver, or the database cannot be reached; the message
            never contains the password.

    Example:
        >>> open_storage("postgresql://u:secret@127.0.0.1:1/db")  # doctest: +SKIP
        StorageError: cannot open storage postgresql://u:***@127.0.0.1:1/db: ...
    """
    if "://" not in url:
        raise StorageError(
            f"storage {mask_password(url)!r} is not a URL; use e.g. sqlite:///study.db or "
            "postgresql://user:password@host/db"
        )
    if not url.startswith(("sqlite", "postgres", "mysql")):
        return optuna.storages.get_storage(url)  # e.g. journal or in-memory storages
    import sqlalchemy.exc

    driver_url = _with_driver(url)
    for attempt in range(4):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.8
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(
                    driver_url,
                    heartbeat_interval=heartbeat_s(),  # type: ignore[arg-type]  # float is fine
                    grace_period=grace_s(),  # type: ignore[arg-type]
                    heartbeat_stale_trial_callback=RetryLostTrial(max_retry=MAX_RETRY),
                    engine_kwargs=(None if url.startswith("sqlite") else {"pool_pre_ping": True}),
                )
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as e:
            # Workers started together race to create the schema; the loser retries.
            if attempt == 3:
                raise StorageError(_storage_message(url, e)) from None
            time.sleep(0.5 + attempt)
        except Exception as e:  # sqlalchemy errors carry the URL: never echo it unmasked
            raise StorageError(_storage_message(url, e)) from None
    raise AssertionError("unreachable")


def _storage_message(url: str, e: BaseException) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()] or [""]
    msg = _scrub(_scrub(lines[0], url), _with_driver_quiet(url))
    return f"cannot open storage {mask_password(url)}: {type(e).__name__}: {msg}"


def _with_driver_quiet(url: str) -> str:
    try:
        return _with_driver(url)
    except StorageError:
        return url


class RetryLostTrial(RetryHeartbeatStaleTrialCallback):
    """Optuna's retry of a heartbeat-stale trial, minus the lost run's outcome attributes.

    The retry keeps the plan (parameters) and the ``baseline`` mark, and records
    ``retry_of``: the number of the trial it replaces.
    """

    def __init__(self, max_retry: int | None = MAX_RETRY) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            super().__init__(max_retry=max_retry)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        trial = copy.deepcopy(trial)
        keep = {k: v for k, v in trial.user_attrs.items() if k in _KEEP_ON_RETRY}
        trial.user_attrs = {**keep, "retry_of": trial.number}
        super().__call__(study, trial)


def _seeded_per_trial(sampler: optuna.samplers.BaseSampler, seed: int) -> None:
    """Reseed ``sampler`` from (seed, trial number) before each trial.

    Parallel workers share the study's seed; seeded once, they would propose the same plans.
    Trial numbers are unique across workers, and a single worker stays reproducible.
    """
    before_trial = sampler.before_trial

    def reseeding_before_trial(study: optuna.Study, trial: FrozenTrial) -> None:
        _reseed(sampler, (seed * 1_000_003 + trial.number) % 2**32)
        before_trial(study, trial)

    sampler.before_trial = reseeding_before_trial  # type: ignore[method-assign]


def _reseed(sampler: object, seed: int) -> None:
    # Optuna's samplers keep a LazyRandomState in `_rng`, and delegate to inner samplers.
    rng = getattr(getattr(sampler, "_rng", None), "rng", None)
    if rng is not None:
        rng.seed(seed)
    for i, name in enumerate(("_random_sampler", "_independent_sampler")):
        inner = getattr(sampler, name, None)
        if isinstance(inner, optuna.samplers.BaseSampler):
            _reseed(inner, (seed + i + 1) % 2**32)


def make_sampler(spec: StudySpec, seed: int) -> optuna.samplers.BaseSampler:
    """TPE (multivariate, the default), NSGA-II, GP or random, seeded per trial.

    The accuracy-drop constraint reaches them through ``Trial.set_constraint``.
    """
    sampler: optuna.samplers.BaseSampler
    if spec.sampler == "tpe":
        sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)
    elif spec.sampler == "nsga2":
        sampler = optuna.samplers.NSGAIISampler(seed=seed)
    elif spec.sampler == "gp":
        sampler = optuna.samplers.GPSampler(seed=seed)
    else:
        sampler = optuna.samplers.RandomSampler(seed=seed)
    _seeded_per_trial(sampler, seed)
    return sampler


def load_study(spec: StudySpec, storage: str | None = None) -> optuna.Study:
    """Create or load the study named by ``spec`` (idempotent: reruns resume)."""
    url = storage_url(spec, storage)
    study = optuna.create_study(
        study_name=spec.name,
        storage=open_storage(url),
        directions=spec.directions,
        sampler=make_sampler(spec, spec.seed),
        load_if_exists=True,
    )
    if list(study.directions) != [optuna.study.StudyDirection[d.upper()] for d in spec.directions]:
        raise StorageError(
            f"study {spec.name!r} in {mask_password(url)} has other objectives "
            "than the study file; use another study name or storage"
        )
    return study


def count(study: optuna.Study, *states: TrialState) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


# -- budget slots -----------------------------------------------------------------------


def slot(trial: FrozenTrial) -> int:
    """The budget slot of a trial: its number, or for a retry the number of the original."""
    return int(trial.system_attrs.get("failed_trial", trial.number))


def _reason(trial: FrozenTrial) -> str:
    return str(trial.user_attrs.get("fail_reason", ""))


def _holds_slot(trial: FrozenTrial, now: datetime) -> bool:
    if trial.state in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING):
        return True
    if trial.state == TrialState.FAIL and _reason(trial).startswith(WORKER_LOST):
        # Lost and queued again (or about to be, by the worker that failed it).
        will_retry = len(trial.system_attrs.get("retry_history", [])) < MAX_RETRY
        ended = trial.datetime_complete
        return will_retry and (ended is None or (now - ended).total_seconds() < _RETRY_WINDOW_S)
    return False


def taken_slots(trials: Sequence[FrozenTrial], before: int | None = None) -> int:
    """Budget slots held by complete, running, queued or about-to-be-retried trials.

    Args:
        trials: the study's trials.
        before: count only slots lower than this one.
    """
    now = datetime.now()
    return len(
        {slot(t) for t in trials if (before is None or slot(t) < before) and _holds_slot(t, now)}
    )


def _counted_failure(trial: FrozenTrial) -> bool:
    reason = _reason(trial)
    return trial.state == TrialState.FAIL and not reason.startswith((WORKER_LOST, INTERRUPTED))


# -- liveness ---------------------------------------------------------------------------


def fail_lost_trials(study: optuna.Study) -> list[int]:
    """Fail running trials whose worker stopped beating, with a reason, and queue retries.

    Like :func:`optuna.storages.fail_stale_trials` (same stale test, same retry callback),
    but it records the ``fail_reason`` first. Trials created but never beaten (a worker killed
    between creating a trial and its first heartbeat) count as lost after 5 grace periods.

    Returns:
        The numbers of the trials failed here.
    """
    storage = study._storage
    if not is_heartbeat_enabled(storage):
        return []
    grace = grace_s()
    lost = set(storage._get_stale_trial_ids(study._study_id))  # type: ignore[attr-defined]
    now = datetime.now()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        started = t.datetime_start
        if (
            "worker" not in t.user_attrs
            and started
            and (now - started).total_seconds() > max(5 * grace, 300)
        ):
            lost.add(t._trial_id)
    reason = (
        f"{WORKER_LOST}: no heartbeat for {grace:g} s (worker killed, crashed or "
        f"disconnected); queued again up to {MAX_RETRY} times"
    )
    failed = []
    for trial_id in sorted(lost):
        try:
            storage.set_trial_user_attr(trial_id, "fail_reason", reason)
            if storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                failed.append(trial_id)
        except UpdateFinishedTrialError:  # finished meanwhile, or failed by another worker
            continue
    callback = storage.get_heartbeat_stale_trial_callback()  # type: ignore[attr-defined]
    numbers = []
    for trial_id in failed:
        trial = copy.deepcopy(storage.get_trial(trial_id))
        numbers.append(trial.number)
        log.warning("trial %d: %s", trial.number, reason)
        if callback is not None:
            callback(study, trial)
    return numbers


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` (a KeyboardInterrupt) in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise Terminated("SIGTERM")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- baselines --------------------------------------------------------------------------


def enqueue_baselines(
    study: optuna.Study, ctx: SearchContext, claims: Claims | None = None
) -> list[str]:
    """Enqueue the uniform baselines once.

    A baseline is enqueued again only when its earlier run was interrupted or pruned. With
    ``claims``, one worker at a time enqueues (no duplicates when workers start together).
    """
    if claims is not None and not claims.try_claim("enqueue-baselines"):
        return []
    try:
        settled = {
            t.user_attrs["baseline"]
            for t in study.get_trials(deepcopy=False)
            if "baseline" in t.user_attrs
            and t.state != TrialState.PRUNED
            and not (t.state == TrialState.FAIL and _reason(t).startswith(INTERRUPTED))
        }
        seen: set[tuple[tuple[str, Any], ...]] = set()
        names = []
        for name, wb, ab in BASELINES:
            params = baseline_params(ctx.spec.space, ctx.layer_names, wb, ab)
            key = tuple(sorted((params or {}).items()))
            if params is None or key in seen:
                continue
            seen.add(key)
            if name in settled:
                continue
            study.enqueue_trial(params, user_attrs={"baseline": name})
            names.append(name)
        return names
    finally:
        if claims is not None:
            claims.release("enqueue-baselines")


def ensure_float_baseline(
    study: optuna.Study, ctx: SearchContext, claims: Claims | None = None
) -> dict[str, Any]:
    """Measure the float model once per study, store it on the study, enqueue the baselines.

    With ``claims``, one worker measures while the others wait for its result.
    """

    def stored() -> Any:
        return study._storage.get_study_user_attrs(study._study_id).get("float_baseline")

    beater = None
    if claims is None:
        beater = Beater(heartbeat_s())
        claims = Claims(study._storage, study.study_name, beater=beater, grace_s=grace_s())
    try:
        baseline = claims.obtain("float_baseline", stored)
        if baseline is not None:
            return baseline
        try:
            baseline = ctx.float_baseline()
            study.set_user_attr("spec", ctx.spec.to_dict())
            study.set_user_attr("layers", [vars(info) for info in ctx.layers])
            study.set_user_attr("task_info", _jsonable(getattr(ctx.task, "info", {}) or {}))
            study.set_user_attr("created", time.strftime("%Y-%m-%d %H:%M:%S"))
            study.set_user_attr("machine", machine_info())  # where latency is measured
            enqueue_baselines(study, ctx, claims)
            study.set_user_attr("float_baseline", baseline)  # last: what waiting workers poll
        finally:
            claims.release("float_baseline")
        return baseline
    finally:
        if beater is not None:
            claims.release_all()
            beater.close()


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if isinstance(v, (str, int, float, bool, list, dict))}


# -- the objective ----------------------------------------------------------------------

_OOM: tuple[type[BaseException], ...] = (
    getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),
    MemoryError,
)


def _is_oom(e: BaseException) -> bool:
    # CPU allocation failures are plain RuntimeErrors from torch's allocator.
    return isinstance(e, _OOM) or "can't allocate memory" in str(e)


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def make_objective(
    study: optuna.Study, ctx: SearchContext, budget: int, worker: str | None = None
) -> Callable[[optuna.Trial], list[float]]:
    """The trial function: budget check, then plan → QAT → metrics (see :class:`SearchContext`).

    Every failure leaves a ``fail_reason`` (and ``traceback``) on the trial.
    """
    spec = ctx.spec

    def objective(trial: optuna.Trial) -> list[float]:
        if worker:
            trial.set_user_attr("worker", worker)
        trials = study.get_trials(deepcopy=False)
        mine = next((t for t in trials if t.number == trial.number), None)
        before = slot(mine) if mine is not None else trial.number
        if taken_slots(trials, before=before) >= budget:
            trial.set_user_attr(
                "fail_reason", f"budget of {budget} complete trials filled by earlier trials"
            )
            raise optuna.TrialPruned("budget reached")
        baseline = study.user_attrs["float_baseline"]
        try:
            plan, qat = ctx.plan_for(trial)
            twin = _complete_twin(trials, plan.to_dict(), qat)
            if twin is not None:  # same plan and QAT: deterministic, so reuse, don't retrain
                return _copy_twin(trial, twin, spec)
            result = ctx.run_plan(
                plan, lr=qat["lr"], steps=qat["steps"], float_accuracy=baseline["accuracy"]
            )
            values = objective_values(result.values, spec.objectives)
        except NonFiniteLossError as e:
            trial.set_user_attr("fail_reason", f"non-finite QAT loss: {e}")
            raise
        except Exception as e:
            if _is_oom(e):
                _free_memory()
                reason = f"out of memory: {type(e).__name__}: {e}"
            else:
                reason = f"{type(e).__name__}: {e}"
            trial.set_user_attr("fail_reason", reason[:2000])
            trial.set_user_attr("traceback", traceback.format_exc()[-4000:])
            raise
        for key, value in result.attrs.items():
            trial.set_user_attr(key, value)
        trial.set_user_attr("size_ratio", result.values["size"] / baseline["size_bytes"])
        if spec.max_accuracy_drop is not None:  # feasible when <= 0
            trial.set_constraint(
                "accuracy_drop", result.attrs["accuracy_drop"] - spec.max_accuracy_drop
            )
        return values

    return objective


_OWN_ATTRS = ("worker", "baseline", "retry_of", "duplicate_of")


def _complete_twin(
    trials: Sequence[FrozenTrial], plan: dict[str, Any], qat: dict[str, Any]
) -> FrozenTrial | None:
    """An earlier complete trial with the same plan and QAT settings, if any."""
    for t in trials:
        if (
            t.state == TrialState.COMPLETE
            and t.user_attrs.get("plan") == plan
            and "duplicate_of" not in t.user_attrs
            and {k: t.user_attrs.get("qat", {}).get(k) for k in qat} == qat
        ):
            return t
    return None


def _copy_twin(trial: optuna.Trial, twin: FrozenTrial, spec: StudySpec) -> list[float]:
    for key, value in twin.user_attrs.items():
        if key not in _OWN_ATTRS:
            trial.set_user_attr(key, value)
    trial.set_user_attr("duplicate_of", twin.number)
    trial.set_user_attr("timing_s", {"total": 0.0})
    for key, value in twin.constraints.items():
        trial.set_constraint(key, value)
    return list(twin.values)


# -- the worker loop --------------------------------------------------------------------


def _run_trial(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], list[float]],
    beater: Beater,
    claims: Claims,
) -> FrozenTrial:
    """Ask, run with heartbeats, tell. Ctrl-C or SIGTERM fails the trial as interrupted."""
    storage = study._storage
    trial: optuna.Trial | None = None
    try:
        with warnings.catch_warnings():  # "Heartbeat ... supposed to be used with optimize"
            warnings.filterwarnings("ignore", message="Heartbeat")
            trial = study.ask()
        beat = f"trial:{trial._trial_id}"
        if is_heartbeat_enabled(storage):
            beater.add(beat, partial(storage.record_heartbeat, trial._trial_id))  # type: ignore[attr-defined]
        values: list[float] | None = None
        try:
            values = objective(trial)
            state = TrialState.COMPLETE
        except optuna.TrialPruned:
            state = TrialState.PRUNED
        except Exception as e:
            state = TrialState.FAIL
            if "fail_reason" not in storage.get_trial_user_attrs(trial._trial_id):
                trial.set_user_attr("fail_reason", f"{type(e).__name__}: {e}"[:2000])
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
    """Fail a trial left by an interrupt or an error outside the objective, if still running."""
    if isinstance(e, Terminated):
        reason = f"{INTERRUPTED} (SIGTERM)"
    elif isinstance(e, KeyboardInterrupt):
        reason = f"{INTERRUPTED} (Ctrl-C)"
    else:
        reason = f"{type(e).__name__}: {e}"[:2000]
    attempts = 5
    for attempt in range(attempts):
        try:
            if study._storage.get_trial(trial._trial_id).state == TrialState.RUNNING:
                trial.set_user_attr("fail_reason", reason)
                study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                log.warning("trial %d failed: %s", trial.number, reason)
            return
        except Exception as cleanup_error:
            if attempt == attempts - 1:  # storage gone: the heartbeat timeout fails it later
                log.warning("could not mark trial %d failed: %s", trial.number, cleanup_error)
                return
            # An interrupt inside a storage call can leave this thread's session
            # mid-transaction, and SQLite may be briefly locked by a reader: start a fresh
            # session and try again.
            session = getattr(study._storage, "scoped_session", None)
            if session is not None:
                with contextlib.suppress(Exception):
                    session.remove()
            time.sleep(0.2 * (attempt + 1))


def _context(spec: StudySpec, cache: LatencyCache) -> SearchContext:
    """The search context; a space or task that does not fit names the study file."""
    where = spec.source or spec.name
    try:
        return SearchContext(spec, latency_cache=cache)
    except StudyFileError:
        raise
    except PlanError as e:
        raise StudyFileError(f"{where}: [space]: {e}") from None
    except TaskError as e:
        raise StudyFileError(f"{where}: task.name = {spec.task!r}: {e}") from None


def run_search(
    spec: StudySpec,
    *,
    trials: int | None = None,
    storage: str | None = None,
    progress: bool = True,
    ctx: SearchContext | None = None,
) -> optuna.Study:
    """Run, resume or join a study until exactly ``trials`` trials are complete.

    Any number of processes may call this on the same study and storage (see the module
    docstring). A trial that fails (NaN loss, an exception in task code, out of memory) is
    recorded as FAIL with its ``fail_reason`` and the search goes on; Ctrl-C fails the trial
    in flight as "interrupted" and raises KeyboardInterrupt. Rerunning resumes.

    Example:
        >>> study = run_search(load_study_spec("studies/digits.toml"), trials=4)  # doctest: +SKIP
    """
    budget = trials or spec.trials
    study = load_study(spec, storage)
    beater = Beater(heartbeat_s())
    claims = Claims(
        study._storage,
        spec.name,
        beater=beater,
        grace_s=grace_s(),
        timeout_s=_env_seconds("AUTOQUANT_CLAIM_TIMEOUT_S", CLAIM_TIMEOUT_S),
    )
    worker = f"{socket.gethostname()}:{os.getpid()}"
    max_failures = max(5, budget)
    bar: _Progress | None = None
    try:
        with _sigterm_as_interrupt():
            ctx = ctx or _context(spec, LatencyCache(store=ClaimingAttrStore(study, claims)))
            baseline = ensure_float_baseline(study, ctx, claims)
            enqueue_baselines(study, ctx, claims)  # again: earlier ones may be interrupted
            objective = make_objective(study, ctx, budget, worker)
            if progress:
                bar = _Progress(study, spec, budget, baseline)
            _work(study, objective, beater, claims, budget, max_failures, bar, spec)
    finally:
        claims.release_all()
        beater.close()
        if bar:
            bar.close()
    return study


def _work(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], list[float]],
    beater: Beater,
    claims: Claims,
    budget: int,
    max_failures: int,
    bar: _Progress | None,
    spec: StudySpec,
) -> None:
    """The worker loop: run trials while budget slots are free; else wait for other workers."""
    heartbeats = is_heartbeat_enabled(study._storage)
    poll_s = min(heartbeat_s(), 2.0)
    waiting_since: float | None = None
    while True:
        fail_lost_trials(study)
        trials = study.get_trials(deepcopy=False)
        done = sum(t.state == TrialState.COMPLETE for t in trials)
        running = any(t.state == TrialState.RUNNING for t in trials)
        if done >= budget:
            # Stay a moment for trials still running: a worker killed while its trial was
            # about to be pruned leaves it RUNNING; fail it rather than leave it forever.
            if not (running and heartbeats):
                return
            waiting_since = waiting_since or time.monotonic()
            if time.monotonic() - waiting_since > grace_s() + 2 * heartbeat_s():
                return
            time.sleep(poll_s)
            continue
        if sum(_counted_failure(t) for t in trials) >= max_failures:
            log.error(
                "stopping: %d trials failed; see `autoquant front %s --failed`",
                max_failures,
                spec.source or spec.name,
            )
            return
        queued = any(t.state == TrialState.WAITING for t in trials)
        if queued or taken_slots(trials) < budget:
            waiting_since = None
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


class _Progress:
    """tqdm bar: trials done, current front size and best accuracy inside the constraint."""

    def __init__(
        self, study: optuna.Study, spec: StudySpec, budget: int, baseline: dict[str, Any]
    ) -> None:
        from tqdm.auto import tqdm

        self.spec = spec
        self.bar = tqdm(
            total=budget,
            initial=count(study, TrialState.COMPLETE),
            desc=f"autoquant {spec.name}",
            unit="trial",
        )
        self.baseline = baseline
        self(study, None)

    def __call__(self, study: optuna.Study, trial: FrozenTrial | None) -> None:
        # Other workers complete trials too: show the study's count, not this process's.
        self.bar.n = min(count(study, TrialState.COMPLETE), self.bar.total)
        front = pareto_front(study, self.spec.max_accuracy_drop)
        best = max((t.user_attrs["accuracy"] for t in front), default=float("nan"))
        self.bar.set_postfix(
            front=len(front), best_acc=f"{best:.4f}", failed=count(study, TrialState.FAIL)
        )

    def close(self) -> None:
        self.bar.close()
