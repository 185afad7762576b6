"""Fake quantization (quantize then dequantize) with the straight-through estimator.

Both functions are our own ``torch.autograd.Function``s in eager mode and plain differentiable
ops under ``torch.compile`` (``fake_quantize_traced``, ``fake_quantize_lsq_traced``: same
values and gradients); ``torch.fake_quantize_*`` serve only as the independent reference in
the tests. The eager forward is written for few kernels because the activation fake-quant
runs on every QAT step: with the zero-point folded into the clamp bounds,
``clamp(round(x/S) + Z, qmin, qmax) - Z == clamp(round(x/S), qmin - Z, qmax - Z)``, so one
multiply, one in-place round, one clamp, one in-place compare (the STE mask, only when a
gradient is needed) and one in-place multiply do the whole job; the backward is one multiply.
``1/S`` is rounded to float32 and the zero-point is added after rounding, exactly as ATen does,
so results match ``torch.fake_quantize_*`` bit for bit.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from autoquant.quant._qparams import EPS, Number, along, reciprocal_f32


class _FakeQuantSTE(torch.autograd.Function):
    """Forward: fake-quant; backward: gradient 1 inside the clamp range, 0 outside."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, inv: Number, scale: Number, lo: Number, hi: Number) -> Tensor:
        q = (x * inv).round_()
        if not ctx.needs_input_grad[0]:
            return q.clamp_(lo, hi).mul_(scale)
        qc = torch.clamp(q, lo, hi)
        # The STE mask as 0./1. floats, written over q: float compare-in-place and a float
        # multiply in backward are ~2x faster on CPU than a bool mask with where().
        ctx.save_for_backward(q.eq_(qc))
        return qc.mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None, None, None


def _with_grad_of(value: Tensor, g: Tensor) -> Tensor:
    """``value`` exactly, with the gradient of ``g`` (``g - g.detach()`` is an exact 0)."""
    return value.detach() + (g - g.detach())


def fake_quantize_traced(x: Tensor, inv: Number, scale: Number, lo: Number, hi: Number) -> Tensor:
    """:class:`_FakeQuantSTE` in plain differentiable ops, for compiled code.

    Dynamo does not always carry a custom ``autograd.Function`` whose forward mutates its
    temporaries and reads ``ctx.needs_input_grad`` (torch 2.11 on CUDA compiled it into a graph
    that passed no gradient to the model's weights); plain ops give Inductor a graph it can
    fuse and differentiate itself. Same values; the gradient is the same clip mask.
    """
    q = torch.round(x * inv)
    qc = torch.clamp(q, lo, hi)
    out = qc * scale
    if not torch.is_grad_enabled():
        return out
    return out + torch.where(q == qc, x - x.detach(), 0.0)


def fake_quantize_lsq_traced(
    x: Tensor,
    scale: Tensor,
    zero_point: Number,
    qmin: Number,
    qmax: Number,
    axis: int | None,
    grad_factor: Number,
) -> Tensor:
    """:class:`_FakeQuantLSQ` in plain differentiable ops, for compiled code (see
    :func:`fake_quantize_traced`). Same forward; the same LSQ/LSQ+ gradients by construction:
    the round is straight-through for ``S``, the clamp bounds ``qmin - Z`` / ``qmax - Z``
    carry ``Z``, and the gradient scale enters as an exact-zero term."""
    s = along(scale.clamp_min(EPS), axis, x.ndim)
    s = _with_grad_of(s, s * grad_factor)
    z = _grid_zero_point(zero_point, qmin, qmax)
    if isinstance(zero_point, Tensor) and zero_point.requires_grad:
        z = _with_grad_of(along(z, axis, x.ndim), along(zero_point, axis, x.ndim) * grad_factor)
    else:
        z = along(z, axis, x.ndim)
    xs = x.detach() * reciprocal_f32(s)  # the gradient path to S only
    q = _with_grad_of(torch.round(xs), xs)
    qc = torch.clamp(q, qmin - z, qmax - z)
    return qc * s + torch.where(q == qc, x - x.detach(), 0.0)


