"""What a trial and a study store, as typed, versioned records with one writer and one reader.

A trial's record lives in its Optuna user attributes, one attribute per field (so
optuna-dashboard shows them) plus ``_version``. :func:`write_record` is the only code that
writes them and :func:`read_record` the only code that reads them; the study's attributes
have :func:`write_study_record` and :func:`read_study_record`.

Versions. Studies written before records existed have no ``_version``: they are version 0,
with the same keys as version 1. The reader upgrades an older record step by step
(``_UPGRADES``) and refuses a newer one with :class:`RecordVersionError`.

Adding a field. Add it to :class:`TrialRecord` (or :class:`StudyRecord`) with the default
``None``: the writer skips ``None``, the reader leaves a missing key at ``None``, so old
studies still load and no version bump is needed. Bump :data:`RECORD_VERSION` and add an
upgrade only when a stored key changes its name or meaning.

Example:
    >>> import optuna
    >>> study = optuna.create_study()
    >>> trial = study.ask()
    >>> write_record(trial, TrialRecord(worker="host:1"))
    >>> write_record(trial, TrialRecord(accuracy=0.9, size_bytes=1200))
    >>> frozen = study.tell(trial, 0.9)
    >>> record = read_record(frozen)
    >>> record.worker, record.accuracy, record.fail_reason
    ('host:1', 0.9, None)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from functools import cached_property
from typing import TYPE_CHECKING, Any, Protocol

from autoquant.types import QuantPlan

from ._optuna_compat import study_user_attrs

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

RECORD_VERSION = 1
VERSION_KEY = "_version"

# Fail reasons that other workers read: a trial whose worker died, Ctrl-C / SIGTERM, and a
# storage that failed under the trial (none of them counts towards the failure limit).
WORKER_LOST = "worker lost"
INTERRUPTED = "interrupted"
INFRASTRUCTURE = "infrastructure"


class RecordVersionError(ValueError):
    """A trial or study was written by a newer autoquant than this one."""


class AttrWriter(Protocol):
    """What :func:`write_record` writes to: :class:`optuna.Trial`, or a storage adapter."""

    def set_user_attr(self, key: str, value: Any) -> None: ...


@dataclass(frozen=True, eq=True)
class TrialRecord:
    """Everything autoquant stores on one trial; every field is optional (``None``: absent).

    Fields hold JSON values, as stored: ``plan`` is ``QuantPlan.to_dict()`` (parsed by
    :attr:`quant_plan`), ``latency`` one ``LatencyResult.to_dict()`` per batch size.
    ``extra`` keeps attributes this version does not know (a user's own), so a record read
    and written back loses nothing.

    Example:
        >>> r = TrialRecord(accuracy=0.91, latency=[{"median_ms": 1.5, "iqr_ms": 0.1}])
        >>> r.latency_iqr_ms, r.failed
        (0.1, False)
    """

    # who ran it
    worker: str | None = None  # "host:pid"
    # host, pid, process start time, boot id and pid namespace of the worker's process: a
    # worker on the same machine tells at once that it is gone (see _liveness.process_gone)
    worker_process: dict[str, Any] | None = None
    baseline: str | None = None  # "w8a8" / "w4a8" for the uniform baselines
    retry_of: int | None = None  # number of the lost trial this one retries
    duplicate_of: int | None = None  # number of the complete trial whose result was reused
    run: str | None = None  # the run (one run_search call) that started it; see _runs.py
    forked_from: dict[str, Any] | None = None  # {"study", "trial"} it was copied from (--fork)
    # what ran
    plan: dict[str, Any] | None = None
    plan_summary: str | None = None
    qat: dict[str, Any] | None = None  # lr, steps, optimizer
    seed: int | None = None
    # what it scored
    accuracy: float | None = None
    accuracy_drop: float | None = None  # float accuracy minus accuracy
    size_bytes: int | None = None
    size_ratio: float | None = None  # of the float model's size
    latency_ms: float | None = None  # median at the first batch size
    latency: list[dict[str, Any]] | None = None
    loss_history: list[float] | None = None
    timing_s: dict[str, float] | None = None  # calibrate, qat, eval, measure, total
    # the deployed model checked against the simulation (DeploymentCheck.to_dict(), _export.py),
    # when made before the trial finished (or copied by --fork); Optuna freezes a finished
    # trial, so later checks are stored on the study: see read_deployed_checks
    deployed: dict[str, Any] | None = None
    # why it failed or was pruned
    fail_reason: str | None = None
    traceback: str | None = None
    # how the search chose and judged it (see _proposals / _pruning)
    proposal: dict[str, Any] | None = None  # the solver's plan: source, budget, prediction, round
    fidelity_scores: dict[str, float] | None = None  # QAT fraction ("0.5") -> held-out accuracy
    pruned: dict[str, Any] | None = None  # stopped by the pruning rule: fidelity, reason, ...
    extra: Mapping[str, Any] = field(default_factory=dict)

    @cached_property
    def quant_plan(self) -> QuantPlan | None:
        """The plan as a :class:`~autoquant.types.QuantPlan` (None when none is stored)."""
        return None if self.plan is None else QuantPlan.from_dict(self.plan)

    @property
    def latency_iqr_ms(self) -> float | None:
        """Interquartile range of the latency at the first batch size."""
        return (self.latency or [{}])[0].get("iqr_ms")

    @property
    def latency_noisy(self) -> bool:
        """Whether any stored latency figure was flagged noisy when measured."""
        return any(bool(entry.get("noisy")) for entry in self.latency or [])

    @property
    def qat_lr(self) -> float | None:
        return (self.qat or {}).get("lr")

    @property
    def qat_steps(self) -> int | None:
        return (self.qat or {}).get("steps")

    @property
    def total_s(self) -> float | None:
        """Wall time of the trial (``timing_s["total"]``)."""
        return (self.timing_s or {}).get("total")

    @property
    def failed(self) -> bool:
        return self.fail_reason is not None

    @property
    def worker_lost(self) -> bool:
        """Failed because its worker stopped beating (it is queued again)."""
        return (self.fail_reason or "").startswith(WORKER_LOST)

    @property
    def interrupted(self) -> bool:
        """Failed by Ctrl-C or SIGTERM."""
        return (self.fail_reason or "").startswith(INTERRUPTED)

    @property
    def deployed_ok(self) -> bool | None:
        """Whether the deployed model passed its check (None: never checked)."""
        return None if self.deployed is None else bool(self.deployed.get("ok"))

    @property
    def infrastructure(self) -> bool:
        """Failed because the storage failed under it (it is queued again)."""
        return (self.fail_reason or "").startswith(INFRASTRUCTURE)


_TRIAL_FIELDS = tuple(f.name for f in fields(TrialRecord) if f.name != "extra")


def record_attrs(record: TrialRecord) -> dict[str, Any]:
    """The user attributes of ``record``: ``_version``, then each field that is not ``None``.

    For the places that hand attributes to Optuna in one piece
    (``study.enqueue_trial(..., user_attrs=...)``, ``optuna.trial.create_trial``).
    """
    attrs: dict[str, Any] = {VERSION_KEY: RECORD_VERSION}
    attrs.update(record.extra)
    for name in _TRIAL_FIELDS:
        value = getattr(record, name)
        if value is not None:
            attrs[name] = value
    return attrs


def write_record(trial: AttrWriter, record: TrialRecord) -> None:
    """Store the fields of ``record`` that are not ``None`` on ``trial`` (with ``_version``).

    Fields left ``None`` keep what the trial has, so a trial writes its record in steps:
    ``write_record(trial, TrialRecord(worker=...))`` first, the scores at the end.
    """
    for key, value in record_attrs(record).items():
        trial.set_user_attr(key, value)


def read_record(trial: FrozenTrial) -> TrialRecord:
    """The record stored on ``trial``; old studies (no ``_version``) load too.

    Raises:
        RecordVersionError: the trial was written by a newer autoquant.
    """
    attrs = _upgrade(trial.user_attrs, f"trial {trial.number}")
    known = {k: v for k, v in attrs.items() if k in _TRIAL_FIELD_SET}
    extra = {k: v for k, v in attrs.items() if k not in _TRIAL_FIELD_SET and k != VERSION_KEY}
    return TrialRecord(**known, extra=extra)


_TRIAL_FIELD_SET = frozenset(_TRIAL_FIELDS)


# -- the study ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FloatBaseline:
    """The float model's scores, measured once per study.

    Example:
        >>> FloatBaseline.from_dict({"accuracy": 0.9, "size_bytes": 10, "latency_ms": 1.0})
        FloatBaseline(accuracy=0.9, size_bytes=10, latency_ms=1.0, latency=[])
    """

    accuracy: float
    size_bytes: int
    latency_ms: float
    latency: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FloatBaseline:
        return cls(
            accuracy=data["accuracy"],
            size_bytes=data["size_bytes"],
            latency_ms=data["latency_ms"],
            latency=list(data.get("latency") or []),
        )


@dataclass(frozen=True)
class StudyRecord:
    """What autoquant stores on a study, in the order it is written.

    ``float_baseline`` comes last of what the first worker writes: the other workers poll
    for it. ``sensitivity`` (the pre-pass) and ``proposal_rounds`` follow. The latency cache
    (``latency:<key>`` attributes, see :class:`~autoquant.search.OptunaAttrStore`) is not
    part of the record.
    """

    spec: dict[str, Any] | None = None  # StudySpec.to_dict(), password masked
    layers: list[dict[str, Any]] | None = None  # quantizable layers in model order
    task_info: dict[str, Any] | None = None
    created: str | None = None
    machine: dict[str, Any] | None = None  # where latency is measured
    forked_from: str | None = None  # the study this one was forked from (--fork)
    float_baseline: FloatBaseline | None = None
    # written later, by one worker each (claimed): the pre-pass and the solver's rounds
    sensitivity: dict[str, Any] | None = None  # SensitivityTable.to_dict() plus "wall_s"
    proposal_rounds: list[dict[str, Any]] | None = None

    @property
    def max_accuracy_drop(self) -> float | None:
        return (self.spec or {}).get("max_accuracy_drop")

    @property
    def layer_names(self) -> list[str]:
        return [layer["name"] for layer in self.layers or []]


_STUDY_FIELDS = tuple(f.name for f in fields(StudyRecord))


def write_study_record(study: optuna.Study, record: StudyRecord) -> None:
    """Store the fields of ``record`` that are not ``None`` on ``study``, in field order."""
    study.set_user_attr(VERSION_KEY, RECORD_VERSION)
    for name in _STUDY_FIELDS:
        value = getattr(record, name)
        if isinstance(value, FloatBaseline):
            value = value.to_dict()
        if value is not None:
            study.set_user_attr(name, value)


def read_study_record(study: optuna.Study) -> StudyRecord:
    """The record stored on ``study`` (read fresh from the storage).

    Raises:
        RecordVersionError: the study was written by a newer autoquant.
    """
    attrs = _upgrade(study_user_attrs(study), f"study {study.study_name!r}")
    known: dict[str, Any] = {k: attrs[k] for k in _STUDY_FIELDS if k in attrs}
    if known.get("float_baseline") is not None:
        known["float_baseline"] = FloatBaseline.from_dict(known["float_baseline"])
    return StudyRecord(**known)


def read_float_baseline(study: optuna.Study) -> FloatBaseline:
    """The study's float baseline (``read_study_record(study).float_baseline``).

    Raises:
        ValueError: no search has stored one yet.
    """
    baseline = read_study_record(study).float_baseline
    if baseline is None:
        raise ValueError(
            f"study {study.study_name!r} has no float baseline yet: run `autoquant search` first"
        )
    return baseline


# -- deployment checks of finished trials ---------------------------------------------------

DEPLOYED_PREFIX = "deployed:"  # study attribute "deployed:<trial number>"


def write_deployed_check(study: optuna.Study, number: int, check: Mapping[str, Any]) -> None:
    """Store the deployment check of finished trial ``number`` (Optuna freezes a finished
    trial's attributes, so it goes on the study, one attribute per trial: no race between
    two exports)."""
    study.set_user_attr(f"{DEPLOYED_PREFIX}{number}", dict(check))


def read_deployed_checks(
    study: optuna.Study, trials: Sequence[FrozenTrial] | None = None
) -> dict[int, dict[str, Any]]:
    """The latest deployment check of each trial that has one, by trial number: the one on
    the study, else the one in the trial's record.

    Example:
        >>> import optuna
        >>> study = optuna.create_study()
        >>> study.add_trial(optuna.trial.create_trial(value=1.0))
        >>> write_deployed_check(study, 0, {"ok": False})
        >>> read_deployed_checks(study)
        {0: {'ok': False}}
    """
    attrs = study_user_attrs(study)
    out: dict[int, dict[str, Any]] = {}
    for t in study.get_trials(deepcopy=False) if trials is None else trials:
        check = attrs.get(f"{DEPLOYED_PREFIX}{t.number}") or read_record(t).deployed
        if check is not None:
            out[t.number] = dict(check)
    return out


# -- versions ---------------------------------------------------------------------------------

# version n -> n + 1, applied to the attributes as stored.
_UPGRADES: dict[int, Callable[[Mapping[str, Any]], Mapping[str, Any]]] = {
    0: lambda attrs: attrs,  # before records: the same keys, no "_version"
}


def _upgrade(attrs: Mapping[str, Any], what: str) -> Mapping[str, Any]:
    version = attrs.get(VERSION_KEY, 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise RecordVersionError(
            f"{what}: {VERSION_KEY} = {version!r} is not allowed; allowed values: "
            f"an integer 0..{RECORD_VERSION}"
        )
    if version > RECORD_VERSION:
        raise RecordVersionError(
            f"{what} was written by a newer autoquant (record version {version}; this one "
            f"reads versions 0..{RECORD_VERSION}): upgrade autoquant to read it"
        )
    while version < RECORD_VERSION:
        attrs = _UPGRADES[version](attrs)
        version += 1
    return attrs


def retry_record(record: TrialRecord, lost_number: int) -> TrialRecord:
    """What the retry of a lost trial starts with: its ``baseline`` and ``proposal`` marks and
    ``retry_of``."""
    return TrialRecord(baseline=record.baseline, proposal=record.proposal, retry_of=lost_number)


def twin_record(twin: TrialRecord, twin_number: int) -> TrialRecord:
    """The record of a trial that reuses the result of an identical complete trial.

    It takes the twin's outcome, not the twin's own marks (worker, baseline, retry_of, run,
    forked_from, its deployment check, proposal).
    """
    return replace(
        twin,
        worker=None,
        baseline=None,
        retry_of=None,
        run=None,
        forked_from=None,
        deployed=None,
        proposal=None,
        duplicate_of=twin_number,
        timing_s={"total": 0.0},
    )


REMEASURED_KEY = "remeasured"  # study attribute: the front's latency re-measured at the end


def write_remeasurement(study: optuna.Study, data: Mapping[str, Any]) -> None:
    """Store the end-of-search re-measurement of the front (see
    :func:`~autoquant.search.remeasure_front`); the latest replaces earlier ones."""
    study.set_user_attr(REMEASURED_KEY, dict(data))


def read_remeasurement(study: optuna.Study) -> dict[str, Any] | None:
    """The stored re-measurement, or None. ``trials`` maps trial numbers (as strings) to
    ``{"stored_ms", "latency_ms", "noisy"}``.

    Example:
        >>> import optuna
        >>> study = optuna.create_study()
        >>> write_remeasurement(study, {"trials": {"0": {"latency_ms": 0.2}}})
        >>> read_remeasurement(study)["trials"]["0"]["latency_ms"]
        0.2
    """
    data = study_user_attrs(study).get(REMEASURED_KEY)
    return dict(data) if isinstance(data, Mapping) else None
