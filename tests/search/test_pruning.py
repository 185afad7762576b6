"""Multi-fidelity, constraint-aware pruning: each branch of the rule, its bound on recorded
learning curves, a real digits study with pruned trials, and TPE with pruned trials."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from autoquant.search import (
    Curve,
    SearchContext,
    decide,
    judged,
    learn_recovery,
    load_study,
    make_sampler,
    pareto_front,
    read_record,
    run_search,
    study_spec_from_dict,
)
from autoquant.search._pareto import nondominated
from autoquant.search._pruning import MIN_LARGE_DROP, WINDOW, dominates

DATA = Path(__file__).parent / "data"
CURVES = sorted(DATA.glob("curves_*.json"))


# -- the rule, branch by branch ----------------------------------------------------------------

# Float accuracy 1.0 on the sample and on the full set; (subset drop d → final drop D).
C = [
    Curve(0, {0.0: 1.0}, 1.0, {"size": 10.0, "latency": 1.0}),  # lossless
    Curve(1, {0.0: 0.989}, 0.995, {"size": 9.0, "latency": 1.0}),  # 1.1 → 0.5 points
    Curve(2, {0.0: 0.97}, 0.985, {"size": 8.0, "latency": 1.0}),  # 3 → 1.5 points
    Curve(3, {0.0: 0.5}, 0.9, {"size": 5.0, "latency": 1.0}),  # collapsed: 50 → 10 points
    Curve(4, {0.0: 0.2}, 0.8, {"size": 4.0, "latency": 1.0}),  # 80 → 20 points
]
KW: dict[str, Any] = {"float_subset": 1.0, "float_accuracy": 1.0, "max_drop": 0.01, "min_trials": 3}


def _optimistic_drop(d: float, curves: list[Curve]) -> float:
    """The documented bound, computed by hand: the smallest ratio of the trials bracketing
    ``d`` within a factor 4, minus the largest residual near it plus one deviation."""
    pairs = [(1.0 - c.scores[0.0], 1.0 - c.accuracy) for c in curves]
    large = max(MIN_LARGE_DROP, KW["max_drop"])
    window = [(dj, D) for dj, D in pairs if dj >= large and d / WINDOW <= dj <= d * WINDOW]
    below, above = [p for p in window if p[0] <= d], [p for p in window if p[0] >= d]
    rho = min(D / dj for dj, D in window) if below and above else 0.0
    near = [rho * dj - D for dj, D in pairs if dj < large or d / WINDOW <= dj <= d * WINDOW]
    return rho * d - max(0.0, max(near) + float(np.std(near)))


def test_no_pruning_before_enough_complete_trials_are_scored() -> None:
    d = decide(0.0, 0.4, {"size": 1.0}, C[3:], **KW)
    assert not d.prune and d.reason is None and d.detail.startswith("2 of 3")
    # curves without a score at this fidelity do not count either
    unscored = [replace(c, scores={}) for c in C]
    assert not decide(0.0, 0.4, {"size": 1.0}, unscored, **KW).prune


def test_an_optimistically_infeasible_trial_is_pruned() -> None:
    d = decide(0.0, 0.4, {"size": 1.0, "latency": 1.0}, C, **KW)  # d = 0.6: between 3 and 4
    expected = _optimistic_drop(0.6, C)
    assert d.prune and d.reason == "infeasible"
    assert d.optimistic_drop == pytest.approx(expected) and expected > 0.01
    assert d.optimistic_accuracy == pytest.approx(1.0 - expected)
    assert d.recovery is not None and d.recovery.remaining == pytest.approx(0.2)  # trial 3


def test_a_damage_level_not_bracketed_is_never_pruned() -> None:
    # d = 0.9: deeper than every complete trial; QAT might recover it as never seen before.
    d = decide(0.0, 0.1, {"size": 1.0}, C, **KW)
    assert not d.prune and d.recovery is not None and d.recovery.remaining == 0.0
    assert d.optimistic_accuracy > max(c.accuracy for c in C)  # so never dominated either
    # between trials 2 and 3 but more than a factor 4 from both (3 % → 12 % → 50 %)
    assert decide(0.0, 0.88, {"size": 1.0}, C, **KW).recovery.remaining == 0.0


def test_an_optimistically_dominated_trial_is_pruned() -> None:
    # d = 1.2 %: bracketed by trials 1 and 2, optimistically feasible, larger than trial 0.
    d = decide(0.0, 0.988, {"size": 12.0, "latency": 1.0}, C, **KW)
    expected = _optimistic_drop(0.012, C)
    assert 0 < expected <= 0.01
    assert d.prune and d.reason == "dominated" and d.dominated_by == 0
    assert d.optimistic_accuracy == pytest.approx(1.0 - expected)


def test_a_trial_that_may_end_feasible_and_non_dominated_goes_on() -> None:
    d = decide(0.0, 0.988, {"size": 3.0, "latency": 1.0}, C, **KW)  # the smallest plan
    assert not d.prune and d.reason is None and 0 < d.optimistic_drop <= 0.01


def test_without_a_constraint_only_dominance_prunes() -> None:
    kw = {**KW, "max_drop": None}
    assert not decide(0.0, 0.4, {"size": 1.0}, C, **kw).prune  # deep damage, but smallest
    assert decide(0.0, 0.4, {"size": 6.0}, C, **kw).reason == "dominated"  # by trial 3


def test_an_unknown_latency_never_dominates() -> None:
    assert dominates(1.0, {"size": 1.0, "latency": 1.0}, 0.9, {"size": 2.0, "latency": 2.0})
    nan = {"size": 1.0, "latency": math.nan}
    assert not dominates(1.0, nan, 0.9, {"size": 2.0, "latency": 2.0})
    assert not dominates(1.0, {"size": 1.0}, 0.9, {"size": 1.0, "latency": 2.0})
    assert not dominates(0.9, {"size": 1.0}, 0.9, {"size": 1.0})  # equal: not dominated
    d = decide(0.0, 0.988, {"size": 12.0, "latency": math.nan}, C, **KW)
    assert not d.prune


@pytest.mark.parametrize("seed", range(5))
def test_the_learned_bound_holds_on_the_curves_it_was_learned_from(seed: int) -> None:
    rng = np.random.default_rng(seed)
    curves = []
    for i in range(12):
        d = float(rng.choice([0.0, 0.005, 0.03, 0.2, 0.6]) * rng.uniform(0.5, 1.5))
        final = float(d * rng.uniform(0.0, 0.8) + rng.normal(0, 0.002))
        curves.append(Curve(i, {0.5: 0.98 - d}, 0.99 - final))
    for drop in (0.01, 0.1, 0.5):
        r = learn_recovery(
            curves, 0.5, drop, float_subset=0.98, float_accuracy=0.99, large=MIN_LARGE_DROP
        )
        assert r is not None and 0.0 <= r.remaining <= 1.0 and r.slack >= 0.0
        near = []
        for c in curves:
            d, final = 0.98 - c.scores[0.5], 0.99 - c.accuracy
            if d < MIN_LARGE_DROP or drop / WINDOW <= d <= drop * WINDOW:
                near.append((d, final))
        for d, final in near:  # the bound holds on every curve near the damage judged ...
            assert final >= r.remaining * d - r.slack - 1e-12
        if r.remaining > 0:  # ... and ρ is the smallest ratio of the bracketing window
            ratios = [f / d for d, f in near if d >= MIN_LARGE_DROP]
            assert r.remaining == pytest.approx(max(0.0, min(ratios)))


# -- replaying learning curves recorded from real searches -----------------------------------


def replay(data: dict[str, Any], min_trials: int = 3) -> tuple[dict[int, Any], set[int]]:
    """Run the rule over recorded trials in order, as a search would (a pruned trial teaches
    nothing later); return the pruned trials and the front of all recorded trials."""
    objectives = [o for o in data["objectives"] if o != "accuracy"]
    field = {"size": "size_bytes", "latency": "latency_ms"}
    curves: list[Curve] = []
    pruned: dict[int, Any] = {}
    for t in data["trials"]:
        values = {o: float(t[field[o]]) for o in objectives}
        scores = {float(k): v for k, v in t["scores"].items()}
        for f in data["fidelities"]:
            decision = decide(
                f,
                scores[f],
                values,
                curves,
                float_subset=data["float_subset"],
                float_accuracy=data["float_accuracy"],
                max_drop=data["max_accuracy_drop"],
                min_trials=min_trials,
            )
            if decision.prune:
                pruned[t["number"]] = decision
                break
        else:
            curves.append(Curve(t["number"], scores, t["accuracy"], values))
    limit = data["max_accuracy_drop"]
    feasible = [t for t in data["trials"] if data["float_accuracy"] - t["accuracy"] <= limit]
    points = np.array([[-t["accuracy"]] + [t[field[o]] for o in objectives] for t in feasible])
    front = {t["number"] for t, keep in zip(feasible, nondominated(points), strict=True) if keep}
    return pruned, front


def test_recorded_curves_exist_for_digits_and_lenet5() -> None:
    tasks = {json.loads(p.read_text())["task"] for p in CURVES}
    assert {"digits-cnn", "mnist-lenet5"} <= tasks


@pytest.mark.parametrize("path", CURVES, ids=[p.stem for p in CURVES])
def test_replayed_curves_never_prune_a_trial_of_the_final_front(path: Path) -> None:
    data = json.loads(path.read_text())
    assert all(set(map(float, t["scores"])) == set(data["fidelities"]) for t in data["trials"])
    pruned, front = replay(data)
    assert front and not set(pruned) & front, f"pruned front trials {set(pruned) & front}"
    for number, d in pruned.items():  # and each pruned trial did end infeasible or dominated
        t = next(t for t in data["trials"] if t["number"] == number)
        if d.reason == "infeasible":
            assert data["float_accuracy"] - t["accuracy"] > data["max_accuracy_drop"]


def test_replayed_curves_do_prune() -> None:
    """The rule is not vacuous on the recorded searches: it stops trials there."""
    pruned = [replay(json.loads(p.read_text()))[0] for p in CURVES]
    assert sum(map(len, pruned)) >= 3


# -- a real study ----------------------------------------------------------------------------

SPEC = {
    "study": {"name": "prune", "trials": 5, "seed": 0},
    "task": {"name": "digits-cnn"},
    "space": {"w_bits": [2, 4, 8], "a_bits": [4, 8], "w_gran": ["per_channel", "per_tensor"]},
    "qat": {"steps": 8, "calib_batches": 1},
    "latency": {"warmup": 1, "repeats": 3, "budget_s": 0.05},
    "constraint": {"max_accuracy_drop": 0.01},
    # No pre-pass, so no proposals: the trials are the plans enqueued below, then the
    # baselines. Scored at half the QAT steps; two complete trials teach the rule.
    "strategy": {"sensitivity": "off", "fidelities": [0.5], "prune_min_trials": 2},
}


def _collapse(ctx: SearchContext, a4: int) -> dict[str, Any]:
    """2-bit per-tensor weights everywhere (digits collapses), 4-bit inputs on ``a4`` layers."""
    params = {}
    for i, layer in enumerate(ctx.layer_names):
        params.update({f"{layer}/w_bits": 2, f"{layer}/w_gran": "per_tensor"})
        params[f"{layer}/a_bits"] = 4 if i < a4 else 8
    return params


@pytest.mark.slow
def test_a_digits_study_prunes_a_hopeless_trial_and_keeps_the_front(tmp_path: Path) -> None:
    spec = study_spec_from_dict(SPEC, "prune.toml")
    ctx = SearchContext(spec)  # shared: the same latency cache for both studies
    studies = {}
    for prune in (True, False):
        s = replace(spec, name=f"prune-{prune}", strategy=replace(spec.strategy, prune=prune))
        ctx.spec = s  # the search reads its strategy from the context
        url = f"sqlite:///{tmp_path / f'{prune}.db'}"
        study = load_study(s, url)
        # Two collapses bracket the damage of the third, which is judged by them (measured
        # at half the QAT steps on the digits CNN: 4-bit inputs on 3, 4 and 1 layers score
        # 0.428, 0.385 and 0.400).
        n = len(ctx.layer_names)
        for a4 in (n - 1, n, 1):
            study.enqueue_trial(_collapse(ctx, a4))
        studies[prune] = run_search(s, storage=url, ctx=ctx, progress=False)

    on, off = (studies[p].get_trials() for p in (True, False))
    assert [read_record(t).baseline for t in off] == [None] * 3 + ["w8a8", "w4a8"]
    assert [t.state for t in off] == [TrialState.COMPLETE] * 5
    assert not any(read_record(t).fidelity_scores for t in off)  # nothing evaluated early
    assert not any("checkpoints" in (read_record(t).timing_s or {}) for t in off)
    expected = [TrialState.COMPLETE] * 5
    expected[2] = TrialState.PRUNED
    assert [t.state for t in on] == expected
    assert sum(judged(t) for t in on) == 5  # the pruned trial holds its budget slot

    r = read_record(on[2])
    p = r.pruned
    assert p is not None and p["reason"] == "infeasible" and p["fidelity"] == 0.5
    assert p["step"] == 4 and set(p["scores"]) == {"0.5"} and p["scores"] == r.fidelity_scores
    assert p["optimistic_drop"] > 0.01 and p["recovery"]["remaining"] > 0
    assert p["spent_s"] > 0 and p["saved_s"] >= 0 and r.total_s == p["spent_s"]
    assert r.fail_reason.startswith("pruned at 50 % of QAT (infeasible)")
    assert r.size_bytes == read_record(off[2]).size_bytes and r.latency_ms is not None
    assert on[2].constraints == {"accuracy_drop": pytest.approx(p["optimistic_drop"] - 0.01)}
    # The decision was right: without pruning the same plan ended infeasible.
    assert read_record(off[2]).accuracy_drop > 0.01
    # Complete trials are scored at the fidelity and train exactly as without pruning.
    for a, b in zip(on, off, strict=True):
        if a.state == TrialState.COMPLETE:
            assert set(read_record(a).fidelity_scores) == {"0.5"}
            assert a.values == b.values
    assert [(t.number, t.values) for t in pareto_front(studies[True], 0.01)] == [
        (t.number, t.values) for t in pareto_front(studies[False], 0.01)
    ]


# -- the sampler with pruned trials ----------------------------------------------------------


def test_tpe_takes_pruned_trials_as_bad_evidence_never_as_good() -> None:
    """Pruned trials have no values: TPE puts them among the worse trials (infeasible ones
    ranked by their constraint), so it samples their region no more than if they were absent,
    and far less than if they had been good."""
    spec = study_spec_from_dict(SPEC, "prune.toml")
    choices = list(range(10))

    def hits(region: str) -> int:
        study = optuna.create_study(directions=spec.directions, sampler=make_sampler(spec, 0))
        for x in choices:
            if x >= 5 and region == "absent":
                continue
            study.enqueue_trial({"x": x})
            trial = study.ask()
            trial.suggest_categorical("x", choices)
            if x < 5:
                trial.set_constraint("accuracy_drop", -0.01)
                study.tell(trial, [0.9 + 0.01 * x, 100.0 - x, 1.0])
            elif region == "pruned":  # stopped by the rule: no values, optimistically infeasible
                trial.set_constraint("accuracy_drop", 0.2)
                study.tell(trial, state=TrialState.PRUNED)
            else:  # "good": complete, better on every objective
                trial.set_constraint("accuracy_drop", -0.01)
                study.tell(trial, [0.99, 50.0, 1.0])
        out = []
        for _ in range(20):
            trial = study.ask()
            out.append(trial.suggest_categorical("x", choices))
            trial.set_constraint("accuracy_drop", -0.01)
            study.tell(trial, [0.9, 100.0, 1.0])
        return sum(x >= 5 for x in out)

    assert hits("pruned") <= hits("absent") < hits("good")
