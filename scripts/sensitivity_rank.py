"""How well does each sensitivity estimate rank the real accuracy drops of whole plans?

    python scripts/sensitivity_rank.py studies/mnist_lenet5.toml --storage sqlite:///runs/study.db

For a finished study: the additive prediction of every complete trial's plan (the sum of its
layers' single-layer damages, as the surrogate starts before any re-fit) from each metric of the
study's stored sensitivity table (KL to the float logits and task loss, on held-out and on
calibration batches, and the accuracy drop) and from the Hutchinson Hessian estimate (computed
here, timed), against the drop each trial measured after its QAT. Prints Spearman and Kendall
rank correlations over all complete trials and over those within 5 points, and the cost of
each estimate.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from autoquant.allocate import Surrogate, hessian_sensitivity, kendall, spearman
from autoquant.search import (
    SearchContext,
    load_existing_study,
    load_study_spec,
    read_float_baseline,
    read_record,
    read_study_record,
)
from autoquant.search._prepass import held_out_batches, stored_sensitivity, unit_space


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", help="the study file")
    parser.add_argument("--storage", default=None)
    parser.add_argument("--hessian-samples", type=int, default=16)
    args = parser.parse_args()

    spec = load_study_spec(args.study)
    study = load_existing_study(spec, args.storage)
    ctx = SearchContext(spec)
    units = unit_space(ctx)
    table = stored_sensitivity(study, units)
    if table is None:
        raise SystemExit("the study has no stored sensitivity table that fits its space")
    wall = (read_study_record(study).sensitivity or {}).get("wall_s")
    t = time.perf_counter()
    hessian = hessian_sensitivity(
        ctx.float_model,
        units,
        ctx.calib,
        held_out_batches(ctx, 512)[:2],
        ctx.task.loss_fn,
        samples=args.hessian_samples,
        seed=spec.seed,
    )
    hessian_s = time.perf_counter() - t
    table = table.merge(hessian)

    base = read_float_baseline(study)
    plans, drops = [], []
    for trial in study.get_trials(deepcopy=False):
        r = read_record(trial)
        if trial.state.name != "COMPLETE" or r.duplicate_of is not None or r.accuracy is None:
            continue
        plans.append(r.quant_plan)
        drops.append(base.accuracy - r.accuracy)
    measured = np.array(drops)
    small = measured < 0.05
    print(
        f"{spec.name}: {len(plans)} complete trials ({int(small.sum())} within 5 points); "
        f"drops after QAT {measured.min():+.4f} .. {measured.max():+.4f}"
    )
    print(f"{'metric':12} {'Spearman':>9} {'Kendall':>8} {'Spearman<5pt':>13} {'Kendall<5pt':>12}")
    for metric in table.metrics:
        surrogate = Surrogate(table, units, metric=metric)
        predicted = np.array([surrogate.predict(p).drop for p in plans])
        row = [
            spearman(predicted, measured),
            kendall(predicted, measured),
            spearman(predicted[small], measured[small]),
            kendall(predicted[small], measured[small]),
        ]
        print(f"{metric:12} " + " ".join(f"{v:>9.3f}" for v in row))
    print(f"cost: the stored KL/loss table {wall} s (the pre-pass); Hessian {hessian_s:.1f} s")


if __name__ == "__main__":
    main()
