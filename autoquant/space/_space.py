"""The search space: which layers are searched and which per-layer choices exist."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any, Protocol

from autoquant.types import (
    ALLOWED_BITS,
    CalibrationMethod,
    Granularity,
    LayerPlan,
    PlanError,
    QuantPlan,
    QuantSpec,
)

#: Learned quantizer parameters per layer: ``none`` (calibrated, frozen), ``scale`` (LSQ) and,
#: for activations on an asymmetric grid, ``scale+zero_point`` (LSQ+).
W_LEARN = ("none", "scale")
A_LEARN = ("none", "scale", "scale+zero_point")

# Per-layer knobs: parameter suffix → (QuantSpec owner, QuantSpec field, allowed values). The
# ``learn`` pseudo-field sets ``learned_scale`` / ``learned_zero_point`` (see _learn_fields).
KNOBS: dict[str, tuple[str, str, tuple[Any, ...]]] = {
    "w_bits": ("weight", "bits", ALLOWED_BITS),
    "a_bits": ("activation", "bits", ALLOWED_BITS),
    "w_sym": ("weight", "symmetric", (True, False)),
    "a_sym": ("activation", "symmetric", (True, False)),
    "w_gran": ("weight", "granularity", tuple(g.value for g in Granularity)),
    "a_gran": ("activation", "granularity", tuple(g.value for g in Granularity)),
    "w_calib": ("weight", "calibration", tuple(c.value for c in CalibrationMethod)),
    "a_calib": ("activation", "calibration", tuple(c.value for c in CalibrationMethod)),
    "w_learn": ("weight", "learn", W_LEARN),
    "a_learn": ("activation", "learn", A_LEARN),
}


def _learn_fields(choice: str, symmetric: bool) -> dict[str, bool]:
    """QuantSpec fields of a ``w_learn``/``a_learn`` choice; a symmetric grid has no zero-point
    to learn, so ``scale+zero_point`` learns the scale alone there."""
    return {
        "learned_scale": choice != "none",
        "learned_zero_point": choice == "scale+zero_point" and not symmetric,
    }


ADD_CHOICES = ("int8", "fp32")


class ChoiceTrial(Protocol):
    """The part of :class:`optuna.trial.BaseTrial` the space needs (``FixedTrial`` works too)."""

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any: ...

    def suggest_float(self, name: str, low: float, high: float, *, log: bool = False) -> float: ...


def _as_tuple(value: Any, name: str) -> tuple[Any, ...]:
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    if not values:
        raise PlanError(f"space.{name} is empty; give at least one choice")
    return values


def _check_choices(name: str, values: tuple[Any, ...]) -> tuple[Any, ...]:
    allowed = KNOBS[name][2]
    out = []
    for v in values:
        if isinstance(v, str) and v.isdigit():
            v = int(v)
        if v not in allowed or (isinstance(v, bool) and not isinstance(allowed[0], bool)):
            raise PlanError(
                f"space.{name} has {v!r}; allowed values: {', '.join(repr(a) for a in allowed)}"
            )
        out.append(v)
    return tuple(dict.fromkeys(out))  # de-duplicated, order kept


@dataclass(frozen=True)
class SearchSpace:
    """Per-layer choices and which layers are searched.

    Each knob (``w_bits``, ``a_bits``, ``w_sym``, ``a_sym``, ``w_gran``, ``a_gran``,
    ``w_calib``, ``a_calib``, ``w_learn``, ``a_learn``) is a tuple of choices; a single choice
    is fixed and not suggested. ``w_learn`` (``"none"``, ``"scale"``) and ``a_learn``
    (``"none"``, ``"scale"``, ``"scale+zero_point"``) choose which quantizer parameters QAT
    learns: none (calibrated, frozen), the scale (LSQ) or, on an asymmetric activation grid,
    the scale and the zero-point (LSQ+; on a symmetric grid it learns the scale alone).
    ``learned_scale=True`` is the older per-study switch: it makes ``"scale"`` the default of
    both (an explicit ``w_learn``/``a_learn`` wins). The residual adds' quantizers learn like
    the first ``a_learn`` choice.

    ``include``/``exclude`` are fnmatch patterns over layer names; excluded layers stay float.
    ``tie`` maps a group name to patterns whose layers share one choice. ``overrides`` maps a
    pattern to knob values (a scalar fixes the knob, a list narrows it), e.g.
    ``{"conv1": {"w_bits": 8}}`` keeps the first layer at 8 bits.
    ``lr`` and ``quant_lr`` (``(low, high)`` log ranges), ``qat_steps`` (choices) and
    ``distill`` (``(True, False)``: with or without distillation from the float model) make QAT
    hyperparameters part of the search. ``adds`` chooses how the model's residual adds run:
    ``"int8"`` (8-bit asymmetric, calibrated like the activations: an integer add when
    deployed) or ``"fp32"``; with both, the search picks (parameter ``adds``).

    Example:
        >>> space = SearchSpace(w_bits=(4, 8), overrides={"fc": {"w_bits": 8}})
        >>> space.knob_choices("fc")["w_bits"]
        (8,)
    """

    w_bits: tuple[Any, ...] = (2, 4, 8)
    a_bits: tuple[Any, ...] = (8,)
    w_sym: tuple[bool, ...] = (True,)
    a_sym: tuple[bool, ...] = (False,)
    w_gran: tuple[str, ...] = ("per_channel",)
    a_gran: tuple[str, ...] = ("per_tensor",)
    w_calib: tuple[str, ...] = ("mse",)
    a_calib: tuple[str, ...] = ("minmax",)
    w_learn: tuple[str, ...] | None = None
    a_learn: tuple[str, ...] | None = None
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    tie: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    lr: tuple[float, float] | None = None
    qat_steps: tuple[int, ...] | None = None
    percentile: float = 99.99
    learned_scale: bool = False
    adds: tuple[str, ...] = ("int8",)
    quant_lr: tuple[float, float] | None = None
    distill: tuple[bool, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.learned_scale, bool):
            raise PlanError(
                f"space.learned_scale={self.learned_scale!r} is not allowed; "
                "allowed values: true, false"
            )
        default_learn = ("scale",) if self.learned_scale else ("none",)
        for name in ("w_learn", "a_learn"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, default_learn)
        for name in KNOBS:
            object.__setattr__(
                self, name, _check_choices(name, _as_tuple(getattr(self, name), name))
            )
        for name in ("include", "exclude"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        if not self.include:
            raise PlanError("space.include is empty; give at least one pattern such as '*'")
        tie = {}
        for group, patterns in dict(self.tie).items():
            pats = (patterns,) if isinstance(patterns, str) else tuple(patterns)
            if not pats:
                raise PlanError(f"space.tie.{group} is empty; give at least one pattern")
            tie[str(group)] = pats
        object.__setattr__(self, "tie", MappingProxyType(tie))
        overrides = {}
        for pattern, knobs in dict(self.overrides).items():
            if not isinstance(knobs, Mapping):
                raise PlanError(f"space.overrides.{pattern} must be a table of knob values")
            for knob, value in knobs.items():
                if knob not in KNOBS:
                    raise PlanError(
                        f"space.overrides.{pattern} has unknown knob {knob!r}; "
                        f"allowed: {', '.join(KNOBS)}"
                    )
                _check_choices(knob, _as_tuple(value, f"overrides.{pattern}.{knob}"))
            overrides[str(pattern)] = MappingProxyType(dict(knobs))
        object.__setattr__(self, "overrides", MappingProxyType(overrides))
        adds = _as_tuple(self.adds, "adds")
        bad = [a for a in adds if a not in ADD_CHOICES]
        if bad:
            raise PlanError(
                f"space.adds has {bad[0]!r}; allowed values: {', '.join(map(repr, ADD_CHOICES))}"
            )
        object.__setattr__(self, "adds", tuple(dict.fromkeys(adds)))
        for name in ("lr", "quant_lr"):
            value = getattr(self, name)
            if value is None:
                continue
            try:
                lo, hi = (float(v) for v in value)
            except (TypeError, ValueError):
                lo = hi = float("nan")
            if not 0 < lo <= hi:
                raise PlanError(f"space.{name}={value!r} must be [low, high] with 0 < low <= high")
            object.__setattr__(self, name, (lo, hi))
        if self.distill is not None:
            distill = _as_tuple(self.distill, "distill")
            if any(not isinstance(d, bool) for d in distill):
                raise PlanError(
                    f"space.distill={self.distill!r} is not allowed; allowed values: "
                    "a list of true/false"
                )
            object.__setattr__(self, "distill", tuple(dict.fromkeys(distill)))
        if self.qat_steps is not None:
            steps = _as_tuple(self.qat_steps, "qat_steps")
            if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in steps):
                raise PlanError(f"space.qat_steps={self.qat_steps!r}; allowed: integers >= 0")
            object.__setattr__(self, "qat_steps", steps)

    # -- layer selection -------------------------------------------------------------

    def select(self, layer_names: Sequence[str]) -> list[str]:
        """The searched layers, in model order; checks that every pattern matches a layer.

        Raises:
            PlanError: a pattern matches no layer, or no layer is left to search.
        """
        names = list(layer_names)
        for where, patterns in (
            ("include", self.include),
            ("exclude", self.exclude),
            ("overrides", tuple(self.overrides)),
            *((f"tie.{g}", p) for g, p in self.tie.items()),
        ):
            for pat in patterns:
                if not fnmatch.filter(names, pat):
                    raise PlanError(
                        f"space.{where} pattern {pat!r} matches no layer; "
                        f"layers: {', '.join(names)}"
                    )
        chosen = [
            n
            for n in names
            if any(fnmatch.fnmatchcase(n, p) for p in self.include)
            and not any(fnmatch.fnmatchcase(n, p) for p in self.exclude)
        ]
        for n in chosen:
            choices = self.knob_choices(n)
            if "scale+zero_point" in choices["a_learn"] and False not in choices["a_sym"]:
                raise PlanError(
                    f"space.a_learn has 'scale+zero_point' but layer {n!r} only has symmetric "
                    "activations (a_sym = [true]), which have no zero-point to learn; allowed: "
                    "a_sym with false, or a_learn 'none'/'scale'"
                )
        for group in self.tie:
            members = [n for n in chosen if self.group_of(n) == group]
            choices = {n: self.knob_choices(n) for n in members}
            if len({repr(c) for c in choices.values()}) > 1:
                raise PlanError(
                    f"space.tie.{group}: its layers {members} get different choices "
                    "from space.overrides; a tie group shares one choice, so "
                    "override all of its layers alike"
                )
        if not chosen:
            raise PlanError(
                "the search space is empty: include/exclude leave no layer; "
                f"layers: {', '.join(names)}"
            )
        return chosen

    def group_of(self, layer: str) -> str:
        """The parameter prefix of a layer: its tie group's name, or the layer name itself."""
        for group, patterns in self.tie.items():
            if any(fnmatch.fnmatchcase(layer, p) for p in patterns):
                return group
        return layer

    def knob_choices(self, layer: str) -> dict[str, tuple[Any, ...]]:
        """Choices for each knob of one layer after overrides (later patterns win)."""
        choices = {k: getattr(self, k) for k in KNOBS}
        for pattern, knobs in self.overrides.items():
            if fnmatch.fnmatchcase(layer, pattern):
                for knob, value in knobs.items():
                    choices[knob] = _check_choices(knob, _as_tuple(value, knob))
        return choices

    # -- trial → plan ----------------------------------------------------------------

    def param_names(self, layer_names: Sequence[str]) -> list[str]:
        """Names of the parameters a trial suggests, e.g. ``layer1.0.conv1/w_bits``."""
        names: list[str] = []
        for layer in self.select(layer_names):
            prefix = self.group_of(layer)
            for knob, values in self.knob_choices(layer).items():
                name = f"{prefix}/{knob}"
                if len(values) > 1 and name not in names:
                    names.append(name)
        if len(self.adds) > 1:
            names.append("adds")
        return names

    def adds_spec(self, choice: str) -> QuantSpec:
        """The :attr:`QuantPlan.adds <autoquant.types.QuantPlan>` spec of an ``adds`` choice."""
        if choice == "fp32":
            return QuantSpec(bits="fp32")
        return QuantSpec(
            bits=8,
            symmetric=False,
            calibration=self.a_calib[0],
            percentile=self.percentile,
            **_learn_fields(self.a_learn[0], symmetric=False),  # type: ignore[index]
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Mapping):
                v = {k: (dict(x) if isinstance(x, Mapping) else list(x)) for k, x in v.items()}
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SearchSpace:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PlanError(
                f"unknown space key(s) {unknown}; allowed keys: {', '.join(sorted(known))}"
            )
        return cls(**data)


