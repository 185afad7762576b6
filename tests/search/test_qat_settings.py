"""``[qat]`` distillation, learned quantizers, compile and autocast reach every trial.

The training pieces are tested against references in ``tests/train``; these tests check the
study-file keys and that a trial really uses them (each fails if the wiring is dropped).
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import torch
from torch import nn

from autoquant.search import SearchContext, StudyFileError, run_search, study_spec_from_dict
from autoquant.search._record import read_record
from autoquant.tasks import Task
from autoquant.train import Distillation, teacher_logits

BASE = {
    "study": {"name": "qat-settings", "trials": 2, "seed": 0},
    "task": {"name": "digits-cnn"},
    "space": {"w_bits": [4], "a_bits": [8]},
}


def _spec(qat: dict, space: dict | None = None, strategy: dict | None = None, **study: object):
    data = {**BASE, "qat": {"steps": 6, "calib_batches": 1, "compile": False, **qat}}
    if strategy:
        data["strategy"] = strategy
    data["space"] = {**BASE["space"], **(space or {})}
    data["study"] = {**BASE["study"], **study}
    return study_spec_from_dict(data, "s.toml")


@pytest.mark.parametrize(
    ("qat", "message"),
    [
        (
            {"distill": {"alpha": 2.0}},
            r"distill\.alpha=2\.0 is not allowed; allowed values: a number in \[0, 1\]",
        ),
        (
            {"distill": {"alpah": 0.5}},
            r"unknown distill key\(s\) \['alpah'\]; allowed keys: alpha, temperature",
        ),
        ({"distill": 0.5}, r"distill must be a table"),
        (
            {"compile": "yes"},
            r"qat\.compile = 'yes' is not allowed; allowed values: 'auto', true, false",
        ),
        (
            {"autocast": "fp16"},
            r"qat\.autocast = 'fp16' is not allowed; allowed values: 'bf16', 'none'",
        ),
        ({"quant_lr": float("nan")}, r"qat\.quant_lr = nan is not allowed"),
    ],
)
def test_bad_qat_settings_name_the_key_and_the_allowed_values(qat: dict, message: str) -> None:
    with pytest.raises(StudyFileError, match=message):
        _spec(qat)


def test_qat_settings_parse_and_round_trip_through_the_stored_spec() -> None:
    spec = _spec(
        {"distill": {"alpha": 0.7, "temperature": 2}, "autocast": "none", "quant_lr": 0.05}
    )
    assert spec.qat.distill == Distillation(alpha=0.7, temperature=2.0)
    assert spec.qat.autocast is None and spec.qat.compile is False and spec.qat.quant_lr == 0.05
    stored = spec.to_dict()["qat"]
    assert stored["distill"] == {"alpha": 0.7, "temperature": 2.0}
    assert study_spec_from_dict({**BASE, "qat": stored}, "s.toml").qat == spec.qat


def test_a_distilled_trial_uses_the_cached_teacher_logits_of_the_study(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTOQUANT_CACHE", str(tmp_path))
    spec = _spec({"distill": {"alpha": 1.0, "temperature": 2.0}})
    ctx = SearchContext(spec)
    plan, qat = ctx.plan_for(optuna.trial.FixedTrial({}))
    kd = ctx.run_plan(plan, **qat, measure=False)
    plain = ctx.run_plan(plan, **qat, distill=False, measure=False)
    # alpha = 1: the loss is the teacher term alone, so the two fine-tunes differ.
    assert kd.record.qat["distillation"] == {"alpha": 1.0, "temperature": 2.0}
    assert "distillation" not in plain.record.qat
    assert kd.record.loss_history != plain.record.loss_history
    # Cached once per study, on disk, equal to a fresh teacher forward over the same stream.
    files = list((tmp_path / "teacher-logits").glob("*.pt"))
    assert len(files) == 1
    fresh = teacher_logits(
        ctx.float_model, ctx.task.train_batches(spec.qat.batch_size, seed=spec.seed), 6
    )
    torch.testing.assert_close(ctx.teacher_logits(6), fresh)


def test_searched_distillation_and_quant_lr_are_trial_parameters_and_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTOQUANT_CACHE", str(tmp_path))
    spec = _spec(
        {},
        {"distill": [True, False], "quant_lr": [1e-3, 3e-2], "w_learn": ["scale"]},
        trials=3,
        strategy={"sensitivity": "off", "prune": False},
    )
    study = run_search(spec, storage=f"sqlite:///{tmp_path / 's.db'}", progress=False)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert done
    for t in done:
        q = read_record(t).qat
        assert q["distill"] is t.params["qat/distill"]
        assert math.isclose(q["quant_lr"], t.params["qat/quant_lr"])
        assert ("distillation" in q) is t.params["qat/distill"]
        assert q["run"]["quant_params"] > 0  # the learned scales trained


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_trial_matches_the_cpu_trial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTOQUANT_CACHE", str(tmp_path))
    results = {}
    for device in ("cpu", "cuda"):
        spec = _spec({"distill": {"alpha": 0.5}}, device=device)
        ctx = SearchContext(spec)
        plan, qat = ctx.plan_for(optuna.trial.FixedTrial({}))
        results[device] = ctx.run_plan(plan, **qat)
    # Same plan, data and seed; GPU kernels differ in rounding only (a few eval samples).
    assert abs(results["cpu"].values["accuracy"] - results["cuda"].values["accuracy"]) < 0.02
    assert results["cpu"].values["size"] == results["cuda"].values["size"]
    assert math.isfinite(results["cuda"].values["latency"])  # measured on the CPU backend


def _token_task() -> Task:
    class Bag(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(50, 16)
            self.fc = nn.Linear(16, 3)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.fc(self.emb(ids).mean(dim=1))

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (96, 6), generator=g)
    y = ids[:, 0] % 3
    torch.manual_seed(0)
    model = Bag().eval()
    return Task.from_tensors(
        "bag", lambda: copy.deepcopy(model), train=(ids[:64], y[:64]), eval=(ids[64:], y[64:])
    )


def test_an_embedding_gets_a_float_activation_without_an_override(tmp_path: Path) -> None:
    # The user's space asks 4- or 8-bit activations everywhere; an embedding's input is token
    # ids, which cannot be quantized. The search fixes that knob instead of failing trials.
    spec = _spec({}, {"a_bits": [4, 8], "w_bits": [4, 8]}, strategy={"sensitivity": "off"})
    ctx = SearchContext(replace(spec, task="bag"), task=_token_task())
    assert ctx.spec.space.knob_choices("emb")["a_bits"] == ("fp32",)
    assert ctx.spec.space.param_names(ctx.layer_names) == ["emb/w_bits", "fc/w_bits", "fc/a_bits"]
    study = run_search(ctx.spec, storage=f"sqlite:///{tmp_path / 's.db'}", ctx=ctx, progress=False)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 2
    for t in done:
        plan = read_record(t).quant_plan
        assert plan.layers["emb"].activation.bits == "fp32"
        assert plan.layers["emb"].weight.bits == t.params["emb/w_bits"]


def test_the_qat_stream_is_decoded_once_and_equals_a_fresh_stream() -> None:
    ctx = SearchContext(_spec({}))
    first = ctx.train_batches(5)
    assert ctx.train_batches(3)[0][0] is first[0][0]  # reused, not decoded again
    fresh = ctx.task.train_batches(ctx.spec.qat.batch_size, seed=ctx.spec.seed)
    for (x, y), (fx, fy) in zip(first, fresh, strict=False):
        torch.testing.assert_close(x, fx)
        torch.testing.assert_close(y, fy)
    assert len(ctx.train_batches(8)) == 8  # a longer request decodes more
