"""Resuming a study with an edited study file: the space check, and ``--fork``.

Optuna cannot mix two search spaces in one study: a parameter whose choices changed fails
every trial with "CategoricalDistribution does not support dynamic value space". So before
any trial, :func:`check_space_unchanged` compares the parameters (names and distributions)
that the stored study's space gives over the stored layers with those of the study file's
space over the model's layers (knobs, include/exclude, ties, overrides, adds, the QAT
search), and stops with :class:`SpaceChangedError`, saying what changed and the two ways
out: a new ``[study] name``, or :func:`fork_study` (``autoquant search STUDY --fork``).

A fork is a new study (in the same storage when the storage is named; beside the source
under ``AUTOQUANT_RUNS`` otherwise) that starts with the source's float baseline, latency
cache and other study-level measurements, and with copies of the source's complete trials
whose parameters are valid in the new space and give the same plan and QAT settings, added
as complete trials so the sampler learns from them.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from autoquant.space import SearchSpace, plan_from_trial, qat_params_from_trial
from autoquant.types import PlanError, QuantPlan

from ._context import SearchContext, fitted_space
from ._objectives import OBJECTIVES
from ._optuna_compat import study_user_attrs
from ._record import (
    DEPLOYED_PREFIX,
    VERSION_KEY,
    StudyRecord,
    TrialRecord,
    read_deployed_checks,
    read_record,
    read_study_record,
    record_attrs,
    write_study_record,
)
from ._spec import StudyFileError, StudySpec, mask_password
from ._storages import (
    StudyNotFoundError,
    load_existing_study,
    load_study,
    storage_url,
)

_SHOWN = 4  # parameters named per kind of change; the rest are counted
log = logging.getLogger("autoquant")


class SpaceChangedError(StudyFileError):
    """The study file's search space differs from the one the stored study was run with."""


class _Recorder:
    """A trial that records the distribution of every parameter it is asked for, and answers
    each with its first (or, ``last=True``, its last) choice."""

    def __init__(self, *, last: bool = False) -> None:
        self.distributions: dict[str, BaseDistribution] = {}
        self.last = last

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        self.distributions[name] = CategoricalDistribution(list(choices))
        return choices[-1] if self.last else choices[0]

    def suggest_float(self, name: str, low: float, high: float, *, log: bool = False) -> float:
        self.distributions[name] = FloatDistribution(low, high, log=log)
        return high if self.last else low


def param_distributions(
    space: SearchSpace, layer_names: Sequence[str]
) -> dict[str, BaseDistribution]:
    """The parameters a trial of ``space`` suggests over these layers, with their
    distributions (exactly what Optuna stores and checks).

    Example:
        >>> param_distributions(SearchSpace(w_bits=(4, 8)), ["fc"])
        {'fc/w_bits': CategoricalDistribution(choices=(4, 8))}
    """
    recorder = _Recorder()
    plan_from_trial(recorder, space, layer_names)
    qat_params_from_trial(recorder, space, 1e-3, 1)
    return recorder.distributions


def plan_difference(before: QuantPlan, after: QuantPlan) -> str | None:
    """The first difference between two plans, in words; ``None`` when they are equal.

    Example:
        >>> from autoquant.types import LayerPlan, QuantSpec
        >>> w4, a8 = QuantSpec(bits=4), QuantSpec(bits=8)
        >>> a = QuantPlan({"fc": LayerPlan(w4, a8)})
        >>> b = QuantPlan({"fc": LayerPlan(w4.replace(calibration="mse"), a8)})
        >>> plan_difference(a, b)
        "layer fc: weight calibration 'minmax' -> 'mse'"
    """
    for name in dict.fromkeys([*before.layers, *after.layers]):
        old, new = before.layers.get(name), after.layers.get(name)
        if old is None or new is None:
            return f"layer {name}: {'absent' if old is None else 'quantized'} -> " + (
                "absent" if new is None else "quantized"
            )
        for side in ("weight", "activation"):
            a, b = getattr(old, side).to_dict(), getattr(new, side).to_dict()
            for key in sorted(set(a) | set(b)):
                if a.get(key) != b.get(key):
                    return f"layer {name}: {side} {key} {a.get(key)!r} -> {b.get(key)!r}"
    if before.adds != after.adds:
        return f"adds: {before.adds.short()} -> {after.adds.short()}"
    return None


