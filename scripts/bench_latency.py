#!/usr/bin/env python
"""Latency benchmark of the deployment backends (ONNX Runtime QDQ, torch x86 int8).

For ResNet-20 (CIFAR shape) and the digits CNN, at each batch size, in one run: float32
latency, uniform int8 latency (w8 per-channel, a8 asymmetric, residual adds int8; and the same
with float adds), the speed-ups, and one mixed plan, for each backend, in interleaved rounds;
then the spread of repeated measurements of one artifact (coefficient
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
INT8_ADDS = QuantSpec(bits=8, symmetric=False)


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
    return QuantPlan(layers, adds=INT8_ADDS)


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
        f"== latency (ms, median of {args.rounds} interleaved rounds; IQR of the last round), "
        f"threads={args.threads}, batch sizes {args.batch_sizes}, warmup={args.warmup}, "
        f"repeats<={args.repeats}, budget={args.budget}s per point and round"
    )
    for model_name, (factory, shape) in _models().items():
        torch.manual_seed(0)
        model = factory().eval()
        x = torch.randn(1, *shape)
        names = [i.name for i in quantizable_layers(model, x)]
        plans = {
            "fp32": None,
            "int8 float-adds": QuantPlan({n: INT8 for n in names}),
            "int8": QuantPlan({n: INT8 for n in names}, adds=INT8_ADDS),
            "mixed": mixed_plan(names),
        }
        qmodels = {k: model if p is None else calibrated(model, p, shape) for k, p in plans.items()}
        print(f"\n{model_name}: {len(names)} layers; mixed plan = {plans['mixed'].summary()}")
        for backend in BACKENDS:
            rounds: dict[str, list] = {k: [] for k in plans}
            for _ in range(args.rounds):  # interleaved: drift on a shared machine hits all
                for k, plan in plans.items():
                    rounds[k].append(
                        measure_latencies(
                            qmodels[k], plan, x, args.batch_sizes, backend=backend, **proto
                        )
                    )
            for b, batch in enumerate(args.batch_sizes):
                fp32 = [r[b].median_ms for r in rounds["fp32"]]
                row = f"  {backend:12s} b={batch:<3d} fp32 {statistics.median(fp32):7.3f}"
                for k in ("int8 float-adds", "int8", "mixed"):
                    ms = [r[b].median_ms for r in rounds[k]]
                    ratio = statistics.median(f / m for f, m in zip(fp32, ms, strict=True))
                    row += (
                        f" | {k} {statistics.median(ms):7.3f} ±{rounds[k][-1][b].iqr_ms:6.3f}"
                        f" ({ratio:4.2f}x)"
                    )
                print(row)
            for k in ("int8 float-adds", "int8"):
                print(f"  {backend:12s} {k} kernels: {rounds[k][0][0].kernels}")
            print(f"  {backend:12s} fp32 kernels: {rounds['fp32'][0][0].kernels}")


def bench_spread(args: argparse.Namespace) -> None:
    print(
        f"\n== spread: {args.runs} independent measurement runs of one deployed artifact "
        "(ResNet-20, batch 1)"
    )
    torch.manual_seed(0)
    model = CifarResNet(20).eval()
    x = torch.randn(1, 3, 32, 32)
    names = [i.name for i in quantizable_layers(model, x)]
    plan = QuantPlan({n: INT8 for n in names}, adds=INT8_ADDS)
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
    parser.add_argument("--rounds", type=int, default=3)
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
