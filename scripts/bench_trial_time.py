"""What one trial costs with a study's defaults, for two versions of autoquant side by side.

    python scripts/bench_trial_time.py --before /path/to/old-checkout --rounds 3
    python scripts/bench_trial_time.py --study studies/cifar10_resnet20.toml --plans w8a8 mixed

Each round runs, in a fresh process per version (alternating, so load changes hit both alike),
every plan once through ``SearchContext.run_plan`` with the study's QAT settings (a relative
``--study`` is read from each version's own checkout, so each runs with its own defaults):
calibrate,
QAT, evaluate, pack and measure latency (the latency cache starts empty in each process, so
each trial measures). The process's start-up (data decoding, model build) is timed apart. A
version is a checkout whose ``autoquant`` package is imported (``--before``, ``--after``; the
after default is this checkout). The table gives the median seconds per phase and the
accuracy, and the speed-up of the total.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parents[1]


def _plan(name: str, layers: list[str]) -> Any:
    from autoquant.types import LayerPlan, QuantPlan, QuantSpec

    def spec(wb: int, ab: int) -> LayerPlan:
        return LayerPlan(
            QuantSpec(bits=wb, granularity="per_channel"), QuantSpec(bits=ab, symmetric=False)
        )

    if name == "w8a8":
        return QuantPlan({n: spec(8, 8) for n in layers})
    # mixed: first and last layers w8a8, the rest alternately w4a8 and w3a6
    edge = {layers[0], layers[-1]}
    return QuantPlan(
        {
            n: spec(8, 8) if n in edge else (spec(4, 8) if i % 2 else spec(3, 6))
            for i, n in enumerate(layers)
        }
    )


def child(study: str, plans: list[str], threads: int) -> None:
    """One process: build the context, run each plan once, print JSON."""
    import torch

    from autoquant.search import SearchContext, load_study_spec

    torch.set_num_threads(threads)
    t = time.perf_counter()
    spec = load_study_spec(study)
    ctx = SearchContext(spec)
    setup = time.perf_counter() - t
    names = getattr(ctx, "layer_names", None) or list(ctx.searched)
    out: dict[str, Any] = {"setup_s": setup, "plans": {}}
    for name in plans:
        result = ctx.run_plan(_plan(name, list(names)), lr=spec.qat.lr, steps=spec.qat.steps)
        record = getattr(result, "record", None)
        attrs = result.attrs if record is None else {"timing_s": record.timing_s}
        out["plans"][name] = {"timing_s": attrs["timing_s"], **result.values}
    print("RESULT " + json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--study",
        default="studies/cifar10_resnet20.toml",
        help="relative paths are read from each version's checkout (its own defaults)",
    )
    parser.add_argument("--before", type=Path, required=False)
    parser.add_argument("--after", type=Path, default=HERE)
    parser.add_argument("--plans", nargs="+", default=["w8a8", "mixed"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.study, args.plans, args.threads)
        return
    versions = {"after": args.after}
    if args.before is not None:
        versions = {"before": args.before, **versions}
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in versions}
    for r in range(args.rounds):
        for v, tree in list(versions.items()) if r % 2 == 0 else list(versions.items())[::-1]:
            env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(args.threads)}
            cmd = [sys.executable, __file__, "--child", "--study", args.study, "--plans"]
            cmd += [*args.plans, "--threads", str(args.threads)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tree)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{v} ({tree}) failed:\n{proc.stderr[-3000:]}")
            runs[v].append(json.loads(line[7:]))
            print(f"round {r + 1}: {v} done", file=sys.stderr)
    phases = ["calibrate", "qat", "eval", "measure", "total"]
    print(f"study {args.study}, {args.threads} thread(s), {args.rounds} rounds, median seconds")
    print(f"{'version':8} {'plan':6} " + " ".join(f"{p:>9}" for p in phases) + "  accuracy")
    totals: dict[tuple[str, str], float] = {}
    for v, rs in runs.items():
        for plan in args.plans:
            cells = [
                statistics.median(x["plans"][plan]["timing_s"].get(p, 0.0) for x in rs)
                for p in phases
            ]
            totals[v, plan] = cells[-1]
            acc = statistics.median(x["plans"][plan]["accuracy"] for x in rs)
            print(f"{v:8} {plan:6} " + " ".join(f"{c:9.2f}" for c in cells) + f"  {acc:.2%}")
        setup = statistics.median(x["setup_s"] for x in rs)
        print(f"{v:8} setup (data, model, discovery) {setup:.1f} s")
    if "before" in runs:
        for plan in args.plans:
            ratio = totals["before", plan] / totals["after", plan]
            print(f"speed-up of a {plan} trial: {ratio:.2f}x")


if __name__ == "__main__":
    main()