def _key_lines(old: SearchSpace, new: SearchSpace) -> list[str]:
    old_dict, new_dict = old.to_dict(), new.to_dict()
    lines = []
    for key in sorted(set(old_dict) | set(new_dict)):
        a, b = old_dict.get(key), new_dict.get(key)
        if a != b:
            hint = ""
            if key == "w_calib" and a == ["minmax"] and b == ["mse"]:
                hint = ' (the default became ["mse"]; w_calib = ["minmax"] under [space] keeps it)'
            lines.append(f"space.{key}: {a!r} -> {b!r}{hint}")
    return lines


def space_key_changes(old_space: Mapping[str, Any], new_space: SearchSpace) -> list[str]:
    """The keys of a stored space (``SearchSpace.to_dict()``) that the new one changes, one
    line each (``space.w_bits: [2, 4, 8] -> [4, 8]``); empty for a stored space this version
    cannot read."""
    try:
        return _key_lines(SearchSpace.from_dict(dict(old_space)), new_space)
    except (PlanError, TypeError):
        return []


def fixed_knob_changes(
    old_space: Mapping[str, Any],
    old_layers: Sequence[str],
    new_space: SearchSpace,
    new_layers: Sequence[str],
) -> list[str]:
    """For two spaces with the same parameters: what makes the same parameters give another
    plan (a fixed knob: ``percentile``, a one-choice ``w_calib``...), one line each; empty
    when the plans agree at every parameter's first and at its last choice.

    Optuna can go on with such a study, but its earlier trials ran with the old setting.

    Example:
        >>> old = SearchSpace(a_sym=(True,)).to_dict()
        >>> for line in fixed_knob_changes(old, ["fc"], SearchSpace(), ["fc"]):
        ...     print(line)
        space.a_sym: [True] -> [False]
        the same parameters give another plan (layer fc: activation symmetric True -> False)
    """
    try:
        old = SearchSpace.from_dict(dict(old_space))
    except (PlanError, TypeError):
        return []
    for last in (False, True):
        diff = plan_difference(
            plan_from_trial(_Recorder(last=last), old, old_layers),
            plan_from_trial(_Recorder(last=last), new_space, new_layers),
        )
        if diff is not None:
            return [*_key_lines(old, new_space), f"the same parameters give another plan ({diff})"]
    return []


def _text(d: BaseDistribution | None) -> str:
    if d is None:
        return "absent"
    if isinstance(d, CategoricalDistribution):
        return f"choices {list(d.choices)}"
    if isinstance(d, FloatDistribution):
        return f"[{d.low:g}, {d.high:g}]" + (" log" if d.log else "")
    return repr(d)


def _names(names: Sequence[str]) -> str:
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def _parameter_line(
    before: Mapping[str, BaseDistribution], after: Mapping[str, BaseDistribution]
) -> str:
    changed = [n for n in before if n in after and before[n] != after[n]]
    parts = []
    if changed:
        shown = "; ".join(f"{n}: {_text(before[n])} -> {_text(after[n])}" for n in changed[:_SHOWN])
        more = f"; and {len(changed) - _SHOWN} more" if len(changed) > _SHOWN else ""
        parts.append(f"{len(changed)} changed ({shown}{more})")
    for label, names in (
        ("added", [n for n in after if n not in before]),
        ("removed", [n for n in before if n not in after]),
    ):
        if names:
            parts.append(f"{len(names)} {label} ({_names(names)})")
    return "parameters: " + ", ".join(parts)


def space_changes(
    old_space: Mapping[str, Any],
    old_layers: Sequence[str],
    new_space: SearchSpace,
    new_layers: Sequence[str],
    *,
    recorded: Mapping[str, BaseDistribution] | None = None,
) -> list[str]:
    """What differs between a stored space (``SearchSpace.to_dict()``) and a new one, one
    line each; empty when both give the same parameters with the same distributions.

    A stored space this version cannot read (written by another version) is compared
    through ``recorded``, the distributions its trials recorded (nothing to compare: no
    change).

    Example:
        >>> old = SearchSpace(w_bits=(2, 4, 8)).to_dict()
        >>> for line in space_changes(old, ["fc"], SearchSpace(w_bits=(4, 8)), ["fc"]):
        ...     print(line)
        space.w_bits: [2, 4, 8] -> [4, 8]
        parameters: 1 changed (fc/w_bits: choices [2, 4, 8] -> choices [4, 8])
    """
    after = param_distributions(new_space, new_layers)
    try:
        old = SearchSpace.from_dict(dict(old_space))
    except (PlanError, TypeError):
        if not recorded or dict(recorded) == after:
            return []
        return [_parameter_line(recorded, after)]
    before = param_distributions(old, old_layers)
    if before == after:
        return []
    lines = _key_lines(old, new_space)
    if list(old_layers) != list(new_layers):
        added = [n for n in new_layers if n not in set(old_layers)]
        removed = [n for n in old_layers if n not in set(new_layers)]
        lines.append(
            f"the model's layers: {len(added)} added ({_names(added)}), {len(removed)} "
            f"removed ({_names(removed)})"
        )
    return [*lines, _parameter_line(before, after)]


