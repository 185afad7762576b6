"""Deployed model size: weights packed at their bit widths, plus qparams and float leftovers."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from autoquant.quant import FakeQuantize
from autoquant.transform._apply import check_plan
from autoquant.transform._attention import explicit_view
from autoquant.transform._fold import conv_bn_pairs
from autoquant.transform._registry import QuantizedLayer, is_quantizable, wrapper_type
from autoquant.types import LayerPlan, QuantPlan, QuantSpec

_SCALE_BITS, _ZERO_POINT_BITS, _FLOAT_BITS, _BIAS_BITS = 32, 8, 32, 32


@dataclass(frozen=True)
class SizeRow:
    """One stored tensor of the deployed model.

    ``role`` is one of ``weight``, ``bias``, ``weight_scale``, ``weight_zero_point``,
    ``act_scale``, ``act_zero_point`` or ``param`` (any other float parameter).
    """

    tensor: str
    layer: str
    role: str
    numel: int
    bits: int

    @property
    def bytes(self) -> int:
        return math.ceil(self.numel * self.bits / 8)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "bytes": self.bytes}


def _qparam_rows(
    layer: str, prefix: str, spec: QuantSpec, channels: int, role: str | None = None
) -> list[SizeRow]:
    if spec.is_float:
        return []
    n = channels if spec.per_channel else 1
    role = role or prefix
    return [
        SizeRow(f"{layer}.{prefix}_scale", layer, f"{role}_scale", n, _SCALE_BITS),
        SizeRow(f"{layer}.{prefix}_zero_point", layer, f"{role}_zero_point", n, _ZERO_POINT_BITS),
    ]


def _weightless_rows(name: str, module: nn.Module, lp: LayerPlan) -> list[SizeRow]:
    """Input qparams of a layer without a weight (attention matmuls: one grid per operand)."""
    cls = type(module) if isinstance(module, QuantizedLayer) else wrapper_type(type(module))
    if cls is None or cls.quantizes_weight:
        return []
    quantizers = getattr(cls, "input_quantizers", ("act_fq",))
    return [
        row
        for fq in quantizers
        for row in _qparam_rows(name, fq.removesuffix("_fq"), lp.activation, 1, role="act")
    ]


def _input_channels(module: nn.Module) -> int:
    cls = type(module) if isinstance(module, QuantizedLayer) else wrapper_type(type(module))
    return cls.input_channels(module) if cls is not None else 1


def _rows(model: nn.Module, plan: QuantPlan | None, example_input: Any) -> list[SizeRow]:
    # Empty for an apply_plan result (already folded).
    folded = dict(conv_bn_pairs(model, example_input))
    folded_bns = set(folded.values())
    seen: set[int] = set()  # a shared parameter is stored once
    rows: list[SizeRow] = []
    # Attention as plans name it: <mha>.in_proj holds the in-projection parameters.
    for name, module in explicit_view(model).named_modules():
        if name in folded_bns or isinstance(module, FakeQuantize):
            continue
        lp: LayerPlan | None = None
        if plan is not None and is_quantizable(module):
            lp = plan.layers.get(name)
            if lp is None and isinstance(module, QuantizedLayer):
                lp = module.layer_plan
        if lp is not None:
            rows += _weightless_rows(name, module, lp)
        params = {k: p for k, p in module.named_parameters(recurse=False) if id(p) not in seen}
        seen.update(id(p) for p in params.values())
        for key, p in params.items():
            tensor = f"{name}.{key}" if name else key
            if lp is not None and key == "weight":
                rows.append(SizeRow(tensor, name, "weight", p.numel(), lp.weight.storage_bits))
                axis = lp.weight.axis
                rows += _qparam_rows(
                    name, "weight", lp.weight, p.shape[axis] if p.ndim > axis else 1
                )
                rows += _qparam_rows(name, "act", lp.activation, _input_channels(module))
            elif key == "bias":
                rows.append(SizeRow(tensor, name, "bias", p.numel(), _BIAS_BITS))
            else:
                rows.append(SizeRow(tensor, name, "param", p.numel(), _FLOAT_BITS))
        if name in folded and getattr(module, "bias", None) is None:
            # Folding BN gives a bias-free conv a bias of out_channels elements.
            out_channels = int(module.weight.shape[0])
            rows.append(SizeRow(f"{name}.bias", name, "bias", out_channels, _BIAS_BITS))
    return rows


def size_breakdown(
    model: nn.Module, plan: QuantPlan, *, example_input: Any = None
) -> list[SizeRow]:
    """Per-tensor rows of the deployed size of ``model`` under ``plan``.

    ``model`` may be the float model (BatchNorm is accounted as folded) or an
    :func:`~autoquant.transform.apply_plan` result. Quantized weights take
    ``ceil(numel * bits / 8)`` bytes plus one fp32 scale (4 B) and one zero-point (1 B) per
    channel (per-channel) or per tensor; a quantized input activation adds its own scale and
    zero-point. fp16 weights take 2 B per element, fp32 ones and every other float parameter
    4 B, and biases 4 B per element (int32 in a QDQ graph).

    Example:
        >>> from autoquant.types import QuantSpec
        >>> net = nn.Sequential(nn.Linear(10, 4))
        >>> plan = QuantPlan.uniform(["0"], QuantSpec(bits=4), QuantSpec(bits=8))
        >>> [(r.role, r.bytes) for r in size_breakdown(net, plan)]  # doctest: +NORMALIZE_WHITESPACE
        [('weight', 20), ('weight_scale', 4), ('weight_zero_point', 1), ('act_scale', 4),
         ('act_zero_point', 1), ('bias', 16)]
    """
    check_plan(model, plan)
    return _rows(model, plan, example_input)


def packed_size_bytes(model: nn.Module, plan: QuantPlan, *, example_input: Any = None) -> int:
    """Total deployed bytes of ``model`` under ``plan`` (sum of :func:`size_breakdown`).

    Example:
        >>> from autoquant.types import QuantSpec
        >>> net = nn.Sequential(nn.Linear(10, 4))
        >>> packed_size_bytes(net, QuantPlan.uniform(["0"], QuantSpec(bits=4), QuantSpec(bits=8)))
        46
    """
    return sum(r.bytes for r in size_breakdown(model, plan, example_input=example_input))


def float_size_bytes(model: nn.Module, *, example_input: Any = None) -> int:
    """4 bytes per parameter of the BN-folded float model.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3, bias=False), nn.BatchNorm2d(2))
        >>> float_size_bytes(net)  # 18 weights + 2 biases from the folded BN
        80
    """
    return sum(r.bytes for r in _rows(model, None, example_input))
