"""The sensitivity table: per unit, the damage of each weight option and each activation option.

It is data, versioned and JSON round-trippable like :class:`~autoquant.types.QuantPlan`, so a
search stores it on the study once and every worker, report or later run reads it back.

Metrics (all "damage": larger is worse, 0 for a float layer):

* ``calib_loss`` / ``eval_loss``: increase of the mean task loss over the float model, on the
  calibration batches / on the held-out subset;
* ``calib_kl`` / ``eval_kl``: mean KL divergence (nats per sample) from the float model's
  output distribution to the quantized one's;
* ``calib_acc`` / ``eval_acc``: top-1 accuracy drop (fraction);
* ``hessian``: the second-order estimate ``½ · tr(H)/n · ||Q(x) - x||²`` (HAWQ-V3), for
  weights and for input activations (see :func:`~autoquant.allocate.hessian_sensitivity`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from autoquant.types import PlanError

if TYPE_CHECKING:
    from autoquant.allocate._units import UnitSpace

TABLE_VERSION = 1
SPLITS = ("calib", "eval")
MEASURED = ("loss", "kl", "acc")
METRICS = (*(f"{s}_{m}" for s in SPLITS for m in MEASURED), "hessian")
KINDS = ("weight", "activation")


def _options(value: Any, where: str) -> tuple[Mapping[str, Any], ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(o, Mapping) for o in value):
        raise PlanError(f"{where} must be a list of knob tables, got {type(value).__name__}")
    return tuple(MappingProxyType(dict(o)) for o in value)


def _metric_arrays(value: Any, n: int, where: str) -> Mapping[str, tuple[float, ...]]:
    if not isinstance(value, Mapping):
        raise PlanError(f"{where} must map metric names to lists, got {type(value).__name__}")
    out = {}
    for metric, values in value.items():
        if metric not in METRICS:
            raise PlanError(f"{where} has unknown metric {metric!r}; allowed values: {METRICS}")
        vals = tuple(float(v) for v in values)
        if len(vals) != n:
            raise PlanError(
                f"{where}.{metric} has {len(vals)} values; it needs one per option ({n})"
            )
        if not all(math.isfinite(v) for v in vals):
            raise PlanError(f"{where}.{metric} has a non-finite value: {vals}")
        out[metric] = vals
    return MappingProxyType(out)


def _signature(u: Any) -> tuple[Any, ...]:
    """What identifies a unit's options (a :class:`UnitDamage` or a ``Unit``)."""
    return (
        u.name,
        tuple(u.layers),
        [dict(o) for o in u.weight_options],
        [dict(o) for o in u.activation_options],
    )