def _bounds(
    zero_point: Number, qmin: Number, qmax: Number, axis: int | None, ndim: int
) -> tuple[Number, Number]:
    """``(qmin - Z, qmax - Z)`` ready to broadcast; Python floats for a 0-dim CPU zero-point
    outside compiled code: a clamp with tensor bounds is ~6x slower on the CPU than one with
    scalar bounds (reading a CPU scalar costs no device sync)."""
    zp = along(zero_point, axis, ndim)
    lo, hi = qmin - zp, qmax - zp
    if (
        isinstance(lo, Tensor)
        and lo.ndim == 0
        and lo.device.type == "cpu"
        and not torch.compiler.is_compiling()
    ):
        return float(lo), float(hi)
    return lo, hi


def fake_quantize(
    x: Tensor,
    scale: Number,
    zero_point: Number,
    qmin: int,
    qmax: int,
    axis: int | None = None,
) -> Tensor:
    """``(clamp(round(x / S) + Z, qmin, qmax) - Z) * S`` with a straight-through gradient.

    Args:
        x: input tensor.
        scale: float or 0-dim tensor (per tensor), or ``[C]`` tensor (per channel along ``axis``).
        zero_point: same shape as ``scale``; holds integers.
        qmin: lowest integer code.
        qmax: highest integer code.
        axis: channel axis of ``x`` for per-channel parameters; ``None`` for per tensor.

    Returns:
        Tensor like ``x``. Its gradient is ``grad`` where ``round(x/S) + Z`` lies in
        ``[qmin, qmax]`` and 0 elsewhere (the mask rule of ``torch.fake_quantize_*``).

    Example:
        >>> out = fake_quantize(torch.tensor([0.26, 9.0]), 0.1, 0.0, -7, 7)  # step 0.1, clip 0.7
        >>> [round(v, 4) for v in out.tolist()]
        [0.3, 0.7]
    """
    inv = along(reciprocal_f32(scale), axis, x.ndim)
    lo, hi = _bounds(zero_point, qmin, qmax, axis, x.ndim)
    if torch.compiler.is_compiling():
        return fake_quantize_traced(x, inv, along(scale, axis, x.ndim), lo, hi)
    return _FakeQuantSTE.apply(x, inv, along(scale, axis, x.ndim), lo, hi)


def _sum_to_shape(t: Tensor, shape: torch.Size, axis: int | None) -> Tensor:
    """Reduce an elementwise gradient to a per-tensor or per-channel (along ``axis``) shape."""
    if axis is None or len(shape) == 0:
        return t.sum().reshape(shape)
    return t.sum(dim=[d for d in range(t.ndim) if d != axis]).reshape(shape)


def _grid_zero_point(zero_point: Number, qmin: Number, qmax: Number) -> Number:
    """The zero-point as deployed: clamped to the grid and rounded to an integer."""
    if isinstance(zero_point, Tensor):
        return zero_point.clamp(qmin, qmax).round()
    return float(round(min(max(zero_point, float(qmin)), float(qmax))))


