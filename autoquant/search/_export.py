"""Turn a stored trial into files a user can ship, and re-measure its latency."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch

from autoquant.measure import LatencyCache, export_onnx, load_onnx, measure_latencies, ort_session

from ._context import SearchContext, replay
from ._record import read_float_baseline, read_record


def _trial(study: optuna.Study, number: int) -> optuna.trial.FrozenTrial:
    trials = study.get_trials(deepcopy=False)
    if not 0 <= number < len(trials):
        raise ValueError(
            f"--trial {number} is not in study {study.study_name!r}; allowed: 0..{len(trials) - 1}"
        )
    trial = trials[number]
    if trial.state != optuna.trial.TrialState.COMPLETE:
        raise ValueError(
            f"trial {number} is {trial.state.name}, not COMPLETE; "
            "only complete trials can be exported"
        )
    return trial


def export_trial(
    study: optuna.Study, ctx: SearchContext, number: int, out_dir: str | Path
) -> dict[str, Any]:
    """Rebuild trial ``number`` (replayed from its parameters) and write it to ``out_dir``.

    Writes ``plan.json``, ``model.onnx`` (plus ``weights.packed.npz`` when a weight has
    fewer than 8 bits), ``metadata.json`` (stored, replayed and deployed metrics, float
    baseline, backend, per-layer formats) and ``state_dict.pt`` (the fine-tuned fake-quant model;
    rebuild it with ``apply_plan(task model, load_plan(...))`` then ``load_state_dict``).

    Example:
        >>> meta = export_trial(study, SearchContext(spec), 3, "export-trial3")  # doctest: +SKIP
    """
    trial = _trial(study, number)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    baseline = read_float_baseline(study)
    record = read_record(trial)
    result = replay(ctx, trial.params, float_accuracy=baseline.accuracy)
    if result.plan != record.quant_plan:
        raise RuntimeError(
            f"trial {number}: the study file's space no longer yields the stored "
            "plan; export with the study file the search ran with"
        )
    model = result.model.eval()
    (out / "plan.json").write_text(result.plan.to_json(indent=2) + "\n", encoding="utf-8")
    torch.save(model.state_dict(), out / "state_dict.pt")
    info = export_onnx(
        model,
        result.plan,
        out / "model.onnx",
        ctx.example_input,
        calib_inputs=[x for x, _ in ctx.calib],
    )
    meta = {
        "study": study.study_name,
        "trial": number,
        "task": ctx.spec.task,
        "stored": {
            k: getattr(record, k)
            for k in ("accuracy", "accuracy_drop", "size_bytes", "size_ratio", "latency_ms")
        },
        "replayed": {
            "accuracy": result.values["accuracy"],
            "size_bytes": result.record.size_bytes,
            "accuracy_drop": result.record.accuracy_drop,
        },
        "deployed_accuracy_onnxruntime": deployed_accuracy(ctx, info.path),
        "float_baseline": {
            "accuracy": baseline.accuracy,
            "size_bytes": baseline.size_bytes,
            "latency_ms": baseline.latency_ms,
        },
        "latency": record.latency,
        "qat": record.qat,
        "onnx": info.to_dict(),
        "files": sorted(p.name for p in out.iterdir()) + ["metadata.json"],
    }
    (out / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def bench_trial_latency(
    study: optuna.Study,
    ctx: SearchContext,
    number: int,
    *,
    repeats: int = 500,
    budget_s: float = 10.0,
    backend: str | None = None,
    batch_sizes: tuple[int, ...] | None = None,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """Re-measure one trial's deployed model with more repeats, bypassing the cache.

    The model is rebuilt from the plan and calibrated but not fine-tuned: integer kernels
    run at the same speed whatever the weight values, so the latency is the trial's.
    """
    plan = read_record(_trial(study, number)).quant_plan
    if plan is None:
        raise ValueError(f"trial {number} stores no plan")
    result = ctx.run_plan(plan, lr=0.0, steps=0, measure=False)
    ls = ctx.spec.latency
    sizes = batch_sizes or ls.batch_sizes
    results = measure_latencies(
        result.model,
        plan,
        ctx.task.example_input(sizes[0]),
        batch_sizes=list(sizes),
        backend=backend or ls.backend,
        threads=threads or ls.threads,
        warmup=ls.warmup,
        repeats=repeats,
        budget_s=budget_s,
        cache=LatencyCache(),
        calib_inputs=[x for x, _ in ctx.calib],
    )
    return [r.to_dict() for r in results]


def deployed_accuracy(ctx: SearchContext, onnx_path: Path) -> float:
    """Top-1 of an exported ONNX model under ONNX Runtime on the task's held-out set."""
    sess = ort_session(load_onnx(onnx_path))
    name = sess.get_inputs()[0].name
    correct = total = 0
    for x, y in ctx.eval:
        logits = sess.run(None, {name: x.numpy()})[0]
        correct += int((np.argmax(logits, 1) == y.numpy()).sum())
        total += len(y)
    return correct / total
