"""Scale and zero-point from a range, and plain quantize/dequantize.

Granularity is data: a per-tensor parameter is a 0-dim tensor (or a float), a per-channel one
is a 1-D tensor that :func:`along` reshapes to broadcast over ``axis``. The same code serves both.
"""

from __future__ import annotations

import torch
from torch import Tensor

from autoquant.types import QuantSpec

#: Smallest scale we ever return: keeps degenerate (constant, all-zero) ranges finite.
EPS = float(torch.finfo(torch.float32).eps)
_F32_MAX = float(torch.finfo(torch.float32).max)

Number = Tensor | float


def along(t: Number, axis: int | None, ndim: int) -> Number:
    """Reshape a per-channel parameter ``[C]`` so it broadcasts along ``axis`` of an
    ``ndim``-dimensional tensor; scalars and 0-dim tensors pass through unchanged."""
    if axis is None or not isinstance(t, Tensor) or t.ndim == 0:
        return t
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


def reciprocal_f32(scale: Number) -> Number:
    """``1 / scale`` rounded as float32, exactly as ATen's fake-quant kernels compute it."""
    if isinstance(scale, Tensor):
        return torch.reciprocal(scale.float())
    return float(torch.tensor(scale, dtype=torch.float32).reciprocal())


def qparams_from_qrange(
    min_val: Tensor, max_val: Tensor, qmin: int, qmax: int, symmetric: bool
) -> tuple[Tensor, Tensor]:
    """:func:`qparams_from_range` on an explicit integer grid (broadcasts over any shape)."""
    # float64 so that huge ranges do not overflow before the final clamp.
    lo = torch.as_tensor(min_val, dtype=torch.float64).nan_to_num(0.0).clamp(max=0.0)
    hi = torch.as_tensor(max_val, dtype=torch.float64).nan_to_num(0.0).clamp(min=0.0)
    lo = lo.clamp(min=-_F32_MAX)
    hi = hi.clamp(max=_F32_MAX)
    if symmetric:
        scale = (torch.maximum(-lo, hi) / qmax).clamp(EPS, _F32_MAX)
        return scale.float(), torch.zeros_like(scale, dtype=torch.float32)
    scale = ((hi - lo) / (qmax - qmin)).clamp(EPS, _F32_MAX)
    # Z = Qmax - Rmax/S, rounded to an integer: real 0 then maps exactly onto the grid.
    zero_point = torch.round(qmax - hi / scale).clamp(qmin, qmax)
    return scale.float(), zero_point.float()


def qparams_from_range(min_val: Tensor, max_val: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Scale and zero-point that map ``[min_val, max_val]`` onto ``spec.qrange``.

    The range is first extended to include 0, so 0 is exactly representable.
    Asymmetric: ``S = (Rmax - Rmin) / (Qmax - Qmin)``, ``Z = clamp(round(Qmax - Rmax / S))``.
    Symmetric (narrow signed grid): ``S = max(|Rmin|, |Rmax|) / Qmax``, ``Z = 0``.
    Degenerate ranges give ``S = EPS`` (never NaN or inf).

    Args:
        min_val: range minimum, shape ``[]`` (per tensor) or ``[C]`` (per channel).
        max_val: range maximum, same shape.
        spec: an integer :class:`~autoquant.types.QuantSpec`.

    Returns:
        ``(scale, zero_point)``, both float32 with the shape of the inputs; the zero-point
        holds integers.

    Example:
        >>> s, z = qparams_from_range(torch.tensor(-1.0), torch.tensor(3.0), QuantSpec(
        ...     bits=8, symmetric=False))
        >>> round(float(s) * 255, 4), float(z)
        (4.0, 64.0)
    """
    qmin, qmax = spec.qrange
    return qparams_from_qrange(min_val, max_val, qmin, qmax, spec.symmetric)


def quantize(
    x: Tensor,
    scale: Number,
    zero_point: Number,
    qmin: int,
    qmax: int,
    axis: int | None = None,
) -> Tensor:
    """Integer codes ``clamp(round(x / S) + Z, qmin, qmax)`` as an int32 tensor.

    Example:
        >>> quantize(torch.tensor([0.26, -5.0]), 0.1, 0.0, -127, 127).tolist()
        [3, -50]
    """
    inv = along(reciprocal_f32(scale), axis, x.ndim)
    zp = along(zero_point, axis, x.ndim)
    return (torch.round(x * inv) + zp).clamp(qmin, qmax).to(torch.int32)


def dequantize(q: Tensor, scale: Number, zero_point: Number, axis: int | None = None) -> Tensor:
    """Real values ``(q - Z) * S`` (float32) of integer codes.

    Example:
        >>> dequantize(torch.tensor([3, -50]), 0.5, 0.0).tolist()
        [1.5, -25.0]
    """
    zp = along(zero_point, axis, q.ndim)
    return (q.float() - zp) * along(scale, axis, q.ndim)
