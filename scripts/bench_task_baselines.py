"""Float, uniform w8a8 and w4a8 (per-channel weights, QAT as in the study file) accuracy of
built-in tasks, on their held-out sets.

    python scripts/bench_task_baselines.py studies/digits.toml studies/mnist_lenet5.toml \
        studies/cifar10_resnet20.toml

The quantized rows are exactly the uniform baseline trials every study enqueues first.
"""

from __future__ import annotations

import argparse
import time

import optuna
import torch

from autoquant.search import BASELINES, SearchContext, load_study_spec, replay
from autoquant.space import baseline_params
from autoquant.train import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("studies", nargs="+")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--task", help="run this task instead of the study file's")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print(f"{'task':<20} {'eval n':>7} {'float':>7} {'w8a8':>7} {'w4a8':>7}  qat steps  seconds")
    for path in args.studies:
        spec = load_study_spec(path)
        if args.task:
            from dataclasses import replace

            spec = replace(spec, task=args.task)
        t0 = time.perf_counter()
        ctx = SearchContext(spec)
        n = sum(len(y) for _, y in ctx.eval)
        row = [evaluate(ctx.float_model, ctx.eval)]
        for _, wb, ab in BASELINES:
            params = baseline_params(spec.space, ctx.layer_names, wb, ab)
            row.append(
                replay(ctx, params).values["accuracy"] if params is not None else float("nan")
            )
        print(
            f"{spec.task:<20} {n:>7} "
            + " ".join(f"{100 * a:6.2f}%" for a in row)
            + f"  {spec.qat.steps:>9}  {time.perf_counter() - t0:7.0f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