def check_space_unchanged(study: optuna.Study, ctx: SearchContext) -> None:
    """Stop before any trial when the study file's space differs from the stored study's.

    A study that stores no space yet (no search has measured its float baseline) passes.

    Raises:
        SpaceChangedError: what changed, and the two ways out (a new study name, --fork).
    """
    record = read_study_record(study)
    stored = (record.spec or {}).get("space")
    if stored is None:
        return
    spec = ctx.spec
    old_layers = record.layer_names or ctx.layer_names
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL))
    recorded = {n: d for t in finished for n, d in t.distributions.items()}
    lines = space_changes(stored, old_layers, spec.space, ctx.layer_names, recorded=recorded)
    where = spec.source or spec.name
    complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if not lines:
        moved = fixed_knob_changes(stored, old_layers, spec.space, ctx.layer_names)
        if moved and complete:
            log.warning(
                "%s: study %r goes on, but its %d complete trials ran with other settings "
                "(new trials quantize the same parameters differently):\n  %s",
                where,
                spec.name,
                complete,
                "\n  ".join(moved),
            )
        return
    raise SpaceChangedError(
        f"{where}: the search space differs from the one study {spec.name!r} was run with "
        f"({complete} complete trials); Optuna cannot mix the two in one study. What "
        "changed:\n  " + "\n  ".join(lines) + "\nEither give the study a new name "
        f'([study] name = "{spec.name}-v2" in {where}) to start afresh, or fork it: '
        f"`autoquant search {where} --fork [NEWNAME]` starts a new study from this one's "
        "float baseline, latency measurements and the complete trials that are valid in "
        "the new space."
    )


# -- --fork ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ForkResult:
    """What :func:`fork_study` made: the new spec and what it copied."""

    spec: StudySpec  # the study file's spec, renamed to the fork
    source: str
    storage: str  # the fork's storage URL, password masked
    complete: int  # complete trials of the source
    copied: tuple[int, ...]  # their numbers in the source, of those copied
    measurements: int  # study-level entries copied (latency cache, ...)
    float_baseline: bool  # whether the source had one to copy

    def summary(self) -> str:
        where = self.spec.source or self.spec.name
        return (
            f"forked study {self.source!r} into {self.spec.name!r} ({self.storage}): copied "
            f"{'the float baseline, ' if self.float_baseline else ''}{self.measurements} "
            f"study-level measurements and {len(self.copied)} of {self.complete} complete "
            "trials (the others are not valid in the new space). To resume or inspect the "
            f'fork later, set [study] name = "{self.spec.name}" in {where}.'
        )


def _exists(spec: StudySpec, storage: str | None) -> bool:
    try:
        load_existing_study(spec, storage)
    except StudyNotFoundError:
        return False
    return True


def fork_name(spec: StudySpec, storage: str | None = None) -> str:
    """The first free name ``<name>-fork<k>`` (k = 1, 2, ...)."""
    k = 1
    while _exists(replace(spec, name=f"{spec.name}-fork{k}"), storage):
        k += 1
    return f"{spec.name}-fork{k}"


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b  # True is not 1: w_sym choices are booleans


def _contains(d: BaseDistribution, value: Any) -> bool:
    if isinstance(d, CategoricalDistribution):
        return any(_same(c, value) for c in d.choices)
    if isinstance(d, FloatDistribution):
        return isinstance(value, (int, float)) and d.low <= value <= d.high
    return False


def _valid_params(
    trial: FrozenTrial,
    record: TrialRecord,
    spec: StudySpec,
    layers: Sequence[str],
    dists: Mapping[str, BaseDistribution],
) -> dict[str, Any] | None:
    """The trial's parameters in the new space, or None when the new space cannot give its
    plan and QAT settings (a choice removed, a knob fixed at another value, ...)."""
    params = {}
    for name, d in dists.items():
        if name not in trial.params or not _contains(d, trial.params[name]):
            return None
        params[name] = trial.params[name]
    fixed = optuna.trial.FixedTrial(params)
    try:
        plan = plan_from_trial(fixed, spec.space, layers)
        qat = qat_params_from_trial(fixed, spec.space, spec.qat.lr, spec.qat.steps)
    except (PlanError, ValueError):
        return None
    stored_qat = record.qat or {}
    if (
        plan != record.quant_plan
        or qat["steps"] != stored_qat.get("steps")
        or not math.isclose(qat["lr"], stored_qat.get("lr", math.nan), rel_tol=1e-12)
        or stored_qat.get("optimizer", spec.qat.optimizer) != spec.qat.optimizer
        or any(qat[k] != stored_qat.get(k) for k in ("quant_lr", "distill") if k in qat)
    ):
        return None
    return params


