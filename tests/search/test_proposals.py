"""Solver-proposed plans: enqueued after the baselines as ordinary trials, within the budget and
the share, never a plan the study already has, refreshed on results, replayable."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from autoquant.allocate import SensitivityTable, Surrogate, UnitSpace
from autoquant.search import (
    FloatBaseline,
    SearchContext,
    StrategySettings,
    TrialRecord,
    enqueue_baselines,
    ensure_sensitivity,
    read_record,
    read_study_record,
    record_attrs,
    run_search,
    study_spec_from_dict,
)
from autoquant.search._locks import Beater, Claims
from autoquant.search._optuna_compat import storage_of
from autoquant.search._proposals import Proposer, allowed, due, maybe_propose
from autoquant.space import plan_from_trial

SPEC = {
    "study": {"name": "proposals", "trials": 20, "seed": 0},
    "task": {"name": "digits-cnn"},
    "space": {"w_bits": [2, 4, 8], "a_bits": [4, 8], "w_gran": ["per_channel", "per_tensor"]},
    "qat": {"steps": 5, "calib_batches": 2},
    "latency": {"warmup": 1, "repeats": 3, "budget_s": 0.05},
    "objectives": {"use": ["accuracy", "size"]},
    "constraint": {"max_accuracy_drop": 0.01},
    "strategy": {"held_out": 256, "proposals": 4, "refresh": 2},
}
BASELINE = FloatBaseline(accuracy=0.98, size_bytes=40000, latency_ms=1.0)


# -- when, and how many (no model needed) ------------------------------------------------------


def _trial(state: TrialState, **record: Any) -> optuna.trial.FrozenTrial:
    values = [0.9, 1.0] if state == TrialState.COMPLETE else None
    return optuna.trial.create_trial(
        state=state, values=values, user_attrs=record_attrs(TrialRecord(**record))
    )


def _numbered(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    for i, t in enumerate(trials):
        t.number = i
    return trials


def test_a_round_enqueues_within_the_per_round_count_the_share_and_the_free_slots() -> None:
    p = {"proposal": {"round": 1}}
    done = [_trial(TrialState.COMPLETE, baseline="w8a8"), _trial(TrialState.WAITING)]
    assert allowed(_numbered(done), budget=40, per_round=8, share=0.6, first=True) == 8
    assert allowed(_numbered(done), budget=10, per_round=8, share=0.6, first=True) == 6
    assert allowed(_numbered(done), budget=4, per_round=8, share=0.6, first=True) == 2  # free
    made = _numbered(done + [_trial(TrialState.COMPLETE, **p) for _ in range(5)])
    assert allowed(made, budget=10, per_round=8, share=0.6, first=False) == 1  # 6 - 5 made
    assert allowed(made, budget=40, per_round=8, share=0.0, first=False) == 0
    # A retry repeats a proposal: it is not a new one.
    retry = _trial(TrialState.COMPLETE, proposal={"round": 1}, retry_of=2)
    assert allowed(_numbered([*made, retry]), budget=10, per_round=8, share=0.6, first=False) == 1
    # Without a count limit: round 1 whole, later ones keep proposals <= share of the trials.
    assert allowed(made, budget=None, per_round=8, share=0.6, first=True) == 8
    # 7 slots, 5 proposals: 5 + n <= 0.6 (7 + n)  =>  n <= -0.8 / 0.4: none
    assert allowed(made, budget=None, per_round=8, share=0.6, first=False) == 0
    more = _numbered(made + [_trial(TrialState.COMPLETE) for _ in range(5)])  # 12 slots
    assert allowed(more, budget=None, per_round=8, share=0.6, first=False) == 5  # 10 of 17


def test_a_round_is_due_first_then_after_refresh_completions_with_none_queued() -> None:
    p = {"proposal": {"round": 1}}
    trials = _numbered([_trial(TrialState.COMPLETE) for _ in range(3)])
    assert due(trials, [], refresh=4)
    rounds = [{"round": 1, "fitted_on": 0}]
    assert not due(trials, rounds, refresh=4)
    trials = _numbered(trials + [_trial(TrialState.COMPLETE, **p)])
    assert due(trials, rounds, refresh=4)
    assert not due(_numbered(trials + [_trial(TrialState.WAITING, **p)]), rounds, refresh=4)
    twin = _trial(TrialState.COMPLETE, duplicate_of=0)  # a reused result teaches nothing
    assert not due(_numbered(trials[:3] + [twin]), rounds, refresh=4)


# -- rounds on a real model ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def ctx() -> SearchContext:
    return SearchContext(study_spec_from_dict(SPEC, "proposals.toml"))


@pytest.fixture(scope="module")
def table(ctx: SearchContext) -> dict[str, Any]:
    study = optuna.create_study(directions=ctx.spec.directions)
    ensure_sensitivity(study, ctx)
    return read_study_record(study).sensitivity


def _study(ctx: SearchContext, table: dict[str, Any]) -> tuple[optuna.Study, Claims]:
    from autoquant.search import StudyRecord, write_study_record

    study = optuna.create_study(directions=ctx.spec.directions)
    write_study_record(study, StudyRecord(sensitivity=table, float_baseline=BASELINE))
    enqueue_baselines(study, ctx)
    return study, Claims(storage_of(study), study.study_name, beater=Beater(5.0))


def _queued(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials() if read_record(t).proposal is not None]


def test_round_one_follows_the_baselines_and_replays_with_fixed_trial(
    ctx: SearchContext, table: dict[str, Any]
) -> None:
    study, claims = _study(ctx, table)
    assert maybe_propose(study, ctx, claims, budget=20, baseline=BASELINE) == 4
    trials = study.get_trials()
    assert [read_record(t).baseline for t in trials[:2]] == ["w8a8", "w4a8"]
    queued = trials[2:]
    assert len(queued) == 4 and all(t.state == TrialState.WAITING for t in queued)
    units = UnitSpace(ctx.spec.space, ctx.layer_names)
    surrogate = Surrogate(SensitivityTable.from_dict(table["table"]), units)
    for t in queued:
        p = read_record(t).proposal
        assert p["round"] == 1 and p["source"] in ("min-size", "size-ladder")
        assert {"budget", "predicted_drop", "predicted_std", "size_ratio"} <= set(p)
        # Replaying the queued parameters gives the proposed plan, with the prediction stored.
        params = t.system_attrs["fixed_params"]
        plan = plan_from_trial(optuna.trial.FixedTrial(params), ctx.spec.space, ctx.layer_names)
        assert units.choice_of(plan) == tuple(p["choice"])
        assert surrogate.predict(plan).drop == pytest.approx(p["predicted_drop"])
    rounds = read_study_record(study).proposal_rounds
    assert [r["round"] for r in rounds] == [1] and rounds[0]["fitted_on"] == 0
    # Not due again while proposals are queued; a second worker finds nothing to do.
    assert maybe_propose(study, ctx, claims, budget=20, baseline=BASELINE) == 0
    claims.release_all()
    claims.beater.close()


def test_proposals_are_deterministic_and_never_repeat_a_plan_of_the_study(
    ctx: SearchContext, table: dict[str, Any]
) -> None:
    first, claims = _study(ctx, table)
    maybe_propose(first, ctx, claims, budget=20, baseline=BASELINE)
    again, claims2 = _study(ctx, table)
    maybe_propose(again, ctx, claims2, budget=20, baseline=BASELINE)
    params = [t.system_attrs["fixed_params"] for t in _queued(first)]
    assert params == [t.system_attrs["fixed_params"] for t in _queued(again)]

    # A study that already completed the first proposal's plan (run by the sampler, say).
    proposer = Proposer.build(ctx)
    top = read_record(_queued(first)[0]).proposal
    plan = proposer.units.plan(tuple(top["choice"]))
    third, claims3 = _study(ctx, table)
    record = TrialRecord(plan=plan.to_dict(), accuracy=0.97, accuracy_drop=0.01, size_bytes=9)
    third.add_trial(
        optuna.trial.create_trial(
            values=[0.97, 9.0],
            params=params[0],
            distributions={
                k: optuna.distributions.CategoricalDistribution([v]) for k, v in params[0].items()
            },
            user_attrs=record_attrs(record),
        )
    )
    maybe_propose(third, ctx, claims3, budget=20, baseline=BASELINE)
    choices = [tuple(read_record(t).proposal["choice"]) for t in _queued(third)]
    assert tuple(top["choice"]) not in choices
    # Nor a queued baseline's plan (its parameters are only set when it runs).
    for w_bits in (8, 4):
        assert proposer.units.baseline_choice(w_bits, 8) not in choices
    for c in (claims, claims2, claims3):
        c.release_all()
        c.beater.close()


def test_a_refresh_refits_on_results_and_keeps_to_the_share(
    ctx: SearchContext, table: dict[str, Any]
) -> None:
    study, claims = _study(ctx, table)
    budget = 10  # share 0.6: at most 6 proposals in all
    maybe_propose(study, ctx, claims, budget=budget, baseline=BASELINE)
    units = Proposer.build(ctx).units
    # Complete every queued trial with made-up results: every 2-bit layer costs 5 points.
    for _ in study.get_trials(states=(TrialState.WAITING,)):
        trial = study.ask()
        r = read_record(study.trials[trial.number])
        choice = (
            tuple(r.proposal["choice"])
            if r.proposal
            else units.baseline_choice(8 if r.baseline == "w8a8" else 4, 8)
        )
        plan = units.plan(choice)
        drop = 0.05 * sum(lp.weight.bits == 2 for lp in plan.layers.values())
        rec = TrialRecord(plan=plan.to_dict(), accuracy=0.98 - drop, accuracy_drop=drop)
        for k, v in record_attrs(rec).items():
            trial.set_user_attr(k, v)
        study.tell(trial, [0.98 - drop, 1.0])
    assert maybe_propose(study, ctx, claims, budget=budget, baseline=BASELINE) == 2  # 6 - 4
    rounds = read_study_record(study).proposal_rounds
    assert [r["fitted_on"] for r in rounds] == [0, 6]
    assert rounds[1]["surrogate"]["observations"] == 6
    assert rounds[1]["surrogate"]["scale_weight"] != rounds[0]["surrogate"]["scale_weight"]
    second = [t for t in _queued(study) if read_record(t).proposal["round"] == 2]
    assert len(second) == 2
    # The budget's share is spent: no third round, whatever completes.
    assert maybe_propose(study, ctx, claims, budget=budget, baseline=BASELINE) == 0
    claims.release_all()
    claims.beater.close()


def test_nothing_is_proposed_when_switched_off(
    ctx: SearchContext, table: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    for strategy in (StrategySettings(proposals=0), StrategySettings(sensitivity="off")):
        monkeypatch.setattr(ctx, "spec", replace(ctx.spec, strategy=strategy))
        study, claims = _study(ctx, table)
        assert maybe_propose(study, ctx, claims, budget=20, baseline=BASELINE) == 0
        assert not _queued(study) and read_study_record(study).proposal_rounds is None
        claims.beater.close()


@pytest.mark.slow
def test_a_digits_search_runs_the_baselines_then_the_proposals(tmp_path: Any) -> None:
    spec = study_spec_from_dict({**SPEC, "study": {**SPEC["study"], "trials": 8}}, "p.toml")
    study = run_search(spec, storage=f"sqlite:///{tmp_path / 'p.db'}", progress=False)
    records = [read_record(t) for t in study.get_trials()]
    assert [r.baseline for r in records[:2]] == ["w8a8", "w4a8"]
    sources = ["proposal" if r.proposal else "other" for r in records[2:6]]
    assert sources == ["proposal"] * 4  # round 1, right after the baselines
    assert sum(r.proposal is not None and r.retry_of is None for r in records) <= 0.6 * 8
    assert read_study_record(study).sensitivity["wall_s"] > 0


def test_a_solver_failure_costs_the_round_not_the_search(
    ctx: SearchContext, table: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from autoquant.search import _proposals

    calls: list[list[str]] = []

    def failing(*args: Any, **kwargs: Any) -> list[Any]:
        calls.append(list(kwargs["objectives"]))
        raise RuntimeError("the allocation solver kept violating a budget")

    monkeypatch.setattr(_proposals, "propose", failing)
    study, claims = _study(ctx, table)
    assert maybe_propose(study, ctx, claims, budget=20, baseline=BASELINE) == 0
    assert calls == [["accuracy", "size"]]  # size-only study: no latency fallback to try
    rounds = read_study_record(study).proposal_rounds
    assert rounds[0]["enqueued"] == 0 and rounds[0]["error"].startswith("RuntimeError: ")
    assert not due(study.get_trials(), rounds, refresh=2)  # not retried at once
    claims.release_all()
    claims.beater.close()
    # With latency an objective, the round tries again on size alone.
    calls.clear()
    three = ("accuracy", "size", "latency")
    monkeypatch.setattr(ctx, "spec", replace(ctx.spec, objectives=three))
    study, claims = _study(ctx, table)
    assert maybe_propose(study, ctx, claims, budget=20, baseline=BASELINE) == 0
    assert calls == [list(three), ["accuracy", "size"]]
    claims.beater.close()
