#!/usr/bin/env python
"""Latency benchmark of the deployment backends (ONNX Runtime QDQ, torch x86 int8).

For ResNet-20 (CIFAR shape) and the digits CNN, at each batch size, in one run: float32
latency, uniform int8 latency (w8 per-channel, a8 asymmetric), the speed-up, and one mixed
plan, for each backend; then the spread of repeated measurements of one artifact (coefficient
of variation of the medians of independent measurement runs), and the share of a trial's time
that latency measurement takes with a cold and a warm cache.

Weights are random and calibration uses random inputs: latency does not depend on values. The
nominal trial is a real one on the digits task (calibration, 50 QAT steps, evaluation).

Usage:
    .venv/bin/python scripts/bench_latency.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from autoquant.measure import LatencyCache, get_backend, measure_latencies, measure_latency
from autoquant.measure._timing import time_calls
from autoquant.tasks import CifarResNet, DigitsCNN
from autoquant.transform import apply_plan, calibration, quantizable_layers
from autoquant.types import LayerPlan, QuantPlan, QuantSpec

BACKENDS = ("onnxruntime", "torch-x86")
INT8 = LayerPlan(QuantSpec(bits=8, granularity="per_channel"), QuantSpec(bits=8, symmetric=False))


def _models() -> dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]]:
    return {
        "resnet20": (lambda: CifarResNet(20), (3, 32, 32)),
        "digits-cnn": (lambda: DigitsCNN(), (1, 8, 8)),
    }


def mixed_plan(names: list[str]) -> QuantPlan:
    """First and last layer w8a8; the rest cycle w4 / w8 / w6-asym weights with 8- and 6-bit
    asymmetric inputs; one layer kept float."""
    cycle = [
        LayerPlan(QuantSpec(bits=4, granularity="per_channel"), QuantSpec(bits=8, symmetric=False)),
        INT8,
        LayerPlan(
            QuantSpec(bits=6, granularity="per_channel", symmetric=False),
            QuantSpec(bits=6, symmetric=False),
        ),
    ]
    layers = {n: cycle[i % 3] for i, n in enumerate(names)}
    layers[names[0]] = layers[names[-1]] = INT8
    layers[names[len(names) // 2]] = LayerPlan()  # fp32
    return QuantPlan(layers)


def calibrated(model: nn.Module, plan: QuantPlan, shape: tuple[int, ...]) -> nn.Module:
    q = apply_plan(model, plan)
    with calibration(q):
        q(torch.randn(64, *shape))
    return q.eval()


def bench_speedups(args: argparse.Namespace) -> None:
    proto = dict(
        threads=args.threads, warmup=args.warmup, repeats=args.repeats, budget_s=args.budget
    )
    print(
        f"== latency (ms, median ± IQR), threads={args.threads}, batch sizes "
        f"{args.batch_sizes}, warmup={args.warmup}, repeats<={args.repeats}, "
        f"budget={args.budget}s per point"
    )
    for model_name, (factory, shape) in _models().items():
        torch.manual_seed(0)
        model = factory().eval()
        x = torch.randn(1, *shape)
        names = [i.name for i in quantizable_layers(model, x)]
        plans = {"int8": QuantPlan({n: INT8 for n in names}), "mixed": mixed_plan(names)}
        qmodels = {k: calibrated(model, p, shape) for k, p in plans.items()}
        print(f"\n{model_name}: {len(names)} layers; mixed plan = {plans['mixed'].summary()}")
        for backend in BACKENDS:
            fl = measure_latencies(model, None, x, args.batch_sizes, backend=backend, **proto)
            i8 = measure_latencies(
                qmodels["int8"], plans["int8"], x, args.batch_sizes, backend=backend, **proto
            )
            mx = measure_latencies(
                qmodels["mixed"], plans["mixed"], x, args.batch_sizes, backend=backend, **proto
            )
            for f, i, m in zip(fl, i8, mx, strict=True):
                print(
                    f"  {backend:12s} b={f.batch_size:<3d} fp32 {f.median_ms:8.3f} ± "
                    f"{f.iqr_ms:6.3f}   int8 {i.median_ms:8.3f} ± {i.iqr_ms:6.3f}   "
                    f"speed-up {f.median_ms / i.median_ms:5.2f}x   mixed {m.median_ms:8.3f}"
                    f" ± {m.iqr_ms:6.3f} ({f.median_ms / m.median_ms:4.2f}x)"
                )
            print(f"  {backend:12s} int8 kernels: {i8[0].kernels}; float: {fl[0].kernels}")


def bench_spread(args: argparse.Namespace) -> None:
    print(
        f"\n== spread: {args.runs} independent measurement runs of one deployed artifact "
        "(ResNet-20, batch 1)"
    )
    torch.manual_seed(0)
    model = CifarResNet(20).eval()
    x = torch.randn(1, 3, 32, 32)
    names = [i.name for i in quantizable_layers(model, x)]
    plan = QuantPlan({n: INT8 for n in names})
    q = calibrated(model, plan, (3, 32, 32))
    for backend in BACKENDS:
        impl = get_backend(backend)
        for label, (m, p) in {"fp32": (model, None), "int8": (q, plan)}.items():
            deployed = impl.deploy(m, p, x, threads=args.threads)
            medians = []
            for _ in range(args.runs):
                with impl.threads_context(args.threads):
                    t = time_calls(
                        deployed.runner(x),
                        warmup=args.warmup,
                        repeats=args.repeats,
                        budget_s=args.budget,
                    )
                medians.append(t.median_ms)
            cv = statistics.pstdev(medians) / statistics.mean(medians)
            print(
                f"  {backend:12s} {label}: medians {[round(v, 3) for v in medians]} ms, "
                f"CV {100 * cv:.1f} %"
            )


def _digits_trial() -> tuple[float, nn.Module, QuantPlan, torch.Tensor]:
    from autoquant.tasks import get_task
    from autoquant.train import evaluate, qat_finetune

    task = get_task("digits-cnn")
    model = task.model_factory()
    x = task.example_input(1)
    names = [i.name for i in quantizable_layers(model, x)]
    plan = QuantPlan({n: INT8 for n in names})
    t0 = time.perf_counter()
    q = apply_plan(model, plan)
    with calibration(q):
        for xb, _ in task.calib_batches(64)[:4]:
            q(xb)
    qat_finetune(
        q, task.train_batches(64, seed=0), task.loss_fn, steps=50, lr=1e-3, optimizer="adam"
    )
    evaluate(q, task.eval_batches(256))
    return time.perf_counter() - t0, q.eval(), plan, x


def bench_cache(args: argparse.Namespace) -> None:
    print(
        "\n== latency measurement share of a trial (digits CNN, default protocol: warmup 10,"
        " repeats 50, budget 2 s, batch 1)"
    )
    trial_s, q, plan, x = _digits_trial()
    print(f"  nominal trial (calibrate 4 batches + 50 QAT steps + eval), measured: {trial_s:.2f} s")
    for backend in BACKENDS:
        cache = LatencyCache()
        kw = dict(backend=backend, threads=args.threads, cache=cache)
        cold = measure_latency(q, plan, x, **kw)
        warm = measure_latency(q, plan, x, **kw)
        print(
            f"  {backend:12s} cold cache {cold.measure_s:6.3f} s "
            f"({100 * cold.measure_s / (trial_s + cold.measure_s):5.1f} % of the trial)   "
            f"warm cache {warm.measure_s * 1e3:7.3f} ms "
            f"({100 * warm.measure_s / (trial_s + warm.measure_s):6.3f} %), hit={warm.cached}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--budget", type=float, default=3.0)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--skip", nargs="*", default=[], choices=["speedups", "spread", "cache"])
    args = parser.parse_args()
    t0 = time.perf_counter()
    if "speedups" not in args.skip:
        bench_speedups(args)
    if "spread" not in args.skip:
        bench_spread(args)
    if "cache" not in args.skip:
        bench_cache(args)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
