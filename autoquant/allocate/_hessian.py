"""The cheaper estimator: Hessian traces by Hutchinson's method (HAWQ-V2/V3).

``tr(H) = E[vᵀ H v]`` for Rademacher vectors ``v``; ``H v`` comes from double backprop of the
task loss. For a layer's weight ``W`` (BN-folded, as deployed) and its input activation
``A``, the damage of an option is the second-order loss increase under an isotropic
curvature, ``½ · tr(H_W)/n · ||Q(W) - W||²`` (HAWQ-V3's ``trace/n · ||ΔW||²``) and, for the
activation, ``½ · tr(H_A) · mean((Q(A) - A)²)`` with ``H_A`` the Hessian of the batch-mean loss
in the batch's activation tensor (equivalently ``½ · tr(H_A)/n · ||ΔA||²`` over the batch).
No option is evaluated: the cost is the calibration pass plus a few Hessian-vector products.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from autoquant.allocate._graph import PartialRunner
from autoquant.allocate._sensitivity import Batch, LossFn, OptionModules, folded_float
from autoquant.allocate._table import SensitivityTable, UnitDamage
from autoquant.allocate._units import UnitSpace
from autoquant.transform import call_model, inputs_to


def rademacher_like(t: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """A tensor of ±1 with ``t``'s shape, dtype and device."""
    r = torch.randint(0, 2, t.shape, generator=generator, device="cpu")
    return (r * 2 - 1).to(dtype=t.dtype, device=t.device)