@dataclass(frozen=True)
class UnitDamage:
    """One unit's row of the table.

    Attributes:
        name: the unit (tie group or layer) name.
        layers: its layers.
        weight_options: knob values of each weight option (as in
            :class:`~autoquant.allocate.Unit`).
        activation_options: knob values of each activation option.
        weight: metric → damage of each weight option (activations float).
        activation: metric → damage of each activation option (weights float).
    """

    name: str
    layers: tuple[str, ...]
    weight_options: tuple[Mapping[str, Any], ...]
    activation_options: tuple[Mapping[str, Any], ...]
    weight: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    activation: Mapping[str, tuple[float, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"unit {self.name!r}"
        object.__setattr__(self, "layers", tuple(self.layers))
        for kind in KINDS:
            opts = _options(getattr(self, f"{kind}_options"), f"{where}.{kind}_options")
            object.__setattr__(self, f"{kind}_options", opts)
            arrays = _metric_arrays(getattr(self, kind), len(opts), f"{where}.{kind}")
            object.__setattr__(self, kind, arrays)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "layers": list(self.layers)}
        for kind in KINDS:
            out[f"{kind}_options"] = [dict(o) for o in getattr(self, f"{kind}_options")]
            out[kind] = {m: list(v) for m, v in getattr(self, kind).items()}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UnitDamage:
        allowed = {"name", "layers", "weight_options", "activation_options", *KINDS}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise PlanError(f"unknown unit field(s) {unknown}; allowed: {sorted(allowed)}")
        return cls(**data)


@dataclass(frozen=True)
class SensitivityTable:
    """Per-unit, per-option damage of quantizing that unit alone (the rest float).

    Attributes:
        units: one :class:`UnitDamage` per unit, in unit order.
        reference: the float model's figures per split, ``{"calib": {"loss", "accuracy",
            "samples"}, "eval": {...}}``.
        adds: damage of quantizing only the model's residual adds, per ``adds`` choice
            (``{"int8": {metric: value}}``); a choice missing here counts as 0.
        timing_s: seconds spent, per phase and ``total``.
        settings: how it was measured (batches, samples, evaluations, ...).
        details: extra facts, e.g. per-layer Hessian traces.
        version: the table format version.

    Example:
        >>> row = UnitDamage("fc", ("fc",), [{"w_bits": 4}, {"w_bits": 8}], [{"a_bits": 8}],
        ...                  weight={"eval_kl": [0.2, 0.01]}, activation={"eval_kl": [0.03]})
        >>> table = SensitivityTable((row,))
        >>> SensitivityTable.from_json(table.to_json()) == table, table.metrics
        (True, ('eval_kl',))
    """

    units: tuple[UnitDamage, ...]
    reference: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    adds: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    timing_s: Mapping[str, float] = field(default_factory=dict)
    settings: Mapping[str, Any] = field(default_factory=dict)
    details: Mapping[str, Any] = field(default_factory=dict)
    version: int = TABLE_VERSION

    def __post_init__(self) -> None:
        if self.version != TABLE_VERSION:
            raise PlanError(
                f"sensitivity table version={self.version!r} is not supported; "
                f"allowed values: {TABLE_VERSION}"
            )
        units = tuple(
            u if isinstance(u, UnitDamage) else UnitDamage.from_dict(u) for u in self.units
        )
        if not units:
            raise PlanError("a sensitivity table needs at least one unit")
        object.__setattr__(self, "units", units)
        for name in ("reference", "adds", "timing_s", "settings", "details"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))
        for choice, metrics in self.adds.items():
            if choice not in ("int8", "fp32"):
                raise PlanError(f"table adds has {choice!r}; allowed values: 'int8', 'fp32'")
            bad = sorted(set(metrics) - set(METRICS))
            if bad:
                raise PlanError(f"table adds.{choice} has unknown metric(s) {bad}")

    # -- reading -----------------------------------------------------------------------

    @property
    def metrics(self) -> tuple[str, ...]:
        """The metrics every unit has for both weight and activation options."""
        common = set(METRICS)
        for u in self.units:
            common &= set(u.weight) & set(u.activation)
        return tuple(m for m in METRICS if m in common)

    def damage(self, metric: str) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per unit, ``(weight damages, activation damages)`` of ``metric`` as arrays."""
        if metric not in self.metrics:
            raise PlanError(
                f"metric {metric!r} is not in the table; allowed values: {self.metrics}"
            )
        return [
            (np.asarray(u.weight[metric], float), np.asarray(u.activation[metric], float))
            for u in self.units
        ]

    def adds_damage(self, choice: str, metric: str) -> float:
        """Damage of the adds alone for an ``adds`` choice (0 when not measured)."""
        return float(self.adds.get(choice, {}).get(metric, 0.0))

    def check(self, units: UnitSpace) -> None:
        """Raise :class:`~autoquant.types.PlanError` unless the table was measured for exactly
        these units and options (same names, layers and knob values, in the same order)."""
        mine = [_signature(u) for u in self.units]
        theirs = [_signature(u) for u in units.units]
        if mine != theirs:
            diff = next(
                (f"{a[0]!r} vs {b[0]!r}" for a, b in zip(mine, theirs, strict=False) if a != b),
                f"{len(mine)} units vs {len(theirs)}",
            )
            raise PlanError(
                "the sensitivity table does not match the search space (first difference: "
                f"table unit {diff}); measure it again for this space"
            )

    def merge(self, other: SensitivityTable) -> SensitivityTable:
        """A table with the metrics of both (same units); ``other`` wins on a clash."""
        if [(u.name, u.layers) for u in self.units] != [(u.name, u.layers) for u in other.units]:
            raise PlanError("cannot merge sensitivity tables of different units")
        units = tuple(
            UnitDamage(
                a.name,
                a.layers,
                a.weight_options,
                a.activation_options,
                weight={**a.weight, **b.weight},
                activation={**a.activation, **b.activation},
            )
            for a, b in zip(self.units, other.units, strict=True)
        )
        adds = {
            k: {**self.adds.get(k, {}), **other.adds.get(k, {})} for k in {*self.adds, *other.adds}
        }
        timing = dict(self.timing_s)
        for k, v in other.timing_s.items():
            timing[k] = timing.get(k, 0.0) + v if k == "total" else v
        return SensitivityTable(
            units,
            reference={**self.reference, **other.reference},
            adds=adds,
            timing_s=timing,
            settings={**self.settings, **other.settings},
            details={**self.details, **other.details},
        )

    def rows(self) -> list[dict[str, Any]]:
        """One flat record per (unit, kind, option): for tables (pandas) and reports."""
        out = []
        for u in self.units:
            for kind in KINDS:
                options = getattr(u, f"{kind}_options")
                values = getattr(u, kind)
                for k, opt in enumerate(options):
                    row = {"unit": u.name, "kind": kind, "option": k, **dict(opt)}
                    row.update({m: v[k] for m, v in values.items()})
                    out.append(row)
        return out

    # -- serialisation -----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "_version": self.version,
            "units": [u.to_dict() for u in self.units],
            "reference": {k: dict(v) for k, v in self.reference.items()},
            "adds": {k: dict(v) for k, v in self.adds.items()},
            "timing_s": dict(self.timing_s),
            "settings": dict(self.settings),
            "details": dict(self.details),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SensitivityTable:
        if not isinstance(data, Mapping) or "units" not in data:
            raise PlanError("a sensitivity table dict needs the keys '_version' and 'units'")
        allowed = {"_version", "units", "reference", "adds", "timing_s", "settings", "details"}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise PlanError(
                f"unknown sensitivity table field(s) {unknown}; allowed: {sorted(allowed)}"
            )
        return cls(
            units=tuple(UnitDamage.from_dict(u) for u in data["units"]),
            reference=data.get("reference", {}),
            adds=data.get("adds", {}),
            timing_s=data.get("timing_s", {}),
            settings=data.get("settings", {}),
            details=data.get("details", {}),
            version=data.get("_version", TABLE_VERSION),
        )

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SensitivityTable:
        return cls.from_dict(json.loads(text))
