"""Predicted accuracy drop of a whole plan from the per-unit sensitivity table.

The model is additive with one non-negative scale per damage source::

    drop(plan) ≈ s_w · Σ_u Dw[u, w_u] + s_a · (Σ_u Da[u, a_u] + D_adds) + b

``D`` is one table metric (``eval_kl`` by default: smooth, never negative, and it sees damage
long before the top-1 accuracy moves). The prior scale ``s0`` maps damage to accuracy drop
and comes from the table itself (:func:`prior_scale`: the median ratio of the measured
single-unit accuracy drops to their damage).

:meth:`Surrogate.fit` re-fits ``(s_w, s_a, b)`` on completed trials (plan → measured drop
after QAT) as a Bayesian ridge regression in natural units: each scale has the prior
``N(s0, (prior_rel_std · s0)²)``, the bias ``N(0, noise²)``, and a measured drop ``y`` the noise
``hypot(noise, rel_noise · y)``: the spread of an outcome grows with its size (how much QAT
recovers of a collapsed plan varies far more than of a w8 plan), so one collapsed trial does not
set the scales for the plans near the limit (on LeNet-5, leave-one-out error of QAT drops below
2 points: 0.77 points with a constant noise, 0.22 with ``rel_noise = 0.5``). That keeps the fit
well-posed with 2–5 trials and scale-free: a
source the trials barely exercise (all trials at 8-bit activations) keeps its prior scale,
instead of being stretched to fit noise, while a source the trials do exercise moves as far
as the evidence warrants (QAT recovers much of a 2-bit layer's PTQ damage, so ``s_w`` must be
free to fall by 10×: hence a wide default prior, ±100 %). Scales stay >= 0 (bounded least
squares). Three parameters, not one per unit: a per-unit correction needs far more trials than
the search has while the proposals matter. The posterior covariance gives each prediction a
standard deviation.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats
from scipy.optimize import lsq_linear

from autoquant.allocate._table import SensitivityTable
from autoquant.allocate._units import Choice, UnitSpace
from autoquant.types import PlanError, QuantPlan


@dataclass(frozen=True)
class Prediction:
    """A predicted accuracy drop (fraction), its standard deviation, and the damage sums."""

    drop: float
    std: float
    weight_damage: float
    activation_damage: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def prior_scale(table: SensitivityTable, metric: str, cap: float = 0.5) -> float:
    """The typical accuracy drop per unit of ``metric`` damage, from the table's own entries.

    The median of ``drop / damage`` over the single-unit entries whose held-out drop
    (``eval_acc``; ``calib_acc`` if absent) is resolvable (at least 2 samples flipped) and
    below ``cap`` (a collapsed model saturates at chance). The median, not a least-squares
    slope: a few high-leverage entries (an 8-bit KL-calibrated input that clips hard: KL 0.65
    for a 3-point drop on LeNet-5) would set the slope alone. On LeNet-5 this median (0.29
    for ``eval_kl``) matched the ratio over 60 random whole plans (0.27-0.34). Falls back to
    ``Σ drop / Σ damage`` with fewer than 3 such entries; 1.0 for an accuracy metric and for
    a table without accuracy drops (uncalibrated).

    Example:
        >>> prior_scale(table, "eval_kl")  # doctest: +SKIP
        0.29
    """
    if metric.endswith("_acc"):
        return 1.0
    acc_metric = next((m for m in ("eval_acc", "calib_acc") if m in table.metrics), None)
    if acc_metric is None:
        return 1.0
    split = acc_metric.split("_")[0]
    samples = float(table.reference.get(split, {}).get("samples", 0.0)) or 1.0
    d = np.concatenate([np.concatenate(p) for p in table.damage(metric)])
    a = np.concatenate([np.concatenate(p) for p in table.damage(acc_metric)])
    keep = (d > 0) & (a >= 2.0 / samples) & (a <= cap)
    if keep.sum() >= 3:
        return float(np.median(a[keep] / d[keep]))
    pos = d > 0
    total = float(d[pos].sum())
    if total == 0.0:
        return 1.0
    return max(float(a[pos].sum()) / total, 1e-12)


class Surrogate:
    """Predicted accuracy drop of a choice or plan; re-fitted on measured trials.

    Args:
        table: the sensitivity table (measured for ``units``).
        units: the units and options.
        metric: the table metric used as damage (negative values count as 0).
        prior: the prior scale ``s0``; default :func:`prior_scale` of the table.
        prior_cap: the drop cap for :func:`prior_scale`.
        prior_rel_std: the prior's standard deviation of each scale, relative to ``s0``
            (also the relative uncertainty of a prediction before any fit).
        noise: the standard deviation of a measured drop near 0 (fraction); also the
            prior's standard deviation of the bias.
        rel_noise: how the standard deviation of a measured drop grows with the drop.

    Example:
        >>> surrogate = Surrogate(table, units)  # doctest: +SKIP
        >>> surrogate.predict(choice).drop  # doctest: +SKIP
        0.0042
        >>> surrogate = surrogate.fit([(plan_a, 0.003), (plan_b, 0.011)])  # doctest: +SKIP
    """

    def __init__(
        self,
        table: SensitivityTable,
        units: UnitSpace,
        metric: str = "eval_kl",
        *,
        prior: float | None = None,
        prior_cap: float = 0.5,
        prior_rel_std: float = 1.0,
        noise: float = 2e-3,
        rel_noise: float = 0.5,
    ) -> None:
        table.check(units)
        for name, value in (("prior_rel_std", prior_rel_std), ("noise", noise)):
            if not value > 0:
                raise ValueError(f"{name}={value!r} is not allowed; allowed values: > 0")
        if not rel_noise >= 0:
            raise ValueError(f"rel_noise={rel_noise!r} is not allowed; allowed values: >= 0")
        self.units = units
        self.metric = metric
        damages = table.damage(metric)
        self.weight = [np.clip(w, 0.0, None) for w, _ in damages]
        self.activation = [np.clip(a, 0.0, None) for _, a in damages]
        self.adds = {c: max(table.adds_damage(c, metric), 0.0) for c in ("int8", "fp32")}
        self.prior = prior_scale(table, metric, prior_cap) if prior is None else float(prior)
        if not self.prior >= 0:
            raise ValueError(f"prior={prior!r} is not allowed; allowed values: >= 0")
        self.noise = noise
        self.rel_noise = rel_noise
        self.prior_rel_std = prior_rel_std
        self.scale_w = self.scale_a = self.prior
        self.bias = 0.0
        self.inflation: float | None = None  # fitted misfit over the assumed noise (>= 1)
        self.cov: np.ndarray | None = None
        self.observations = 0

    # -- damages -----------------------------------------------------------------------

    def _choice(self, x: QuantPlan | Sequence[int]) -> tuple[Choice, str]:
        if isinstance(x, QuantPlan):
            choice = self.units.choice_of(x)
            if choice is None:
                raise PlanError(
                    "the plan is outside the search space; the surrogate cannot score it"
                )
            return choice, "fp32" if x.adds.is_float else "int8"
        return self.units.check(x), self.units.default_adds

    def damages(self, x: QuantPlan | Sequence[int], adds: str | None = None) -> tuple[float, float]:
        """``(weight damage, activation damage incl. adds)`` summed over units."""
        choice, plan_adds = self._choice(x)
        dw = da = 0.0
        for i, (u, k) in enumerate(zip(self.units.units, choice, strict=True)):
            w, a = u.split(k)
            dw += float(self.weight[i][w])
            da += float(self.activation[i][a])
        return dw, da + self.adds[adds or plan_adds]

    def predict(self, x: QuantPlan | Sequence[int], adds: str | None = None) -> Prediction:
        """The predicted drop of a plan or choice (a choice uses ``adds`` or the default)."""
        dw, da = self.damages(x, adds)
        f = np.array([dw, da, 1.0])
        drop = float(f @ self._params())
        if self.cov is None or self.inflation is None:
            std = math.hypot(self.prior_rel_std * abs(drop), self.noise)
        else:
            noise = self.inflation * math.hypot(self.noise, self.rel_noise * drop)
            std = math.sqrt(max(float(f @ self.cov @ f), 0.0) + noise**2)
        return Prediction(drop=drop, std=std, weight_damage=dw, activation_damage=da)

    def prob_within(
        self, x: QuantPlan | Sequence[int], max_drop: float, adds: str | None = None
    ) -> float:
        """Probability that the measured drop is at most ``max_drop`` (Gaussian prediction):
        e.g. to skip or prune a sampled plan that is almost surely infeasible."""
        p = self.predict(x, adds)
        return float(stats.norm.cdf((max_drop - p.drop) / p.std))

    def _params(self) -> np.ndarray:
        return np.array([self.scale_w, self.scale_a, self.bias])

    def option_drop(self, unit: int) -> np.ndarray:
        """Each option's share of the predicted drop (the solver's per-option cost)."""
        w = self.weight[unit] * self.scale_w
        a = self.activation[unit] * self.scale_a
        return (w[:, None] + a[None, :]).reshape(-1)

    def constant(self, adds: str | None = None) -> float:
        """The part of the prediction no unit choice changes (bias and the adds)."""
        return self.bias + self.scale_a * self.adds[adds or self.units.default_adds]

    # -- fitting -----------------------------------------------------------------------

    def fit(self, observations: Sequence[tuple[QuantPlan | Sequence[int], float]]) -> Surrogate:
        """A copy re-fitted on ``(plan or choice, measured accuracy drop)`` pairs.

        With no observations the copy keeps the prior. Plans outside the space raise
        :class:`~autoquant.types.PlanError`.
        """
        out = copy.copy(self)
        obs = list(observations)
        if not obs:
            return out
        x = np.array([[*self.damages(p), 1.0] for p, _ in obs])
        y = np.array([float(v) for _, v in obs])
        if not np.all(np.isfinite(y)):
            raise ValueError(f"measured drops must be finite, got {y.tolist()}")
        # Whitened rows: data / its noise, then one row per prior (scale / its std).
        sigma = np.hypot(self.noise, self.rel_noise * y)
        prior_std = self.prior_rel_std * max(self.prior, 1e-12)
        a = np.vstack([x / sigma[:, None], np.diag([1 / prior_std, 1 / prior_std, 1 / self.noise])])
        b = np.concatenate([y / sigma, [self.prior / prior_std, self.prior / prior_std, 0.0]])
        sol = lsq_linear(a, b, bounds=([0.0, 0.0, -np.inf], [np.inf, np.inf, np.inf]))
        out.scale_w, out.scale_a, out.bias = (float(v) for v in sol.x)
        chi = math.sqrt(float((((x @ sol.x - y) / sigma) ** 2).mean()))
        out.inflation = max(chi, 1.0)  # misfit beyond the assumed noise widens the band
        out.cov = np.linalg.inv(a.T @ a) * out.inflation**2
        out.observations = len(obs)
        return out

    def to_dict(self) -> dict[str, Any]:
        """The fitted state, for a trial or study record."""
        return {
            "metric": self.metric,
            "prior": self.prior,
            "scale_weight": self.scale_w,
            "scale_activation": self.scale_a,
            "bias": self.bias,
            "inflation": self.inflation,
            "observations": self.observations,
        }


def _rank(fn: Any, predicted: Sequence[float], measured: Sequence[float]) -> float:
    p, m = np.asarray(predicted, float), np.asarray(measured, float)
    if p.shape != m.shape or p.ndim != 1:
        raise ValueError(f"need two equal-length sequences, got {p.shape} and {m.shape}")
    if len(p) < 2 or np.ptp(p) == 0 or np.ptp(m) == 0:
        return float("nan")
    return float(fn(p, m)[0])


def spearman(predicted: Sequence[float], measured: Sequence[float]) -> float:
    """Spearman rank correlation (nan when undefined: fewer than 2 points or a constant).

    Example:
        >>> spearman([0.1, 0.2, 0.3], [1.0, 3.0, 2.0])
        0.5
    """
    return _rank(stats.spearmanr, predicted, measured)


def kendall(predicted: Sequence[float], measured: Sequence[float]) -> float:
    """Kendall's tau-b rank correlation (nan when undefined).

    Example:
        >>> round(kendall([0.1, 0.2, 0.3], [1.0, 3.0, 2.0]), 4)
        0.3333
    """
    return _rank(stats.kendalltau, predicted, measured)