def plan_from_trial(
    trial: ChoiceTrial, space: SearchSpace, layer_names: Sequence[str]
) -> QuantPlan:
    """Turn any Optuna trial (``Trial``, ``FrozenTrial``-replay via ``FixedTrial``) into a plan.

    Parameter names are ``<layer or tie group>/<knob>``; knobs with one choice are fixed
    and not suggested.

    Example:
        >>> import optuna
        >>> space = SearchSpace(w_bits=(4, 8))
        >>> plan = plan_from_trial(optuna.trial.FixedTrial({"fc/w_bits": 4}), space, ["fc"])
        >>> plan.layers["fc"].short()
        'w4ca8a'
    """
    layers: dict[str, LayerPlan] = {}
    for layer in space.select(layer_names):
        prefix = space.group_of(layer)
        values: dict[str, Any] = {}
        for knob, choices in space.knob_choices(layer).items():
            name = f"{prefix}/{knob}"
            values[knob] = (
                choices[0] if len(choices) == 1 else trial.suggest_categorical(name, list(choices))
            )
        specs: dict[str, dict[str, Any]] = {"weight": {}, "activation": {}}
        for knob, value in values.items():
            owner, spec_field, _ = KNOBS[knob]
            specs[owner][spec_field] = value
        for spec in specs.values():
            spec.update(_learn_fields(spec.pop("learn"), symmetric=spec["symmetric"]))
        layers[layer] = LayerPlan(
            weight=QuantSpec(**specs["weight"], percentile=space.percentile, axis=0),
            activation=QuantSpec(**specs["activation"], percentile=space.percentile, axis=1),
        )
    adds = (
        space.adds[0]
        if len(space.adds) == 1
        else trial.suggest_categorical("adds", list(space.adds))
    )
    return QuantPlan(layers, adds=space.adds_spec(adds))


