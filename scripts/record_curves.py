"""Record learning curves of real trials for the pruning rule's replay test.

    python scripts/record_curves.py studies/digits.toml --trials 40 \\
        --out tests/search/data/curves_digits_tpe.json
    python scripts/record_curves.py studies/mnist_lenet5.toml --trials 40 \\
        --out tests/search/data/curves_lenet5_tpe.json

Runs the study (a fresh in-memory copy; the shipped strategy unless flags change it) with
pruning in *record-only* mode: every trial is scored at the ``[strategy] fidelities`` on the
pruning sample but none is stopped (``prune_min_trials`` is set out of reach). Writes, per
trial in order: its source (baseline / proposal / sampler), the scores at each fidelity, the
final accuracy, size and latency; and the float model's accuracy on the full held-out set and
on the pruning sample. ``tests/search/test_pruning.py`` replays these curves through the rule.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import optuna
import torch

from autoquant.search import load_study_spec, read_float_baseline, read_record, run_search
from autoquant.search._context import SearchContext
from autoquant.search._pruning import Pruner


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("study", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--sampler", help="override [study] sampler")
    parser.add_argument("--seed", type=int, help="override [study] seed")
    parser.add_argument("--no-proposals", action="store_true", help="proposals = 0")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    spec = load_study_spec(args.study)
    strategy = replace(spec.strategy, prune=True, prune_min_trials=10**9)
    if args.no_proposals:
        strategy = replace(strategy, proposals=0)
    changes = {"strategy": strategy, "name": f"{spec.name}-curves", "trials": args.trials}
    if args.sampler:
        changes["sampler"] = args.sampler
    if args.seed is not None:
        changes["seed"] = args.seed
    spec = replace(spec, **changes)
    ctx = SearchContext(spec)
    t0 = time.perf_counter()
    study = run_search(spec, storage="sqlite:///:memory:", ctx=ctx, progress=True)
    wall = time.perf_counter() - t0
    baseline = read_float_baseline(study)
    pruner = Pruner(study, ctx, baseline)
    trials = []
    for t in study.get_trials(deepcopy=False):
        r = read_record(t)
        if r.accuracy is None:
            continue
        source = r.baseline or ("proposal" if r.proposal else "sampler")
        trials.append(
            {
                "number": t.number,
                "source": source,
                "plan": r.plan_summary,
                "scores": r.fidelity_scores or {},
                "accuracy": r.accuracy,
                "size_bytes": r.size_bytes,
                "latency_ms": r.latency_ms,
                "total_s": r.total_s,
            }
        )
    out = {
        "study": str(args.study),
        "task": spec.task,
        "sampler": spec.sampler,
        "seed": spec.seed,
        "objectives": list(spec.objectives),
        "max_accuracy_drop": spec.max_accuracy_drop,
        "fidelities": list(spec.strategy.fidelities),
        "prune_eval": spec.strategy.prune_eval,
        "qat_steps": spec.qat.steps,
        "float_accuracy": baseline.accuracy,
        "float_subset": pruner.float_subset,
        "float_size_bytes": baseline.size_bytes,
        "wall_s": round(wall, 1),
        "trials": trials,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"{len(trials)} trials in {wall:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
