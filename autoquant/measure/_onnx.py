"""Export a plan as a QDQ ONNX model that ONNX Runtime fuses into integer kernels.

Approach (graph surgery on a float export):

1. The fake-quant model is turned back into its float, BN-folded clone and exported with the
   TorchScript exporter (``torch.onnx.export(..., dynamo=False)``; in torch 2.13 the default
   ``dynamo=True`` exporter needs ``onnxscript``, which the project does not depend on). Before
   export every Conv/Linear weight and bias gets unique placeholder values, so the exporter
   can neither merge equal tensors nor rename them: each layer's node is found by its weight
   initializer's name (``<fqn>.weight``), or, after a constant-folded transpose, by value.
2. Each quantized layer is rewritten in the QDQ format: the weight becomes an integer
   initializer (int8, uint8 when asymmetric; per-channel along the output axis) read through
   ``DequantizeLinear``; the layer input passes ``QuantizeLinear -> DequantizeLinear`` with the
   calibrated (or LSQ-learned) scale and zero-point, after a ``Clip`` to its own grid when
   narrower than 8 bits; biases stay float32 (ONNX Runtime quantizes them into the fused
   kernel).
3. An integer kernel also needs its *output* quantized. When the output reaches exactly one
   quantized layer through ops that commute with quantization (ReLU, MaxPool, Flatten,
   Reshape, ...), it is quantized onto that layer's input grid, which changes no value. Else a
   Conv output gets an 8-bit grid from the output range seen on the calibration inputs (after a
   following ReLU when there is one), e.g. before a residual add; a Gemm/MatMul output stays
   float (QGemm / MatMulIntegerToFloat).
4. Quantized adds (``plan.adds``): the float export carries ``autoquant::Mark`` nodes where the
   fake-quant model calls an add's quantizer; each becomes ``QuantizeLinear ->
   DequantizeLinear`` on that quantizer's grid. An operand already on a grid (e.g. a
   shortcut's slice and zero pad) gets the same grid again after each op in between, and a
   global average pool before a quantized layer gets that layer's input grid, so ONNX Runtime
   runs them on integers (QLinearAdd, QLinearGlobalAveragePool).
5. Exact rewrites for ONNX Runtime's kernels: ``DequantizeLinear -> Pad(zeros) ->
   QuantizeLinear`` on one grid becomes a Pad of the integer tensor by its zero point, and a
   symmetric int8 conv whose input channels are not a multiple of 4 (an RGB stem) gets zero
   channels (weights padded in-graph, stored unpadded) so that it runs in MLAS's direct
   int8 conv kernel instead of im2col + GEMM.

Weights below 8 bits are stored bit-packed in a sidecar (``weights.packed.npz``) next to the
ONNX file and left out of it; :func:`load_onnx` restores the int8 initializers.
"""

from __future__ import annotations

import copy
import io
import json
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from autoquant.measure._deploy import (
    DeployedLayer,
    IntQ,
    Requant,
    activation_intq,
    deployed_layers,
    float_clone,
    grid_prefix,
    layer_grid,
    output_ranges,
    plan_formats,
    plan_requant,
)
from autoquant.measure._pack import SIDECAR_NAME, PackedTensor, read_sidecar, write_sidecar
from autoquant.transform import quantizable_names
from autoquant.types import PlanError, QuantPlan

OPSET = 17
#: Bumped when the graph exported for a given plan changes (e.g. a new lowering), so that cached
#: latencies of the old graph are not reused: it is part of the ONNX Runtime backend's version.
EXPORT_REVISION = 2
_LAYER_OPS = ("Conv", "Gemm", "MatMul")
# Ops through which per-tensor quantization commutes exactly (monotone or pure data
# movement, zero kept at zero), so a producer may quantize onto its consumer's grid.
_COMMUTING_OPS = frozenset(
    {
        "Relu",
        "MaxPool",
        "Flatten",
        "Reshape",
        "Identity",
        "Squeeze",
        "Unsqueeze",
        "Transpose",
        "Dropout",
    }
)
#: Tensor roles counted by :func:`artifact_weight_bytes` (the roles of
#: :func:`autoquant.transform.size_breakdown`).
SIZE_ROLES = (
    "weight",
    "weight_scale",
    "weight_zero_point",
    "act_scale",
    "act_zero_point",
    "bias",
    "param",
)
_ROLES_KEY = "autoquant.tensor_roles"


class _MarkFunction(torch.autograd.Function):
    """Identity that exports as ``autoquant::Mark(name=...)`` (replaced before saving)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, name: str) -> Tensor:
        return x.clone()

    @staticmethod
    def symbolic(g: Any, x: Any, name: str) -> Any:
        out = g.op("autoquant::Mark", x, name_s=name)
        out.setType(x.type())
        return out


class _Mark(nn.Module):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, x: Tensor) -> Tensor:
        return _MarkFunction.apply(x, self.name)


def _marks(proto: Any) -> dict[int, tuple[Any, str]]:
    """``id(node) -> (node, quantizer target)`` of the graph's Mark nodes."""
    return {
        id(n): (n, _attr(n, "name", b"").decode())
        for n in proto.graph.node
        if n.op_type == "Mark" and n.domain == "autoquant"
    }