def qat_params_from_trial(
    trial: ChoiceTrial, space: SearchSpace, lr: float, steps: int
) -> dict[str, Any]:
    """QAT hyperparameters: searched when the space names them, else the given defaults.

    Always ``lr`` and ``steps``; ``quant_lr`` (parameter ``qat/quant_lr``) and ``distill``
    (``qat/distill``, a bool: distil from the float model or not) only when the space has them,
    so that trials stored before they existed compare equal.

    Example:
        >>> import optuna
        >>> space = SearchSpace(distill=(True, False))
        >>> qat_params_from_trial(optuna.trial.FixedTrial({"qat/distill": True}), space, 0.1, 9)
        {'lr': 0.1, 'steps': 9, 'distill': True}
    """
    if space.lr is not None:
        lr = trial.suggest_float("qat/lr", space.lr[0], space.lr[1], log=True)
    if space.qat_steps is not None:
        steps = (
            space.qat_steps[0]
            if len(space.qat_steps) == 1
            else trial.suggest_categorical("qat/steps", list(space.qat_steps))
        )
    out: dict[str, Any] = {"lr": lr, "steps": int(steps)}
    if space.quant_lr is not None:
        out["quant_lr"] = trial.suggest_float(
            "qat/quant_lr", space.quant_lr[0], space.quant_lr[1], log=True
        )
    if space.distill is not None:
        out["distill"] = bool(
            space.distill[0]
            if len(space.distill) == 1
            else trial.suggest_categorical("qat/distill", list(space.distill))
        )
    return out


