"""Cost models per unit option: exact packed size, and a fitted additive latency model.

Size is exact: each unit option's bytes are read off
:func:`~autoquant.transform.size_breakdown` (weight, weight qparams, input qparams of the
unit's layers; biases and everything else are a constant), so the solver's size constraint
is the size the search will measure.

Latency is measured, not known up front, so it is a model: additive over layers by kernel
category (:func:`kernel_category`), ``latency = b + Σ_l (m_l · r[c_l] + δ[l, c_l])`` with
``m_l`` the layer's share of the MACs, ``r[c]`` a per-MAC rate per category and ``δ`` a
per-layer correction. Ridge priors pull the rates toward one common rate, ``b`` and ``δ``
toward 0, so two or three measurements (the float model and the uniform baselines) already
give a MAC-proportional model and later trials refine it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import lsq_linear
from torch import nn

from autoquant.allocate._units import Choice, UnitSpace
from autoquant.measure import LayerFormat
from autoquant.transform import size_breakdown
from autoquant.types import LayerPlan, PlanError, QuantPlan

_WEIGHT_ROLES = ("weight", "weight_scale", "weight_zero_point")
_ACT_ROLES = ("act_scale", "act_zero_point")


@dataclass(frozen=True)
class SizeModel:
    """Exact deployed bytes per unit option.

    ``size(choice) = constant + Σ_u weight_bytes[u][w] + activation_bytes[u][a]`` equals
    :func:`~autoquant.transform.packed_size_bytes` of the choice's plan.

    Attributes:
        constant: bytes that no choice changes (biases, float layers, other parameters).
        weight_bytes: per unit, per weight option: packed weights plus weight qparams.
        activation_bytes: per unit, per activation option: input qparams.
        float_bytes: the BN-folded float model's bytes (the size-ratio denominator).

    Example:
        >>> sizes = SizeModel.build(model, units)  # doctest: +SKIP
        >>> sizes.size(choice) == packed_size_bytes(model, units.plan(choice))  # doctest: +SKIP
        True
    """

    constant: int
    weight_bytes: tuple[tuple[int, ...], ...]
    activation_bytes: tuple[tuple[int, ...], ...]
    float_bytes: int

    @classmethod
    def build(cls, model: nn.Module, units: UnitSpace) -> SizeModel:
        """Read every option's bytes off :func:`~autoquant.transform.size_breakdown` of
        ``max(weight options, activation options)`` plans of the float ``model``."""
        owner = {layer: i for i, u in enumerate(units.units) for layer in u.layers}
        weight: list[dict[int, int]] = [{} for _ in units.units]
        act: list[dict[int, int]] = [{} for _ in units.units]
        constant: int | None = None
        steps = max(max(u.n_weight, u.n_activation) for u in units.units)
        for k in range(steps):
            ws = [min(k, u.n_weight - 1) for u in units.units]
            acts = [min(k, u.n_activation - 1) for u in units.units]
            choice = tuple(u.option(w, a) for u, w, a in zip(units.units, ws, acts, strict=True))
            w_part = [0] * len(units.units)
            a_part = [0] * len(units.units)
            rest = 0
            for row in size_breakdown(model, units.plan(choice)):
                i = owner.get(row.layer)
                if i is not None and row.role in _WEIGHT_ROLES:
                    w_part[i] += row.bytes
                elif i is not None and row.role in _ACT_ROLES:
                    a_part[i] += row.bytes
                else:
                    rest += row.bytes
            if constant is not None and rest != constant:  # pragma: no cover - invariant
                raise RuntimeError("size rows outside the units changed with the choice")
            constant = rest
            for i in range(len(units.units)):
                weight[i][ws[i]] = w_part[i]
                act[i][acts[i]] = a_part[i]
        float_bytes = sum(r.bytes for r in size_breakdown(model, QuantPlan({})))
        return cls(
            constant=int(constant or 0),
            weight_bytes=tuple(tuple(d[w] for w in range(len(d))) for d in weight),
            activation_bytes=tuple(tuple(d[a] for a in range(len(d))) for d in act),
            float_bytes=float_bytes,
        )

    def option_bytes(self, unit: int) -> np.ndarray:
        """Bytes of each option of ``unit`` (option order: weight-major)."""
        w = np.asarray(self.weight_bytes[unit], dtype=np.int64)
        a = np.asarray(self.activation_bytes[unit], dtype=np.int64)
        return (w[:, None] + a[None, :]).reshape(-1)

    def size(self, choice: Sequence[int]) -> int:
        """Exact packed bytes of a choice."""
        return self.constant + sum(int(self.option_bytes(i)[k]) for i, k in enumerate(choice))


# ---------------------------------------------------------------------------------------
# Latency
# ---------------------------------------------------------------------------------------

CATEGORIES = ("float", "int8", "int8_sat", "simulated")


def kernel_category(lp: LayerPlan | None) -> str:
    """How a layer runs when deployed (see :class:`~autoquant.measure.LayerFormat`).

    ``float``: no integer tensor (fp32/fp16); ``int8``: an integer kernel; ``int8_sat``: an
    8-bit × 8-bit integer layer on a CPU whose u8×s8 kernels saturate (run another way, at
    another speed); ``simulated``: an integer tensor around a float kernel (e.g. weights
    dequantized at run time, per-channel activations).

    Example:
        >>> from autoquant.types import QuantSpec
        >>> kernel_category(LayerPlan(QuantSpec(bits=4), QuantSpec(bits="fp32")))
        'simulated'
    """
    if lp is None:
        return "float"
    fmt = LayerFormat.of(lp)
    if fmt.int_kernel:
        return "int8_sat" if fmt.saturates else "int8"
    if not fmt.weight.is_int and not fmt.activation.is_int:
        return "float"
    return "simulated"


class LatencyModel:
    """Additive per-layer latency by kernel category, fitted on measured plans.

    Args:
        units: the units and options.
        layer_macs: MACs per layer name (e.g. from :func:`~autoquant.transform.
            quantizable_layers`); layers outside the units are part of the constant.
        ridge_rate: weight of the prior "every category costs the same per MAC".
        ridge_layer: weight of the prior "no per-layer correction".
        ridge_intercept: weight of the prior "no fixed cost".

    The priors act like pseudo-observations on the scale of the mean measured latency, so
    ``ridge_layer=1`` means one measurement's worth of evidence for each correction.

    Example:
        >>> model = LatencyModel(units, macs).fit([(None, 2.0), (w8a8_plan, 0.9)])  # doctest: +SKIP
        >>> model.predict(mixed_plan)  # doctest: +SKIP
        1.4
    """

    def __init__(
        self,
        units: UnitSpace,
        layer_macs: Mapping[str, float],
        *,
        ridge_rate: float = 1e-2,
        ridge_layer: float = 1.0,
        ridge_intercept: float = 1e-2,
    ) -> None:
        for name, value in (
            ("ridge_rate", ridge_rate),
            ("ridge_layer", ridge_layer),
            ("ridge_intercept", ridge_intercept),
        ):
            if not value > 0:
                raise ValueError(f"{name}={value!r} is not allowed; allowed values: > 0")
        self.units = units
        self.layers = [layer for u in units.units for layer in u.layers]
        missing = [n for n in self.layers if n not in layer_macs]
        if missing:
            raise PlanError(f"layer_macs lacks {missing}; give the MACs of every unit layer")
        macs = np.array([float(layer_macs[n]) for n in self.layers])
        total = macs.sum()
        self.share = macs / total if total > 0 else np.full(len(macs), 1 / len(macs))
        self.ridge = (ridge_rate, ridge_layer, ridge_intercept)
        self.theta: np.ndarray | None = None  # [b, r(C), δ(L×C)] in units of `scale`
        self.scale = 1.0
        self.observations = 0
        n_cat = len(CATEGORIES)
        self._categories = [
            [CATEGORIES.index(kernel_category(units.layer_plan(i, k))) for k in range(u.n_options)]
            for i, u in enumerate(units.units)
        ]
        self._n = 1 + n_cat + len(self.layers) * n_cat

    # -- features ----------------------------------------------------------------------

    def _features(self, cats: Sequence[int]) -> np.ndarray:
        n_cat = len(CATEGORIES)
        f = np.zeros(self._n)
        f[0] = 1.0
        for j, c in enumerate(cats):
            f[1 + c] += self.share[j]
            f[1 + n_cat + j * n_cat + c] = 1.0
        return f

    def _cats_of_plan(self, plan: QuantPlan | None) -> list[int]:
        layers = {} if plan is None else plan.layers
        return [CATEGORIES.index(kernel_category(layers.get(n))) for n in self.layers]

    def _cats_of_choice(self, choice: Choice) -> list[int]:
        out = []
        for i, (u, k) in enumerate(zip(self.units.units, choice, strict=True)):
            out.extend([self._categories[i][k]] * len(u.layers))
        return out

    # -- fit and predict -----------------------------------------------------------------

    def fit(self, observations: Sequence[tuple[QuantPlan | None, float]]) -> LatencyModel:
        """Fit on ``(plan, latency_ms)`` pairs (``None`` is the float model); returns self.

        Raises:
            ValueError: no observation, or a latency that is not a positive number.
        """
        obs = list(observations)
        if not obs:
            raise ValueError("fit the latency model on at least one measurement (the float model)")
        y = np.array([float(v) for _, v in obs])
        if not np.all(np.isfinite(y)) or np.any(y <= 0):
            raise ValueError(f"latencies must be finite and > 0, got {y.tolist()}")
        self.scale = float(y.mean())
        rows = np.array([self._features(self._cats_of_plan(p)) for p, _ in obs])
        n_cat = len(CATEGORIES)
        # Unknowns: θ (b, r, δ) and ρ, the common rate of the prior.
        a = np.zeros((len(obs), self._n + 1))
        a[:, : self._n] = rows
        prior = []
        r_w, d_w, b_w = (np.sqrt(v) for v in self.ridge)
        row = np.zeros(self._n + 1)
        row[0] = b_w
        prior.append(row)
        for c in range(n_cat):
            row = np.zeros(self._n + 1)
            row[1 + c], row[-1] = r_w, -r_w
            prior.append(row)
        for j in range(len(self.layers) * n_cat):
            row = np.zeros(self._n + 1)
            row[1 + n_cat + j] = d_w
            prior.append(row)
        a_all = np.vstack([a, np.array(prior)])
        b_all = np.concatenate([y / self.scale, np.zeros(len(prior))])
        lower = np.full(self._n + 1, -np.inf)
        lower[1 : 1 + n_cat] = 0.0  # a rate per MAC is never negative
        lower[-1] = 0.0
        sol = lsq_linear(a_all, b_all, bounds=(lower, np.full(self._n + 1, np.inf)))
        self.theta = sol.x[: self._n]
        self.observations = len(obs)
        return self

    def _check_fitted(self) -> np.ndarray:
        if self.theta is None:
            raise RuntimeError("the latency model is not fitted; call fit() with measurements")
        return self.theta

    def predict(self, plan: QuantPlan | Sequence[int] | None) -> float:
        """Predicted latency (ms) of a plan, a choice, or ``None`` (the float model)."""
        theta = self._check_fitted()
        if plan is None or isinstance(plan, QuantPlan):
            cats = self._cats_of_plan(plan)
        else:
            cats = self._cats_of_choice(self.units.check(plan))
        return float(self._features(cats) @ theta) * self.scale

    @property
    def constant_ms(self) -> float:
        """The fixed part (``b``) in ms."""
        return float(self._check_fitted()[0]) * self.scale

    def option_ms(self, unit: int) -> np.ndarray:
        """Latency (ms) each option of ``unit`` adds; a plan's prediction is
        :attr:`constant_ms` plus one entry per unit."""
        theta = self._check_fitted()
        n_cat = len(CATEGORIES)
        start = sum(len(u.layers) for u in self.units.units[:unit])
        out = []
        for c in self._categories[unit]:
            total = 0.0
            for j in range(start, start + len(self.units.units[unit].layers)):
                total += self.share[j] * theta[1 + c] + theta[1 + n_cat + j * n_cat + c]
            out.append(total * self.scale)
        return np.array(out)

    def rates(self) -> dict[str, float]:
        """Fitted ms per whole-model MACs, per kernel category."""
        theta = self._check_fitted()
        return {c: float(theta[1 + i]) * self.scale for i, c in enumerate(CATEGORIES)}

    def to_dict(self) -> dict[str, Any]:
        """The fitted state, for a trial or study record."""
        return {
            "observations": self.observations,
            "constant_ms": self.constant_ms,
            "rates_ms": self.rates(),
        }
