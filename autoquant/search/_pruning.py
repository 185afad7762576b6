"""Multi-fidelity, constraint-aware pruning for multi-objective studies.

Optuna's pruners take one intermediate value (``trial.report`` raises in multi-objective
studies), so autoquant prunes on its own terms. A trial's size is exact before QAT and its
latency is measured right after calibration, so both are known early. At each fidelity of
``[strategy] fidelities`` (0.0: after calibration; 0.5: half the QAT steps) the trial scores
its accuracy on a seeded sample of ``prune_eval`` held-out examples, and stops when even an
*optimistic* final accuracy would leave it infeasible (drop over the limit) or dominated by a
feasible complete trial (at least as accurate, no larger, no slower, one strictly).

The optimistic final accuracy comes from the complete trials scored at the same fidelity
(:func:`learn_recovery`)::

    optimistic final drop = ρ · d − γ

* ``d``, the subset drop: the float model's accuracy on the sample minus the trial's there;
* ``ρ``, the remaining fraction: the smallest ``final drop / subset drop`` among the complete
  trials whose subset drop lies within a factor 4 of ``d`` (and is at least
  ``max(max_drop, 1 %)``; smaller drops are sampling noise), provided that window holds
  trials on both sides of ``d``; else 0: a damage level not bracketed by complete trials is
  never pruned as infeasible, and a trial with ``ρ = 0`` is never dominated either (its
  optimistic accuracy is above every complete trial's);
* ``γ``, the slack: the largest amount by which a complete trial of that window, or one with
  a drop below 1 %, ended better than ``ρ`` times its subset drop, plus one standard
  deviation of those residuals (few trials, noisy subset).

Why a ratio, why bracketed. QAT recovers most of a post-calibration drop, and how much varies:
on the recorded digits curves (200 QAT steps) post-calibration drops of 23-88 points kept 2-4 %
of their size (88 → 2.5 points), drops of 9-17 points kept 0-6 % (an 8-point drop was
recovered entirely); at half the QAT steps a drop keeps about half (4.1 → 2.5). With 8 QAT
steps the fraction kept grows with the damage instead (2.9 → 0.8, 7.8 → 4.3 points). An
absolute "largest gain" would let one recovered collapse forbid all pruning; one global ratio
would mix regimes; extrapolating a ratio beyond the damage seen fails one way or the other.
If the fraction kept is monotone in the damage, in either direction, the smallest ratio of
trials bracketing ``d`` is at most the trial's own: the optimistic drop is then a lower bound,
up to the plan-to-plan scatter that ``γ`` covers.

The guarantee, stated: a trial is pruned only if, to end feasible and non-dominated, QAT would
have to leave a smaller fraction of its drop than every complete trial of comparable damage
(within a factor 4, on both sides) at that fidelity, by more than the slack. Replaying curves
recorded from real digits and LeNet-5 searches (``tests/search/data/curves_*.json``), the rule
prunes no trial that ends on the final front.

Pruned trials are told as PRUNED with a ``pruned`` record (fidelity, reason, partial scores,
optimistic accuracy, time spent, estimated time saved) and the accuracy constraint set to the
optimistic drop minus the limit: Optuna's TPE ranks infeasible trials by that violation and
puts feasible pruned ones among the worse trials; NSGA-II and random ignore them. A pruned
trial holds a budget slot (:mod:`autoquant.search._budget`). ``[strategy] prune = false``
turns all of it off: no intermediate evaluation runs.
"""

from __future__ import annotations

import copy
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from autoquant.train import evaluate
from autoquant.types import QuantPlan

from ._context import Checkpoint, SearchContext
from ._prepass import held_out_batches
from ._record import FloatBaseline, TrialRecord, read_record, write_record

MIN_LARGE_DROP = 0.01  # subset drops below this (or the limit, if larger) do not set ρ
WINDOW = 4.0  # ρ comes from trials at least 1 / WINDOW as damaged as the one judged
SPREAD = 1.0  # standard deviations of the residuals added to the largest one (the slack γ)