def baseline_params(
    space: SearchSpace, layer_names: Sequence[str], w_bits: int, a_bits: int
) -> dict[str, Any] | None:
    """Trial parameters for a uniform ``w{w_bits}a{a_bits}`` per-channel baseline.

    Knobs other than bits take per-channel weights where allowed, else their first
    choice. Returns None when the space cannot express the baseline (a bit width missing
    from a layer's choices is skipped only where overrides fix that layer).
    """
    params: dict[str, Any] = {}
    wanted = {"w_bits": w_bits, "a_bits": a_bits, "w_gran": "per_channel"}
    for layer in space.select(layer_names):
        prefix = space.group_of(layer)
        for knob, choices in space.knob_choices(layer).items():
            if len(choices) == 1:
                continue
            value = wanted.get(knob, choices[0])
            if value not in choices:
                if knob in ("w_bits", "a_bits"):
                    return None
                value = choices[0]
            params[f"{prefix}/{knob}"] = value
    if space.qat_steps is not None and len(space.qat_steps) > 1:
        params["qat/steps"] = space.qat_steps[0]
    if len(space.adds) > 1:
        params["adds"] = "int8"
    return params


def fit_space(
    space: SearchSpace, float_inputs: Sequence[str] = (), no_weights: Sequence[str] = ()
) -> SearchSpace:
    """``space`` with the knobs that cannot apply fixed, so no trial spends a choice on them.

    Layers whose input is never quantized (embeddings: the input is token ids) get an fp32
    activation and layers without a weight (attention matmuls) an fp32 weight; the other
    knobs of that side take their first choice. These overrides come after the user's, so
    they win (the layer cannot do anything else).

    Args:
        space: the study's space.
        float_inputs: names of layers that do not quantize their input.
        no_weights: names of layers that have no weight.

    Example:
        >>> s = fit_space(SearchSpace(a_bits=(4, 8)), float_inputs=["emb"])
        >>> s.knob_choices("emb")["a_bits"], s.knob_choices("fc")["a_bits"]
        (('fp32',), (4, 8))
    """
    auto: dict[str, dict[str, Any]] = {}
    for names, side in ((float_inputs, "a"), (no_weights, "w")):
        for name in names:
            choices = space.knob_choices(name)
            knobs = auto.setdefault(fnmatch_escape(name), {})
            for knob in KNOBS:
                if knob.startswith(f"{side}_"):
                    knobs[knob] = "fp32" if knob.endswith("_bits") else choices[knob][0]
            knobs[f"{side}_learn"] = "none"
    if not auto:
        return space
    overrides = {k: dict(v) for k, v in space.overrides.items()}
    for pattern, knobs in auto.items():  # last, so that they win; a user's other knobs stay
        overrides[pattern] = {**overrides.pop(pattern, {}), **knobs}
    return replace(space, overrides=overrides)


def fnmatch_escape(name: str) -> str:
    """A pattern that matches exactly ``name`` (``[``, ``*``, ``?`` taken literally)."""
    return "".join(f"[{c}]" if c in "[]*?" else c for c in name)