class _FakeQuantLSQ(torch.autograd.Function):
    """LSQ (Esser et al. 2020) and LSQ+ (Bhalgat et al. 2020) in the zero-point form of
    ``torch._fake_quantize_learnable_*``: straight-through for ``x``; learned-step gradient for
    ``S``; for ``Z`` (used rounded, as deployed) a straight-through round, which gives 0 inside
    the grid and ``-S`` outside. LSQ+ writes the offset as ``beta = -S*Z``; its ``beta``
    gradient (0 inside, 1 outside) is this one divided by ``-S``.

    The forward saves the clip mask and the scale's local gradient instead of ``x``: 6
    elementwise passes forward and 3-4 backward, instead of recomputing the grid (12)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        scale: Tensor,
        zero_point: Number,
        qmin: Number,
        qmax: Number,
        axis: int | None,
        grad_factor: Number,
    ) -> Tensor:
        s = along(scale.clamp_min(EPS), axis, x.ndim)  # a step must stay positive
        lo, hi = _bounds(_grid_zero_point(zero_point, qmin, qmax), qmin, qmax, axis, x.ndim)
        xs = x * reciprocal_f32(s)
        q = torch.round(xs)
        qc = torch.clamp(q, lo, hi)
        mask = q.eq_(qc)  # 1. inside the grid, 0. where clipped (float: cheaper to multiply)
        # d(out)/dS = round(x/S) - x/S inside the range, the clamp bound outside.
        local = torch.addcmul(qc, xs, mask, value=-1.0) if ctx.needs_input_grad[1] else None
        ctx.save_for_backward(mask, local, s)
        ctx.axis, ctx.grad_factor = axis, grad_factor
        ctx.shapes = (scale.shape, zero_point.shape if isinstance(zero_point, Tensor) else ())
        return qc.mul_(s)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        mask, local, s = ctx.saved_tensors
        grad_x = grad * mask if ctx.needs_input_grad[0] or ctx.needs_input_grad[2] else None
        grad_s = grad_z = None
        if ctx.needs_input_grad[1]:
            grad_s = _weighted_sum(grad, local, ctx.shapes[0], ctx.axis) * ctx.grad_factor
        if ctx.needs_input_grad[2]:
            # d(out)/dZ = 0 inside (Z cancels), -S outside (the output is the clamp bound).
            shape = ctx.shapes[1]
            outside = _sum_to_shape(grad, shape, ctx.axis) - _sum_to_shape(grad_x, shape, ctx.axis)
            grad_z = -outside * s.reshape(shape) * ctx.grad_factor
        return grad_x if ctx.needs_input_grad[0] else None, grad_s, grad_z, None, None, None, None


def _weighted_sum(t: Tensor, w: Tensor, shape: torch.Size, axis: int | None) -> Tensor:
    """``_sum_to_shape(t * w)``; per tensor as one dot product (no temporary)."""
    if axis is None or len(shape) == 0:
        return torch.dot(t.reshape(-1), w.reshape(-1)).reshape(shape)
    return _sum_to_shape(t * w, shape, axis)


def lsq_grad_factor(numel: int, n_scales: int, qmax: int) -> float:
    """LSQ gradient scale ``1 / sqrt(N * Qmax)`` with ``N`` the elements per scale."""
    return 1.0 / math.sqrt(max(numel // max(n_scales, 1), 1) * max(qmax, 1))


def fake_quantize_lsq(
    x: Tensor,
    scale: Tensor,
    zero_point: Number,
    qmin: Number,
    qmax: Number,
    axis: int | None = None,
    grad_factor: Number | None = None,
) -> Tensor:
    """Fake quantization with a learnable step size (LSQ) and optionally zero-point (LSQ+).

    The forward equals :func:`fake_quantize` with ``Z`` clamped to ``[qmin, qmax]`` and rounded
    (the integer a deployed model stores). The gradient w.r.t. ``x`` is the same
    straight-through mask; w.r.t. ``scale`` it is ``round(x/S) - x/S`` inside the range and
    ``qmin - Z`` / ``qmax - Z`` below / above it; w.r.t. a ``zero_point`` tensor that requires
    grad it is 0 inside and ``-S`` outside; both times ``grad_factor``. The mask is decided on
    ``round(x/S) + Z`` as in ``torch._fake_quantize_learnable_per_tensor_affine``, whose
    gradients these are.

    Args:
        x: input tensor.
        scale: learnable 0-dim or ``[C]`` tensor (positive; clamped at a tiny epsilon).
        zero_point: same shape as ``scale`` (or a float); learned when it requires grad.
        qmin: lowest integer code (an int, or a 0-dim tensor so that compiled code does not
            specialise on it).
        qmax: highest integer code.
        axis: channel axis for per-channel ``scale``.
        grad_factor: defaults to ``1 / sqrt(N * qmax)``, ``N`` = elements per scale.

    Example:
        >>> s = torch.tensor(0.1, requires_grad=True)
        >>> fake_quantize_lsq(torch.tensor([0.26, 9.0]), s, 0.0, -7, 7).sum().backward()
        >>> round(float(s.grad), 4)  # (3 - 2.6 + 7) / sqrt(2 * 7)
        1.9777
    """
    if not torch.is_grad_enabled():  # evaluation: the same forward, nothing kept for backward
        z = _grid_zero_point(zero_point, qmin, qmax)
        return fake_quantize(x, scale.clamp_min(EPS), z, qmin, qmax, axis)  # type: ignore[arg-type]
    if grad_factor is None:
        grad_factor = lsq_grad_factor(x.numel(), scale.numel(), int(qmax))
    if torch.compiler.is_compiling():
        return fake_quantize_lsq_traced(x, scale, zero_point, qmin, qmax, axis, grad_factor)
    return _FakeQuantLSQ.apply(x, scale, zero_point, qmin, qmax, axis, grad_factor)
