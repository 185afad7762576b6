"""Exact allocation: one option per unit, least predicted drop under size/latency budgets.

An integer program solved by HiGHS through :func:`scipy.optimize.milp`: binary ``x[u, k]``,
``Σ_k x[u, k] = 1`` per unit, the objective (predicted drop, or size or latency for the dual)
and linear budget rows. HiGHS runs with ``mip_rel_gap = 0``; costs are shifted per unit and
scaled to ``[0, 1]`` before solving, so its absolute tolerances (1e-6) are far below any
difference the surrogate can resolve. Each solution is rounded and checked exactly against the
budgets (sizes are integers); a budget the rounded solution exceeds is tightened and the
problem solved again.

Excluded choices (plans already tried) are no-good cuts: ``Σ_u x[u, c_u] <= units - 1``. With
option *classes* a cut covers every option of the tried one's class in each unit, so a plan
that differs from a tried one only within classes (say, only in calibration methods) is
excluded too.

Options that cannot be optimal are dropped first: an option is removed when its unit's other
options that are at least as good in every quantity the problem uses fall into more distinct
classes than there are excluded choices (so one of the swaps to a dominating option always
leads to a choice that is not excluded).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from autoquant.allocate._costs import LatencyModel, SizeModel
from autoquant.allocate._surrogate import Surrogate
from autoquant.allocate._units import Choice, UnitSpace
from autoquant.types import PlanError

QUANTITIES = ("drop", "size", "latency")
_MAX_TIGHTEN = 8


@dataclass(frozen=True)
class Problem:
    """Per unit and option: predicted drop, bytes and (optionally) latency; allowed options.

    Attributes:
        drop: per unit, each option's predicted drop (its share of the surrogate's sum).
        size: per unit, each option's bytes.
        latency: per unit, each option's latency in ms, or None without a latency model.
        allowed: per unit, a boolean mask of the options the solver may pick.
        drop_constant: the drop no choice changes (surrogate bias, adds).
        size_constant: bytes no choice changes.
        latency_constant: ms no choice changes.

    Example:
        >>> p = Problem(drop=([0.0, 0.3],), size=([8, 2],), allowed=([True, True],))
        >>> solve(p, max_size=5).choice
        (1,)
    """

    drop: tuple[np.ndarray, ...]
    size: tuple[np.ndarray, ...]
    allowed: tuple[np.ndarray, ...] = ()
    latency: tuple[np.ndarray, ...] | None = None
    drop_constant: float = 0.0
    size_constant: int = 0
    latency_constant: float = 0.0

    def __post_init__(self) -> None:
        drop = tuple(np.asarray(d, dtype=np.float64) for d in self.drop)
        size = tuple(np.asarray(s, dtype=np.int64) for s in self.size)
        allowed = (
            tuple(np.asarray(a, dtype=bool) for a in self.allowed)
            if self.allowed
            else tuple(np.ones(len(d), dtype=bool) for d in drop)
        )
        latency = (
            None if self.latency is None else tuple(np.asarray(t, np.float64) for t in self.latency)
        )
        if not drop:
            raise PlanError("an allocation problem needs at least one unit")
        for name, arrays in (("size", size), ("allowed", allowed), ("latency", latency)):
            if arrays is None:
                continue
            if len(arrays) != len(drop) or any(
                a.shape != d.shape for a, d in zip(arrays, drop, strict=False)
            ):
                raise PlanError(f"Problem.{name} must have one entry per option of each unit")
        for d in (*drop, *(latency or ())):
            if d.ndim != 1 or not np.all(np.isfinite(d)):
                raise PlanError("Problem costs must be finite 1-d arrays, one per unit")
        object.__setattr__(self, "drop", drop)
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "allowed", allowed)
        object.__setattr__(self, "latency", latency)

    @classmethod
    def build(
        cls,
        units: UnitSpace,
        surrogate: Surrogate,
        sizes: SizeModel,
        latency: LatencyModel | None = None,
        *,
        fixed: Mapping[str, int] | None = None,
        forbidden: Mapping[str, Sequence[int]] | None = None,
        adds: str | None = None,
    ) -> Problem:
        """The problem of a unit space under a surrogate and cost models.

        Args:
            units: the units and options.
            surrogate: predicted drop per option.
            sizes: bytes per option.
            latency: a fitted latency model, or None.
            fixed: unit name → the only option it may take.
            forbidden: unit name → options it may not take.
            adds: the ``adds`` choice the plans will use (default: the space's default).
        """
        allowed = [np.ones(u.n_options, dtype=bool) for u in units.units]
        for name, k in (fixed or {}).items():
            i = units.index(name)
            units.units[i].split(k)
            allowed[i][:] = False
            allowed[i][k] = True
        for name, ks in (forbidden or {}).items():
            i = units.index(name)
            for k in ks:
                units.units[i].split(k)
                allowed[i][k] = False
        n = len(units.units)
        return cls(
            drop=tuple(surrogate.option_drop(i) for i in range(n)),
            size=tuple(sizes.option_bytes(i) for i in range(n)),
            allowed=tuple(allowed),
            latency=None if latency is None else tuple(latency.option_ms(i) for i in range(n)),
            drop_constant=surrogate.constant(adds),
            size_constant=sizes.constant,
            latency_constant=0.0 if latency is None else latency.constant_ms,
        )

    def arrays(self, quantity: str) -> tuple[tuple[np.ndarray, ...], float]:
        """Per-unit arrays and the constant of ``drop``, ``size`` or ``latency``."""
        if quantity == "drop":
            return self.drop, self.drop_constant
        if quantity == "size":
            return tuple(s.astype(np.float64) for s in self.size), float(self.size_constant)
        if quantity == "latency":
            if self.latency is None:
                raise PlanError("this problem has no latency model; build it with one")
            return self.latency, self.latency_constant
        raise PlanError(f"quantity={quantity!r}; allowed values: {QUANTITIES}")

    def value(self, choice: Sequence[int], quantity: str) -> float:
        """A choice's total ``drop``, ``size`` (exact integer) or ``latency``."""
        if quantity == "size":
            return int(
                self.size_constant + sum(int(s[k]) for s, k in zip(self.size, choice, strict=True))
            )
        arrays, const = self.arrays(quantity)
        return const + sum(float(a[k]) for a, k in zip(arrays, choice, strict=True))

    def extreme(self, quantity: str, best: bool = True) -> float:
        """The smallest (``best``) or largest value of ``quantity`` over allowed choices."""
        arrays, const = self.arrays(quantity)
        pick = np.min if best else np.max
        total = const + sum(
            float(pick(a[m])) for a, m in zip(arrays, self.allowed, strict=True) if m.any()
        )
        return int(round(total)) if quantity == "size" else total


@dataclass(frozen=True)
class Allocation:
    """One solution: the choice, its predicted drop, exact size, predicted latency, and the
    problem that produced it (``objective`` minimised under ``budget``)."""

    choice: Choice
    predicted_drop: float
    size_bytes: int
    latency_ms: float | None
    objective: str
    budget: Mapping[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "choice": list(self.choice),
            "predicted_drop": self.predicted_drop,
            "size_bytes": self.size_bytes,
            "latency_ms": self.latency_ms,
            "objective": self.objective,
            "budget": dict(self.budget),
        }


def _allocation(
    problem: Problem, choice: Choice, objective: str, budget: dict[str, float]
) -> Allocation:
    return Allocation(
        choice=choice,
        predicted_drop=float(problem.value(choice, "drop")),
        size_bytes=int(problem.value(choice, "size")),
        latency_ms=None if problem.latency is None else float(problem.value(choice, "latency")),
        objective=objective,
        budget=budget,
    )


def _candidates(
    problem: Problem, quantities: Sequence[str], n_exclude: int, classes: Sequence[np.ndarray]
) -> list[np.ndarray]:
    """Per unit, the option indices kept after removing provably useless ones."""
    mats = [problem.arrays(q)[0] for q in quantities]
    out = []
    for i, allowed in enumerate(problem.allowed):
        idx = np.flatnonzero(allowed)
        m = np.stack([arrays[i][idx] for arrays in mats], axis=1)  # [K, Q]
        le = np.all(m[:, None, :] <= m[None, :, :], axis=2)
        lt = np.any(m[:, None, :] < m[None, :, :], axis=2)
        order = np.arange(len(idx))
        dominates = le & (lt | (order[:, None] < order[None, :]))
        np.fill_diagonal(dominates, False)
        cls = classes[i][idx]
        n_classes = np.array([len(np.unique(cls[dominates[:, j]])) for j in range(len(idx))])
        out.append(idx[n_classes <= n_exclude])
    return out


def _check_bound(name: str, value: float | None) -> None:
    if value is not None and not np.isfinite(value):
        raise PlanError(f"{name}={value!r} is not allowed; allowed values: a finite number")


def solve(
    problem: Problem,
    *,
    minimize: str = "drop",
    max_drop: float | None = None,
    max_size: float | None = None,
    max_latency: float | None = None,
    exclude: Sequence[Sequence[int]] = (),
    classes: Sequence[Sequence[int]] | None = None,
    tie_break: str | None = "auto",
    time_limit: float = 60.0,
) -> Allocation | None:
    """The optimal choice, or None when no allowed choice meets the budgets.

    Ties are broken exactly by a second solve: among the optimal choices, the one with the
    least ``tie_break`` quantity (``"auto"``: the predicted drop for the duals, the size when
    minimising the drop; ``None``: any optimal choice).

    Args:
        problem: the :class:`Problem`.
        minimize: ``"drop"`` (least predicted drop), or ``"size"`` / ``"latency"`` (the dual:
            smallest or fastest plan, usually with ``max_drop``).
        max_drop: predicted drop limit (fraction).
        max_size: size budget in bytes (whole model, as ``packed_size_bytes``).
        max_latency: latency budget in ms (needs a latency model).
        exclude: choices the solution must differ from (e.g. plans already tried).
        classes: per unit, a class id per option; the solution must differ from each excluded
            choice in the class of some unit's option (default: each option its own class).
        tie_break: the quantity that decides between optimal choices (see above).
        time_limit: HiGHS time limit in seconds.

    Raises:
        PlanError: a bad argument.
        RuntimeError: HiGHS stopped without proving optimality (time limit).

    Example:
        >>> p = Problem(drop=([0.0, 0.1, 0.5], [0.0, 0.2]), size=([8, 4, 2], [8, 2]))
        >>> a = solve(p, max_size=10)
        >>> a.choice, a.size_bytes, round(a.predicted_drop, 3)
        ((0, 1), 10, 0.2)
        >>> solve(p, max_size=3) is None
        True
    """
    if minimize not in QUANTITIES:
        raise PlanError(f"minimize={minimize!r}; allowed values: {QUANTITIES}")
    if tie_break == "auto":
        tie_break = "size" if minimize == "drop" else "drop"
    if tie_break is not None and tie_break not in QUANTITIES:
        raise PlanError(f"tie_break={tie_break!r}; allowed values: {QUANTITIES}, 'auto', None")
    bounds = {"drop": max_drop, "size": max_size, "latency": max_latency}
    for name, value in bounds.items():
        _check_bound(f"max_{name}", value)
    limits = {q: float(v) for q, v in bounds.items() if v is not None}
    budget = {f"max_{q}": v for q, v in limits.items()}
    n_units = len(problem.drop)
    excluded = [tuple(int(k) for k in c) for c in exclude]
    if any(len(c) != n_units for c in excluded):
        raise PlanError(f"every excluded choice needs one option per unit ({n_units})")
    if classes is None:
        cls = [np.arange(len(d)) for d in problem.drop]
    else:
        cls = [np.asarray(c, dtype=np.int64) for c in classes]
        if len(cls) != n_units or any(
            c.shape != d.shape for c, d in zip(cls, problem.drop, strict=False)
        ):
            raise PlanError("classes must give one class id per option of each unit")
    used = [minimize, *(q for q in limits if q != minimize)]
    keep = _candidates(problem, used, len(excluded), cls)
    if any(len(k) == 0 for k in keep):
        return None
    offsets = np.cumsum([0] + [len(k) for k in keep])
    n_vars = int(offsets[-1])

    def row(quantity: str) -> tuple[np.ndarray, float]:
        arrays, const = problem.arrays(quantity)
        return np.concatenate([arrays[i][k] for i, k in enumerate(keep)]), const

    obj, _ = row(minimize)
    c = obj.copy()
    for i in range(n_units):  # shift per unit: the choice is unchanged, the scale is sane
        sl = slice(offsets[i], offsets[i + 1])
        c[sl] -= c[sl].min()
    span = float(c.max())
    c = c / span if span > 0 else c

    a_rows: list[np.ndarray] = []
    lower: list[float] = []
    upper: list[float] = []
    for i in range(n_units):
        r = np.zeros(n_vars)
        r[offsets[i] : offsets[i + 1]] = 1.0
        a_rows.append(r)
        lower.append(1.0)
        upper.append(1.0)
    for choice in excluded:
        r = np.zeros(n_vars)
        for i, k in enumerate(choice):
            pos = np.flatnonzero(cls[i][keep[i]] == cls[i][k])
            if len(pos) == 0:
                break  # no option of that class is left: the cut holds already
            r[offsets[i] + pos] = 1.0
        else:
            a_rows.append(r)
            lower.append(-np.inf)
            upper.append(n_units - 1.0)
    bound_rows = {}
    for q, limit in limits.items():
        coef, const = row(q)
        scale = float(np.abs(coef).max()) or 1.0
        bound_rows[q] = (coef / scale, (limit - const) / scale, scale)

    rhs = {q: v[1] for q, v in bound_rows.items()}
    for _ in range(_MAX_TIGHTEN):
        rows = a_rows + [bound_rows[q][0] for q in bound_rows]
        ub = upper + [rhs[q] for q in bound_rows]
        lb = lower + [-np.inf] * len(bound_rows)
        res = milp(
            c,
            integrality=np.ones(n_vars),
            bounds=Bounds(0.0, 1.0),
            constraints=[LinearConstraint(np.array(rows), np.array(lb), np.array(ub))],
            options={"mip_rel_gap": 0.0, "time_limit": time_limit},
        )
        if res.status == 2 or (res.x is None and res.status != 1):
            return None  # infeasible
        if res.status != 0 or res.x is None:
            raise RuntimeError(f"the allocation solver stopped early: {res.message}")
        x = res.x > 0.5
        choice = tuple(
            int(keep[i][np.flatnonzero(x[offsets[i] : offsets[i + 1]])[0]]) for i in range(n_units)
        )
        violated = False
        for q, limit in limits.items():
            value = problem.value(choice, q)
            tol = 0.0 if q == "size" else 1e-12 * max(abs(limit), 1.0)
            if value > limit + tol:
                coef_scale = bound_rows[q][2]
                rhs[q] -= (value - limit) / coef_scale + 1e-9
                violated = True
        if not violated:
            first = _allocation(problem, choice, minimize, budget)
            if tie_break is None or tie_break == minimize:
                return first
            best = problem.value(choice, minimize)
            if minimize != "size":  # float optimum: the second solve may not beat it by noise
                best += 1e-9 * max(abs(best), 1.0)
            tied = {**{f"max_{q}": v for q, v in limits.items()}, f"max_{minimize}": best}
            try:
                second = solve(
                    problem,
                    minimize=tie_break,
                    exclude=excluded,
                    classes=classes,
                    tie_break=None,
                    time_limit=time_limit,
                    **tied,
                )
            except RuntimeError:  # a float optimum as a limit, finer than the MILP tolerance
                second = None
            if second is None:  # the first solution stands
                return first
            return _allocation(problem, second.choice, minimize, budget)
    raise RuntimeError("the allocation solver kept violating a budget after tightening it")


def geometric_budgets(low: float, high: float, n: int) -> list[float]:
    """``n`` budgets spaced geometrically from ``low`` to ``high`` (both included).

    Example:
        >>> [round(b, 6) for b in geometric_budgets(100, 400, 3)]
        [100.0, 200.0, 400.0]
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise PlanError(f"n={n!r} is not allowed; allowed values: an integer >= 1")
    if not 0 < low <= high:
        raise PlanError(f"budgets need 0 < low <= high, got low={low!r}, high={high!r}")
    if n == 1:
        return [float(high)]
    return [float(v) for v in np.geomspace(low, high, n)]


def ladder(
    problem: Problem,
    *,
    size_budgets: Sequence[float] = (),
    latency_budgets: Sequence[float] = (),
    exclude: Sequence[Sequence[int]] = (),
    classes: Sequence[Sequence[int]] | None = None,
) -> list[Allocation]:
    """The least-drop plan at each size budget, then at each latency budget: distinct plans
    (a plan found again at a larger budget is dropped), each list in budget order. Infeasible
    budgets give nothing.

    Example:
        >>> p = Problem(drop=([0.0, 0.1, 0.5], [0.0, 0.2]), size=([8, 4, 2], [8, 2]))
        >>> [(a.choice, a.size_bytes) for a in ladder(p, size_budgets=[3, 4, 6, 12, 16])]
        [((2, 1), 4), ((1, 1), 6), ((1, 0), 12), ((0, 0), 16)]
    """
    out: list[Allocation] = []
    seen: set[Choice] = set()
    for key, budgets in (("max_size", size_budgets), ("max_latency", latency_budgets)):
        for b in sorted(float(v) for v in budgets):
            a = solve(problem, exclude=exclude, classes=classes, **{key: b})
            if a is not None and a.choice not in seen:
                seen.add(a.choice)
                out.append(a)
    return out
