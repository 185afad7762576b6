"""``propose``: the plans the search should try next, as trial parameters, ranked.

The search enqueues them (``study.enqueue_trial(p.params, user_attrs={"proposal":
p.record()})``) as the first trials after the uniform baselines, and calls ``propose`` again
with a re-fitted surrogate and the plans tried so far as results arrive.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from autoquant.allocate._costs import LatencyModel, SizeModel
from autoquant.allocate._solver import Allocation, Problem, geometric_budgets, ladder, solve
from autoquant.allocate._surrogate import Prediction, Surrogate
from autoquant.allocate._units import Choice, UnitSpace
from autoquant.types import PlanError, QuantPlan

Tried = QuantPlan | Mapping[str, Any] | Sequence[int]


@dataclass(frozen=True)
class Proposal:
    """One proposed trial.

    Attributes:
        params: the trial parameters (``FixedTrial(params)`` replays the plan).
        plan: the plan.
        choice: the option index per unit.
        prediction: the surrogate's predicted drop and its uncertainty.
        size_bytes: exact packed size.
        size_ratio: size over the float model's size.
        latency_ms: predicted latency (None without a latency model).
        source: what produced it: ``"min-size"`` / ``"min-latency"`` (smallest / fastest plan
            predicted within ``budget["max_drop"]``), ``"size-ladder"`` / ``"latency-ladder"``
            (least predicted drop within the budget).
        budget: the budget of that solve.
    """

    params: dict[str, Any]
    plan: QuantPlan
    choice: Choice
    prediction: Prediction
    size_bytes: int
    size_ratio: float
    latency_ms: float | None
    source: str
    budget: Mapping[str, float] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """A JSON-ready record for the trial (what was predicted, and why it was proposed)."""
        return {
            "source": self.source,
            "budget": dict(self.budget),
            "predicted_drop": self.prediction.drop,
            "predicted_std": self.prediction.std,
            "size_bytes": self.size_bytes,
            "size_ratio": self.size_ratio,
            "latency_ms": self.latency_ms,
            "choice": list(self.choice),
        }


def tried_choices(units: UnitSpace, tried: Sequence[Tried]) -> list[Choice]:
    """The choices of tried plans, parameter dicts or choices; ones outside the space are
    skipped (they cannot be proposed anyway)."""
    out = []
    for t in tried:
        if isinstance(t, QuantPlan):
            choice = units.choice_of(t)
        elif isinstance(t, Mapping):
            try:
                choice = units.choice_of_params(t)
            except PlanError:
                choice = None
        else:
            choice = units.check(t)
        if choice is not None:
            out.append(choice)
    return list(dict.fromkeys(out))


def propose(
    units: UnitSpace,
    surrogate: Surrogate,
    sizes: SizeModel,
    *,
    objectives: Sequence[str] = ("accuracy", "size"),
    max_drop: float | None = None,
    latency: LatencyModel | None = None,
    tried: Sequence[Tried] = (),
    extra: Mapping[str, Any] | None = None,
    size_steps: int = 8,
    latency_steps: int = 4,
    drop_fractions: Sequence[float] = (0.5, 1.0, 2.0),
    fixed: Mapping[str, int] | None = None,
    forbidden: Mapping[str, Sequence[int]] | None = None,
    same_if_only: Sequence[str] = ("w_calib", "a_calib"),
    limit: int | None = None,
) -> list[Proposal]:
    """Ranked, distinct plans to try, none of them already tried.

    For each objective among ``size`` and ``latency``: the smallest (fastest) plan whose
    predicted drop is within ``fraction × max_drop`` for each of ``drop_fractions`` (the
    surrogate is uncertain, so the limit is bracketed), and the least-drop plan at each of
    ``size_steps`` (``latency_steps``) budgets spaced geometrically from the smallest
    (fastest) possible plan to the least-drop plan's size (latency). Ranking: plans predicted
    within ``max_drop`` first, smallest (fastest) first, then the rest by predicted drop;
    with both objectives the two orders alternate.

    A plan that differs from a tried plan, or from a better-ranked proposal, only in the knobs
    ``same_if_only`` counts as the same plan: the solver always picks the calibration method
    the table scores best for given bit widths, so once a plan is tried, the next-best plan at
    its budget is usually the same bits with the second-best calibration, a trial that teaches
    little. For the same reason no proposal is predicted-dominated by a tried plan (one that is
    no larger, no slower where latency is an objective, and predicted no worse).

    Args:
        units: the units and options.
        surrogate: the (re-fitted) surrogate.
        sizes: the exact size model.
        objectives: the study's objectives (``accuracy`` plus ``size`` and/or ``latency``).
        max_drop: the accuracy-drop limit (fraction), or None.
        latency: a fitted latency model; required when ``latency`` is an objective.
        tried: plans already tried (plans, parameter dicts or choices): never proposed.
        extra: non-unit trial parameters (``adds``, ``qat/lr``, ``qat/steps``).
        size_steps: size budgets in the ladder.
        latency_steps: latency budgets in the ladder.
        drop_fractions: multiples of ``max_drop`` for the dual solves.
        fixed: unit name → the only option it may take.
        forbidden: unit name → options it may not take.
        same_if_only: knobs whose differences alone do not make a plan new (``()``: any
            difference does).
        limit: return at most this many.

    Example:
        >>> proposals = propose(units, surrogate, sizes, max_drop=0.005)  # doctest: +SKIP
        >>> study.enqueue_trial(proposals[0].params,
        ...                     user_attrs={"proposal": proposals[0].record()})  # doctest: +SKIP
    """
    goals = [o for o in objectives if o != "accuracy"]
    bad = [o for o in goals if o not in ("size", "latency")]
    if bad or not goals:
        raise PlanError(
            f"objectives={list(objectives)!r}; allowed values: 'accuracy' with 'size' and/or "
            "'latency'"
        )
    if "latency" in goals and latency is None:
        raise PlanError("latency is an objective: pass a fitted LatencyModel as latency=")
    if max_drop is not None and not max_drop > 0:
        raise PlanError(f"max_drop={max_drop!r}; allowed values: a number > 0 or None")
    params_extra = units.extra_params(extra)
    adds = params_extra.get("adds")
    problem = Problem.build(
        units,
        surrogate,
        sizes,
        latency if "latency" in goals else None,
        fixed=fixed,
        forbidden=forbidden,
        adds=adds,
    )
    exclude = tried_choices(units, tried)
    classes = units.option_classes(same_if_only)
    best = solve(problem, exclude=exclude, classes=classes)
    if best is None:
        return []

    found: dict[str, list[tuple[Allocation, str]]] = {}
    for goal in goals:
        key = "size_bytes" if goal == "size" else "latency_ms"
        items: list[tuple[Allocation, str]] = []
        if max_drop is not None:
            for f in sorted(drop_fractions):
                a = solve(
                    problem, minimize=goal, max_drop=f * max_drop, exclude=exclude, classes=classes
                )
                if a is not None:
                    items.append((a, f"min-{goal}"))
        low = problem.extreme(goal)
        high = float(getattr(best, key))
        steps = size_steps if goal == "size" else latency_steps
        if steps > 0 and low > 0 and high >= low:
            budgets = geometric_budgets(low, high, steps)
            kwargs = {"size_budgets" if goal == "size" else "latency_budgets": budgets}
            found_ladder = ladder(problem, exclude=exclude, classes=classes, **kwargs)
            items += [(a, f"{goal}-ladder") for a in found_ladder]
        found[goal] = items

    def rank(goal: str) -> list[tuple[Allocation, str]]:
        key = "size_bytes" if goal == "size" else "latency_ms"

        def order(item: tuple[Allocation, str]) -> tuple[int, float]:
            a = item[0]
            if max_drop is None or a.predicted_drop <= max_drop:
                return (0, float(getattr(a, key)))
            return (1, a.predicted_drop)

        return sorted(found[goal], key=order)

    ranked = [rank(g) for g in goals]
    merged: list[tuple[Allocation, str]] = []
    for i in range(max(len(r) for r in ranked)):
        merged += [r[i] for r in ranked if i < len(r)]
    out: list[Proposal] = []
    seen: set[tuple[int, ...]] = set()
    quantities = ["drop", *goals]
    tried_values = [[problem.value(t, q) for q in quantities] for t in exclude]

    def dominated(choice: Choice) -> bool:
        mine = [problem.value(choice, q) for q in quantities]
        return any(
            all(t <= m + 1e-12 for t, m in zip(tv, mine, strict=True)) for tv in tried_values
        )

    for a, source in merged:
        key = tuple(classes[i][k] for i, k in enumerate(a.choice))
        if key in seen or dominated(a.choice):
            continue
        seen.add(key)
        plan = units.plan(a.choice, adds=adds)
        out.append(
            Proposal(
                params=units.params(a.choice, extra),
                plan=plan,
                choice=a.choice,
                prediction=surrogate.predict(a.choice, adds=adds),
                size_bytes=a.size_bytes,
                size_ratio=a.size_bytes / sizes.float_bytes,
                latency_ms=None if latency is None else latency.predict(a.choice),
                source=source,
                budget=dict(a.budget),
            )
        )
        if limit is not None and len(out) >= limit:
            break
    return out
