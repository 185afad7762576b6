"""``FakeQuantize``: an observer while calibrating, a frozen fake-quantizer afterwards."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from autoquant.quant._fake import _FakeQuantSTE, fake_quantize_lsq, lsq_grad_factor
from autoquant.quant._observers import Observer, make_observer
from autoquant.quant._qparams import Number, along, qparams_from_range, reciprocal_f32
from autoquant.types import QuantSpec


class FakeQuantize(nn.Module):
    """Simulates quantizing one tensor per a :class:`~autoquant.types.QuantSpec`.

    States: ``observing`` (set by ``autoquant.transform.calibration``): the observer sees each
    input, which passes through unchanged. After :meth:`freeze` (``calibrated``): inputs are
    fake-quantized with frozen scale and zero-point; no observer runs, so QAT pays only for the
    fake-quant itself. Before calibration: identity. ``bits="fp32"`` is always the identity and
    ``"fp16"`` a round trip through float16 (outside observing).

    Args:
        spec: how to quantize.
        for_weight: the input is a weight (observed once, per-channel axis 0 allowed).
        channels: number of per-channel scales, when known up front (sizes ``scale`` so that a
            saved state dict loads before calibration); otherwise sized at :meth:`freeze`.

    Attributes:
        scale: float32 buffer, or an ``nn.Parameter`` trained by LSQ when
            ``spec.learned_scale``. Shape ``[]`` or ``[C]``.
        zero_point: float32 buffer holding integers, same shape.
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
        scale = torch.ones(shape)
        if spec.learned_scale and not spec.is_float:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        self.register_buffer("zero_point", torch.zeros(shape))
        self.observing = False
        self.calibrated = spec.is_float
        self._cache: tuple[Any, ...] | None = None

    # State -----------------------------------------------------------------------------------
    @property
    def has_observed(self) -> bool:
        return self.observer is not None and self.observer.has_data

    def reset_observer(self) -> None:
        if self.observer is not None:
            self.observer.reset()

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
        self._cache = None

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

    def get_extra_state(self) -> dict[str, Any]:
        return {"calibrated": self.calibrated}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.calibrated = bool(state["calibrated"])
        self._cache = None

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        for name in ("scale", "zero_point"):  # per-channel qparams sized at freeze()
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                self._set(name, torch.zeros(saved.shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._cache = None

    # Forward ---------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if self.observing:
            if self.observer is not None and not (self.for_weight and self.observer.has_data):
                self.observer.update(x)
            return x
        if self.spec.is_float:
            return x.to(torch.float16).to(x.dtype) if self.spec.bits == "fp16" else x
        if not self.calibrated:
            return x
        if isinstance(self.scale, nn.Parameter):
            zero_point = self._cached(x.ndim)[2]
            return fake_quantize_lsq(
                x, self.scale, zero_point, self.qmin, self.qmax, self.axis, self._grad_factor(x)
            )
        inv, scale, _, lo, hi = self._cached(x.ndim)
        return _FakeQuantSTE.apply(x, inv, scale, lo, hi)

    def _cached(self, ndim: int) -> tuple[Number, Number, Number, Number, Number]:
        """``(1/S, S, Z, qmin - Z, qmax - Z)`` ready to broadcast: Python floats per tensor (no
        tensor-bound clamp, no host sync per step), reshaped tensors per channel. Frozen
        qparams make this safe; freeze(), loading and moving the module drop the cache."""
        if self._cache is None or self._cache[0] != ndim:
            s, z = self.scale.detach(), self.zero_point
            if self.axis is None:
                sf, zf = float(s), float(z)
                args: tuple[Number, ...] = (float(reciprocal_f32(s)), sf, zf)
            else:
                args = tuple(along(t, self.axis, ndim) for t in (reciprocal_f32(s), s, z))
            entry = (ndim, *args, self.qmin - args[2], self.qmax - args[2])
            if not isinstance(ndim, int):  # a torch.fx Proxy while tracing: never cache it
                return entry[1:]  # type: ignore[return-value]
            self._cache = entry
        return self._cache[1:]  # type: ignore[return-value]

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> FakeQuantize:
        self._cache = None  # cached tensors would stay on the old device / dtype
        return super()._apply(fn, *args, **kwargs)

    def _grad_factor(self, x: Tensor) -> float:
        return lsq_grad_factor(x.numel(), self.scale.numel(), self.qmax)

    def extra_repr(self) -> str:
        state = "observing" if self.observing else "calibrated" if self.calibrated else "off"
        kind = "weight" if self.for_weight else "activation"
        return f"{self.spec.short()} {self.spec.calibration.value} {kind}, {state}"
