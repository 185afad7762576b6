"""How much low-bit accuracy do distillation and learned quantizers recover in QAT?

ResNet-20 on the JPEG CIFAR-10 copy (task ``cifar10-resnet20``), the study's QAT settings
(Adam, lr 2e-5, batch 64, 4 calibration batches, residual adds on int8), the first conv and the
classifier at w8a8 as in ``studies/cifar10_resnet20.toml``. Plans for the other 18 convs:

* ``w8a8``, ``w4a8``, ``w4a4``: uniform (weights per-channel symmetric, calibrated by
  ``--w-calib``: MSE by default, as in a search space; activations asymmetric, min/max);
* ``mixed``: stage 1 w4a4, stage 2 w3a4, stage 3 w2a4.

Each plan is trained with the same data stream, steps and seed four ways:

* ``plain``: calibrated, frozen qparams, straight-through estimator (what trials do today);
* ``distill``: + distillation from the float model (``--alpha``, ``--temperature``), its
  logits computed once per stream and cached (``AUTOQUANT_CACHE/teacher-logits``);
* ``lsq``: + learned weight scales (LSQ) and activation scales and zero-points (LSQ+) at
  ``--quant-lr``;
* ``both``: distillation and learned quantizers.

Printed: a markdown table (accuracy, drop from float in points, seconds per trial for
calibration + QAT + evaluation; the teacher's one-off pass is printed apart), and per plan
whether ``both`` halves the drop of ``plain``. ``--out`` writes the rows as JSON.

Usage:
    AUTOQUANT_DATA=... .venv/bin/python scripts/bench_qat_recovery.py --threads 2
    .venv/bin/python scripts/bench_qat_recovery.py --steps 100 200 --seeds 0 1
    .venv/bin/python scripts/bench_qat_recovery.py --steps 2 --eval-size 200 \\
        --plans w4a4 --variants plain both   # smoke run
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from autoquant.tasks import cache_dir, get_task
from autoquant.train import (
    DEFAULT_QUANT_LR,
    Distillation,
    cached_teacher_logits,
    evaluate,
    qat_finetune,
    torch_threads,
)
from autoquant.transform import apply_plan, calibration, quantizable_layers
from autoquant.types import LayerPlan, QuantPlan, QuantSpec

PLANS = ("w8a8", "w4a8", "w4a4", "mixed")
VARIANTS = ("plain", "distill", "lsq", "both")
EDGE = ("conv1", "linear")  # fixed at w8a8, as in studies/cifar10_resnet20.toml
MIXED = {"layer1.": (4, 4), "layer2.": (3, 4), "layer3.": (2, 4)}


def layer_plan(w_bits: int, a_bits: int, learned: bool, w_calib: str) -> LayerPlan:
    return LayerPlan(
        QuantSpec(
            bits=w_bits, granularity="per_channel", calibration=w_calib, learned_scale=learned
        ),
        QuantSpec(
            bits=a_bits,
            symmetric=False,
            axis=1,
            learned_scale=learned,
            learned_zero_point=learned,
        ),
    )


def make_plan(name: str, layers: list[str], learned: bool, w_calib: str) -> QuantPlan:
    out = {}
    for layer in layers:
        if layer in EDGE:
            bits = (8, 8)
        elif name == "mixed":
            bits = next(b for prefix, b in MIXED.items() if layer.startswith(prefix))
        else:
            bits = (int(name[1]), int(name[3]))
        out[layer] = layer_plan(*bits, learned, w_calib)
    adds = QuantSpec(bits=8, symmetric=False, learned_scale=learned, learned_zero_point=learned)
    return QuantPlan(out, adds=adds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="cifar10-resnet20")
    ap.add_argument("--eval-size", type=int, default=2000)
    ap.add_argument("--steps", type=int, nargs="+", default=[200])
    ap.add_argument("--plans", nargs="+", default=list(PLANS), choices=PLANS)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--optimizer", default="adam", choices=("adam", "sgd"))
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--calib-batches", type=int, default=4)
    ap.add_argument("--w-calib", default="mse", help="weight calibration (the space default)")
    ap.add_argument("--quant-lr", type=float, default=DEFAULT_QUANT_LR)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", default="false", choices=("false", "true", "auto"))
    ap.add_argument("--autocast", default=None, choices=("bf16",))
    ap.add_argument("--out", default="", help="write the rows as JSON here")
    args = ap.parse_args()
    compile: bool | str = {"false": False, "true": True}.get(args.compile, args.compile)
    distill = Distillation(args.alpha, args.temperature)

    rows: list[dict[str, Any]] = []
    with torch_threads(args.threads):
        task = get_task(args.task, eval_size=args.eval_size)
        float_model = task.model_factory().eval()
        evals = task.eval_batches(256)
        calib = task.calib_batches(64)[: args.calib_batches]
        # Traced on the CPU before evaluate() moves the model to the device.
        layers = [i.name for i in quantizable_layers(float_model, task.example_input(1))]
        float_acc = evaluate(float_model, evals, device=args.device)
        print(f"{args.task}: float accuracy {float_acc:.4f} on {args.eval_size} test images")
        for seed in args.seeds:
            t0 = time.perf_counter()
            teacher = cached_teacher_logits(
                float_model,
                lambda seed=seed: task.train_batches(args.batch_size, seed=seed),
                steps=max(args.steps),
                stream={
                    "task": args.task,
                    "options": {"eval_size": args.eval_size},
                    "seed": seed,
                    "batch_size": args.batch_size,
                },
                cache_dir=cache_dir() / "teacher-logits",
                device=args.device,
            )
            print(
                f"seed {seed}: teacher logits {tuple(teacher.shape)}, {teacher.nbytes} bytes, "
                f"{time.perf_counter() - t0:.1f} s (once per study; cached on disk)"
            )
            for plan_name in args.plans:
                for steps in args.steps:
                    for variant in args.variants:
                        learned = variant in ("lsq", "both")
                        use_kd = variant in ("distill", "both")
                        plan = make_plan(plan_name, layers, learned, args.w_calib)
                        torch.manual_seed(seed)
                        t = time.perf_counter()
                        q = apply_plan(float_model, plan).to(args.device)
                        with calibration(q), torch.no_grad():
                            for x, _ in calib:
                                q(x.to(args.device))
                        record: dict[str, Any] = {}
                        history = qat_finetune(
                            q,
                            task.train_batches(args.batch_size, seed=seed),
                            task.loss_fn,
                            steps=steps,
                            lr=args.lr,
                            optimizer=args.optimizer,
                            device=args.device,
                            quant_lr=args.quant_lr,
                            distill=distill if use_kd else None,
                            teacher_logits=teacher if use_kd else None,
                            compile=compile,
                            autocast=args.autocast,
                            record=record,
                        )
                        acc = evaluate(q, evals, device=args.device, compile=compile)
                        seconds = time.perf_counter() - t
                        row = {
                            "seed": seed,
                            "plan": plan_name,
                            "summary": plan.summary(),
                            "variant": variant,
                            "steps": steps,
                            "accuracy": acc,
                            "drop_points": 100 * (float_acc - acc),
                            "seconds": seconds,
                            "final_loss": history[-1] if history else None,
                            "compile": record.get("compile"),
                        }
                        rows.append(row)
                        print(
                            f"  {plan_name:<6} {variant:<8} {steps:>4} steps: acc {acc:.4f} "
                            f"drop {row['drop_points']:5.2f} pts, {seconds:5.1f} s",
                            flush=True,
                        )

    print()
    print(f"float accuracy {100 * float_acc:.2f} % ({args.eval_size} test images)")
    print()
    print("| plan | variant | steps | seeds | accuracy % | drop (pts) | s / trial |")
    print("|---|---|---|---|---|---|---|")
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["plan"], r["variant"], r["steps"]), []).append(r)
    for (plan_name, variant, steps), rs in groups.items():
        acc = sum(r["accuracy"] for r in rs) / len(rs)
        drop = sum(r["drop_points"] for r in rs) / len(rs)
        sec = sum(r["seconds"] for r in rs) / len(rs)
        print(
            f"| {plan_name} | {variant} | {steps} | {len(rs)} | {100 * acc:.2f} | {drop:.2f} "
            f"| {sec:.1f} |"
        )
    print()
    for plan_name in args.plans:
        for steps in args.steps:
            plain = groups.get((plan_name, "plain", steps))
            both = groups.get((plan_name, "both", steps))
            if not plain or not both:
                continue
            d_plain = sum(r["drop_points"] for r in plain) / len(plain)
            d_both = sum(r["drop_points"] for r in both) / len(both)
            verdict = "halved" if d_both <= d_plain / 2 else "not halved"
            print(f"{plan_name}, {steps} steps: drop {d_plain:.2f} -> {d_both:.2f} pts ({verdict})")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"float_accuracy": float_acc, "args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
