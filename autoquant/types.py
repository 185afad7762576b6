"""Leaf value types: the quantization plan as data.

A :class:`QuantPlan` maps a module's fully-qualified name to a :class:`LayerPlan`
(a weight :class:`QuantSpec` and an input-activation :class:`QuantSpec`). All three
are frozen, validated on construction, and round-trip through JSON, so any trial's
plan can be stored, replayed and deployed without re-running a search.

Example:
    >>> spec = QuantSpec(bits=4, granularity="per_channel")
    >>> plan = QuantPlan({"fc": LayerPlan(weight=spec, activation=QuantSpec(bits=8))})
    >>> QuantPlan.from_json(plan.to_json()) == plan
    True
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from types import MappingProxyType
from typing import Any

PLAN_VERSION = 1
MIN_BITS, MAX_BITS = 2, 8
FLOAT_FORMATS = ("fp16", "fp32")
ALLOWED_BITS: tuple[int | str, ...] = (*range(MIN_BITS, MAX_BITS + 1), *FLOAT_FORMATS)


class CalibrationMethod(str, Enum):
    """How an observer turns observed values into a clipping range."""

    MINMAX = "minmax"
    MOVING_AVERAGE = "moving_average"
    PERCENTILE = "percentile"
    MSE = "mse"
    KL = "kl"


class Granularity(str, Enum):
    """One scale for the whole tensor, or one per channel along ``QuantSpec.axis``."""

    PER_TENSOR = "per_tensor"
    PER_CHANNEL = "per_channel"


class PlanError(ValueError):
    """A plan, spec or study value is invalid; the message names the field and allowed values."""


def _allowed(values: Iterable[Any]) -> str:
    return ", ".join(repr(v) for v in values)


def _coerce_enum(enum: type[Enum], value: Any, name: str) -> Any:
    try:
        return enum(value)
    except ValueError:
        raise PlanError(
            f"{name}={value!r} is not allowed; allowed values: {_allowed(e.value for e in enum)}"
        ) from None


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor (a weight or an input activation) is quantized.

    Args:
        bits: integer bit width 2..8, or ``"fp16"``/``"fp32"`` (not integer-quantized).
        symmetric: signed narrow range ``[-(2^(b-1)-1), 2^(b-1)-1]`` with zero-point 0 if
            True; unsigned ``[0, 2^b-1]`` with a zero-point if False.
        granularity: ``"per_tensor"`` or ``"per_channel"`` (one scale per index of ``axis``).
        axis: channel axis for per-channel quantization (0 for weights, 1 for NCHW activations).
        calibration: range estimator: minmax, moving_average, percentile, mse or kl.
        percentile: clip percentile in (0, 100] for ``percentile`` calibration.
        momentum: EMA momentum in (0, 1] for ``moving_average`` calibration.
        bins: histogram bins for ``percentile`` and ``kl`` calibration.
        learned_scale: train the scale as a parameter during QAT (LSQ).
        learned_zero_point: train the zero-point too (LSQ+; asymmetric grids only). The
            forward uses it clamped to the grid and rounded, as the deployed integer
            zero-point; omitted from :meth:`to_dict` when False, so plans written before it
            existed keep their JSON.

    Example:
        >>> QuantSpec(bits=4, symmetric=False).qrange
        (0, 15)
    """

    bits: int | str = 8
    symmetric: bool = True
    granularity: Granularity = Granularity.PER_TENSOR
    axis: int = 0
    calibration: CalibrationMethod = CalibrationMethod.MINMAX
    percentile: float = 99.99
    momentum: float = 0.1
    bins: int = 2048
    learned_scale: bool = False
    learned_zero_point: bool = False

    def __post_init__(self) -> None:
        bits = self.bits
        if isinstance(bits, str) and bits.isdigit():
            bits = int(bits)
        if isinstance(bits, bool) or bits not in ALLOWED_BITS:
            raise PlanError(
                f"bits={self.bits!r} is not allowed; allowed values: {_allowed(ALLOWED_BITS)}"
            )
        object.__setattr__(self, "bits", bits)
        object.__setattr__(
            self, "granularity", _coerce_enum(Granularity, self.granularity, "granularity")
        )
        object.__setattr__(
            self, "calibration", _coerce_enum(CalibrationMethod, self.calibration, "calibration")
        )
        for name in ("symmetric", "learned_scale", "learned_zero_point"):
            if not isinstance(getattr(self, name), bool):
                raise PlanError(
                    f"{name}={getattr(self, name)!r} is not allowed; allowed values: True, False"
                )
        if isinstance(self.axis, bool) or not isinstance(self.axis, int) or self.axis < 0:
            raise PlanError(f"axis={self.axis!r} is not allowed; allowed values: an integer >= 0")
        if not (isinstance(self.percentile, (int, float)) and 0 < self.percentile <= 100):
            raise PlanError(
                f"percentile={self.percentile!r} is not allowed; "
                "allowed values: a number in (0, 100]"
            )
        if not (isinstance(self.momentum, (int, float)) and 0 < self.momentum <= 1):
            raise PlanError(
                f"momentum={self.momentum!r} is not allowed; allowed values: a number in (0, 1]"
            )
        if isinstance(self.bins, bool) or not isinstance(self.bins, int) or self.bins < 16:
            raise PlanError(f"bins={self.bins!r} is not allowed; allowed values: an integer >= 16")
        if self.learned_zero_point and self.symmetric and not self.is_float:
            raise PlanError(
                "learned_zero_point=True is not allowed with symmetric=True (the zero-point of "
                "a symmetric grid is 0); allowed values: learned_zero_point=False, or "
                "symmetric=False"
            )

    @property
    def is_float(self) -> bool:
        """True for ``fp16``/``fp32``: the tensor is not integer-quantized."""
        return isinstance(self.bits, str)

    @property
    def per_channel(self) -> bool:
        return self.granularity is Granularity.PER_CHANNEL

    @property
    def qrange(self) -> tuple[int, int]:
        """``(qmin, qmax)`` of the integer grid; symmetric ranges are narrow (no -2^(b-1))."""
        if self.is_float:
            raise PlanError(f"bits={self.bits!r} has no integer range")
        b = int(self.bits)
        if self.symmetric:
            return -(2 ** (b - 1) - 1), 2 ** (b - 1) - 1
        return 0, 2**b - 1

    @property
    def storage_bits(self) -> int:
        """Bits one element needs in the deployed artifact."""
        return {"fp16": 16, "fp32": 32}.get(self.bits, self.bits)  # type: ignore[arg-type]

    def replace(self, **changes: Any) -> QuantSpec:
        """A copy with some fields changed (validated again)."""
        return QuantSpec(**{**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["granularity"] = self.granularity.value
        out["calibration"] = self.calibration.value
        if not self.learned_zero_point:  # newer than the plan format: absent means False
            del out["learned_zero_point"]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantSpec:
        if not isinstance(data, Mapping):
            raise PlanError(f"a QuantSpec must be a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PlanError(
                f"unknown QuantSpec field(s) {unknown}; allowed fields: {_allowed(sorted(known))}"
            )
        return cls(**data)

    def short(self) -> str:
        """Compact label, e.g. ``4c`` (4 bits, per-channel) or ``8a`` (8 bits, asymmetric)."""
        if self.is_float:
            return str(self.bits)
        return f"{self.bits}{'c' if self.per_channel else ''}{'' if self.symmetric else 'a'}"


FP32 = QuantSpec(bits="fp32")


@dataclass(frozen=True)
class LayerPlan:
    """The weight and input-activation specs of one layer.

    Example:
        >>> LayerPlan(weight=QuantSpec(bits=4), activation=QuantSpec(bits=8)).short()
        'w4a8'
    """

    weight: QuantSpec = FP32
    activation: QuantSpec = FP32

    def __post_init__(self) -> None:
        for name in ("weight", "activation"):
            value = getattr(self, name)
            if isinstance(value, Mapping):
                object.__setattr__(self, name, QuantSpec.from_dict(value))
            elif not isinstance(value, QuantSpec):
                raise PlanError(
                    f"LayerPlan.{name} must be a QuantSpec or a mapping, got {type(value).__name__}"
                )

    @property
    def is_float(self) -> bool:
        return self.weight.is_float and self.activation.is_float

    def to_dict(self) -> dict[str, Any]:
        return {"weight": self.weight.to_dict(), "activation": self.activation.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerPlan:
        unknown = sorted(set(data) - {"weight", "activation"})
        if unknown:
            raise PlanError(
                f"unknown LayerPlan field(s) {unknown}; allowed fields: 'activation', 'weight'"
            )
        return cls(**data)

    def short(self) -> str:
        return f"w{self.weight.short()}a{self.activation.short()}"


@dataclass(frozen=True)
class QuantPlan:
    """Fully-qualified module name → :class:`LayerPlan`, versioned.

    Layers not in the plan stay float. ``adds`` is the spec of the model's tensor + tensor adds
    (residual connections): ``fp32`` keeps them float; an 8-bit per-tensor spec quantizes both
    operands and the output (after a ReLU that follows the add), so the deployed graph can
    run them as integer adds (ONNX Runtime's QLinearAdd).

    Example:
        >>> plan = QuantPlan.uniform(["conv", "fc"], QuantSpec(bits=8), QuantSpec(bits=8))
        >>> sorted(plan.layers)
        ['conv', 'fc']
    """

    layers: Mapping[str, LayerPlan] = field(default_factory=dict)
    adds: QuantSpec = FP32
    version: int = PLAN_VERSION

    def __post_init__(self) -> None:
        if self.version != PLAN_VERSION:
            raise PlanError(
                f"version={self.version!r} is not supported; allowed values: {PLAN_VERSION}"
            )
        allowed = "allowed values: QuantSpec(bits='fp32') or an 8-bit per-tensor QuantSpec"
        try:
            adds = QuantSpec.from_dict(self.adds) if isinstance(self.adds, Mapping) else self.adds
        except PlanError as e:
            raise PlanError(f"QuantPlan.adds: {e}; {allowed}") from None
        if not isinstance(adds, QuantSpec) or not (
            adds.bits == "fp32" or (adds.bits == 8 and not adds.per_channel)
        ):
            raise PlanError(f"QuantPlan.adds={self.adds!r} is not allowed; {allowed}")
        object.__setattr__(self, "adds", adds)
        if not isinstance(self.layers, Mapping):
            raise PlanError(f"QuantPlan.layers must be a mapping, got {type(self.layers).__name__}")
        layers: dict[str, LayerPlan] = {}
        for name, lp in self.layers.items():
            if not isinstance(name, str) or not name:
                raise PlanError(f"layer name {name!r} must be a non-empty string")
            layers[name] = lp if isinstance(lp, LayerPlan) else LayerPlan.from_dict(lp)
        object.__setattr__(self, "layers", MappingProxyType(layers))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QuantPlan):
            return NotImplemented
        return (
            self.version == other.version
            and dict(self.layers) == dict(other.layers)
            and self.adds == other.adds
        )

    def __hash__(self) -> int:
        return hash(self.to_json())

    def __len__(self) -> int:
        return len(self.layers)

    @classmethod
    def uniform(
        cls,
        names: Iterable[str],
        weight: QuantSpec,
        activation: QuantSpec,
        adds: QuantSpec = FP32,
    ) -> QuantPlan:
        """The same :class:`LayerPlan` for every named layer."""
        lp = LayerPlan(weight=weight, activation=activation)
        return cls({n: lp for n in names}, adds=adds)

    def to_dict(self) -> dict[str, Any]:
        return {
            "_version": self.version,
            "layers": {n: lp.to_dict() for n, lp in self.layers.items()},
            "adds": self.adds.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantPlan:
        if not isinstance(data, Mapping) or "layers" not in data:
            raise PlanError("a QuantPlan dict needs the keys '_version' and 'layers'")
        unknown = sorted(set(data) - {"_version", "layers", "adds"})
        if unknown:
            raise PlanError(
                f"unknown QuantPlan field(s) {unknown}; allowed fields: '_version', 'adds', "
                "'layers'"
            )
        return cls(
            layers=data["layers"],
            adds=data.get("adds", FP32),  # plans written before adds existed: float adds
            version=data.get("_version", PLAN_VERSION),
        )

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> QuantPlan:
        return cls.from_dict(json.loads(text))

    def summary(self) -> str:
        """Compact per-layer bit summary, e.g. ``w8a8×3 w4a8×2``, in layer order runs, then
        ``add8a`` when the adds are quantized."""
        runs: list[list[Any]] = []
        for lp in self.layers.values():
            s = lp.short()
            if runs and runs[-1][0] == s:
                runs[-1][1] += 1
            else:
                runs.append([s, 1])
        text = " ".join(s if n == 1 else f"{s}×{n}" for s, n in runs)
        return text if self.adds.is_float else f"{text} add{self.adds.short()}".strip()


def load_plan(path: str | os.PathLike[str]) -> QuantPlan:
    """Read a plan from a JSON file, or from the ``plan.json`` of an ``autoquant export`` folder.

    Example:
        >>> from autoquant.transform import apply_plan  # doctest: +SKIP
        >>> model = apply_plan(float_model, load_plan("export-trial3"))  # doctest: +SKIP
    """
    p = Path(path)
    if p.is_dir():
        p = p / "plan.json"
    try:
        return QuantPlan.from_json(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"plan file {p} not found") from None
    except json.JSONDecodeError as e:
        raise PlanError(f"{p}: not valid JSON: {e}") from None