def _values(record: TrialRecord, objectives: Sequence[str]) -> list[float] | None:
    values = [getattr(record, OBJECTIVES[o].field) for o in objectives]
    if any(v is None or not math.isfinite(v) for v in values):
        return None
    return [float(v) for v in values]


def fork_study(
    spec: StudySpec, name: str | None = None, *, storage: str | None = None
) -> ForkResult:
    """Fork the study named by ``spec`` into a new study run with ``spec``'s space.

    Args:
        spec: the (edited) study file; its ``name`` is the study to fork.
        name: the fork's name (default: ``<name>-fork<k>``, the first free one).
        storage: the storage URL override (``--storage``).

    Returns:
        What was made; ``result.spec`` (the file's spec renamed) runs the fork.

    Raises:
        StudyNotFoundError: there is no study to fork.
        StudyFileError: ``name`` is not a valid study name, or names a study that exists.

    Example:
        >>> result = fork_study(load_study_spec("studies/digits.toml"))  # doctest: +SKIP
        >>> run_search(result.spec)  # doctest: +SKIP
    """
    source = load_existing_study(spec, storage)
    new_spec = replace(spec, name=name or fork_name(spec, storage))
    url = storage_url(new_spec, storage, create=False)
    if _exists(new_spec, storage):
        raise StudyFileError(
            f"--fork {new_spec.name}: study {new_spec.name!r} already exists in "
            f"{mask_password(url)}; choose another name"
        )
    target = load_study(new_spec, storage)
    record = read_study_record(source)
    # As a search fits it (embeddings, weightless layers), so that the fork resumes cleanly.
    new_spec = replace(new_spec, space=fitted_space(new_spec.space, record.layers or []))

    # Study-level measurements first (latency cache, tables of other features), the
    # record last: its float baseline is what other workers poll for. Deployment checks
    # are per trial: they go into the copied trials' records.
    record_keys = {f.name for f in fields(StudyRecord)} | {VERSION_KEY}
    shared = {
        k: v
        for k, v in study_user_attrs(source).items()
        if k not in record_keys and not k.startswith(DEPLOYED_PREFIX)
    }
    for key, value in shared.items():
        target.set_user_attr(key, value)
    write_study_record(
        target,
        replace(
            record,
            spec=new_spec.to_dict(),
            created=time.strftime("%Y-%m-%d %H:%M:%S"),
            forked_from=source.study_name,
        ),
    )

    layers = record.layer_names
    dists = param_distributions(new_spec.space, layers) if layers else {}
    complete = source.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    checks = read_deployed_checks(source, complete)
    copied: list[int] = []
    numbers: dict[int, int] = {}  # source number -> fork number
    next_number = len(target.get_trials(deepcopy=False))
    for t in complete if layers else []:
        r = read_record(t)
        params = _valid_params(t, r, new_spec, layers, dists)
        values = _values(r, new_spec.objectives)
        if params is None or values is None:
            continue
        max_drop = new_spec.max_accuracy_drop
        constraints = (
            {"accuracy_drop": r.accuracy_drop - max_drop}
            if max_drop is not None and r.accuracy_drop is not None
            else None
        )
        copy = replace(
            r,
            retry_of=None,
            duplicate_of=numbers.get(r.duplicate_of) if r.duplicate_of is not None else None,
            forked_from={"study": source.study_name, "trial": t.number},
            deployed=checks.get(t.number),
        )
        target.add_trial(
            optuna.trial.create_trial(
                values=values,
                params=params,
                distributions={n: dists[n] for n in params},
                user_attrs=record_attrs(copy),
                constraints=constraints,
            )
        )
        numbers[t.number] = next_number
        next_number += 1
        copied.append(t.number)
    return ForkResult(
        spec=new_spec,
        source=source.study_name,
        storage=mask_password(url),
        complete=len(complete),
        copied=tuple(copied),
        measurements=len(shared),
        float_baseline=record.float_baseline is not None,
    )