def fidelity_key(fraction: float) -> str:
    """How a fidelity is stored in ``fidelity_scores`` (JSON keys are strings): ``"0.5"``."""
    return repr(float(fraction))


@dataclass(frozen=True)
class Curve:
    """A complete trial as the rule sees it.

    Attributes:
        number: the trial number.
        scores: fidelity → accuracy on the pruning sample.
        accuracy: the final accuracy (full held-out set).
        values: objective name → final value (``size``, ``latency``; lower is better).
    """

    number: int
    scores: Mapping[float, float]
    accuracy: float
    values: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Recovery:
    """The optimistic recovery learned at one fidelity (see the module doc).

    Example:
        >>> Recovery(0.5, remaining=0.5, slack=0.001, trials=4).optimistic_drop(0.04)
        0.019
    """

    fidelity: float
    remaining: float  # ρ
    slack: float  # γ
    trials: int

    def optimistic_drop(self, subset_drop: float) -> float:
        return self.remaining * subset_drop - self.slack


def learn_recovery(
    curves: Sequence[Curve],
    fidelity: float,
    drop: float,
    *,
    float_subset: float,
    float_accuracy: float,
    large: float,
    window: float = WINDOW,
    spread: float = SPREAD,
) -> Recovery | None:
    """ρ and γ for a trial whose subset drop is ``drop``, from the curves scored at
    ``fidelity`` (None: no curve has a score there).

    ``ρ`` is the smallest ``final drop / subset drop`` among curves whose subset drop lies in
    ``[drop / window, drop · window]`` (and is at least ``large``), clipped to [0, 1], when
    that window holds curves on both sides of ``drop``; else 0 (recovery at this damage is
    not bracketed by what was seen). ``γ`` is the largest residual
    ``ρ · subset drop − final drop`` over the curves of that window and those with a subset
    drop below ``large``, plus ``spread`` standard deviations of those residuals (never
    below 0).

    Example:
        >>> c = [Curve(0, {0.0: 0.80}, 0.95), Curve(1, {0.0: 0.60}, 0.92)]
        >>> r = learn_recovery(c, 0.0, 0.3, float_subset=1.0, float_accuracy=1.0, large=0.01)
        >>> round(r.remaining, 4), round(r.slack, 4)
        (0.2, 0.005)
        >>> learn_recovery(c, 0.0, 0.9, float_subset=1.0, float_accuracy=1.0, large=0.01)
        Recovery(fidelity=0.0, remaining=0.0, slack=0.0, trials=2)
    """
    pairs = [
        (float_subset - c.scores[fidelity], float_accuracy - c.accuracy)
        for c in curves
        if fidelity in c.scores
    ]
    if not pairs:
        return None
    low = [final / d for d, final in pairs if max(drop / window, large) <= d <= drop]
    high = [final / d for d, final in pairs if max(drop, large) <= d <= drop * window]
    # Interpolate, never extrapolate: a damage level bracketed by complete trials.
    remaining = min(1.0, max(0.0, min(low + high))) if low and high else 0.0
    # The slack: how much better than ρ · d trials of this damage level, or of none (noise
    # around the float model's accuracy), ended.
    near = [
        remaining * d - final
        for d, final in pairs
        if d < large or drop / window <= d <= drop * window
    ]
    slack = max(0.0, max(near) + spread * statistics.pstdev(near)) if near else 0.0
    return Recovery(fidelity, remaining, slack, len(pairs))


@dataclass(frozen=True)
class Decision:
    """What the rule decided for one trial at one fidelity."""

    prune: bool
    reason: str | None  # "infeasible" | "dominated" | None
    detail: str
    optimistic_accuracy: float | None = None
    optimistic_drop: float | None = None
    dominated_by: int | None = None
    recovery: Recovery | None = None


def _finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def dominates(
    accuracy: float, values: Mapping[str, float], other_acc: float, other: Mapping[str, float]
) -> bool:
    """Whether (``accuracy``, ``values``) dominates (``other_acc``, ``other``): accuracy at
    least as high, every other objective no higher, one strictly better. A value missing or
    not finite on either side compares as unknown: no domination.

    Example:
        >>> dominates(0.9, {"size": 10.0}, 0.9, {"size": 12.0})
        True
        >>> dominates(0.9, {"size": 10.0}, 0.9, {"size": 10.0})
        False
    """
    if any(not (_finite(values.get(k)) and _finite(other.get(k))) for k in other):
        return False
    if accuracy < other_acc or any(values[k] > other[k] for k in other):
        return False
    return accuracy > other_acc or any(values[k] < other[k] for k in other)


