"""The solver against brute force on small random problems (every budget respected, optimal)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from autoquant.allocate import Problem, geometric_budgets, ladder, solve
from autoquant.types import PlanError


def _problem(seed: int, latency: bool = True, masks: bool = False) -> Problem:
    rng = np.random.default_rng(seed)
    n_units = int(rng.integers(3, 5))
    counts = rng.integers(3, 6, size=n_units)
    # Rounded drops create ties, which the solver must still resolve to an optimal value.
    drop = [np.round(rng.uniform(0, 1, k), 1) for k in counts]
    size = [rng.integers(1, 30, k) for k in counts]
    lat = [rng.uniform(0.1, 2.0, k) for k in counts] if latency else None
    allowed = [rng.uniform(size=k) < 0.8 for k in counts] if masks else ()
    return Problem(
        drop=tuple(drop),
        size=tuple(size),
        latency=None if lat is None else tuple(lat),
        allowed=tuple(allowed),
        drop_constant=0.05,
        size_constant=7,
        latency_constant=0.3,
    )


def _brute(
    p: Problem,
    minimize: str,
    bounds: dict[str, float],
    exclude: list[tuple[int, ...]] = (),
    classes: list[np.ndarray] | None = None,
) -> tuple[float, list[tuple[int, ...]]]:
    """Optimal value and the feasible choices, by enumeration."""
    options = [np.flatnonzero(a) for a in p.allowed]
    cls = classes or [np.arange(len(d)) for d in p.drop]

    def excluded(c: tuple[int, ...]) -> bool:
        return any(all(k[c[u]] == k[t[u]] for u, k in enumerate(cls)) for t in exclude)

    feasible = [
        c
        for c in itertools.product(*options)
        if all(p.value(c, q) <= b + 1e-12 for q, b in bounds.items()) and not excluded(c)
    ]
    best = min((p.value(c, minimize) for c in feasible), default=None)
    return best, feasible


def _check(p: Problem, minimize: str, bounds: dict[str, float], exclude=(), classes=None) -> bool:
    best, feasible = _brute(p, minimize, bounds, list(exclude), classes)
    limits = {f"max_{q}": b for q, b in bounds.items()}
    got = solve(p, minimize=minimize, exclude=exclude, classes=classes, **limits)
    if best is None:
        assert got is None
        return False
    assert got is not None
    c = got.choice
    assert c in feasible  # within every budget, allowed, not excluded
    assert p.value(c, minimize) == pytest.approx(best, abs=1e-9)
    # ties go to the least drop (duals) or the smallest plan (least drop)
    tie = "size" if minimize == "drop" else "drop"
    optimal = [f for f in feasible if p.value(f, minimize) <= best + 1e-9]
    assert p.value(c, tie) == pytest.approx(min(p.value(f, tie) for f in optimal), abs=1e-9)
    assert got.size_bytes == p.value(c, "size")
    assert got.predicted_drop == pytest.approx(p.value(c, "drop"))
    return True


@pytest.mark.parametrize("seed", range(30))
def test_least_drop_under_size_and_latency_budgets_is_optimal(seed: int) -> None:
    p = _problem(seed, masks=seed % 3 == 0)
    rng = np.random.default_rng(100 + seed)
    lo, hi = p.extreme("size"), p.extreme("size", best=False)
    solved = 0
    for _ in range(4):
        size = float(rng.uniform(lo - 5, hi))  # some budgets below the smallest plan
        latency = float(rng.uniform(p.extreme("latency"), p.extreme("latency", best=False)))
        solved += _check(p, "drop", {"size": size})
        solved += _check(p, "drop", {"size": size, "latency": latency})
    assert solved > 0


@pytest.mark.parametrize("seed", range(15))
def test_duals_are_optimal(seed: int) -> None:
    p = _problem(seed)
    rng = np.random.default_rng(200 + seed)
    for _ in range(4):
        max_drop = float(rng.uniform(p.extreme("drop") - 0.1, p.extreme("drop", best=False)))
        _check(p, "size", {"drop": max_drop})
        _check(p, "latency", {"drop": max_drop, "size": float(p.extreme("size", best=False))})


@pytest.mark.parametrize("seed", range(15))
def test_excluded_choices_give_the_next_best(seed: int) -> None:
    p = _problem(seed, latency=False)
    budget = {"size": float(np.mean([p.extreme("size"), p.extreme("size", best=False)]))}
    exclude: list[tuple[int, ...]] = []
    for _ in range(5):  # exclude each optimum in turn, plus some random choices
        a = solve(p, max_size=budget["size"], exclude=exclude)
        if a is None:
            break
        exclude.append(a.choice)
        rng = np.random.default_rng(seed + len(exclude))
        exclude.append(tuple(int(rng.integers(len(d))) for d in p.drop))
        _check(p, "drop", budget, exclude)


@pytest.mark.parametrize("seed", range(15))
def test_excluded_classes_exclude_every_plan_that_differs_only_within_classes(seed: int) -> None:
    p = _problem(seed, latency=False)
    classes = [np.arange(len(d)) // 2 for d in p.drop]  # options 0-1, 2-3, 4 share a class
    budget = {"size": float(p.extreme("size", best=False))}
    exclude: list[tuple[int, ...]] = []
    for _ in range(4):
        a = solve(p, max_size=budget["size"], exclude=exclude, classes=classes)
        if a is None:
            break
        exclude.append(a.choice)
        _check(p, "drop", budget, exclude, classes)


def test_a_dominated_option_survives_when_its_dominators_share_an_excluded_class() -> None:
    # option 2 is worse than options 0 and 1, which form one class; excluding that class
    # leaves option 2 as the only answer
    p = Problem(drop=([0.0, 0.0, 0.5], [0.0]), size=([1, 1, 1], [1]))
    classes = [[0, 0, 1], [0]]
    assert solve(p, exclude=[(0, 0)], classes=classes).choice == (2, 0)
    assert solve(p, exclude=[(0, 0)]).choice == (1, 0)


def test_infeasible_and_bad_arguments() -> None:
    p = Problem(drop=([0.0, 0.1], [0.0, 0.2]), size=([8, 2], [8, 2]), size_constant=1)
    assert solve(p, max_size=4) is None  # smallest plan: 1 + 2 + 2 = 5
    assert solve(p, max_size=5).choice == (1, 1)
    assert solve(p, minimize="size", max_drop=-1.0) is None
    none_allowed = Problem(drop=([0.0, 0.1],), size=([1, 2],), allowed=([False, False],))
    assert solve(none_allowed) is None
    with pytest.raises(PlanError, match="minimize='speed'"):
        solve(p, minimize="speed")
    with pytest.raises(PlanError, match="no latency model"):
        solve(p, max_latency=1.0)
    with pytest.raises(PlanError, match="max_size=nan"):
        solve(p, max_size=float("nan"))
    with pytest.raises(PlanError, match="one option per unit"):
        solve(p, exclude=[(0,)])
    with pytest.raises(PlanError, match="one class id per option"):
        solve(p, classes=[[0, 1]])
    with pytest.raises(PlanError, match="one entry per option"):
        Problem(drop=([0.0, 0.1],), size=([1, 2, 3],))


def test_sizes_are_exact_integers_at_the_budget() -> None:
    # Large byte counts: the best plan is 1 byte over the budget; a tolerance of 1e-6 relative
    # (3 bytes) would take it.
    p = Problem(drop=([0.0, 1.0], [0.0, 1.0]), size=([2_000_001, 1_000_000], [1_000_001, 1]))
    a = solve(p, max_size=3_000_001)
    assert a.predicted_drop == 1.0 and a.size_bytes <= 3_000_001
    assert solve(p, max_size=3_000_002).choice == (0, 0)
    assert solve(p, max_size=1_000_000) is None


@pytest.mark.parametrize("seed", range(10))
def test_ladder_plans_are_distinct_optimal_and_ordered(seed: int) -> None:
    p = _problem(seed)
    budgets = geometric_budgets(p.extreme("size"), p.extreme("size", best=False), 6)
    plans = ladder(p, size_budgets=list(reversed(budgets)) + [budgets[0] - 1])
    assert len({a.choice for a in plans}) == len(plans)
    prev_budget, prev_drop = 0.0, np.inf
    for a in plans:
        b = a.budget["max_size"]
        assert b >= prev_budget and a.size_bytes <= b
        assert a.predicted_drop <= prev_drop + 1e-12  # more budget never predicts worse
        assert a.predicted_drop == pytest.approx(solve(p, max_size=b).predicted_drop)
        prev_budget, prev_drop = b, a.predicted_drop
    lat = ladder(p, latency_budgets=[p.extreme("latency", best=False)])
    assert lat and lat[0].budget == {"max_latency": p.extreme("latency", best=False)}


def test_geometric_budgets() -> None:
    assert geometric_budgets(10, 1000, 3) == pytest.approx([10, 100, 1000])
    assert geometric_budgets(10, 1000, 1) == [1000.0]
    with pytest.raises(PlanError, match="0 < low <= high"):
        geometric_budgets(0, 10, 3)
