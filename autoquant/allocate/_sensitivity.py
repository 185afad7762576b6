"""The sensitivity pass: quantize one unit alone, calibrate, measure the damage without QAT.

For every unit, every weight option (activations float) and every activation option (weights
float) is scored, so the cost is ``units × (weight options + activation options)``
evaluations, not their product. How it stays cheap:

* the model is BN-folded once and each option is a fake-quant wrapper that *shares* the folded
  weights (no copy of the model per evaluation);
* all options are calibrated together in one float pass per calibration batch (forward
  pre-hooks feed each layer's float input to every option's observer: calibration observes
  float values, exactly what ``with calibration(model)`` does for a whole plan);
* per batch the float model runs once; each evaluation re-runs only the graph downstream of
  its unit (:class:`~autoquant.allocate.PartialRunner`) and reuses the float output.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from autoquant.allocate._graph import PartialRunner
from autoquant.allocate._table import KINDS, SPLITS, SensitivityTable, UnitDamage
from autoquant.allocate._units import UnitSpace
from autoquant.quant import FakeQuantize
from autoquant.transform import (
    Inputs,
    apply_plan,
    as_tuple,
    calibration,
    call_model,
    fold_batchnorm,
    inputs_to,
    quantizable_layers,
    quantizable_types,
)
from autoquant.types import LayerPlan, QuantPlan

Batch = tuple[Inputs, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]
Progress = Callable[[int, int], None]


# ---------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------


def sample_batches(
    batches: Sequence[Batch], samples: int, batch_size: int = 64, seed: int = 0
) -> list[Batch]:
    """``samples`` examples drawn at random (seeded) from ``batches``, re-batched.

    A task's held-out batches may be ordered (by class, say), so a prefix is not a sample.

    Example:
        >>> data = [(torch.arange(10.0)[:, None], torch.arange(10))]
        >>> [len(y) for _, y in sample_batches(data, 5, batch_size=2)]
        [2, 2, 1]
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples={samples!r} is not allowed; allowed values: an integer >= 1")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is not allowed; allowed values: >= 1")
    if not batches:
        raise ValueError("batches is empty")
    xs = [as_tuple(x) for x, _ in batches]
    inputs = tuple(torch.cat([x[i] for x in xs]) for i in range(len(xs[0])))
    targets = torch.cat([y for _, y in batches])
    n = len(targets)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=gen)[: min(samples, n)].sort().values
    single = isinstance(batches[0][0], Tensor)
    out: list[Batch] = []
    for i in range(0, len(idx), batch_size):
        part = idx[i : i + batch_size]
        x = tuple(t[part] for t in inputs)
        out.append((x[0] if single else x, targets[part]))
    return out


# ---------------------------------------------------------------------------------------
# Option modules: a fake-quant wrapper per (layer, option), sharing the folded weights
# ---------------------------------------------------------------------------------------


class OptionModules:
    """For each unit, a wrapper per layer for each weight option (activations float) and each
    activation option (weights float), built on the BN-folded float layers.

    Attributes:
        weight: ``weight[unit][option]`` → ``{layer: wrapper}``.
        activation: ``activation[unit][option]`` → ``{layer: wrapper}``.
    """

    def __init__(self, folded: nn.Module, units: UnitSpace) -> None:
        self.folded = folded
        self.units = units
        registry = quantizable_types()

        def wrap(unit: int, lp: LayerPlan) -> dict[str, nn.Module]:
            out = {}
            for layer in units.units[unit].layers:
                module = folded.get_submodule(layer)
                out[layer] = registry[type(module)].from_float(module, lp)
            return out

        self.weight = [
            [wrap(i, units.weight_plan(i, w)) for w in range(u.n_weight)]
            for i, u in enumerate(units.units)
        ]
        self.activation = [
            [wrap(i, units.activation_plan(i, a)) for a in range(u.n_activation)]
            for i, u in enumerate(units.units)
        ]
        swaps = [swap for per_unit in (*self.weight, *self.activation) for swap in per_unit]
        self.container = nn.ModuleList(m for swap in swaps for m in swap.values())

    def kind(self, kind: str) -> list[list[dict[str, nn.Module]]]:
        return self.weight if kind == "weight" else self.activation

    def calibrate(self, runner: PartialRunner, batches: Sequence[Batch], device: Any) -> None:
        """Calibrate every option on ``batches`` (float inputs of each layer, as
        ``with calibration(model)`` sees them for a whole plan)."""
        observers: dict[str, list[FakeQuantize]] = {}
        for per_unit in self.activation:
            for swap in per_unit:
                for layer, wrapper in swap.items():
                    if wrapper.act_fq.observer is not None:
                        observers.setdefault(layer, []).append(wrapper.act_fq)

        def hook_for(fqs: list[FakeQuantize]) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
                for fq in fqs:
                    fq(args[0])

            return hook

        handles = [
            self.folded.get_submodule(layer).register_forward_pre_hook(hook_for(fqs))
            for layer, fqs in observers.items()
        ]
        try:
            with calibration(self.container):
                for x, _ in batches:
                    runner.float_pass(inputs_to(x, device))
        finally:
            for h in handles:
                h.remove()


