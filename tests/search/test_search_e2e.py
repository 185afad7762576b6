"""End-to-end: a real (tiny) digits search through the whole pipeline."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from autoquant.measure import LatencyCache
from autoquant.search import (
    OptunaAttrStore,
    SearchContext,
    load_study,
    pareto_front,
    read_float_baseline,
    read_record,
    replay,
    run_search,
    study_spec_from_dict,
)
from autoquant.search._optuna_compat import storage_of
from autoquant.types import QuantPlan

pytestmark = pytest.mark.slow

SPEC = {
    "study": {"name": "e2e", "trials": 4, "seed": 0, "sampler": "tpe"},
    "task": {"name": "digits-cnn"},
    "space": {"w_bits": [2, 4, 8], "a_bits": [4, 8], "a_calib": ["minmax", "mse"]},
    "qat": {"steps": 15, "lr": 0.001, "calib_batches": 2},
    "latency": {"warmup": 3, "repeats": 10, "budget_s": 0.3},
    "constraint": {"max_accuracy_drop": 0.05},
    # Every trial must complete here (replay, resume); pruning: tests/search/test_pruning.py.
    "strategy": {"prune": False},
}


@pytest.fixture
def spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AUTOQUANT_RUNS", str(tmp_path))
    return study_spec_from_dict(SPEC, "e2e.toml")


def test_digits_search_front_baselines_replay_and_resume(spec) -> None:
    torch.set_num_threads(1)
    study = run_search(spec, progress=False)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 4
    assert {read_record(t).baseline for t in complete} >= {"w8a8", "w4a8"}

    baseline = read_float_baseline(study)
    w8 = next(t for t in complete if read_record(t).baseline == "w8a8")
    assert {lp.short() for lp in QuantPlan.from_dict(read_record(w8).plan).layers.values()} == {
        "w8ca8a"
    }
    assert baseline.accuracy - read_record(w8).accuracy < 0.03
    assert read_record(w8).size_bytes < baseline.size_bytes / 3

    front = pareto_front(study, spec.max_accuracy_drop)
    assert front, "the front must not be empty"
    for t in front:
        assert read_record(t).accuracy_drop <= spec.max_accuracy_drop
        assert t.constraints == {
            "accuracy_drop": pytest.approx(read_record(t).accuracy_drop - spec.max_accuracy_drop)
        }
        others = [o for o in complete if read_record(o).accuracy_drop <= spec.max_accuracy_drop]
        assert not any(
            o.values[0] >= t.values[0]
            and all(a <= b for a, b in zip(o.values[1:], t.values[1:], strict=True))
            and o.values != t.values
            for o in others
        ), f"front trial {t.number} is dominated"

    # Every stored plan replays through FixedTrial to the same metrics.
    ctx = SearchContext(spec, latency_cache=LatencyCache(OptunaAttrStore(study)))
    for t in complete:
        result = replay(ctx, t.params, float_accuracy=baseline.accuracy)
        assert result.plan == QuantPlan.from_dict(read_record(t).plan)
        assert result.values["accuracy"] == pytest.approx(read_record(t).accuracy, abs=0.01)
        assert result.values["size"] == read_record(t).size_bytes
        assert result.record.latency[0]["cached"], "same deployed graph: cache hit"

    # A second invocation resumes: nothing is redone, and a larger budget only adds trials.
    first_numbers = [t.number for t in complete]
    again = run_search(spec, progress=False)
    assert [t.number for t in again.get_trials(states=(TrialState.COMPLETE,))] == first_numbers
    more = run_search(spec, trials=5, progress=False)
    numbers = [t.number for t in more.get_trials(states=(TrialState.COMPLETE,))]
    assert numbers[:4] == first_numbers and len(numbers) == 5


def test_nan_loss_fails_one_trial_and_the_study_completes(spec) -> None:
    # No pre-pass: it calls the task's loss too, and this test counts the QAT's calls.
    spec = replace(spec, name="nan", trials=3, strategy=replace(spec.strategy, sensitivity="off"))
    ctx = SearchContext(spec)
    real_loss = ctx.task.loss_fn
    calls = {"n": 0}
    steps = spec.qat.steps

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        loss = real_loss(out, y)
        # The first QAT step of the second trial sees a NaN loss.
        return loss * math.nan if calls["n"] == steps + 1 else loss

    ctx.task = replace(ctx.task, loss_fn=loss_fn)
    study = run_search(spec, ctx=ctx, progress=False)
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert len(failed) == 1
    assert "non-finite QAT loss" in read_record(failed[0]).fail_reason
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 3


def test_resume_keeps_the_study_and_rejects_other_objectives(spec) -> None:
    load_study(spec)
    with pytest.raises(Exception, match="other objectives"):
        load_study(replace(spec, objectives=("accuracy", "size")))
    assert optuna.get_all_study_names(storage_of(load_study(spec))) == ["e2e"]
