"""Registry of quantizable module types and their fake-quant wrappers.

A wrapper subclasses the float module (so ``isinstance(q, nn.Conv2d)`` still holds and the
weights stay where they were) and :class:`QuantizedLayer`, which adds a weight fake-quantizer
and an input-activation fake-quantizer. A new layer type is one small class:

    >>> @register_quantizable(nn.Conv3d)
    ... class QConv3d(QuantizedLayer, nn.Conv3d):
    ...     def forward_with(self, x, weight):
    ...         return self._conv_forward(x, weight, self.bias)
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import ClassVar, TypeVar

import torch.nn.functional as F
from torch import Tensor, nn

from autoquant.quant import FakeQuantize
from autoquant.types import LayerPlan, PlanError

_REGISTRY: dict[type[nn.Module], type[QuantizedLayer]] = {}

Q = TypeVar("Q", bound="type[QuantizedLayer]")


def register_quantizable(float_type: type[nn.Module]) -> Callable[[Q], Q]:
    """Class decorator: ``float_type`` modules are quantized with the decorated wrapper.

    Example:
        >>> QLinear.float_type is nn.Linear and quantizable_types()[nn.Linear] is QLinear
        True
    """

    def decorate(cls: Q) -> Q:
        if not issubclass(cls, float_type):
            raise TypeError(f"{cls.__name__} must subclass {float_type.__name__}")
        cls.float_type = float_type
        _REGISTRY[float_type] = cls
        return cls

    return decorate


def quantizable_types() -> dict[type[nn.Module], type[QuantizedLayer]]:
    """A copy of the registry: float module type -> wrapper class."""
    return dict(_REGISTRY)


class QuantizedLayer(nn.Module):
    """Marker base of fake-quant wrappers: ``forward(x) = float_op(act_fq(x), weight_fq(W))``.

    Attributes:
        float_type: the float module class this wrapper replaces (class attribute).
        weight_fq: :class:`~autoquant.quant.FakeQuantize` of the (BN-folded) weight.
        act_fq: :class:`~autoquant.quant.FakeQuantize` of the layer input.
        layer_plan: the :class:`~autoquant.types.LayerPlan` it was built from.
    """

    float_type: ClassVar[type[nn.Module]]
    weight: Tensor
    weight_fq: FakeQuantize
    act_fq: FakeQuantize
    layer_plan: LayerPlan

    @classmethod
    def from_float(cls, module: nn.Module, layer_plan: LayerPlan) -> QuantizedLayer:
        """A wrapper sharing ``module``'s parameters (``module`` itself is not modified)."""
        if type(module) is not cls.float_type:
            raise TypeError(
                f"{cls.__name__}.from_float expects {cls.float_type.__name__}, "
                f"got {type(module).__name__}"
            )
        q = copy.copy(module)  # shallow: same Parameter objects, own module dicts below
        for attr in ("_parameters", "_buffers", "_modules"):
            setattr(q, attr, dict(getattr(module, attr)))
        q.__class__ = cls
        q._init_quant(layer_plan)
        return q  # type: ignore[return-value]

    def _init_quant(self, layer_plan: LayerPlan) -> None:
        act = layer_plan.activation
        if act.per_channel and act.axis != 1:
            raise PlanError(
                f"activation axis={act.axis!r} is not allowed for per-channel "
                "activations; allowed values: 1 (the channel axis of the input)"
            )
        self.layer_plan = layer_plan
        w = layer_plan.weight
        if w.per_channel and w.axis >= self.weight.ndim:
            raise PlanError(
                f"weight axis={w.axis!r} is not allowed for a {self.weight.ndim}-d "
                f"weight; allowed values: 0..{self.weight.ndim - 1}"
            )
        w_channels = self.weight.shape[w.axis] if w.per_channel else None
        device = self.weight.device  # qparams live with the weights (CPU or GPU)
        self.weight_fq = FakeQuantize(w, for_weight=True, channels=w_channels).to(device)
        act_channels = self.in_channels_() if act.per_channel else None
        self.act_fq = FakeQuantize(act, channels=act_channels).to(device)

    def in_channels_(self) -> int:
        """Size of the input's channel axis (axis 1)."""
        return int(self.weight.shape[1]) * int(getattr(self, "groups", 1))

    def forward_with(self, x: Tensor, weight: Tensor) -> Tensor:
        """The float op with a given weight (each wrapper implements this)."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with(self.act_fq(x), self.weight_fq(self.weight))

    @staticmethod
    def macs(module: nn.Module, output: Tensor) -> int:
        """Multiply-accumulates of one call: each output element costs one weight row."""
        weight: Tensor = module.weight  # type: ignore[assignment]
        return int(output.numel() * weight[0].numel())


@register_quantizable(nn.Conv1d)
class QConv1d(QuantizedLayer, nn.Conv1d):
    """Fake-quant ``nn.Conv1d``."""

    def forward_with(self, x: Tensor, weight: Tensor) -> Tensor:
        return self._conv_forward(x, weight, self.bias)


@register_quantizable(nn.Conv2d)
class QConv2d(QuantizedLayer, nn.Conv2d):
    """Fake-quant ``nn.Conv2d``."""

    def forward_with(self, x: Tensor, weight: Tensor) -> Tensor:
        return self._conv_forward(x, weight, self.bias)


@register_quantizable(nn.Linear)
class QLinear(QuantizedLayer, nn.Linear):
    """Fake-quant ``nn.Linear``."""

    def forward_with(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.linear(x, weight, self.bias)
