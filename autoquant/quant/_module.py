"""``FakeQuantize``: an observer while calibrating, a frozen or learned fake-quantizer afterwards.

Two forwards compute the same values. Eager: per-tensor qparams as Python floats (scalar
kernels, no host sync per step), cached after :meth:`FakeQuantize.freeze`. Under
``torch.compile`` (``torch.compiler.is_compiling()``): every qparam, the grid bounds and the LSQ
gradient factor are tensors, and a weight's per-tensor qparams are expanded to one per output
channel, so that bits, symmetry, calibration method, weight granularity and scale values are
*data* of a compiled graph, not constants baked into it: trials with different plans of one
architecture reuse one graph instead of recompiling.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from autoquant.quant._fake import (
    _FakeQuantSTE,
    fake_quantize_lsq,
    fake_quantize_traced,
    lsq_grad_factor,
)
from autoquant.quant._observers import Observer, make_observer
from autoquant.quant._qparams import EPS, Number, along, qparams_from_range, reciprocal_f32
from autoquant.types import QuantSpec


class FakeQuantize(nn.Module):
    """Simulates quantizing one tensor per a :class:`~autoquant.types.QuantSpec`.

    States: ``observing`` (set by ``autoquant.transform.calibration``): the observer sees each
    input, which passes through unchanged. After :meth:`freeze` (``calibrated``): inputs are
    fake-quantized with frozen (or, with LSQ/LSQ+, learned) scale and zero-point; no observer
    runs, so QAT pays only for the fake-quant itself. Before calibration: identity.
    ``bits="fp32"`` is always the identity and ``"fp16"`` a round trip through float16 (outside
    observing). Inputs in bfloat16/float16 (autocast) are quantized in float32 and cast back,
    so the integer codes do not depend on the compute dtype.

    Args:
        spec: how to quantize.
        for_weight: the input is a weight (observed once, per-channel axis 0 allowed).
        channels: number of per-channel scales, when known up front (sizes ``scale`` so that a
            saved state dict loads before calibration); otherwise sized at :meth:`freeze`.

    Attributes:
        scale: float32 buffer, or an ``nn.Parameter`` trained by LSQ when
            ``spec.learned_scale``. Shape ``[]`` or ``[C]``.
        zero_point: float32 buffer holding integers, or an ``nn.Parameter`` trained by LSQ+
            when ``spec.learned_zero_point`` (its value is kept inside ``[qmin, qmax]`` by
            :meth:`constrain_`; the forward and the export use it rounded). Same shape.
        qmin, qmax: the integer grid (``0, 0`` for float specs).

    Example:
        >>> fq = FakeQuantize(QuantSpec(bits=4))
        >>> fq.observing = True
        >>> _ = fq(torch.linspace(-1.0, 1.0, 9))
        >>> fq.freeze()
        >>> fq(torch.tensor([0.3])).tolist()  # step 1/7
        [0.2857142984867096]
    """

    def __init__(
        self, spec: QuantSpec, *, for_weight: bool = False, channels: int | None = None
    ) -> None:
        super().__init__()
        self.spec = spec
        self.for_weight = for_weight
        self.axis: int | None = spec.axis if spec.per_channel else None
        self.observer: Observer | None = None
        self.qmin, self.qmax = (0, 0) if spec.is_float else spec.qrange
        if not spec.is_float:
            self.observer = make_observer(spec, for_weight=for_weight)
        shape = (channels,) if spec.per_channel and channels else ()
        for name, learned, init in (
            ("scale", spec.learned_scale, torch.ones(shape)),
            ("zero_point", spec.learned_zero_point, torch.zeros(shape)),
        ):
            if learned and not spec.is_float:
                setattr(self, name, nn.Parameter(init))
            else:
                self.register_buffer(name, init)
        self.learned = isinstance(self.scale, nn.Parameter) or isinstance(
            self.zero_point, nn.Parameter
        )
        # Compiled-mode data: the grid as a tensor, and (frozen path) [1/S, S, qmin-Z, qmax-Z]
        # along ``_kaxis``: the per-channel axis, or axis 0 for any weight (per-tensor values
        # expanded per output channel), or None (0-dim) for a per-tensor activation.
        self.register_buffer(
            "qbounds", torch.tensor([float(self.qmin), float(self.qmax)]), persistent=False
        )
        self.register_buffer("kernel", torch.zeros(4, *shape), persistent=False)
        expand = for_weight and not self.learned  # the learned path reads scale, not kernel
        self._kaxis: int | None = self.axis if spec.per_channel else (0 if expand else None)
        self._channels: int | None = None  # output channels of a per-tensor weight
        self._observing = False
        self._calibrated = spec.is_float
        self._cache: tuple[Any, ...] | None = None
        self._mode = self._forward_mode()

    # State -----------------------------------------------------------------------------------
    @property
    def has_observed(self) -> bool:
        return self.observer is not None and self.observer.has_data

    def reset_observer(self) -> None:
        if self.observer is not None:
            self.observer.reset()

    @property
    def observing(self) -> bool:
        """Calibrating: the observer sees each input, which passes through unchanged."""
        return self._observing

    @observing.setter
    def observing(self, value: bool) -> None:
        self._observing = bool(value)
        self._mode = self._forward_mode()

    @property
    def calibrated(self) -> bool:
        """Scale and zero-point are set: inputs are fake-quantized (outside observing)."""
        return self._calibrated

    @calibrated.setter
    def calibrated(self, value: bool) -> None:
        self._calibrated = bool(value)
        self._mode = self._forward_mode()

    def _forward_mode(self) -> str:
        """What :meth:`forward` does, as one string attribute: a compiled graph guards on it
        alone, never on ``spec`` (whose bits differ between plans)."""
        if self._observing:
            return "observe"
        if self.spec.is_float:
            return str(self.spec.bits)
        if not self._calibrated:
            return "identity"
        return "learned" if self.learned else "frozen"

    def freeze(self) -> None:
        """Compute scale and zero-point from the observer, stop observing, start quantizing."""
        self.observing = False
        if self.observer is None:
            self.calibrated = True
            return
        min_val, max_val = self.observer.compute_range()
        scale, zero_point = qparams_from_range(min_val, max_val, self.spec)
        self._set("scale", scale)
        self._set("zero_point", zero_point)
        self.calibrated = True
        self._refresh()

    def _set(self, name: str, value: Tensor) -> None:
        current = getattr(self, name)
        value = value.to(device=current.device, dtype=current.dtype)
        with torch.no_grad():
            if current.shape == value.shape:
                current.copy_(value)  # keeps the Parameter object an optimizer may hold
            elif isinstance(current, nn.Parameter):
                setattr(self, name, nn.Parameter(value, requires_grad=current.requires_grad))
            else:
                setattr(self, name, value)

    def constrain_(self) -> None:
        """Keep learned qparams valid after an optimizer step: ``scale >= EPS`` and the
        zero-point inside ``[qmin, qmax]`` (so what is exported is what was simulated)."""
        constrain_quantizers_([self])

    def _learns(self, name: str) -> bool:
        return isinstance(getattr(self, name), nn.Parameter)

    def quant_parameters(self) -> list[nn.Parameter]:
        """The learned qparams (LSQ scale, LSQ+ zero-point), for their own optimizer group."""
        return [p for p in (self.scale, self.zero_point) if isinstance(p, nn.Parameter)]

    def _refresh(self, channels: int | None = None) -> None:
        """Recompute the kernel tensor (for a per-tensor weight: ``channels`` copies, given by
        the first quantized forward) and drop the eager cache."""
        self._cache = None
        if self.spec.is_float:
            return
        self._channels = channels or self._channels
        with torch.no_grad(), torch.inference_mode(False):
            s, z = self.scale.detach().clamp_min(EPS), self.zero_point.detach()
            z = z.clamp(self.qmin, self.qmax).round()
            k = torch.stack([reciprocal_f32(s), s, self.qmin - z, self.qmax - z])
            if self.axis is None and self._kaxis == 0 and self._channels:  # per-tensor weight
                k = k[:, None].expand(4, self._channels).contiguous()
            self.kernel = k

    def get_extra_state(self) -> dict[str, Any]:
        return {"calibrated": self.calibrated}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.calibrated = bool(state["calibrated"])
        self._refresh()

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        for name in ("scale", "zero_point"):  # per-channel qparams sized at freeze()
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                self._set(name, torch.zeros(saved.shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._refresh()

    # Forward ---------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        mode = self._mode
        if mode == "observe":
            if self.observer is not None and not (self.for_weight and self.observer.has_data):
                self.observer.update(x)
                if self._kaxis == 0 and self.axis is None:  # a per-tensor weight
                    self._channels = int(x.shape[0])
            return x
        if mode == "fp32" or mode == "identity":
            return x
        if mode == "fp16":
            return x.to(torch.float16).to(x.dtype)
        if x.dtype != torch.float32 and x.is_floating_point():  # autocast: codes in float32
            return self._quantize(x.float()).to(x.dtype)
        return self._quantize(x)

    def _quantize(self, x: Tensor) -> Tensor:
        compiling = torch.compiler.is_compiling()
        if self._mode == "learned":
            if compiling:
                qmin, qmax = self.qbounds[0], self.qbounds[1]
                n = max(x.numel() // max(self.scale.numel(), 1), 1)
                factor: Number = torch.rsqrt(qmax.clamp_min(1.0) * n)
                return fake_quantize_lsq(
                    x, self.scale, self.zero_point, qmin, qmax, self.axis, factor
                )
            zero_point: Number = self.zero_point
            if not isinstance(zero_point, nn.Parameter):
                zero_point = self._cached(x)[2]
            factor = lsq_grad_factor(x.numel(), self.scale.numel(), self.qmax)
            return fake_quantize_lsq(
                x, self.scale, zero_point, self.qmin, self.qmax, self.axis, factor
            )
        if compiling:
            inv, scale, lo, hi = (along(k, self._kaxis, x.ndim) for k in self.kernel.unbind(0))
            return fake_quantize_traced(x, inv, scale, lo, hi)
        inv, scale, _, lo, hi = self._cached(x)
        return _FakeQuantSTE.apply(x, inv, scale, lo, hi)

    def _cached(self, x: Tensor) -> tuple[Number, Number, Number, Number, Number]:
        """``(1/S, S, Z, qmin - Z, qmax - Z)`` ready to broadcast over ``x``: Python floats per
        tensor (no tensor-bound clamp, no host sync per step), reshaped kernel rows per channel
        and for weights. Frozen qparams make this safe; freeze(), loading and moving the
        module drop the cache."""
        ndim = x.ndim
        if self._cache is None or self._cache[0] != ndim:
            if self._kaxis is not None and self.kernel.ndim == 1:
                self._refresh(int(x.shape[self._kaxis]))  # a per-tensor weight: one per channel
            inv, s, lo, hi = self.kernel.unbind(0)
            if self.kernel.ndim == 1:
                fl = [float(t) for t in (inv, s, lo, hi)]
                args: tuple[Number, ...] = (fl[0], fl[1], self.qmin - fl[2], fl[2], fl[3])
            else:
                with torch.inference_mode(False):
                    inv_, s_, lo_, hi_ = (along(t, self._kaxis, ndim) for t in (inv, s, lo, hi))
                args = (inv_, s_, self.qmin - lo_, lo_, hi_)
            entry = (ndim, *args)
            if not isinstance(ndim, int):  # a torch.fx Proxy while tracing: never cache it
                return entry[1:]  # type: ignore[return-value]
            self._cache = entry
        return self._cache[1:]  # type: ignore[return-value]

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> FakeQuantize:
        self._cache = None  # cached tensors would stay on the old device / dtype
        return super()._apply(fn, *args, **kwargs)

    def extra_repr(self) -> str:
        state = "observing" if self.observing else "calibrated" if self.calibrated else "off"
        kind = "weight" if self.for_weight else "activation"
        learned = "".join(f", learned {p}" for p in ("scale", "zero_point") if self._learns(p))
        return f"{self.spec.short()} {self.spec.calibration.value} {kind}, {state}{learned}"


@torch.no_grad()
def constrain_quantizers_(quantizers: Iterable[FakeQuantize]) -> None:
    """:meth:`FakeQuantize.constrain_` for many quantizers with a few multi-tensor kernels (the
    QAT loop calls it after every optimizer step).

    Example:
        >>> fq = FakeQuantize(QuantSpec(bits=4, symmetric=False, learned_zero_point=True))
        >>> _ = fq.zero_point.data.fill_(17.3)
        >>> constrain_quantizers_([fq]); float(fq.zero_point.detach())
        15.0
    """
    scales, zero_points, lows, highs = [], [], [], []
    for fq in quantizers:
        if fq._learns("scale"):
            scales.append(fq.scale)
        if fq._learns("zero_point"):
            zero_points.append(fq.zero_point)
            lows.append(fq.qmin)
            highs.append(fq.qmax)
    if scales:
        torch._foreach_clamp_min_(scales, EPS)
    if zero_points:
        torch._foreach_clamp_min_(zero_points, lows)
        torch._foreach_clamp_max_(zero_points, highs)