def folded_float(model: nn.Module, device: Any = "cpu") -> nn.Module:
    """A BN-folded eval-mode copy of ``model`` on ``device`` (``model`` is not modified)."""
    return fold_batchnorm(model).to(device).eval()


# ---------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------


class _Reference:
    """The float output of one batch, ready to compare quantized outputs against."""

    def __init__(self, output: Tensor, target: Tensor, loss_fn: LossFn) -> None:
        if output.dim() != 2 or target.dim() != 1 or output.shape[0] != target.shape[0]:
            raise ValueError(
                f"the sensitivity pass needs scores [N, classes] and targets [N]; got scores "
                f"{tuple(output.shape)} and targets {tuple(target.shape)}"
            )
        self.target = target
        self.loss_fn = loss_fn
        self.n = int(target.shape[0])
        self.log_p = torch.log_softmax(output.float(), dim=1)
        self.p = self.log_p.exp()
        self.loss, self.correct = self._loss_correct(output)

    def _loss_correct(self, output: Tensor) -> tuple[float, int]:
        loss = float(self.loss_fn(output, self.target)) * self.n
        correct = int((output.argmax(1) == self.target).sum())
        return loss, correct

    def compare(self, output: Tensor) -> np.ndarray:
        """``[loss increase sum, KL sum, correct lost]`` over the batch."""
        loss, correct = self._loss_correct(output)
        kl = float((self.p * (self.log_p - torch.log_softmax(output.float(), dim=1))).sum())
        return np.array([loss - self.loss, kl, self.correct - correct], dtype=np.float64)


@dataclass(frozen=True)
class SensitivityCost:
    """What a sensitivity pass will cost, estimated before running it.

    Attributes:
        evaluations: single-unit models scored (``units × (weight + activation options)``,
            plus one for quantized adds).
        forward_passes: work in whole float forward passes over one batch.
        seconds: estimated wall time (one timed float pass × ``forward_passes``; observers and
            fake-quant add a little).
        seconds_per_batch: the timed float pass.
        traced: partial re-runs are used (else every evaluation is a whole pass).
    """

    evaluations: int
    forward_passes: float
    seconds: float
    seconds_per_batch: float
    traced: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _adds_plan(units: UnitSpace) -> QuantPlan | None:
    if "int8" not in units.space.adds:
        return None
    return QuantPlan({}, adds=units.space.adds_spec("int8"))


def _layer_macs(model: nn.Module, batches: Sequence[Batch]) -> dict[str, float]:
    example = batches[0][0]
    return {i.name: float(i.macs) for i in quantizable_layers(model, example)}


def estimate_sensitivity_cost(
    model: nn.Module,
    units: UnitSpace,
    calib: Sequence[Batch],
    held_out: Sequence[Batch],
    *,
    adds: bool = True,
    device: Any = "cpu",
) -> SensitivityCost:
    """Estimate :func:`measure_sensitivity`'s cost from one timed float pass.

    Example:
        >>> cost = estimate_sensitivity_cost(model, units, calib, held_out)  # doctest: +SKIP
        >>> cost.evaluations, round(cost.seconds)  # doctest: +SKIP
        (120, 14)
    """
    folded = folded_float(model, device)
    runner = PartialRunner(folded, [u.layers for u in units.units])
    fractions = runner.fractions(_layer_macs(folded, held_out or calib))
    x = inputs_to((held_out or calib)[0][0], device)
    with torch.no_grad():
        runner.float_pass(x)  # warm-up
        t0 = time.perf_counter()
        runner.float_pass(x)
        per_batch = time.perf_counter() - t0
    evaluations = sum(u.n_weight + u.n_activation for u in units.units)
    per_eval_batch = 1.0 + sum(
        (u.n_weight + u.n_activation) * f for u, f in zip(units.units, fractions, strict=True)
    )
    with_adds = adds and _adds_plan(units) is not None
    n_batches = len(calib) + len(held_out)
    passes = len(calib) + n_batches * (per_eval_batch + (1.0 if with_adds else 0.0))
    if with_adds:
        passes += len(calib)
    return SensitivityCost(
        evaluations=evaluations + int(with_adds),
        forward_passes=passes,
        seconds=passes * per_batch,
        seconds_per_batch=per_batch,
        traced=runner.traced,
    )