def decide(
    fidelity: float,
    score: float,
    values: Mapping[str, float],
    curves: Sequence[Curve],
    *,
    float_subset: float,
    float_accuracy: float,
    max_drop: float | None,
    min_trials: int,
) -> Decision:
    """The rule at one fidelity for a trial that scored ``score`` on the pruning sample.

    Args:
        fidelity: the fraction of QAT done.
        score: the trial's accuracy on the pruning sample.
        values: its other objectives (``size``, ``latency``), known before QAT.
        curves: the complete trials (those scored at ``fidelity`` teach the rule).
        float_subset: the float model's accuracy on the pruning sample.
        float_accuracy: the float model's accuracy on the full held-out set.
        max_drop: the accuracy-drop limit (None: no constraint, dominance only).
        min_trials: curves scored at ``fidelity`` needed before any pruning.
    """
    scored = [c for c in curves if fidelity in c.scores]
    if len(scored) < min_trials:
        return Decision(False, None, f"{len(scored)} of {min_trials} complete trials scored")
    large = max(max_drop or 0.0, MIN_LARGE_DROP)
    subset_drop = float_subset - score
    recovery = learn_recovery(
        scored,
        fidelity,
        subset_drop,
        float_subset=float_subset,
        float_accuracy=float_accuracy,
        large=large,
    )
    assert recovery is not None
    drop = recovery.optimistic_drop(subset_drop)
    accuracy = float_accuracy - drop
    common = {"optimistic_accuracy": accuracy, "optimistic_drop": drop, "recovery": recovery}
    if max_drop is not None and drop > max_drop + 1e-12:
        return Decision(
            True,
            "infeasible",
            f"even an optimistic final drop of {100 * drop:.2f} points exceeds the limit of "
            f"{100 * max_drop:g}",
            **common,
        )
    for c in curves:  # every feasible complete trial may dominate
        final_drop = float_accuracy - c.accuracy
        if max_drop is not None and final_drop > max_drop + 1e-12:
            continue
        if dominates(c.accuracy, c.values, accuracy, values):
            return Decision(
                True,
                "dominated",
                f"even at an optimistic {100 * accuracy:.2f} % it is dominated by trial "
                f"{c.number} ({100 * c.accuracy:.2f} %)",
                dominated_by=c.number,
                **common,
            )
    return Decision(False, None, "may end feasible and non-dominated", **common)


# -- the study side ---------------------------------------------------------------------------

VALUE_FIELDS = {"size": "size_bytes", "latency": "latency_ms"}


def curves_of(trials: Sequence[FrozenTrial], objectives: Sequence[str]) -> list[Curve]:
    """The complete trials that ran (twins excluded) as :class:`Curve` objects."""
    out = []
    for t in trials:
        r = read_record(t)
        if t.state != TrialState.COMPLETE or r.duplicate_of is not None or r.accuracy is None:
            continue
        scores = {float(k): float(v) for k, v in (r.fidelity_scores or {}).items()}
        values = {
            o: float(getattr(r, VALUE_FIELDS[o]))
            for o in objectives
            if o in VALUE_FIELDS and getattr(r, VALUE_FIELDS[o]) is not None
        }
        out.append(Curve(t.number, scores, float(r.accuracy), values))
    return out


def median_trial_s(trials: Sequence[FrozenTrial]) -> float | None:
    """Median wall time of the complete trials that ran (None: none yet)."""
    times = [
        read_record(t).total_s
        for t in trials
        if t.state == TrialState.COMPLETE and read_record(t).duplicate_of is None
    ]
    times = [s for s in times if s is not None]
    return statistics.median(times) if times else None


