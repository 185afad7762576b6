"""Every use of Optuna's internals, in one place (Optuna >= 5.0, < 6; see ``pyproject.toml``).

autoquant relies on a few things Optuna does not promise: a study's storage and id, a trial's
id, the heartbeat module (``optuna.storages._heartbeat``), the stale-trial query behind
:func:`optuna.storages.fail_stale_trials`, the ``system_attrs`` keys of
:class:`~optuna.storages.RetryHeartbeatStaleTrialCallback` and how it copies a trial, and the
samplers' random states (``_rng``). Each is wrapped here by a small function with a public
name, so that a new Optuna major version is fixed in this file alone; no other module of
autoquant may reach into Optuna (``tests/search/test_optuna_compat.py`` scans the sources).

Example:
    >>> import optuna
    >>> study = optuna.create_study()
    >>> study.set_user_attr("k", 1)
    >>> dict(study_user_attrs(study))
    {'k': 1}
"""

from __future__ import annotations

import abc
import contextlib
import copy
import warnings
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import optuna
from optuna.storages import BaseStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._cached_storage import _CachedStorage
from optuna.storages._heartbeat import (
    BaseHeartbeat,
    is_heartbeat_enabled,  # what Optuna itself checks
)
from optuna.trial import FrozenTrial, TrialState

AnyTrial = optuna.Trial | FrozenTrial


def storage_of(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The storage a study reads and writes (``study._storage``)."""
    return study._storage


def study_user_attrs(study: optuna.Study) -> Mapping[str, Any]:
    """The study's user attributes, read fresh from the storage and not deep-copied.

    ``study.user_attrs`` deep-copies every attribute, the whole latency cache included; this
    is for readers that only look. Do not mutate the result.
    """
    return study._storage.get_study_user_attrs(study._study_id)


def find_study(storage: optuna.storages.BaseStorage, name: str) -> int:
    """The id of the study called ``name`` in ``storage``.

    Raises:
        KeyError: there is none.
    """
    return storage.get_study_id_from_name(name)


def stored_trial(study: optuna.Study, trial: AnyTrial) -> FrozenTrial:
    """The trial as the storage holds it now (another worker may have changed it)."""
    return study._storage.get_trial(trial._trial_id)


class TrialAttrWriter:
    """Writes a trial's user attributes straight to the storage, by trial id.

    For trials this process did not ask for (a lost trial failed by another worker); it
    has the ``set_user_attr`` of :class:`optuna.Trial`, so the record writer takes it.
    """

    def __init__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._storage = study._storage
        self._id = trial._trial_id

    def set_user_attr(self, key: str, value: Any) -> None:
        self._storage.set_trial_user_attr(self._id, key, value)


def set_failed(study: optuna.Study, trial: FrozenTrial) -> bool:
    """Mark a running trial FAIL; False when it was not running any more.

    Raises:
        optuna.exceptions.UpdateFinishedTrialError: it finished meanwhile.
    """
    return study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)


# -- heartbeats and stale trials -------------------------------------------------------------


def beats_enabled(study: optuna.Study) -> bool:
    """Whether the study's storage records heartbeats (an RDB storage opened with them)."""
    return is_heartbeat_enabled(study._storage)


def trial_beat(study: optuna.Study, trial: optuna.Trial) -> Callable[[], None]:
    """A function that records one heartbeat of ``trial``."""
    return partial(study._storage.record_heartbeat, trial._trial_id)  # type: ignore[attr-defined]


def stale_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Running trials whose heartbeat is older than the storage's grace period.

    The same test as :func:`optuna.storages.fail_stale_trials`; empty without heartbeats.
    """
    if not beats_enabled(study):
        return []
    storage = study._storage
    ids = storage._get_stale_trial_ids(study._study_id)  # type: ignore[attr-defined]
    return [storage.get_trial(i) for i in ids]


def retry_stale_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """Run the storage's stale-trial callback (the retry) on a trial failed as lost."""
    storage = study._storage
    callback = storage.get_heartbeat_stale_trial_callback()  # type: ignore[attr-defined]
    if callback is not None:
        callback(study, copy.deepcopy(storage.get_trial(trial._trial_id)))


def retried_number(trial: FrozenTrial) -> int | None:
    """The number of the trial that ``trial`` retries, through every retry (None: not a retry)."""
    number = trial.system_attrs.get("failed_trial")
    return None if number is None else int(number)


def retries_used(trial: FrozenTrial) -> int:
    """How many times the trial's original has been retried before ``trial``."""
    return len(trial.system_attrs.get("retry_history", []))


class RetryStaleTrial(RetryHeartbeatStaleTrialCallback):
    """Optuna's retry of a heartbeat-stale trial, with the user attributes the retry starts with.

    Args:
        max_retry: times a trial is queued again.
        retry_attrs: the lost trial → the user attributes of its retry (Optuna would copy
            them all, the lost run's outcome included).
    """

    def __init__(
        self, max_retry: int | None, retry_attrs: Callable[[FrozenTrial], dict[str, Any]]
    ) -> None:
        with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.8
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            super().__init__(max_retry=max_retry)
        self.retry_attrs = retry_attrs

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        trial = copy.deepcopy(trial)
        trial.user_attrs = self.retry_attrs(trial)  # Optuna copies these onto the retry
        super().__call__(study, trial)


# -- storages: the cache, the engine, and a proxy that runs every call through a guard --------


def cached(storage: RDBStorage) -> BaseStorage:
    """``storage`` behind Optuna's cache, as ``optuna.create_study(storage=rdb)`` would wrap it."""
    return _CachedStorage(storage)


def rdb_engine(storage: RDBStorage) -> Any:
    """The SQLAlchemy engine of an RDB storage (``storage.engine``)."""
    return storage.engine


# Methods the proxy defines itself (no database needed, or a guarded call with a twist); every
# other public method of BaseStorage, and the heartbeat calls, are routed through the guard.
_OWN = (
    "get_heartbeat_interval",
    "get_heartbeat_stale_trial_callback",
    "get_failed_trial_callback",
    "check_trial_is_updatable",
    "set_trial_state_values",
)
_GUARDED = tuple(
    sorted(
        {
            name
            for name in dir(BaseStorage)
            if not name.startswith("_")
            and callable(getattr(BaseStorage, name))
            and name not in _OWN
        }
        | {"record_heartbeat", "_get_stale_trial_ids"}
    )
)


class GuardedStorage(BaseStorage, BaseHeartbeat):
    """A storage proxy: every call of ``inner`` runs as ``guard(name, call)``.

    The guard decides what a failing call means (retry through an outage, stop on a write
    failure: :class:`autoquant.search._guard.StorageGuard`); this class only routes every
    method of :class:`~optuna.storages.BaseStorage` and of the heartbeat interface through it,
    so ask, tell, attributes, heartbeats and claims all get the same treatment.

    Example:
        >>> calls = []
        >>> def guard(name, call):
        ...     calls.append(name)
        ...     return call()
        >>> storage = GuardedStorage(optuna.storages.InMemoryStorage(), guard)
        >>> study = optuna.create_study(storage=storage)
        >>> "create_new_study" in calls, is_heartbeat_enabled(storage)
        (True, False)
    """

    def __init__(self, inner: BaseStorage, guard: Callable[[str, Callable[[], Any]], Any]) -> None:
        self.inner = inner
        self.guard = guard

    def get_heartbeat_interval(self) -> int | None:
        if isinstance(self.inner, BaseHeartbeat):
            return self.inner.get_heartbeat_interval()
        return None

    def get_heartbeat_stale_trial_callback(
        self,
    ) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        if isinstance(self.inner, BaseHeartbeat):
            return self.inner.get_heartbeat_stale_trial_callback()
        return None

    def get_failed_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return self.get_heartbeat_stale_trial_callback()

    def check_trial_is_updatable(self, trial_id: int, trial_state: TrialState) -> None:
        self.inner.check_trial_is_updatable(trial_id, trial_state)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Any = None) -> bool:
        """Retried by the guard like any call, but a retry that finds the trial already in
        ``state`` succeeded: the first try committed and only its answer was lost."""
        tries = 0

        def call() -> bool:
            nonlocal tries
            tries += 1
            try:
                return self.inner.set_trial_state_values(trial_id, state=state, values=values)
            except optuna.exceptions.UpdateFinishedTrialError:
                if tries > 1 and self.inner.get_trial(trial_id).state == state:
                    return True
                raise

        return self.guard("set_trial_state_values", call)