@dataclass
class ExportInfo:
    """What :func:`export_onnx` wrote.

    Attributes:
        path: the ONNX file (sub-8-bit weights left out when a sidecar exists).
        sidecar: the packed sub-8-bit weights, or None when every weight is 8-bit or float.
        formats: per plan layer, how it runs (see :func:`describe_layer`).
        requant: per integer layer, how its output is quantized (``exact``, ``calibrated``,
            ``float``).
        weight_bytes: :func:`artifact_weight_bytes` of the written files.
        extra_bytes: bytes of deployment-only tensors not in the size objective (calibrated
            output qparams, clip bounds).
    """

    path: Path
    sidecar: Path | None
    formats: dict[str, str]
    requant: dict[str, str]
    weight_bytes: int
    extra_bytes: int
    packed: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "sidecar": str(self.sidecar) if self.sidecar else None,
            "formats": self.formats,
            "requant": self.requant,
            "weight_bytes": self.weight_bytes,
            "extra_bytes": self.extra_bytes,
            "packed": self.packed,
        }


# ---------------------------------------------------------------------------------------
# Float export and graph analysis
# ---------------------------------------------------------------------------------------


def _as_inputs(example_input: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
    return tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)


def export_float(model: nn.Module, example_input: Tensor | Sequence[Tensor]) -> Any:
    """ONNX ``ModelProto`` of a float module (TorchScript exporter, dynamic batch axis)."""
    import onnx

    inputs = _as_inputs(example_input)
    with torch.no_grad():
        out = model(*inputs)
    n_out = len(out) if isinstance(out, (tuple, list)) else 1
    in_names = ["input"] if len(inputs) == 1 else [f"input{i}" for i in range(len(inputs))]
    out_names = ["output"] if n_out == 1 else [f"output{i}" for i in range(n_out)]
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated in torch 2.x
        torch.onnx.export(
            model,
            inputs,
            buf,
            dynamo=False,
            opset_version=OPSET,
            input_names=in_names,
            output_names=out_names,
            dynamic_axes={n: {0: "batch"} for n in in_names + out_names},
            do_constant_folding=True,
        )
    return onnx.load_from_string(buf.getvalue())


def _placeholder_clone(fm: nn.Module) -> nn.Module:
    """A copy whose layer weights and biases hold unique random values (see module doc)."""
    marked = copy.deepcopy(fm)
    gen = torch.Generator().manual_seed(12345)
    with torch.no_grad():
        for name in quantizable_names(marked):
            layer = marked.get_submodule(name)
            for p in (layer.weight, getattr(layer, "bias", None)):
                if p is not None:
                    p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
    return marked


@dataclass
class _LayerNode:
    node: Any  # onnx.NodeProto
    weight_init: str
    transposed: bool  # the initializer holds W^T (MatMul, Gemm transB=0)
    calls: int = 1  # nodes using this weight (a layer called more than once in forward)


def _find_layer_nodes(proto: Any, marked: nn.Module, names: Iterable[str]) -> dict[str, _LayerNode]:
    from onnx import numpy_helper

    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    by_weight: dict[str, list[Any]] = {}
    for node in graph.node:
        if node.op_type in _LAYER_OPS and len(node.input) > 1 and node.input[1] in inits:
            by_weight.setdefault(node.input[1], []).append(node)
    found: dict[str, _LayerNode] = {}
    values: dict[str, np.ndarray] | None = None
    for name in names:
        weight = marked.get_submodule(name).weight.detach().numpy()
        key = f"{name}.weight"
        if key in by_weight:
            node = by_weight[key][0]
            found[name] = _LayerNode(
                node,
                key,
                node.op_type == "MatMul"
                or (node.op_type == "Gemm" and not _attr(node, "transB", 0)),
                len(by_weight[key]),
            )
            continue
        if values is None:
            values = {k: numpy_helper.to_array(inits[k]) for k in by_weight}
        for k, arr in values.items():
            for transposed, ref in ((False, weight), (True, weight.T)):
                if arr.shape == ref.shape and np.array_equal(arr, ref):
                    found[name] = _LayerNode(by_weight[k][0], k, transposed, len(by_weight[k]))
    return found