class Pruner:
    """One per worker: the pruning sample, the float model's score on it, and the rule.

    Example:
        >>> pruner = Pruner(study, ctx, baseline)  # doctest: +SKIP
        >>> monitor = pruner.monitor(trial, plan, qat)  # doctest: +SKIP
        >>> ctx.run_plan(plan, ..., checkpoints=pruner.fidelities, on_checkpoint=monitor)
        ... # doctest: +SKIP
    """

    def __init__(self, study: optuna.Study, ctx: SearchContext, baseline: FloatBaseline):
        self.study = study
        self.ctx = ctx
        self.baseline = baseline
        strategy = ctx.spec.strategy
        self.fidelities = tuple(strategy.fidelities)
        self.batches = held_out_batches(ctx, strategy.prune_eval)
        self.float_subset = evaluate(
            copy.deepcopy(ctx.float_model), self.batches, device=ctx.device
        )

    def monitor(
        self, trial: optuna.Trial, plan: QuantPlan, qat: Mapping[str, Any]
    ) -> FidelityMonitor:
        return FidelityMonitor(self, trial, plan, dict(qat))


class FidelityMonitor:
    """The checkpoint callback of one trial: score, record, decide, and stop if pruned."""

    def __init__(
        self, pruner: Pruner, trial: optuna.Trial, plan: QuantPlan, qat: dict[str, Any]
    ) -> None:
        self.pruner = pruner
        self.trial = trial
        self.plan = plan
        self.qat = qat
        self.scores: dict[str, float] = {}

    def __call__(self, cp: Checkpoint) -> None:
        p, spec = self.pruner, self.pruner.ctx.spec
        score = evaluate(cp.model, p.batches, device=p.ctx.device)
        self.scores[fidelity_key(cp.fraction)] = score
        write_record(self.trial, TrialRecord(fidelity_scores=dict(self.scores)))
        values = {"size": float(cp.size_bytes), "latency": cp.latencies[0].get("median_ms")}
        values = {k: v for k, v in values.items() if k in spec.objectives}
        trials = p.study.get_trials(deepcopy=False)
        decision = decide(
            cp.fraction,
            score,
            values,
            curves_of(trials, spec.objectives),
            float_subset=p.float_subset,
            float_accuracy=p.baseline.accuracy,
            max_drop=spec.max_accuracy_drop,
            min_trials=spec.strategy.prune_min_trials,
        )
        if decision.prune:
            self._prune(cp, decision, median_trial_s(trials))

    def _prune(self, cp: Checkpoint, d: Decision, median_s: float | None) -> None:
        spec, baseline = self.pruner.ctx.spec, self.pruner.baseline
        assert d.optimistic_drop is not None and d.recovery is not None
        spent = cp.elapsed_s
        reason = f"pruned at {100 * cp.fraction:g} % of QAT ({d.reason}): {d.detail}"
        record = TrialRecord(
            plan=self.plan.to_dict(),
            plan_summary=self.plan.summary(),
            qat={**self.qat, "optimizer": spec.qat.optimizer},
            seed=spec.seed,
            size_bytes=cp.size_bytes,
            size_ratio=cp.size_bytes / baseline.size_bytes,
            latency_ms=cp.latencies[0].get("median_ms"),
            latency=cp.latencies,
            timing_s={"total": round(spent, 4)},
            fail_reason=reason,
            pruned={
                "fidelity": cp.fraction,
                "step": cp.step,
                "reason": d.reason,
                "detail": d.detail,
                "scores": dict(self.scores),
                "float_subset": self.pruner.float_subset,
                "optimistic_accuracy": d.optimistic_accuracy,
                "optimistic_drop": d.optimistic_drop,
                "dominated_by": d.dominated_by,
                "recovery": asdict(d.recovery),
                "spent_s": round(spent, 4),
                "saved_s": None if median_s is None else round(max(0.0, median_s - spent), 4),
            },
        )
        write_record(self.trial, record)
        if spec.max_accuracy_drop is not None:  # TPE ranks infeasible trials by this
            self.trial.set_constraint("accuracy_drop", d.optimistic_drop - spec.max_accuracy_drop)
        raise optuna.TrialPruned(reason)