def _routed(name: str) -> Callable[..., Any]:
    def method(self: GuardedStorage, *args: Any, **kwargs: Any) -> Any:
        inner = getattr(self.inner, name)
        return self.guard(name, lambda: inner(*args, **kwargs))

    method.__name__ = method.__qualname__ = name
    return method


for _name in _GUARDED:
    setattr(GuardedStorage, _name, _routed(_name))
abc.update_abstractmethods(GuardedStorage)


def storage_guard(storage: BaseStorage) -> Any:
    """The guard of a :class:`GuardedStorage` (None for any other storage)."""
    return storage.guard if isinstance(storage, GuardedStorage) else None


# -- sessions and samplers ---------------------------------------------------------------------


def reset_session(study: optuna.Study) -> None:
    """Drop this thread's database session, e.g. after an interrupt inside a storage call.

    A no-op for storages without one. Note that ``study._storage`` is Optuna's cache wrapper
    around the RDB storage, which has no ``scoped_session`` of its own: kept as it was before
    this module existed.
    """
    session = getattr(study._storage, "scoped_session", None)
    if session is not None:
        with contextlib.suppress(Exception):
            session.remove()


def reseed_sampler(sampler: object, seed: int) -> None:
    """Reseed a sampler's random state, and those of the samplers it delegates to.

    Optuna's samplers keep a ``LazyRandomState`` in ``_rng`` and their fallbacks in
    ``_random_sampler`` / ``_independent_sampler``.
    """
    rng = getattr(getattr(sampler, "_rng", None), "rng", None)
    if rng is not None:
        rng.seed(seed)
    for i, name in enumerate(("_random_sampler", "_independent_sampler")):
        inner = getattr(sampler, name, None)
        if isinstance(inner, optuna.samplers.BaseSampler):
            reseed_sampler(inner, (seed + i + 1) % 2**32)
