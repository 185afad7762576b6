"""Registry of quantizable module types and their fake-quant wrappers.

A wrapper is the float module's class plus :class:`QuantizedLayer`: it keeps the float module's
parameters and attributes, adds a weight fake-quantizer and an input fake-quantizer, and
intercepts the float op at one primitive: ``_conv_forward`` for convolutions,
``Linear.forward``, ``Embedding.forward``. Everything around the primitive still runs.

Lookup walks ``type(module).__mro__``, so the most specific registered base wins. A user
subclass gets a wrapper class generated on first use (and cached), ``QMyConv(MyConv, QConv2d)``:
``isinstance(q, MyConv)`` holds, ``MyConv``'s own ``forward`` runs, and the primitive it reaches
(``super().forward(x)``, ``self._conv_forward(...)``) is the quantized one. Whether a subclass
really reaches the primitive exactly once per call, with its own weight, is checked on a real
forward pass by :func:`~autoquant.transform.quantizable_layers`, which reports the layers that
cannot be wrapped exactly instead of quantizing them wrongly.

A new layer type is one small class:

    >>> import torch
    >>> class Scale(nn.Module):
    ...     def __init__(self, n):
    ...         super().__init__()
    ...         self.weight = nn.Parameter(torch.ones(n, 1))
    ...     def forward(self, x):
    ...         return x * self.weight[:, 0]
    >>> @register_quantizable(Scale)
    ... class QScale(QuantizedLayer, Scale):
    ...     def forward(self, x):
    ...         return self.act_fq(x) * self.weight_fq(self.weight)[:, 0]
    >>> wrapper_type(Scale) is QScale
    True
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from autoquant.quant import FakeQuantize
from autoquant.types import LayerPlan, PlanError

_REGISTRY: dict[type[nn.Module], type[QuantizedLayer]] = {}
# Wrapper classes generated for subclasses of registered types (cleared on registration).
_DERIVED: dict[type[nn.Module], type[QuantizedLayer]] = {}

Q = TypeVar("Q", bound="type[QuantizedLayer]")


def register_quantizable(float_type: type[nn.Module]) -> Callable[[Q], Q]:
    """Class decorator: ``float_type`` modules (and subclasses without a more specific
    registration) are quantized with the decorated wrapper.

    Example:
        >>> QLinear.float_type is nn.Linear and quantizable_types()[nn.Linear] is QLinear
        True
    """

    def decorate(cls: Q) -> Q:
        if not (issubclass(cls, float_type) and issubclass(cls, QuantizedLayer)):
            raise TypeError(
                f"{cls.__name__} must subclass QuantizedLayer and {float_type.__name__}"
            )
        cls.float_type = float_type
        _REGISTRY[float_type] = cls
        _DERIVED.clear()
        return cls

    return decorate


def quantizable_types() -> dict[type[nn.Module], type[QuantizedLayer]]:
    """A copy of the registry: registered float module type -> wrapper class."""
    return dict(_REGISTRY)


def registered_base(cls: type) -> type[nn.Module] | None:
    """The most specific registered type in ``cls``'s MRO (``None`` if there is none).

    Example:
        >>> registered_base(nn.modules.linear.NonDynamicallyQuantizableLinear) is nn.Linear
        True
    """
    if issubclass(cls, QuantizedLayer):
        cls = cls.float_type
    return next((t for t in cls.__mro__ if t in _REGISTRY), None)


def wrapper_type(cls: type) -> type[QuantizedLayer] | None:
    """The wrapper class for float modules of class ``cls``, ``None`` if not quantizable.

    ``cls`` itself registered: its wrapper. A subclass of a registered type: a generated class
    ``Q<cls>(cls, wrapper of the registered base)`` (cached), whose ``float_type`` is ``cls``.

    Example:
        >>> class MyLinear(nn.Linear):
        ...     pass
        >>> w = wrapper_type(MyLinear)
        >>> w.__name__, issubclass(w, QLinear), issubclass(w, MyLinear), w.float_type is MyLinear
        ('QMyLinear', True, True, True)
    """
    if issubclass(cls, QuantizedLayer):
        return None
    base = registered_base(cls)
    if base is None:
        return None
    wrapper = _REGISTRY[base]
    if cls is base:
        return wrapper
    derived = _DERIVED.get(cls)
    if derived is None:
        # MRO: Q<cls>, cls (its own forward), wrapper (the intercept), base, ...
        derived = type(
            f"Q{cls.__name__}",
            (cls, wrapper),
            {
                "float_type": cls,
                "__module__": cls.__module__,
                "__qualname__": f"Q{cls.__qualname__}",
                "__doc__": f"Fake-quant ``{cls.__qualname__}`` (generated from "
                f"``{wrapper.__name__}``).",
            },
        )
        _DERIVED[cls] = derived
    return derived


def is_quantizable(module: nn.Module) -> bool:
    """Whether ``module`` is a wrapper or an instance of a registered type (or a subclass)."""
    return isinstance(module, QuantizedLayer) or registered_base(type(module)) is not None


def wrap_(module: nn.Module, layer_plan: LayerPlan) -> QuantizedLayer:
    """Turn ``module`` into its wrapper **in place** (every reference to it sees the wrapper).

    Raises:
        TypeError: ``module`` is not of a registered type.
        PlanError: the type cannot run this plan, or this module cannot be wrapped (see
            :meth:`QuantizedLayer.unsupported`).
    """
    cls = wrapper_type(type(module))
    if cls is None:
        raise TypeError(f"{type(module).__name__} is not a quantizable type")
    reason = cls.unsupported(module)
    if reason is not None:
        raise PlanError(f"{type(module).__name__} cannot be quantized: {reason}")
    module.__class__ = cls
    q: QuantizedLayer = module  # type: ignore[assignment]
    q._init_quant(layer_plan)
    return q


class QuantizedLayer(nn.Module):
    """Base of fake-quant wrappers: the float op on ``act_fq(input)`` and ``weight_fq(weight)``.

    Each wrapper overrides one primitive of its float type (the *intercept*) and nothing else.

    Attributes:
        float_type: the float module class this wrapper replaces (class attribute).
        quantizes_input: whether the layer's input is fake-quantized (class attribute; False
            for embeddings, whose input holds indices: their plan's activation must be fp32).
        quantizes_weight: whether the layer has a weight to quantize (class attribute; False
            for weightless ops such as the attention matmuls, which have no ``weight_fq`` and
            whose plan's weight must be fp32).
        weight_fq: :class:`~autoquant.quant.FakeQuantize` of the (BN-folded) weight.
        act_fq: :class:`~autoquant.quant.FakeQuantize` of the layer input (the identity when
            ``quantizes_input`` is False).
        layer_plan: the :class:`~autoquant.types.LayerPlan` it was built from.
    """

    float_type: ClassVar[type[nn.Module]]
    quantizes_input: ClassVar[bool] = True
    quantizes_weight: ClassVar[bool] = True
    weight: Tensor
    weight_fq: FakeQuantize
    act_fq: FakeQuantize
    layer_plan: LayerPlan

    @classmethod
    def from_float(cls, module: nn.Module, layer_plan: LayerPlan) -> QuantizedLayer:
        """A wrapper sharing ``module``'s parameters (``module`` itself is not modified).

        ``module`` may be an instance of a subclass of this wrapper's float type; the result is
        then an instance of the generated wrapper of that subclass.
        """
        target = wrapper_type(type(module))
        if target is None or not issubclass(target, cls):
            raise TypeError(
                f"{cls.__name__}.from_float expects {cls.float_type.__name__} (or a subclass), "
                f"got {type(module).__name__}"
            )
        q = copy.copy(module)  # shallow: same Parameter objects, own module dicts below
        for attr in ("_parameters", "_buffers", "_modules"):
            setattr(q, attr, dict(getattr(module, attr)))
        return wrap_(q, layer_plan)

    @classmethod
    def unsupported(cls, module: nn.Module) -> str | None:
        """Why ``module`` cannot be wrapped exactly and how to fix that (``None`` when it can);
        checked before wrapping and reported by layer discovery."""
        if parametrize.is_parametrized(module):
            return (
                "its weight is computed by a parametrization (weight_norm, spectral_norm, ...); "
                "torch.nn.utils.parametrize.remove_parametrizations(module, 'weight') makes it "
                "a plain weight"
            )
        return None

    @classmethod
    def input_channels(cls, module: nn.Module) -> int:
        """Size of the input's channel axis (axis 1), for per-channel activations."""
        weight: Tensor = module.weight  # type: ignore[assignment]
        return int(weight.shape[1]) * int(getattr(module, "groups", 1))

    @staticmethod
    def macs(module: nn.Module, args: tuple[Any, ...], output: Any) -> int:
        """Multiply-accumulates of one call: each output element costs one weight row."""
        weight: Tensor = module.weight  # type: ignore[assignment]
        return int(output.numel() * weight[0].numel())

    def _init_quant(self, layer_plan: LayerPlan) -> None:
        act, w = layer_plan.activation, layer_plan.weight
        if not self.quantizes_input and act.bits != "fp32":
            raise PlanError(
                f"activation bits={act.bits!r} is not allowed: {type(self).float_type.__name__}"
                " layers do not quantize their input (indices); allowed values: 'fp32'"
            )
        if act.per_channel and act.axis != 1:
            raise PlanError(
                f"activation axis={act.axis!r} is not allowed for per-channel "
                "activations; allowed values: 1 (the channel axis of the input)"
            )
        if w.per_channel and w.axis >= self.weight.ndim:
            raise PlanError(
                f"weight axis={w.axis!r} is not allowed for a {self.weight.ndim}-d "
                f"weight; allowed values: 0..{self.weight.ndim - 1}"
            )
        self.layer_plan = layer_plan
        w_channels = self.weight.shape[w.axis] if w.per_channel else None
        device = self.weight.device  # qparams live with the weights (CPU or GPU)
        self.weight_fq = FakeQuantize(w, for_weight=True, channels=w_channels).to(device)
        act_channels = self.input_channels(self) if act.per_channel else None
        self.act_fq = FakeQuantize(act, channels=act_channels).to(device)


class _QConv(QuantizedLayer):
    """Intercepts ``_conv_forward(input, weight, bias)``, which every ``_ConvNd.forward``
    calls (padding modes included)."""

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return super()._conv_forward(  # type: ignore[misc]
            self.act_fq(input), self.weight_fq(weight), bias
        )


@register_quantizable(nn.Conv1d)
class QConv1d(_QConv, nn.Conv1d):
    """Fake-quant ``nn.Conv1d``."""


@register_quantizable(nn.Conv2d)
class QConv2d(_QConv, nn.Conv2d):
    """Fake-quant ``nn.Conv2d``."""


@register_quantizable(nn.Conv3d)
class QConv3d(_QConv, nn.Conv3d):
    """Fake-quant ``nn.Conv3d``."""


@register_quantizable(nn.Linear)
class QLinear(QuantizedLayer, nn.Linear):
    """Fake-quant ``nn.Linear``; intercepts ``Linear.forward`` (a subclass's own forward must
    reach it through ``super().forward``)."""

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(self.act_fq(input), self.weight_fq(self.weight), self.bias)


class _QEmbeddingBase(QuantizedLayer):
    quantizes_input = False

    @classmethod
    def unsupported(cls, module: nn.Module) -> str | None:
        if getattr(module, "max_norm", None) is not None:
            return (
                "max_norm renormalizes the weight rows in place during forward (the stored, "
                "quantized rows would differ from the ones used); renormalize the weight once "
                "and set max_norm=None to quantize it"
            )
        if getattr(module, "sparse", False):
            return (
                "sparse gradients cannot flow through the weight fake-quantizer; set "
                "sparse=False to quantize it"
            )
        return super().unsupported(module)

    @classmethod
    def input_channels(cls, module: nn.Module) -> int:
        return 1  # indices have no channel axis (never quantized)


@register_quantizable(nn.Embedding)
class QEmbedding(_QEmbeddingBase, nn.Embedding):
    """Weight-only fake-quant ``nn.Embedding`` (per-row: per-channel on axis 0); the indices
    are never quantized."""

    def forward(self, input: Tensor) -> Tensor:
        return F.embedding(
            input,
            self.weight_fq(self.weight),
            self.padding_idx,
            self.max_norm,
            self.norm_type,
            self.scale_grad_by_freq,
            self.sparse,
        )

    @staticmethod
    def macs(module: nn.Module, args: tuple[Any, ...], output: Any) -> int:
        return 0  # a gather


@register_quantizable(nn.EmbeddingBag)
class QEmbeddingBag(_QEmbeddingBase, nn.EmbeddingBag):
    """Weight-only fake-quant ``nn.EmbeddingBag``."""

    def forward(
        self,
        input: Tensor,
        offsets: Tensor | None = None,
        per_sample_weights: Tensor | None = None,
    ) -> Tensor:
        return F.embedding_bag(
            input,
            self.weight_fq(self.weight),
            offsets,
            self.max_norm,
            self.norm_type,
            self.scale_grad_by_freq,
            self.mode,
            self.sparse,
            per_sample_weights,
            self.include_last_offset,
            self.padding_idx,
        )

    @staticmethod
    def macs(module: nn.Module, args: tuple[Any, ...], output: Any) -> int:
        # One multiply-add per gathered value (sum/mean of the bag's rows).
        indices = args[0] if args and isinstance(args[0], Tensor) else None
        dim = int(module.weight.shape[1])  # type: ignore[union-attr]
        return int(indices.numel() * dim) if indices is not None else 0
