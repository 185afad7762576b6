"""Search strategies at equal wall-clock: random, TPE (as before) and the new default.

    python scripts/bench_search.py --minutes 10 --seeds 3          # both tasks, the real run
    python scripts/bench_search.py --tasks mnist_lenet5 --minutes 1 --seeds 1 \\
        --qat-steps 10 --eval-size 500                             # a smoke run

Each run is a fresh in-memory study of a shipped study file with a wall-clock ``timeout``
(no trial count), its own latency cache and one worker:

* ``random``: the random sampler; no pre-pass, no proposals, no pruning;
* ``tpe``: the study's TPE sampler; no pre-pass, no proposals, no pruning (the search before
  ``[strategy]`` existed);
* ``default``: TPE with the sensitivity pre-pass, solver proposals and pruning (the study
  file's ``[strategy]``: the defaults, with the shipped studies' small adjustments).
* ``default-minmax``: ``default`` with min/max weight calibration (``w_calib``'s default
  before MSE); it runs for T too.

``default`` runs for T; ``tpe`` and ``random`` run for ``--factor`` × T (3 by default), so one
run gives their curve at T, 2T and 3T. The constrained hypervolume (feasible trials only,
normalised (1 − accuracy, size / float size), reference (1, 1)) is taken at checkpoints of the
wall-clock since the run started (the pre-pass included): T/3, 2T/3 and T for ``default``, T,
2T, 3T for the others. Printed as a markdown table (mean ± standard deviation over seeds), with
the smallest feasible size (% of float), the trials judged, the pre-pass's cost in
trial-equivalents (its wall time over the median trial's); a PNG plots hypervolume against
wall-clock (``--plot``). The goal: ``default`` at T reaches at least ``tpe`` at 3T, on both
tasks.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from optuna.trial import TrialState

from autoquant.search import (
    SearchContext,
    StrategySettings,
    feasible,
    hypervolume_2d,
    judged,
    load_study_spec,
    read_float_baseline,
    read_record,
    read_study_record,
    run_search,
)
from autoquant.search._pareto import normalised_accuracy_size

ROOT = Path(__file__).resolve().parents[1]
OFF = StrategySettings(sensitivity="off", proposals=0, prune=False)
MODES = {
    "random": lambda spec: replace(spec, sampler="random", strategy=OFF),
    "tpe": lambda spec: replace(spec, strategy=OFF),
    "default": lambda spec: spec,  # the study file's [strategy] (the shipped ones: defaults)
    # The default with min/max weight calibration (the space default before MSE).
    "default-minmax": lambda spec: replace(spec, space=replace(spec.space, w_calib=("minmax",))),
}


def run(spec: Any, mode: str, seed: int, seconds: float) -> dict[str, Any]:
    """One search; the feasible (accuracy, size) points with the second they completed at."""
    spec = replace(
        MODES[mode](spec),
        seed=seed,
        name=f"{spec.name}-{mode}-{seed}",
        trials=None,
        timeout=seconds,
        # The figures compared are accuracy and size: no end-of-run latency re-measure.
        latency=replace(spec.latency, remeasure_front=False),
    )
    ctx = SearchContext(spec)  # a fresh latency cache: every run pays its own measurements
    start = time.time()
    study = run_search(spec, storage="sqlite:///:memory:", ctx=ctx, progress=False, timeout=seconds)
    wall = time.time() - start
    base = read_float_baseline(study)
    points, times = [], []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if read_record(t).duplicate_of is None and feasible(t, spec.max_accuracy_drop):
            r = read_record(t)
            points.append((r.accuracy, r.size_bytes))
            times.append(t.datetime_complete.timestamp() - start)
    trials = study.get_trials(deepcopy=False)
    totals = [read_record(t).total_s for t in trials if t.state == TrialState.COMPLETE]
    totals = [s for s in totals if s]
    sens = read_study_record(study).sensitivity
    median = statistics.median(totals) if totals else None
    return {
        "points": points,
        "times": times,
        "float_size": base.size_bytes,
        "wall": wall,
        "judged": sum(judged(t) for t in trials),
        "pruned": sum(judged(t) and t.state == TrialState.PRUNED for t in trials),
        "prepass_trials": sens["wall_s"] / median if sens and median else None,
        "median_trial_s": median,
    }


def hv_at(result: dict[str, Any], second: float) -> float:
    done = [p for p, t in zip(result["points"], result["times"], strict=True) if t <= second]
    if not done:
        return 0.0
    acc, size = zip(*done, strict=True)
    return hypervolume_2d(normalised_accuracy_size(acc, size, result["float_size"]), (1.0, 1.0))


def smallest(result: dict[str, Any], second: float) -> float | None:
    sizes = [s for (_, s), t in zip(result["points"], result["times"], strict=True) if t <= second]
    return 100 * min(sizes) / result["float_size"] if sizes else None


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", default="mnist_lenet5,cifar10_resnet20", help="study files")
    parser.add_argument("--minutes", type=float, default=10.0, help="T, the default's budget")
    parser.add_argument("--factor", type=float, default=3.0, help="tpe/random run factor × T")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds run from this one")
    parser.add_argument("--modes", default="default,tpe,random")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for QAT")
    parser.add_argument("--qat-steps", type=int, help="override [qat] steps")
    parser.add_argument("--eval-size", type=int, help="override the task's eval_size")
    parser.add_argument("--held-out", type=int, help="override [strategy] held_out (pre-pass)")
    parser.add_argument("--plot", type=Path, default=Path("bench_search.png"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    T = 60.0 * args.minutes
    modes = args.modes.split(",")
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for name in args.tasks.split(","):
        spec = load_study_spec(ROOT / "studies" / f"{name}.toml")
        if args.qat_steps is not None:
            spec = replace(spec, qat=replace(spec.qat, steps=args.qat_steps))
        if args.eval_size is not None:
            spec = replace(spec, task_options={**spec.task_options, "eval_size": args.eval_size})
        if args.held_out is not None:
            spec = replace(spec, strategy=replace(spec.strategy, held_out=args.held_out))
        for mode in modes:
            seconds = T if mode.startswith("default") else args.factor * T
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                print(f"{name} {mode} seed {seed}: {seconds:.0f} s ...", flush=True)
                results.setdefault((name, mode), []).append(run(spec, mode, seed, seconds))

    checkpoints = {
        m: [T / 3, 2 * T / 3, T]
        if m.startswith("default")
        else [k * T for k in range(1, int(args.factor) + 1)]
        for m in modes
    }
    print(
        f"\nConstrained hypervolume (feasible trials; (1 - accuracy, size / float), reference "
        f"(1, 1)) at wall-clock checkpoints, mean ± sd over {args.seeds} seeds; T = "
        f"{args.minutes:g} min, {args.threads} thread(s)\n"
    )
    print("| task | mode | checkpoint | hypervolume | smallest feasible (% of float) |")
    print("|---|---|---|---|---|")
    for (name, mode), runs in results.items():
        for c in checkpoints[mode]:
            small = [s for r in runs if (s := smallest(r, c)) is not None]
            hv = _mean_sd([hv_at(r, c) for r in runs])
            print(f"| {name} | {mode} | {c / T:.2g} T | {hv} | {_fmt(min(small, default=None))} |")
    print("\n| task | mode | trials judged | pruned | median trial (s) | pre-pass (trials) |")
    print("|---|---|---|---|---|---|")
    for (name, mode), runs in results.items():
        pre = [r["prepass_trials"] for r in runs if r["prepass_trials"] is not None]
        med = [r["median_trial_s"] for r in runs if r["median_trial_s"]]
        judged_n = statistics.mean(r["judged"] for r in runs)
        pruned_n = statistics.mean(r["pruned"] for r in runs)
        print(
            f"| {name} | {mode} | {judged_n:.1f} | {pruned_n:.1f} "
            f"| {_fmt(statistics.mean(med) if med else None)} "
            f"| {_fmt(statistics.mean(pre) if pre else None)} |"
        )
    for name in args.tasks.split(","):
        if (name, "default") in results and (name, "tpe") in results:
            ours = statistics.mean(hv_at(r, T) for r in results[(name, "default")])
            theirs = statistics.mean(hv_at(r, args.factor * T) for r in results[(name, "tpe")])
            verdict = "met" if ours >= theirs else "NOT met"
            print(
                f"\n{name}: default at T {ours:.4f} vs tpe at {args.factor:g} T {theirs:.4f}: "
                f"goal {verdict}"
            )
    _plot(results, T, args.factor, args.plot)
    print(f"\nplot: {args.plot}")


def _plot(
    results: dict[tuple[str, str], list[dict[str, Any]]], T: float, factor: float, path: Path
) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = list(dict.fromkeys(name for name, _ in results))
    fig = Figure(figsize=(6 * len(tasks), 4), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    colors = {"default": "tab:red", "tpe": "tab:blue", "random": "tab:gray"}
    for ax, name in zip(axes, tasks, strict=True):
        for (task, mode), runs in results.items():
            if task != name:
                continue
            end = T if mode.startswith("default") else factor * T
            grid = np.linspace(0, end, 60)
            curves = np.array([[hv_at(r, s) for s in grid] for r in runs])
            ax.plot(grid / 60, np.median(curves, axis=0), color=colors.get(mode), label=mode)
            if len(runs) > 1:
                ax.fill_between(
                    grid / 60, curves.min(0), curves.max(0), color=colors.get(mode), alpha=0.15
                )
        ax.axvline(T / 60, color="k", ls=":", lw=1)
        ax.set_title(name)
        ax.set_xlabel("wall-clock (min)")
        ax.set_ylabel("constrained hypervolume")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(path)


if __name__ == "__main__":
    main()
