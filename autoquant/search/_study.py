"""The only place that creates and runs Optuna studies."""

from __future__ import annotations

import logging
import os
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from autoquant.measure import LatencyCache
from autoquant.space import baseline_params
from autoquant.train import NonFiniteLossError

from ._objective import SearchContext, objective_values
from ._pareto import pareto_front
from ._spec import StudySpec, mask_password

log = logging.getLogger("autoquant")

BASELINES = (("w8a8", 8, 8), ("w4a8", 4, 8))
HEARTBEAT_S = 10  # a worker's trial with no heartbeat for GRACE_S is failed and retried
GRACE_S = 60


class StorageError(RuntimeError):
    """The study storage cannot be opened; the message masks any password."""


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


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """Open an Optuna storage with heartbeats, so killed workers' trials are retried."""
    if "://" not in url:
        raise StorageError(
            f"storage {url!r} is not a URL; use e.g. sqlite:///study.db or "
            "postgresql://user:password@host/db"
        )
    if url.startswith(("sqlite", "postgresql", "mysql")):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.8
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(
                    url,
                    heartbeat_interval=HEARTBEAT_S,
                    grace_period=GRACE_S,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2),
                    engine_kwargs=None if url.startswith("sqlite") else {"pool_pre_ping": True},
                )
        except Exception as e:  # sqlalchemy errors carry the URL: never echo it unmasked
            msg = str(e).replace(url, mask_password(url)).splitlines()[0]
            raise StorageError(
                f"cannot open storage {mask_password(url)}: {type(e).__name__}: {msg}"
            ) from None
    return optuna.storages.get_storage(url)  # e.g. journal or in-memory storages


def make_sampler(spec: StudySpec, seed: int) -> optuna.samplers.BaseSampler:
    """TPE (multivariate, the default), NSGA-II, GP or random, all seeded.

    The accuracy-drop constraint reaches them through ``Trial.set_constraint``.
    """
    if spec.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)
    if spec.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if spec.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


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


class OptunaAttrStore:
    """A key-value store in the study's user attributes, shared by every worker.

    Used for the latency cache so that resumed and parallel workers reuse measurements.
    """

    prefix = "latency:"

    def __init__(self, study: optuna.Study) -> None:
        self.study = study

    def get(self, key: str) -> Any:
        attrs = self.study._storage.get_study_user_attrs(self.study._study_id)
        return attrs.get(self.prefix + key)

    def set(self, key: str, value: Any) -> None:
        self.study.set_user_attr(self.prefix + key, value)


def count(study: optuna.Study, *states: TrialState) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def enqueue_baselines(study: optuna.Study, ctx: SearchContext) -> list[str]:
    """Enqueue the uniform baselines once (skipped when already in the study)."""
    seen: set[tuple[tuple[str, Any], ...]] = set()
    names = []
    for name, wb, ab in BASELINES:
        params = baseline_params(ctx.spec.space, ctx.layer_names, wb, ab)
        key = tuple(sorted((params or {}).items()))
        if params is None or key in seen:
            continue
        seen.add(key)
        if any(t.user_attrs.get("baseline") == name for t in study.get_trials(deepcopy=False)):
            continue
        study.enqueue_trial(params, user_attrs={"baseline": name}, skip_if_exists=True)
        names.append(name)
    return names


def make_objective(
    study: optuna.Study, ctx: SearchContext, budget: int
) -> Callable[[optuna.Trial], list[float]]:
    spec = ctx.spec

    def objective(trial: optuna.Trial) -> list[float]:
        # Other workers may have filled the budget since this worker asked for a trial.
        if count(study, TrialState.COMPLETE) >= budget:
            trial.set_user_attr("fail_reason", "budget already reached by other workers")
            raise optuna.TrialPruned("budget reached")
        baseline = study.user_attrs["float_baseline"]
        try:
            plan, qat = ctx.plan_for(trial)
            result = ctx.run_plan(
                plan, lr=qat["lr"], steps=qat["steps"], float_accuracy=baseline["accuracy"]
            )
            values = objective_values(result.values, spec.objectives)
        except NonFiniteLossError as e:
            trial.set_user_attr("fail_reason", f"non-finite QAT loss: {e}")
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("fail_reason", "interrupted (Ctrl-C)")
            raise
        except Exception as e:
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


def ensure_float_baseline(study: optuna.Study, ctx: SearchContext) -> dict[str, Any]:
    """Measure the float model once per study and store it on the study."""
    if "float_baseline" not in study.user_attrs:
        study.set_user_attr("float_baseline", ctx.float_baseline())
        study.set_user_attr("spec", ctx.spec.to_dict())
        study.set_user_attr("layers", [vars(info) for info in ctx.layers])
        study.set_user_attr("task_info", _jsonable(getattr(ctx.task, "info", {}) or {}))
        study.set_user_attr("created", time.strftime("%Y-%m-%d %H:%M:%S"))
    return study.user_attrs["float_baseline"]


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if isinstance(v, (str, int, float, bool, list, dict))}


def run_search(
    spec: StudySpec,
    *,
    trials: int | None = None,
    storage: str | None = None,
    progress: bool = True,
    ctx: SearchContext | None = None,
) -> optuna.Study:
    """Run or resume a study until ``trials`` trials are complete.

    A trial that fails (NaN loss, an exception in task code, out of memory) is recorded
    as FAIL with its ``fail_reason`` and the search goes on. Rerunning resumes.

    Example:
        >>> study = run_search(load_study_spec("studies/digits.toml"), trials=4)  # doctest: +SKIP
    """
    budget = trials or spec.trials
    study = load_study(spec, storage)
    ctx = ctx or SearchContext(spec, latency_cache=LatencyCache(store=OptunaAttrStore(study)))
    baseline = ensure_float_baseline(study, ctx)
    enqueue_baselines(study, ctx)
    objective = make_objective(study, ctx, budget)
    max_failures = max(5, budget)

    bar = _progress(study, spec, budget, baseline) if progress else None
    try:
        while True:
            done = count(study, TrialState.COMPLETE)
            running = count(study, TrialState.RUNNING)
            if done >= budget or done + running >= budget:
                break
            if count(study, TrialState.FAIL) >= max_failures:
                log.error(
                    "stopping: %d trials failed; see `autoquant front %s --failed`",
                    max_failures,
                    spec.source or spec.name,
                )
                break
            study.optimize(
                objective, n_trials=1, catch=(Exception,), callbacks=[bar] if bar else None
            )
    finally:
        if bar:
            bar.close()
    return study


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
        if trial is not None and trial.state == TrialState.COMPLETE:
            self.bar.update(1)
        front = pareto_front(study, self.spec.max_accuracy_drop)
        best = max((t.user_attrs["accuracy"] for t in front), default=float("nan"))
        self.bar.set_postfix(
            front=len(front), best_acc=f"{best:.4f}", failed=count(study, TrialState.FAIL)
        )

    def close(self) -> None:
        self.bar.close()


def _progress(
    study: optuna.Study, spec: StudySpec, budget: int, baseline: dict[str, Any]
) -> _Progress:
    return _Progress(study, spec, budget, baseline)
