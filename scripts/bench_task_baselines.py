"""Baselines of built-in tasks on their held-out sets.

Default: float, uniform w8a8 and w4a8 accuracy (per-channel weights, QAT as in the study
file); the quantized rows are exactly the uniform baseline trials every study enqueues.

    python scripts/bench_task_baselines.py studies/digits.toml studies/mnist_lenet5.toml \
        studies/cifar10_resnet20.toml

``--deploy``: one row per plan (float, the study's w8a8 baseline, a mixed plan), after
calibration only (no QAT): accuracy, packed size and batch-1 latency on both backends
(ONNX Runtime and torch-x86). A cell that fails (a layer type or input a backend cannot
deploy yet) reads FAIL and its reason is printed under the table; the other cells still run.

    python scripts/bench_task_baselines.py studies/sst2_minilm.toml --deploy --eval-size 200

The mixed plan keeps the first and last layers at w8a8 and gives 4-bit weights to the
larger half of the others (by parameters); activations stay 8-bit.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import optuna
import torch
from torch import nn

from autoquant.measure import measure_latencies
from autoquant.search import BASELINES, SearchContext, StudySpec, load_study_spec, replay
from autoquant.space import baseline_params
from autoquant.train import evaluate
from autoquant.transform import float_size_bytes
from autoquant.types import LayerPlan, QuantPlan

BACKENDS = ("onnxruntime", "torch-x86")


def qat_baselines(ctx: SearchContext) -> list[float]:
    """Float accuracy, then the QAT accuracy of each uniform baseline (NaN if not expressible)."""
    spec = ctx.spec
    row = [evaluate(ctx.float_model, ctx.eval)]
    for _, wb, ab in BASELINES:
        params = baseline_params(spec.space, ctx.layer_names, wb, ab)
        row.append(replay(ctx, params).values["accuracy"] if params is not None else float("nan"))
    return row


def mixed_plan(ctx: SearchContext, w8a8: QuantPlan) -> QuantPlan:
    """``w8a8`` with 4-bit weights on the larger half (by parameters) of the inner layers."""
    inner = [info for info in ctx.layers if info.name in w8a8.layers][1:-1]
    large = sorted(inner, key=lambda info: info.params, reverse=True)[: len(inner) // 2]
    layers = dict(w8a8.layers)
    for info in large:
        lp = layers[info.name]
        layers[info.name] = LayerPlan(weight=replace(lp.weight, bits=4), activation=lp.activation)
    return QuantPlan(layers, adds=w8a8.adds)


class Row:
    """One plan's cells; a failing cell records its reason instead of stopping the row."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.cells: dict[str, str] = {}
        self.failures: list[str] = []

    def cell(self, column: str, fn: Callable[[], str]) -> Any:
        try:
            self.cells[column] = fn()
        except Exception as exc:  # noqa: BLE001 - report and go on with the next cell
            self.cells[column] = "FAIL"
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            self.failures.append(f"{self.name} / {column}: {type(exc).__name__}: {reason[:300]}")


def deploy_rows(ctx: SearchContext, threads: int, budget_s: float) -> list[Row]:
    """Float, w8a8 and mixed: post-calibration accuracy, size and batch-1 latency per backend."""
    spec = ctx.spec
    example = ctx.task.example_input(1)
    calib_inputs = [x for x, _ in ctx.calib]
    models: dict[str, tuple[nn.Module | None, QuantPlan | None]] = {
        "float": (ctx.float_model, None)
    }
    rows = [Row("float")]
    rows[0].cell("accuracy", lambda: f"{100 * evaluate(ctx.float_model, ctx.eval):.2f}%")
    rows[0].cell("size", lambda: f"{float_size_bytes(ctx.float_model)}")

    params = baseline_params(spec.space, ctx.layer_names, 8, 8)
    plans: dict[str, QuantPlan] = {}
    if params is not None:
        plans["w8a8"] = ctx.plan_for(optuna.trial.FixedTrial(params))[0]
        plans["mixed"] = mixed_plan(ctx, plans["w8a8"])
    for name, plan in plans.items():
        row = Row(name)
        rows.append(row)
        result: dict[str, Any] = {}

        def run(plan: QuantPlan = plan, result: dict[str, Any] = result) -> str:
            # steps=0: calibration only; latency is measured below, per backend.
            res = ctx.run_plan(plan, lr=spec.qat.lr, steps=0, measure=False)
            result["res"] = res
            return f"{100 * res.values['accuracy']:.2f}%"

        row.cell("accuracy", run)
        if "res" in result:
            models[name] = (result["res"].model, plan)
            row.cell("size", lambda result=result: f"{int(result['res'].values['size'])}")
        else:
            models[name] = (None, plan)
    for row in rows:
        model, plan = models[row.name]
        for backend in BACKENDS:

            def latency(model: nn.Module | None = model, plan: Any = plan, b: str = backend) -> str:
                if model is None:
                    raise RuntimeError("no calibrated model (accuracy failed)")
                res = measure_latencies(
                    copy.deepcopy(model),
                    plan,
                    example,
                    [1],
                    backend=b,
                    threads=threads,
                    budget_s=budget_s,
                    calib_inputs=None if plan is None else calib_inputs,
                )
                return f"{res[0].median_ms:.3f}"

            row.cell(f"{backend} ms", latency)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("studies", nargs="+")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--task", help="run this task instead of the study file's")
    parser.add_argument("--eval-size", type=int, help="override the task's eval_size option")
    parser.add_argument("--deploy", action="store_true", help="float/w8a8/mixed, no QAT, latency")
    parser.add_argument("--budget", type=float, default=2.0, help="latency budget (s) per point")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    header = (
        f"{'task':<20} {'plan':<6} {'eval n':>6} {'accuracy':>9} {'size B':>10} "
        + " ".join(f"{b + ' ms':>15}" for b in BACKENDS)
        if args.deploy
        else f"{'task':<20} {'eval n':>7} {'float':>7} {'w8a8':>7} {'w4a8':>7}  qat steps  seconds"
    )
    print(header)
    failures: list[str] = []
    for path in args.studies:
        spec: StudySpec = load_study_spec(path)
        if args.task:
            spec = replace(spec, task=args.task)
        if args.eval_size is not None:
            spec = replace(spec, task_options={**spec.task_options, "eval_size": args.eval_size})
        t0 = time.perf_counter()
        ctx = SearchContext(spec)
        n = sum(len(y) for _, y in ctx.eval)
        if args.deploy:
            for row in deploy_rows(ctx, args.threads, args.budget):
                c = row.cells
                print(
                    f"{spec.task:<20} {row.name:<6} {n:>6} {c.get('accuracy', '-'):>9} "
                    f"{c.get('size', '-'):>10} "
                    + " ".join(f"{c.get(b + ' ms', '-'):>15}" for b in BACKENDS),
                    flush=True,
                )
                failures += [f"{spec.task}: {f}" for f in row.failures]
            print(f"({time.perf_counter() - t0:.0f} s)")
        else:
            row = qat_baselines(ctx)
            print(
                f"{spec.task:<20} {n:>7} "
                + " ".join(f"{100 * a:6.2f}%" for a in row)
                + f"  {spec.qat.steps:>9}  {time.perf_counter() - t0:7.0f}",
                flush=True,
            )
    if failures:
        print("\nfailed cells:")
        for f in failures:
            print(f"  {f}")


if __name__ == "__main__":
    main()