def _attr(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _consumers(nodes: Iterable[Any]) -> dict[str, list[tuple[Any, int]]]:
    """``{tensor: [(node, input index), ...]}`` of the nodes reading each tensor."""
    out: dict[str, list[tuple[Any, int]]] = {}
    for node in nodes:
        for i, t in enumerate(node.input):
            out.setdefault(t, []).append((node, i))
    return out


def layer_chains(
    proto: Any, nodes: Mapping[str, _LayerNode], marks: Mapping[int, tuple[Any, str]] | None = None
) -> dict[str, tuple[str | None, bool]]:
    """Per layer: the one grid (see :func:`~autoquant.measure.layer_grid`) that every consumer
    of its output reads through commuting ops (or None), and whether the output's only
    consumer is a ReLU. Consumers are layers (their input grid) and ``marks`` (an add's
    quantizer)."""
    graph = proto.graph
    consumers = _consumers(graph.node)
    outputs = {o.name for o in graph.output}
    layer_of = {id(ln.node): name for name, ln in nodes.items()}
    mark_of = {k: target for k, (_, target) in (marks or {}).items()}
    chains: dict[str, tuple[str | None, bool]] = {}
    for name, ln in nodes.items():
        t = ln.node.output[0]
        first = consumers.get(t, [])
        relu = len(first) == 1 and first[0][0].op_type == "Relu" and t not in outputs
        grids: set[str] = set()
        pending, ok = [t], True
        while pending and ok:
            t = pending.pop()
            if t in outputs or not consumers.get(t):
                ok = False
            for node, idx in consumers.get(t, []):
                if id(node) in layer_of and idx == 0:
                    grids.add(layer_grid(layer_of[id(node)]))
                elif id(node) in mark_of:
                    grids.add(mark_of[id(node)])
                elif node.op_type in _COMMUTING_OPS and idx == 0 and len(node.output) == 1:
                    pending.append(node.output[0])
                else:
                    ok = False
        chains[name] = (grids.pop() if ok and len(grids) == 1 else None, relu)
    return chains


# ---------------------------------------------------------------------------------------
# QDQ graph surgery
# ---------------------------------------------------------------------------------------


class _Editor:
    """Collects new nodes and initializers; rebuilds a topologically sorted graph."""

    def __init__(self, proto: Any) -> None:
        self.proto = proto
        self.graph = proto.graph
        self.inits: dict[str, Any] = {i.name: i for i in self.graph.initializer}
        self.roles: dict[str, str] = {}
        self.nodes: list[Any] = list(self.graph.node)

    def init(self, name: str, array: np.ndarray, role: str) -> str:
        from onnx import numpy_helper

        self.inits[name] = numpy_helper.from_array(np.asarray(array), name)
        self.roles[name] = role
        return name

    def add(self, op: str, inputs: list[str], outputs: list[str], **attrs: Any) -> None:
        from onnx import helper

        self.nodes.append(
            helper.make_node(op, inputs, outputs, name=outputs[0] + "/" + op, **attrs)
        )

    def qparams(self, prefix: str, q: IntQ, role: str | None = None) -> tuple[str, str]:
        s, z = f"{prefix}_scale", f"{prefix}_zero_point"
        if s not in self.inits:
            self.init(s, q.scale.astype(np.float32), f"{role}_scale" if role else "extra")
            self.init(z, q.zero_point_array(), f"{role}_zero_point" if role else "extra")
        return s, z

    def qdq(self, x: str, out: str, scale: str, zp: str, axis: int | None) -> None:
        kw = {} if axis is None else {"axis": axis}
        self.add("QuantizeLinear", [x, scale, zp], [out + "_quantized"], **kw)
        self.add("DequantizeLinear", [out + "_quantized", scale, zp], [out], **kw)

    def finish(self) -> Any:
        used = {t for n in self.nodes for t in n.input}
        produced = {t for n in self.nodes for t in n.output}
        available = {i.name for i in self.graph.input} | set(self.inits)
        order = _toposort(self.nodes, available)
        del self.graph.node[:]
        self.graph.node.extend(order)
        del self.graph.initializer[:]
        self.graph.initializer.extend(
            v for k, v in self.inits.items() if k in used and k not in produced
        )
        return self.proto


def _toposort(nodes: list[Any], available: set[str]) -> list[Any]:
    """Kahn's algorithm, keeping the given order among ready nodes."""
    ready = set(available) | {""}
    pending = list(nodes)
    out: list[Any] = []
    while pending:
        rest = []
        for node in pending:
            if all(t in ready for t in node.input):
                out.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            missing = sorted({t for n in rest for t in n.input if t not in ready})
            raise RuntimeError(f"ONNX graph has unresolved inputs {missing[:5]}")
        pending = rest
    return out


def _weight_axis(ln: _LayerNode, axis: int | None) -> int | None:
    if axis is None or not ln.transposed:
        return axis
    return 1 - axis  # a 2-D weight stored as W^T


def _stem_channels(ln: _LayerNode, fm_layer: nn.Module, dl: DeployedLayer | None) -> int:
    """Input channels to append (zero weights, zero-point inputs: no value changes) so that
    ONNX Runtime runs a conv in its direct int8 kernel (MLAS ``ConvSym``, on x86 for uint8
    inputs and int8 weights with zero zero-points), which needs input channels in multiples of
    4 and 16+ output channels in multiples of 8; else it falls back to im2col and a GEMM, 2-3x
    slower on an RGB stem."""
    if (
        dl is None
        or ln.node.op_type != "Conv"
        or not isinstance(fm_layer, nn.Conv2d)
        or fm_layer.groups != 1
        or dl.weight_q is None
        or dl.weight_q.storage != "int8"
        or np.any(dl.weight_q.zero_point != 0)
        or dl.act_q is None
        or dl.act_q.axis is not None
        or dl.act_q.storage != "uint8"
    ):
        return 0
    c, o = fm_layer.in_channels, fm_layer.out_channels
    return -c % 4 if o >= 16 and o % 8 == 0 else 0


def _rewrite_layer(
    ed: _Editor,
    name: str,
    ln: _LayerNode,
    fm_layer: nn.Module,
    dl: DeployedLayer | None,
    on_grid: Mapping[str, str],
) -> None:
    """Weight and bias of one layer from the real model; QDQ around it when quantized (not
    on an input already on this layer's input grid, see :func:`_grids_of`)."""
    from onnx import TensorProto

    node = ln.node
    extra = _stem_channels(ln, fm_layer, dl)
    stem_pads = None
    if extra:
        pads = np.zeros(2 * fm_layer.weight.ndim, np.int64)
        pads[fm_layer.weight.ndim + 1] = extra  # end of the channel axis
        stem_pads = ed.init(f"{name}.channel_pads", pads, "extra")

    def oriented(arr: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(arr.T if ln.transposed else arr)

    weight = fm_layer.weight.detach().float().numpy()
    bias = getattr(fm_layer, "bias", None)
    if bias is not None and len(node.input) > 2 and node.op_type != "MatMul":
        node.input[2] = ed.init(f"{name}.bias", bias.detach().float().numpy(), "bias")
    if dl is None or dl.format.weight.storage == "fp32":
        node.input[1] = ed.init(
            f"{name}.weight", oriented(weight), "weight" if dl is not None else "param"
        )
    elif dl.format.weight.storage == "fp16":
        w16 = ed.init(f"{name}.weight_fp16", oriented(weight).astype(np.float16), "weight")
        ed.add("Cast", [w16], [f"{name}.weight_float"], to=TensorProto.FLOAT)
        node.input[1] = f"{name}.weight_float"
    else:
        q, values = dl.weight_q, dl.weight_codes
        if dl.format.saturates and q.storage == "int8":
            # u8×s8 kernels saturate on this CPU; the same grid as uint8 runs U8U8, exactly.
            values = (values.astype(np.int16) + 128).astype(np.uint8)
            q = IntQ(q.scale, q.zero_point + 128, q.qmin + 128, q.qmax + 128, q.axis, "uint8")
        codes = ed.init(f"{name}.weight_quantized", oriented(values), "weight")
        if stem_pads is not None:  # zero weights for the added channels (folded by ORT)
            ed.add("Pad", [codes, stem_pads], [f"{name}.weight_quantized_padded"])
            codes = f"{name}.weight_quantized_padded"
        s, z = ed.qparams(f"{name}.weight", q, "weight")
        axis = _weight_axis(ln, q.axis)
        ed.add(
            "DequantizeLinear",
            [codes, s, z],
            [f"{name}.weight_dequantized"],
            **({} if axis is None else {"axis": axis}),
        )
        node.input[1] = f"{name}.weight_dequantized"
    if dl is None:
        return
    # Input activation.
    x = node.input[0]
    a = dl.plan.activation
    if a.bits == "fp16":
        ed.add("Cast", [x], [f"{name}.input_fp16"], to=TensorProto.FLOAT16)
        ed.add("Cast", [f"{name}.input_fp16"], [f"{name}.input_fp16_float"], to=TensorProto.FLOAT)
        node.input[0] = f"{name}.input_fp16_float"
    elif dl.act_q is not None and on_grid.get(x) == f"{name}.act":
        ed.qparams(f"{name}.act", dl.act_q, "act")  # the input is on this grid already
    elif dl.act_q is not None:
        q = dl.act_q
        if q.clip:
            lo = q.scale * (q.qmin - q.zero_point)
            hi = q.scale * (q.qmax - q.zero_point)
            if q.axis is None:
                ed.add(
                    "Clip",
                    [
                        x,
                        ed.init(f"{name}.act_clip_min", lo.astype(np.float32), "extra"),
                        ed.init(f"{name}.act_clip_max", hi.astype(np.float32), "extra"),
                    ],
                    [f"{name}.input_clipped"],
                )
            else:  # per channel: broadcast bounds along axis 1
                ndim = weight.ndim if not isinstance(fm_layer, nn.Linear) else 2
                shape = (1, -1) + (1,) * (ndim - 2)
                ed.add(
                    "Max",
                    [
                        x,
                        ed.init(
                            f"{name}.act_clip_min", lo.astype(np.float32).reshape(shape), "extra"
                        ),
                    ],
                    [f"{name}.input_clipped_lo"],
                )
                ed.add(
                    "Min",
                    [
                        f"{name}.input_clipped_lo",
                        ed.init(
                            f"{name}.act_clip_max", hi.astype(np.float32).reshape(shape), "extra"
                        ),
                    ],
                    [f"{name}.input_clipped"],
                )
            x = f"{name}.input_clipped"
        s, z = ed.qparams(f"{name}.act", q, "act")
        ed.qdq(x, f"{name}.input_dequantized", s, z, q.axis)
        node.input[0] = f"{name}.input_dequantized"
    if stem_pads is not None:  # zero-point channels; an integer Pad after _integer_pads
        s, z = ed.qparams(f"{name}.act", dl.act_q, "act")
        ed.add("Pad", [node.input[0], stem_pads], [f"{name}.input_padded"])
        ed.qdq(f"{name}.input_padded", f"{name}.input_padded_dequantized", s, z, None)
        node.input[0] = f"{name}.input_padded_dequantized"


def _insert_requant(
    ed: _Editor,
    name: str,
    ln: _LayerNode,
    rq: Requant,
    consumers: Mapping[str, list[tuple[Any, int]]],
) -> None:
    if rq.mode == "float":
        node = ln.node
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
            # ONNX Runtime fuses DQ -> Gemm -> float output into QGemm only without a float
            # bias (it would need an int32 one): add the float bias after the kernel instead.
            bias = node.input[2]
            del node.input[2]
            t = node.output[0]
            node.output[0] = f"{name}.output_no_bias"
            ed.add("Add", [node.output[0], bias], [t])
        return
    producer = ln.node
    if rq.after_relu:
        producer = consumers[ln.node.output[0]][0][0]
    t = producer.output[0]
    raw = f"{name}.output_float"
    producer.output[0] = raw
    if rq.mode == "exact":
        s, z = f"{rq.grid}_scale", f"{rq.grid}_zero_point"
    else:
        s, z = ed.qparams(f"{name}.output", rq.q)
    ed.qdq(raw, t, s, z, None)


def _requant_text(rq: Requant) -> str:
    return {
        "exact": f"exact (onto {rq.consumer}'s input grid)"
        if rq.consumer
        else f"exact (onto the {rq.grid} grid)",
        "calibrated": "calibrated uint8" + (" after ReLU" if rq.after_relu else ""),
        "float": "float",
    }[rq.mode]


_GRID_KEEPING_OPS = _COMMUTING_OPS | {"Slice", "Pad"}
_POOL_OPS = ("GlobalAveragePool", "AveragePool")


def _producers(nodes: Iterable[Any]) -> dict[str, Any]:
    return {t: n for n in nodes for t in n.output}


def _requantize_output(ed: _Editor, node: Any, scale: str, zp: str) -> None:
    """Quantize ``node``'s output onto a per-tensor grid, keeping the tensor's name."""
    t = node.output[0]
    node.output[0] = f"{t}_before_qdq"
    ed.qdq(node.output[0], t, scale, zp, None)


def _grids_of(nodes: list[Any], through_ops: bool = True) -> dict[str, str]:
    """``{tensor: grid prefix}`` of the tensors on a per-tensor grid: DequantizeLinear outputs
    and (``through_ops``) what reaches them through commuting ops."""
    on = {
        n.output[0]: n.input[1][: -len("_scale")]
        for n in nodes
        if n.op_type == "DequantizeLinear" and n.input[1].endswith("_scale") and not n.attribute
    }
    changed = through_ops
    while changed:
        changed = False
        for n in nodes:
            if n.op_type in _COMMUTING_OPS and n.input[0] in on and n.output[0] not in on:
                on[n.output[0]] = on[n.input[0]]
                changed = True
    return on


def _convert_marks(ed: _Editor, grids: Mapping[str, IntQ]) -> None:
    """Replace each Mark by QuantizeLinear -> DequantizeLinear on its quantizer's grid, or by
    an Identity when its input is on that grid already."""
    on_grid = _grids_of(ed.nodes)
    for node in [n for n in ed.nodes if n.op_type == "Mark" and n.domain == "autoquant"]:
        target = _attr(node, "name", b"").decode()
        shared = target.endswith(".act_fq")  # a layer's input grid: counted in the size
        s, z = ed.qparams(grid_prefix(target), grids[target], "act" if shared else None)
        ed.nodes.remove(node)
        if on_grid.get(node.input[0]) == grid_prefix(target):
            ed.add("Identity", [node.input[0]], [node.output[0]])
        else:
            ed.qdq(node.input[0], node.output[0], s, z, None)


def _is_zero_pad(node: Any) -> bool:
    return _attr(node, "mode", b"constant") in (b"constant", "constant") and (
        len(node.input) < 3 or not node.input[2]
    )


def _quantize_add_operands(ed: _Editor) -> None:
    """Give each operand of a quantized add (its output goes only to QuantizeLinear, possibly
    through one ReLU) that reaches a DequantizeLinear through grid-keeping ops (a shortcut's
    slice and zero pad) that grid again after each of those ops: exact, and ONNX Runtime
    then runs the ops and the add on integers."""
    consumers = {t: [n for n, _ in c] for t, c in _consumers(ed.nodes).items()}
    producers = _producers(ed.nodes)
    for add in [n for n in ed.nodes if n.op_type == "Add" and len(n.input) == 2]:
        out = add.output[0]
        cons = consumers.get(out, [])
        if len(cons) == 1 and cons[0].op_type == "Relu":
            cons = consumers.get(cons[0].output[0], [])
        if not cons or any(c.op_type != "QuantizeLinear" for c in cons):
            continue
        for t in add.input:
            chain = []
            p = producers.get(t)
            while p is not None and p.op_type in _GRID_KEEPING_OPS and p.input:
                if p.op_type == "Pad" and not _is_zero_pad(p):
                    break
                chain.append(p)
                p = producers.get(p.input[0])
            if not chain or p is None or p.op_type != "DequantizeLinear" or _attr(p, "axis", None):
                continue
            for node in chain:
                _requantize_output(ed, node, p.input[1], p.input[2])


def _integer_pads(ed: _Editor) -> None:
    """``DequantizeLinear -> Pad(zeros) -> QuantizeLinear`` on one per-tensor grid becomes a
    Pad of the integer tensor by its zero point: exact, and ONNX Runtime, which fuses no QDQ
    around a Pad, then runs no float op there (a shortcut's channel padding, a padded stem)."""
    consumers = _consumers(ed.nodes)
    producers = _producers(ed.nodes)
    for pad in [n for n in ed.nodes if n.op_type == "Pad" and _is_zero_pad(n)]:
        dq = producers.get(pad.input[0])
        after = consumers.get(pad.output[0], [])
        if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 3 or len(after) != 1:
            continue
        q = after[0][0]
        if q.op_type != "QuantizeLinear" or list(q.input[1:]) != list(dq.input[1:]):
            continue
        if _attr(dq, "axis", None) is not None or _attr(q, "axis", None) is not None:
            continue
        pads = pad.input[1]
        del pad.input[:]
        pad.input.extend([dq.input[0], pads, dq.input[2]])
        pad.output[0] = q.output[0]
        ed.nodes.remove(q)
        if len(consumers[dq.output[0]]) == 1:
            ed.nodes.remove(dq)


def _quantize_pools(
    ed: _Editor, layers: Mapping[str, DeployedLayer], nodes: Mapping[str, _LayerNode]
) -> None:
    """An average pool whose output reaches an integer layer through reshapes gets that
    layer's input grid right after it (exact: reshapes commute), so it runs on integers."""
    consumers = {t: [n for n, _ in c] for t, c in _consumers(ed.nodes).items()}
    producers = _producers(ed.nodes)
    for name, dl in layers.items():
        q = dl.act_q
        if q is None or q.axis is not None or q.clip or not dl.format.int_kernel:
            continue
        t = nodes[name].node.input[0]
        p = producers.get(t)
        while p is not None and p.op_type in ("Flatten", "Reshape", "Squeeze", "Identity"):
            if len(consumers.get(p.output[0], [])) != 1:
                break
            p = producers.get(p.input[0])
        if p is not None and p.op_type in _POOL_OPS and len(consumers[p.output[0]]) == 1:
            s, z = ed.qparams(f"{name}.act", q, "act")
            _requantize_output(ed, p, s, z)


@dataclass
class Analysis:
    """A plan's deployed layers located in the exported float graph, with output decisions."""

    plan: QuantPlan
    layers: dict[str, DeployedLayer]
    float_model: nn.Module
    proto: Any  # the float export (placeholder weights)
    nodes: dict[str, _LayerNode]
    requant: dict[str, Requant]
    grids: dict[str, IntQ] = field(default_factory=dict)  # quantized adds' grids, by target


def analyse(
    model: nn.Module,
    plan: QuantPlan | None,
    example_input: Tensor,
    calib_inputs: Iterable[Tensor] | None = None,
    *,
    float_output_ops: Sequence[str] = (),
) -> Analysis:
    """Locate every layer of a calibrated fake-quant ``model`` in its float ONNX export and
    choose how each integer layer's output is quantized (see the module doc).

    Args:
        float_output_ops: ONNX op types whose integer kernel may keep a float output.
    """
    plan = plan or QuantPlan()
    layers = deployed_layers(model, plan)
    fm = float_clone(model, _Mark)
    marked = _placeholder_clone(fm)
    proto = export_float(marked, example_input)
    nodes = _find_layer_nodes(proto, marked, quantizable_names(fm))
    missing = sorted(set(layers) - set(nodes))
    if missing:
        raise PlanError(
            f"plan layer(s) {missing} were not found in the exported graph (never "
            "called in forward?)"
        )
    repeated = sorted(n for n in layers if nodes[n].calls > 1)
    if repeated:
        raise PlanError(
            f"plan layer(s) {repeated} are called more than once in forward; "
            "deployment supports one call per quantized layer"
        )
    marks = _marks(proto)
    grids = {}
    for _, target in marks.values():
        grids[target] = activation_intq(model.get_submodule(target), target)
    chains = layer_chains(proto, {n: nodes[n] for n in layers}, marks)
    float_ok = {n for n in layers if nodes[n].node.op_type in float_output_ops}
    need = [n for n, dl in layers.items() if dl.format.int_kernel]
    inputs = [example_input] if calib_inputs is None else list(calib_inputs)
    ranges = output_ranges(model, need, inputs) if need else {}
    requant = plan_requant(layers, chains, ranges, float_output_ok=float_ok, grids=grids)
    return Analysis(plan, layers, fm, proto, nodes, requant, grids)


@dataclass
class QDQModel:
    """An in-memory QDQ model and what was decided while building it."""

    proto: Any  # onnx.ModelProto, complete (int8 initializers for every weight)
    layers: dict[str, DeployedLayer]
    requant: dict[str, Requant]
    formats: dict[str, str]
    packed: dict[str, PackedTensor]
    tails: dict[str, str]  # per layer, the plan-independent part of ``formats``


def build_qdq(
    model: nn.Module,
    plan: QuantPlan | None,
    example_input: Tensor,
    calib_inputs: Iterable[Tensor] | None = None,
) -> QDQModel:
    """The QDQ ONNX model of a calibrated fake-quant ``model`` under ``plan`` (in memory)."""
    from onnx import helper

    from autoquant.measure._pack import pack_bits

    an = analyse(model, plan, example_input, calib_inputs, float_output_ops=("Gemm", "MatMul"))
    layers, fm, proto, nodes, requant = an.layers, an.float_model, an.proto, an.nodes, an.requant
    plan = an.plan

    ed = _Editor(proto)
    consumers = _consumers(proto.graph.node)
    fm_modules = dict(fm.named_modules())
    # Order matters: output grids first, so that a Mark or a layer input already on its grid
    # gets no second QuantizeLinear (one grid per tensor, as ONNX Runtime fuses best).
    for name, rq in requant.items():
        _insert_requant(ed, name, nodes[name], rq, consumers)
    _convert_marks(ed, an.grids)
    _quantize_pools(ed, layers, nodes)
    # Only a direct DequantizeLinear input: ONNX Runtime fuses DQ -> Flatten -> Gemm worse.
    on_grid = _grids_of(ed.nodes, through_ops=False)
    for name, ln in nodes.items():
        _rewrite_layer(ed, name, ln, fm_modules[name], layers.get(name), on_grid)
    _quantize_add_operands(ed)
    _integer_pads(ed)
    # Other parameters (e.g. a BatchNorm without a conv before it) keep their exported names.
    params = dict(fm.named_parameters())
    for init_name in list(ed.inits):
        if init_name in params and init_name not in ed.roles:
            ed.init(init_name, params[init_name].detach().numpy(), "param")
    proto = ed.finish()

    packed = {}
    for name, dl in layers.items():
        q = dl.weight_q
        bits = dl.plan.weight.bits
        if q is not None and int(bits) < 8:
            key = f"{name}.weight_quantized"
            arr = np.ascontiguousarray(
                dl.weight_codes.T if nodes[name].transposed else dl.weight_codes
            )
            packed[key] = PackedTensor(
                key,
                int(bits),
                q.qmin,
                tuple(arr.shape),
                dl.format.weight.storage,
                pack_bits(arr, int(bits), q.qmin),
            )
    tails = {n: "out→" + _requant_text(r) for n, r in requant.items()}
    formats = plan_formats(plan, "onnxruntime", tails)
    stored = {i.name for i in proto.graph.initializer}
    roles = {k: v for k, v in ed.roles.items() if k in stored}
    helper.set_model_props(
        proto,
        {
            _ROLES_KEY: json.dumps(roles, sort_keys=True),
            "autoquant.plan": plan.to_json(),
            "autoquant.formats": json.dumps(formats),
        },
    )
    return QDQModel(proto, layers, requant, formats, packed, tails)


# ---------------------------------------------------------------------------------------
# Files: export, load, size
# ---------------------------------------------------------------------------------------


def export_onnx(
    model: nn.Module,
    plan: QuantPlan | None,
    path: str | Path,
    example_input: Tensor,
    *,
    calib_inputs: Iterable[Tensor] | None = None,
) -> ExportInfo:
    """Write the deployable QDQ ONNX model of a calibrated fake-quant ``model``.

    Args:
        model: the calibrated (and possibly fine-tuned) result of
            :func:`autoquant.transform.apply_plan`; a float model with ``plan=None``.
        plan: the plan ``model`` was built from.
        path: the ``.onnx`` file to write; a sidecar ``weights.packed.npz`` is written next to
            it when some weight has fewer than 8 bits (those weights are then left out of the
            ONNX file: load it with :func:`load_onnx`).
        example_input: an input batch (any batch size: the batch axis is dynamic).
        calib_inputs: inputs to observe output ranges on, for layers whose output needs its
            own 8-bit grid (see the module doc); default ``[example_input]``. Pass real
            calibration batches for an accurate artifact.

    Example:
        >>> from autoquant.transform import apply_plan, calibration, packed_size_bytes
        >>> from autoquant.types import QuantSpec
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2))
        >>> plan = QuantPlan.uniform(["0", "3"], QuantSpec(bits=4), QuantSpec(bits=8))
        >>> q = apply_plan(net, plan)
        >>> with calibration(q):
        ...     _ = q(torch.randn(8, 1, 4, 4))
        >>> info = export_onnx(q, plan, tempfile.mkdtemp() + "/m.onnx", torch.randn(1, 1, 4, 4))
        >>> info.sidecar.name, info.weight_bytes == packed_size_bytes(q, plan)
        ('weights.packed.npz', True)
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    qdq = build_qdq(model, plan, example_input, calib_inputs)
    proto = qdq.proto
    sidecar = path.parent / SIDECAR_NAME
    if qdq.packed:
        write_sidecar(sidecar, qdq.packed)
        proto = copy.deepcopy(proto)
        keep = [i for i in proto.graph.initializer if i.name not in qdq.packed]
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(keep)
        onnx.helper.set_model_props(
            proto,
            {**{p.key: p.value for p in proto.metadata_props}, "autoquant.sidecar": SIDECAR_NAME},
        )
    else:
        sidecar.unlink(missing_ok=True)
    onnx.save(proto, str(path))
    rows = artifact_size_rows(path)
    return ExportInfo(
        path=path,
        sidecar=sidecar if qdq.packed else None,
        formats=qdq.formats,
        requant={n: _requant_text(r) for n, r in qdq.requant.items()},
        weight_bytes=sum(r["bytes"] for r in rows if r["role"] in SIZE_ROLES),
        extra_bytes=sum(r["bytes"] for r in rows if r["role"] not in SIZE_ROLES),
        packed=sorted(qdq.packed),
    )


def load_onnx(path: str | Path) -> Any:
    """Load an exported model, restoring bit-packed sub-8-bit weights from the sidecar.

    Returns a complete ``onnx.ModelProto`` (int8/uint8 initializers) ready for ONNX Runtime.
    """
    import onnx
    from onnx import numpy_helper

    path = Path(path)
    proto = onnx.load(str(path))
    props = {p.key: p.value for p in proto.metadata_props}
    if "autoquant.sidecar" in props:
        sidecar = path.parent / props["autoquant.sidecar"]
        if not sidecar.exists():
            raise FileNotFoundError(f"{path} needs its packed weights {sidecar}")
        proto.graph.initializer.extend(
            numpy_helper.from_array(t.unpack(), name) for name, t in read_sidecar(sidecar).items()
        )
    return proto


def artifact_size_rows(path: str | Path) -> list[dict[str, Any]]:
    """Stored tensors of an exported model: name, role, where, bytes (as stored)."""
    import onnx
    from onnx import numpy_helper

    path = Path(path)
    proto = onnx.load(str(path))
    props = {p.key: p.value for p in proto.metadata_props}
    roles = json.loads(props.get(_ROLES_KEY, "{}"))
    rows = [
        {
            "tensor": i.name,
            "role": roles.get(i.name, "constant"),
            "file": path.name,
            "bytes": int(numpy_helper.to_array(i).nbytes),
        }
        for i in proto.graph.initializer
    ]
    if "autoquant.sidecar" in props:
        sidecar = path.parent / props["autoquant.sidecar"]
        rows += [
            {
                "tensor": n,
                "role": roles.get(n, "weight"),
                "file": sidecar.name,
                "bytes": int(t.data.nbytes),
            }
            for n, t in read_sidecar(sidecar).items()
        ]
    return rows


def artifact_weight_bytes(path: str | Path) -> int:
    """Bytes a user ships for the weights of an exported model: integer weights as stored
    (sub-8-bit ones bit-packed in the sidecar), their scales and zero-points, the input
    activations' scales and zero-points, biases and other float parameters.

    Equals :func:`autoquant.transform.packed_size_bytes` of the model and plan exported.
    Not counted: exporter constants (shapes), and the few deployment-only tensors of
    :attr:`ExportInfo.extra_bytes`. Container overhead (protobuf, zip headers) is not counted.
    """
    return sum(r["bytes"] for r in artifact_size_rows(path) if r["role"] in SIZE_ROLES)


def ort_session(
    proto_or_path: Any, threads: int = 1, optimized_path: str | Path | None = None
) -> Any:
    """An ONNX Runtime CPU session with ``threads`` intra-op threads (sequential execution)."""
    import onnxruntime as ort

    if isinstance(proto_or_path, (str, Path)):
        proto_or_path = load_onnx(proto_or_path)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(
        proto_or_path.SerializeToString(), so, providers=["CPUExecutionProvider"]
    )


def fused_op_types(proto_or_path: Any) -> Counter[str]:
    """Op types of the graph ONNX Runtime actually runs (after its QDQ fusions).

    Example:
        >>> fused_op_types(path)["QLinearConv"]  # doctest: +SKIP
        19
    """
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "optimized.onnx"
        ort_session(proto_or_path, 1, out)
        return Counter(n.op_type for n in onnx.load(str(out)).graph.node)


def run_onnx(session: Any, x: Tensor) -> np.ndarray:
    """First output of ``session`` for one input batch."""
    name = session.get_inputs()[0].name
    return session.run(None, {name: x.detach().float().numpy()})[0]
