"""Sensitivity pass, surrogate and solver on a shipped study, checked against real evaluations.

    python scripts/allocate_demo.py                       # mnist-lenet5 (digits without data)
    python scripts/allocate_demo.py --study studies/digits.toml --held-out 512
    python scripts/allocate_demo.py --qat-steps 100       # also fine-tune, re-fit, re-propose

Runs the sensitivity pass (PTQ, per unit and option) and the Hessian estimate, prints their
cost, proposes plans for a ladder of size budgets and at the study's accuracy limit, then
evaluates each proposed plan post-calibration (no QAT) on the study's held-out set and prints
its size (% of float), predicted and measured accuracy drop, and how well each damage metric
ranks the measured drops. With ``--qat-steps``, each plan is also fine-tuned like a trial, the
surrogate is re-fitted on those drops and a second round is proposed and measured.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autoquant.allocate import (
    Proposal,
    SizeModel,
    Surrogate,
    UnitSpace,
    estimate_sensitivity_cost,
    hessian_sensitivity,
    kendall,
    measure_sensitivity,
    propose,
    sample_batches,
    spearman,
)
from autoquant.search import load_study_spec
from autoquant.tasks import data_dir, get_task
from autoquant.train import evaluate, qat_finetune
from autoquant.transform import apply_plan, calibration, call_model, quantizable_names
from autoquant.types import QuantPlan

ROOT = Path(__file__).resolve().parents[1]


def _default_study() -> Path:
    if (data_dir() / "weights/lenet5_mnist.pt").is_file() and (data_dir() / "mnist.npz").is_file():
        return ROOT / "studies/mnist_lenet5.toml"
    return ROOT / "studies/digits.toml"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--study", type=Path, default=None, help="study file (default: LeNet-5)")
    parser.add_argument("--held-out", type=int, default=1024, help="held-out samples for the table")
    parser.add_argument("--budgets", type=int, default=8, help="size budgets in the ladder")
    parser.add_argument("--qat-steps", type=int, default=0, help="also fine-tune each plan")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    spec = load_study_spec(args.study or _default_study())
    task = get_task(spec.task, **dict(spec.task_options))
    model = task.model_factory()
    units = UnitSpace(spec.space, quantizable_names(model))
    calib = task.calib_batches(spec.qat.calib_batch_size)[: spec.qat.calib_batches]
    evals = task.eval_batches(spec.qat.eval_batch_size)
    held_out = sample_batches(evals, args.held_out, batch_size=256)
    max_drop = spec.max_accuracy_drop or 0.01
    float_acc = evaluate(model, evals)
    print(
        f"study {spec.name}: task {spec.task}, float accuracy {100 * float_acc:.2f} % on "
        f"{sum(len(y) for _, y in evals)} held-out samples, limit {100 * max_drop:.2f} points"
    )
    print(
        f"{len(units)} units: "
        + ", ".join(f"{u.name} ({u.n_weight} w × {u.n_activation} a options)" for u in units.units)
    )

    cost = estimate_sensitivity_cost(model, units, calib, held_out)
    print(
        f"\nsensitivity pass: {cost.evaluations} evaluations, {cost.forward_passes:.0f} "
        f"float-pass equivalents of one batch (partial re-runs: {cost.traced}), "
        f"estimated {cost.seconds:.1f} s"
    )
    table = measure_sensitivity(model, units, calib, held_out, task.loss_fn)
    print(f"  measured: {table.timing_s['total']:.1f} s {dict(table.timing_s)}")
    hess = hessian_sensitivity(model, units, calib, calib[:2], task.loss_fn)
    print(f"  Hessian estimate: {hess.timing_s['total']:.1f} s {dict(hess.timing_s)}")
    table = table.merge(hess)
    for u, row in zip(units.units, table.units, strict=True):
        w, a = row.weight["eval_kl"], row.activation["eval_kl"]
        worst_w, worst_a = (
            max(range(len(w)), key=w.__getitem__),
            max(range(len(a)), key=a.__getitem__),
        )
        print(
            f"  {u.name:18s} weight KL {min(w):.1e}..{max(w):.1e} (worst "
            f"{dict(row.weight_options[worst_w])}), input KL {min(a):.1e}..{max(a):.1e} "
            f"(worst {dict(row.activation_options[worst_a])})"
        )

    sizes = SizeModel.build(model, units)
    surrogates = {
        m: Surrogate(table, units, m)
        for m in ("eval_kl", "eval_loss", "eval_acc", "calib_kl", "hessian")
    }
    surrogate = surrogates["eval_kl"]
    print(f"\nsurrogate eval_kl: prior scale {surrogate.prior:.3g} (accuracy drop per nat of KL)")

    def ptq(plan: QuantPlan) -> tuple[nn.Module, float]:
        q = apply_plan(model, plan)
        with calibration(q):
            for x, _ in calib:
                call_model(q, x)
        return q, float_acc - evaluate(q, evals)

    def qat(q: nn.Module) -> float:
        torch.manual_seed(spec.seed)
        qat_finetune(
            q,
            task.train_batches(spec.qat.batch_size, seed=spec.seed),
            task.loss_fn,
            steps=args.qat_steps,
            lr=spec.qat.lr,
            optimizer=spec.qat.optimizer,
        )
        return float_acc - evaluate(q, evals)

    def round_(surr: Surrogate, tried: list[QuantPlan]) -> list[tuple[Proposal, float, Any]]:
        t0 = time.perf_counter()
        proposals = propose(
            units, surr, sizes, max_drop=max_drop, tried=tried, size_steps=args.budgets
        )
        print(f"{len(proposals)} proposals in {time.perf_counter() - t0:.2f} s")
        print(
            f"  {'source':15s} {'budget':>22s} {'size %':>7s} {'pred %':>12s} {'PTQ %':>7s}"
            + (f" {'QAT %':>7s}" if args.qat_steps else "")
            + "  plan"
        )
        rows = []
        for p in proposals:
            q, drop = ptq(p.plan)
            qat_drop = qat(q) if args.qat_steps else None
            budget = ", ".join(f"{k}={v:.4g}" for k, v in p.budget.items())
            print(
                f"  {p.source:15s} {budget:>22s} {100 * p.size_ratio:7.2f} "
                f"{100 * p.prediction.drop:6.2f}±{100 * p.prediction.std:<5.2f} {100 * drop:7.2f}"
                + (f" {100 * qat_drop:7.2f}" if qat_drop is not None else "")
                + f"  {p.plan.summary()}"
            )
            rows.append((p, drop, qat_drop))
        return rows

    print("\nround 1 (table prior): ", end="")
    rows = round_(surrogate, [])
    measured = [d for _, d, _ in rows]
    print("\nrank agreement with the measured PTQ drops of these plans:")
    for name, s in surrogates.items():
        pred = [s.predict(p.choice).drop for p, _, _ in rows]
        print(
            f"  {name:10s} Spearman {spearman(pred, measured):6.3f}  "
            f"Kendall {kendall(pred, measured):6.3f}"
        )
    feasible = [p.size_ratio for p, d, _ in rows if d <= max_drop]
    print(
        f"smallest plan within the limit after PTQ alone: {100 * min(feasible):.2f} % of float"
        if feasible
        else "no plan within the limit"
    )

    if args.qat_steps:
        obs = [(p.plan, qd) for p, _, qd in rows]
        fitted = surrogate.fit(obs)
        print(f"\nre-fitted on {len(obs)} QAT results: {fitted.to_dict()}")
        print("round 2 (re-fitted): ", end="")
        rows2 = round_(fitted, [p.plan for p, _, _ in rows])
        done = rows + rows2
        feasible = [p.size_ratio for p, _, qd in done if qd <= max_drop]
        print(
            f"smallest plan within the limit after QAT: {100 * min(feasible):.2f} % of float"
            if feasible
            else "no plan within the limit"
        )


if __name__ == "__main__":
    main()
