"""The modules of a torch-x86 deployment: integer kernels, lookups, float-simulated layers and
quantized adds (see :mod:`autoquant.measure._torch_x86`, which builds them).

An integer layer runs ``clamp (sub-8-bit inputs) -> quantize_per_tensor (quint8) -> quantized
module -> dequantize`` or, with a float output, fbgemm's int8 linear with an fp32 output; a
weight-only layer (an embedding) its torch.ao 8-bit rowwise module. Quantized adds run as
``quantized::add`` / ``add_relu`` on quint8 operands. Every replacement of a layer keeps float
``weight`` and ``bias`` attributes, for code around it that reads them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from autoquant.measure._deploy import DeployedLayer, IntQ, activation_intq
from autoquant.quant import FakeQuantize
from autoquant.transform import add_outputs, fx_rule


def quint8(q: IntQ) -> tuple[float, int]:
    """(scale, zero-point) of a per-tensor grid as quint8."""
    zp = int(q.zero_point) + (128 if q.storage == "int8" else 0)
    return float(q.scale), zp


class _FloatParams:
    """Float ``weight`` and ``bias`` of the layer a deployed module replaces (plain attributes,
    not parameters), for code around it that reads them."""

    weight: Tensor | None
    bias: Tensor | None

    def _keep_params(self, dl: DeployedLayer) -> None:
        object.__setattr__(self, "weight", dl.weight_value)
        object.__setattr__(self, "bias", getattr(dl.float_module, "bias", None))


class IntKernelLayer(_FloatParams, nn.Module):
    """``dequantize(qlayer(quantize_per_tensor(clamp(x))))`` on the x86 int8 engine.

    With ``emit_quantized`` the output stays a quint8 tensor: set when it is already on the
    next layer's input grid and reaches it through ops that run on quantized tensors (ReLU,
    max-pool, flatten, ...), which then skips its own quantize step (same values). With
    ``float_output`` (see :func:`~autoquant.measure.register_deployment`), the kernel computes
    the float output itself from the float input and the input grid.
    """

    def __init__(
        self,
        qlayer: nn.Module,
        in_q: IntQ,
        float_output: Callable[[Tensor, float, int], Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.qlayer = qlayer
        self.scale, self.zero_point = quint8(in_q)
        self.clip = in_q.clip_range() if in_q.clip else None
        self.emit_quantized = False
        self.float_output = float_output

    def forward(self, x: Tensor) -> Tensor:
        if x.is_quantized and (
            self.float_output is not None
            or (x.q_scale(), x.q_zero_point()) != (self.scale, self.zero_point)
        ):
            x = x.dequantize()  # on another grid (e.g. a quantized add's output)
        if not x.is_quantized:
            if self.clip is not None:
                x = x.clamp(*self.clip)
            if self.float_output is not None:
                return self.float_output(x, self.scale, self.zero_point)
            x = torch.quantize_per_tensor(x, self.scale, self.zero_point, torch.quint8)
        y = self.qlayer(x)
        return y if self.emit_quantized else y.dequantize()

    def extra_repr(self) -> str:
        return (
            f"in_scale={self.scale:.4g}, in_zero_point={self.zero_point}, "
            f"emit_quantized={self.emit_quantized}, float_output={self.float_output is not None}"
        )


class LookupLayer(_FloatParams, nn.Module):
    """A weight-only layer on its torch.ao 8-bit rowwise module (an embedding): float output."""

    def __init__(self, qlayer: nn.Module) -> None:
        super().__init__()
        self.qlayer = qlayer

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        # torch.ao's lookups take contiguous indices only (an expanded token-type id is not).
        args = tuple(a.contiguous() if isinstance(a, Tensor) else a for a in args)
        return self.qlayer(*args, **kwargs)


class QuantizeTo(nn.Module):
    """Puts a tensor on one quint8 grid (an operand or the output of a quantized add).

    Disabled (``integer=False``, where a reader takes float tensors only), it fake-quantizes in
    float instead (same values).
    """

    def __init__(self, q: IntQ) -> None:
        super().__init__()
        self.scale, self.zero_point = quint8(q)
        self.integer = True

    def forward(self, x: Tensor) -> Tensor:
        if x.is_quantized:
            if (x.q_scale(), x.q_zero_point()) == (self.scale, self.zero_point):
                return x if self.integer else x.dequantize()
            x = x.dequantize()
        y = torch.quantize_per_tensor(x, self.scale, self.zero_point, torch.quint8)
        return y if self.integer else y.dequantize()


class QuantizedAdd(nn.Module):
    """``quantized::add`` (or ``add_relu``) of two quint8 tensors onto the output grid."""

    def __init__(self, q: IntQ, relu: bool) -> None:
        super().__init__()
        self.scale, self.zero_point = quint8(q)
        self.relu = relu

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        if not (a.is_quantized and b.is_quantized):  # a float fallback upstream
            a = a.dequantize() if a.is_quantized else a
            b = b.dequantize() if b.is_quantized else b
            return torch.relu(a + b) if self.relu else a + b
        op = torch.ops.quantized.add_relu if self.relu else torch.ops.quantized.add
        return op(a, b, self.scale, self.zero_point)


def graph_modules(module: nn.Module) -> list[fx.GraphModule]:
    """The graphs holding quantized adds: ``module`` and any submodule that is a
    ``GraphModule`` (see :func:`autoquant.transform.quantize_adds`)."""
    return [m for m in module.modules() if isinstance(m, fx.GraphModule)]


def lower_adds(gm: fx.GraphModule) -> None:
    """Quantizer calls become :class:`QuantizeTo` and each add between them a
    :class:`QuantizedAdd` (see :func:`autoquant.transform.quantize_adds`)."""
    graph = gm.graph
    grids: dict[fx.Node, IntQ] = {}
    for node in graph.nodes:
        fq = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        if isinstance(fq, FakeQuantize):
            q = activation_intq(fq, str(node.target))
            gm.add_submodule(str(node.target), QuantizeTo(q))
            grids[node] = q
    count = 0
    for node, out in add_outputs(gm):
        quantizer = next(iter(out.users)) if len(out.users) == 1 else None
        if quantizer not in grids:
            continue
        name = f"_aq_add{count}"
        gm.add_submodule(name, QuantizedAdd(grids[quantizer], relu=out is not node))
        with graph.inserting_before(node):
            new = graph.call_module(name, tuple(node.args))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        count += 1
    graph.lint()
    gm.recompile()


# Readers that take quint8 tensors (besides our modules and the grid-keeping ops).
_QUANTIZED_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
_QUANTIZED_POOL_FUNCTIONS = frozenset(
    {F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d}
)


def _takes_quantized(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Every reader of ``node`` (through ops that keep a grid) runs on quint8 tensors."""
    for user in node.users:
        module = gm.get_submodule(str(user.target)) if user.op == "call_module" else None
        if isinstance(module, (QuantizeTo, QuantizedAdd, IntKernelLayer, *_QUANTIZED_POOLS)) or (
            user.op == "call_function" and user.target in _QUANTIZED_POOL_FUNCTIONS
        ):
            continue
        if fx_rule(gm, user) is not None and _takes_quantized(gm, user):
            continue
        return False
    return True


def floats_for_float_readers(module: nn.Module) -> None:
    """A quantized add's output grid hands a float tensor to readers that take float tensors
    only (a LayerNorm after a transformer's residual add), quint8 to the others."""
    for gm in graph_modules(module):
        for node in gm.graph.nodes:
            q = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
            if isinstance(q, QuantizeTo) and not _takes_quantized(gm, node):
                q.integer = False


class SimulatedLayer(_FloatParams, nn.Module):
    """A float layer with its input quantization simulated (no integer kernel exists)."""

    def __init__(self, float_layer: nn.Module, act_fq: nn.Module) -> None:
        super().__init__()
        self.act_fq = act_fq
        self.layer = float_layer

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return self.layer(self.act_fq(x), *args, **kwargs)
