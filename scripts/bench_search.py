"""Random search vs TPE on the same budget: hypervolume of the normalised (accuracy, size)
front after every 10 trials, and where a trial's time goes.

    python scripts/bench_search.py studies/mnist_lenet5.toml --trials 40

Each sampler runs in its own fresh in-memory study with the same seed, task and
settings; the latency cache is shared so both pay the same measurement cost.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
import optuna
import torch

from autoquant.search import SearchContext, hypervolume_history, load_study_spec, run_search


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("study")
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--samplers", default="random,tpe")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    base = load_study_spec(args.study)
    ctx = SearchContext(base)
    print(f"task {base.task}: {len(ctx.layer_names)} layers, space {base.space.to_dict()}")
    results = {}
    for sampler in args.samplers.split(","):
        spec = replace(base, sampler=sampler, name=f"{base.name}-{sampler}")
        ctx.spec = spec
        t0 = time.perf_counter()
        study = run_search(
            spec, trials=args.trials, storage="sqlite:///:memory:", ctx=ctx, progress=False
        )
        wall = time.perf_counter() - t0
        baseline = study.user_attrs["float_baseline"]
        hv = hypervolume_history(study.trials, baseline["size_bytes"], spec.max_accuracy_drop)
        timing = np.array(
            [
                [
                    t.user_attrs["timing_s"][k]
                    for k in ("calibrate", "qat", "eval", "measure", "total")
                ]
                for t in study.trials
                if "timing_s" in t.user_attrs
            ]
        )
        results[sampler] = (hv, timing, wall, baseline)

    print(
        f"\nhypervolume of the normalised (1-accuracy, size/float) front, reference (1, 1), "
        f"constraint drop <= {base.max_accuracy_drop}"
    )
    header = "trials  " + "  ".join(f"{s:>8}" for s in results)
    print(header)
    for n in range(10, args.trials + 1, 10):
        print(f"{n:>6}  " + "  ".join(f"{r[0][n - 1]:8.4f}" for r in results.values()))
    print("\nmedian trial time breakdown (s): calibrate / qat / eval / measure / total")
    for s, (_, timing, wall, _) in results.items():
        med = np.median(timing, axis=0)
        print(f"{s:>8}: " + " / ".join(f"{v:.2f}" for v in med) + f"   wall {wall:.0f} s")
    b = next(iter(results.values()))[3]
    print(
        f"\nfloat baseline: accuracy {b['accuracy']:.4f}, size {b['size_bytes']} B, "
        f"latency {b['latency_ms']:.3f} ms"
    )


if __name__ == "__main__":
    main()