def measure_sensitivity(
    model: nn.Module,
    units: UnitSpace,
    calib: Sequence[Batch],
    held_out: Sequence[Batch],
    loss_fn: LossFn,
    *,
    adds: bool = True,
    device: Any = "cpu",
    progress: Progress | None = None,
) -> SensitivityTable:
    """Measure every unit's damage per weight option and per activation option, without QAT.

    Each option quantizes only that unit (the rest float, adds float), is calibrated on
    ``calib`` with the option's own calibration method, and is scored on ``calib`` and on
    ``held_out`` against the float model's outputs (computed once per batch): loss increase,
    KL divergence and top-1 accuracy drop (see :mod:`~autoquant.allocate._table` for the
    metric names). With ``adds`` and ``"int8"`` among the space's adds, the quantized
    residual adds alone are scored too (the table's ``adds``).

    Args:
        model: the float model (not modified).
        units: the units and options (:class:`~autoquant.allocate.UnitSpace`).
        calib: calibration batches (use the search's, so that the table sees its ranges).
        held_out: held-out batches (e.g. :func:`sample_batches` of the task's eval batches).
        loss_fn: the task loss, ``loss_fn(outputs, targets)`` (mean over the batch).
        adds: also score the quantized adds alone.
        device: where to run.
        progress: called as ``progress(done, total)`` after each unit and split.

    Returns:
        The :class:`~autoquant.allocate.SensitivityTable`, with the time spent per phase.

    Example:
        >>> table = measure_sensitivity(
        ...     model, units, calib, held_out, F.cross_entropy)  # doctest: +SKIP
        >>> table.damage("eval_kl")[0]  # doctest: +SKIP
        (array([0.31, 0.02, 0.001]), array([0.004]))
    """
    if not calib or not held_out:
        raise ValueError(
            "measure_sensitivity needs at least one calibration and one held-out batch"
        )
    t_start = time.perf_counter()
    timing = {"calibrate": 0.0, "float": 0.0, "evaluate": 0.0}
    folded = folded_float(model, device)
    for p in folded.parameters():
        p.requires_grad_(False)
    runner = PartialRunner(folded, [u.layers for u in units.units])
    options = OptionModules(folded, units)
    adds_plan = _adds_plan(units) if adds else None
    adds_model: nn.Module | None = None
    with torch.no_grad():
        t = time.perf_counter()
        options.calibrate(runner, calib, device)
        if adds_plan is not None:
            adds_model = apply_plan(folded, adds_plan).to(device)
            if not any(isinstance(m, FakeQuantize) for m in adds_model.modules()):
                adds_model = None  # the model has no residual adds
            else:
                with calibration(adds_model):
                    for x, _ in calib:
                        call_model(adds_model, inputs_to(x, device))
        timing["calibrate"] = time.perf_counter() - t

        # sums[split][kind][unit] -> [options, 3] (loss increase, KL, correct lost)
        sums = {
            s: {k: [np.zeros((len(per), 3)) for per in options.kind(k)] for k in KINDS}
            for s in SPLITS
        }
        adds_sums = {s: np.zeros(3) for s in SPLITS}
        reference: dict[str, dict[str, float]] = {}
        total = len(SPLITS) * len(units.units)
        done = 0
        for split, batches in zip(SPLITS, (calib, held_out), strict=True):
            loss = correct = n = 0.0
            for x, y in batches:
                x, y = inputs_to(x, device), y.to(device)
                t = time.perf_counter()
                state = runner.float_pass(x)
                ref = _Reference(state.output, y, loss_fn)
                timing["float"] += time.perf_counter() - t
                loss, correct, n = loss + ref.loss, correct + ref.correct, n + ref.n
                t = time.perf_counter()
                for kind in KINDS:
                    for i, per_option in enumerate(options.kind(kind)):
                        acc = sums[split][kind][i]
                        for k, swap in enumerate(per_option):
                            acc[k] += ref.compare(runner.run(state, i, swap))
                if adds_model is not None:
                    adds_sums[split] += ref.compare(call_model(adds_model, x))
                timing["evaluate"] += time.perf_counter() - t
            reference[split] = {"loss": loss / n, "accuracy": correct / n, "samples": n}
            done += len(units.units)
            if progress is not None:
                progress(done, total)

    def metrics(split_sums: dict[str, np.ndarray]) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for split in SPLITS:
            means = split_sums[split] / reference[split]["samples"]
            for j, name in enumerate(("loss", "kl", "acc")):
                out[f"{split}_{name}"] = [float(v) for v in np.atleast_2d(means)[:, j]]
        return out

    rows = []
    for i, u in enumerate(units.units):
        per_kind = {k: metrics({s: sums[s][k][i] for s in SPLITS}) for k in KINDS}
        rows.append(
            UnitDamage(
                u.name,
                u.layers,
                u.weight_options,
                u.activation_options,
                weight=per_kind["weight"],
                activation=per_kind["activation"],
            )
        )
    adds_table = {}
    if adds_plan is not None:
        adds_table["int8"] = (
            {m: v[0] for m, v in metrics(adds_sums).items()}
            if adds_model is not None
            else {f"{s}_{m}": 0.0 for s in SPLITS for m in ("loss", "kl", "acc")}
        )
    evaluations = sum(u.n_weight + u.n_activation for u in units.units) + int(
        adds_model is not None
    )
    timing["total"] = time.perf_counter() - t_start
    return SensitivityTable(
        tuple(rows),
        reference=reference,
        adds=adds_table,
        timing_s={k: round(v, 4) for k, v in timing.items()},
        settings={
            "calib_batches": len(calib),
            "calib_samples": reference["calib"]["samples"],
            "eval_batches": len(held_out),
            "eval_samples": reference["eval"]["samples"],
            "evaluations": evaluations,
            "partial_reruns": runner.traced,
            "device": str(device),
        },
    )