def hutchinson_traces(
    loss: Tensor,
    tensors: Sequence[Tensor],
    samples: int = 32,
    generator: torch.Generator | None = None,
) -> list[float]:
    """Hutchinson estimates of ``tr(∂²loss/∂t²)`` for each tensor ``t`` (its diagonal block).

    One Rademacher vector per tensor and sample; one Hessian-vector product per sample serves
    all tensors (the cross blocks average out, since the vectors are independent).

    Args:
        loss: a scalar built from ``tensors`` with the autograd graph kept.
        tensors: parameters or intermediate tensors with ``requires_grad``.
        samples: Rademacher samples (the error falls as ``1/sqrt(samples)``).
        generator: seeds the vectors.

    Example:
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> hutchinson_traces((w**2).sum(), [w], samples=4)  # H = 2I: exact for any v
        [4.0]
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples={samples!r} is not allowed; allowed values: an integer >= 1")
    grads = torch.autograd.grad(loss, list(tensors), create_graph=True)
    totals = [0.0 for _ in tensors]
    for _ in range(samples):
        vs = [rademacher_like(t, generator) for t in tensors]
        hvs = torch.autograd.grad(grads, list(tensors), grad_outputs=vs, retain_graph=True)
        for j, (v, hv) in enumerate(zip(vs, hvs, strict=True)):
            totals[j] += float((v * hv).sum())
    return [t / samples for t in totals]


def _capture_inputs(
    model: nn.Module, layers: Sequence[str]
) -> tuple[dict[str, list[Tensor]], Callable[[], None]]:
    """Forward pre-hooks that make each layer's input a tensor that requires grad (a leaf if
    nothing upstream does) and record it."""
    seen: dict[str, list[Tensor]] = {layer: [] for layer in layers}

    def hook_for(layer: str) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            x = args[0]
            if not x.requires_grad:
                x = x.detach().requires_grad_(True)
                seen[layer].append(x)
                return (x, *args[1:])
            seen[layer].append(x)
            return None

        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in layers]

    def remove() -> None:
        for h in handles:
            h.remove()

    return seen, remove


def hessian_sensitivity(
    model: nn.Module,
    units: UnitSpace,
    calib: Sequence[Batch],
    batches: Sequence[Batch],
    loss_fn: LossFn,
    *,
    samples: int = 16,
    seed: int = 0,
    device: Any = "cpu",
) -> SensitivityTable:
    """A table with the metric ``hessian`` for every weight and activation option.

    Args:
        model: the float model (not modified).
        units: the units and options.
        calib: calibration batches (each activation option is calibrated on them, as in
            :func:`~autoquant.allocate.measure_sensitivity`).
        batches: batches for the traces and the activation errors (a few suffice).
        loss_fn: the task loss (mean over the batch).
        samples: Rademacher samples per batch.
        seed: seeds the Rademacher vectors.
        device: where to run.

    Returns:
        A :class:`~autoquant.allocate.SensitivityTable` with ``hessian`` damages; its
        ``details["hessian_trace"]`` holds, per layer, the weight trace over the weight's
        element count and the activation trace (batch-mean loss), averaged over batches.

    Example:
        >>> table = table.merge(hessian_sensitivity(model, units, calib, calib[:2],
        ...                                         F.cross_entropy))  # doctest: +SKIP
    """
    if not calib or not batches:
        raise ValueError("hessian_sensitivity needs calibration batches and trace batches")
    t0 = time.perf_counter()
    folded = folded_float(model, device)
    layers = [layer for u in units.units for layer in u.layers]
    with torch.no_grad():
        for p in folded.parameters():
            p.requires_grad_(False)
        options = OptionModules(folded, units)
        options.calibrate(PartialRunner(folded, [u.layers for u in units.units]), calib, device)
    t_calib = time.perf_counter() - t0

    weights = {n: folded.get_submodule(n).weight for n in layers}
    for w in weights.values():
        w.requires_grad_(True)
    w_trace = dict.fromkeys(layers, 0.0)
    a_trace = dict.fromkeys(layers, 0.0)
    a_error: dict[tuple[int, int, str], float] = {}
    gen = torch.Generator().manual_seed(seed)
    for x, y in batches:
        seen, remove = _capture_inputs(folded, layers)
        try:
            loss = loss_fn(call_model(folded, inputs_to(x, device)), y.to(device))
        finally:
            remove()
        acts = [(n, t) for n in layers for t in seen[n]]
        traces = hutchinson_traces(
            loss, [weights[n] for n in layers] + [t for _, t in acts], samples, gen
        )
        for n, tr in zip(layers, traces, strict=False):
            w_trace[n] += tr / len(batches)
        for (n, _), tr in zip(acts, traces[len(layers) :], strict=True):
            a_trace[n] += tr / len(batches)
        with torch.no_grad():
            for i, per_option in enumerate(options.activation):
                for k, swap in enumerate(per_option):
                    for n, wrapper in swap.items():
                        err = sum(float(((wrapper.act_fq(t) - t) ** 2).mean()) for t in seen[n])
                        key = (i, k, n)
                        a_error[key] = a_error.get(key, 0.0) + err / len(batches)
        del loss, seen, acts
    for w in weights.values():
        w.requires_grad_(False)

    rows = []
    with torch.no_grad():
        for i, u in enumerate(units.units):
            w_damage = []
            for swap in options.weight[i]:
                total = 0.0
                for n, wrapper in swap.items():
                    w = weights[n]
                    err = float(((wrapper.weight_fq(w) - w) ** 2).sum())
                    total += 0.5 * w_trace[n] / w.numel() * err
                w_damage.append(total)
            a_damage = [
                sum(0.5 * a_trace[n] * a_error[(i, k, n)] for n in u.layers)
                for k in range(u.n_activation)
            ]
            rows.append(
                UnitDamage(
                    u.name,
                    u.layers,
                    u.weight_options,
                    u.activation_options,
                    weight={"hessian": w_damage},
                    activation={"hessian": a_damage},
                )
            )
    total_s = time.perf_counter() - t0
    return SensitivityTable(
        tuple(rows),
        timing_s={
            "hessian_calibrate": round(t_calib, 4),
            "hessian": round(total_s - t_calib, 4),
            "total": round(total_s, 4),
        },
        settings={"hessian_batches": len(batches), "hessian_samples": samples},
        details={
            "hessian_trace": {
                n: {"weight_per_element": w_trace[n] / weights[n].numel(), "activation": a_trace[n]}
                for n in layers
            }
        },
    )
