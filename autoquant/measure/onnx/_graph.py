"""Reading an ONNX graph: attributes, producers and consumers, grids, layer output chains."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import onnx
from onnx import helper

from autoquant.measure._requant import layer_grid

MARK_DOMAIN = "autoquant"
#: Op type of the marks where the fake-quant model calls a quantized add's quantizer.
ADD_MARK = "Mark"

# Ops through which per-tensor quantization commutes exactly (monotone or pure data
# movement, zero kept at zero), so a producer may quantize onto its consumer's grid.
COMMUTING_OPS = frozenset(
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
GRID_KEEPING_OPS = COMMUTING_OPS | {"Slice", "Pad"}
RESHAPE_OPS = ("Flatten", "Reshape", "Squeeze", "Identity")


def attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    """An attribute's value, or ``default``."""
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def consumers(nodes: Iterable[onnx.NodeProto]) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    """``{tensor: [(node, input index), ...]}`` of the nodes reading each tensor."""
    out: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in nodes:
        for i, t in enumerate(node.input):
            out.setdefault(t, []).append((node, i))
    return out


def consumer_nodes(nodes: Iterable[onnx.NodeProto]) -> dict[str, list[onnx.NodeProto]]:
    """``{tensor: [node, ...]}`` of the nodes reading each tensor."""
    return {t: [n for n, _ in c] for t, c in consumers(nodes).items()}


def producers(nodes: Iterable[onnx.NodeProto]) -> dict[str, onnx.NodeProto]:
    """``{tensor: node}`` of the node writing each tensor."""
    return {t: n for n in nodes for t in n.output}


def is_mark(node: onnx.NodeProto, op_type: str = ADD_MARK) -> bool:
    return node.domain == MARK_DOMAIN and node.op_type == op_type


def mark_target(node: onnx.NodeProto) -> str:
    """The ``name`` attribute of a mark: a quantizer's or a layer's FQN."""
    return attr(node, "name", b"").decode()


def add_marks(proto: onnx.ModelProto) -> dict[int, tuple[onnx.NodeProto, str]]:
    """``id(node) -> (node, quantizer target)`` of the graph's add marks."""
    return {id(n): (n, mark_target(n)) for n in proto.graph.node if is_mark(n)}


def is_zero_pad(node: onnx.NodeProto) -> bool:
    """A constant ``Pad`` without a pad value (pads with zeros)."""
    return attr(node, "mode", b"constant") in (b"constant", "constant") and (
        len(node.input) < 3 or not node.input[2]
    )


def grids_of(nodes: list[onnx.NodeProto], through_ops: bool = True) -> dict[str, str]:
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
            if n.op_type in COMMUTING_OPS and n.input[0] in on and n.output[0] not in on:
                on[n.output[0]] = on[n.input[0]]
                changed = True
    return on


def layer_chains(
    proto: onnx.ModelProto,
    nodes: Mapping[str, Any],
    marks: Mapping[int, tuple[onnx.NodeProto, str]] | None = None,
) -> dict[str, tuple[str | None, bool]]:
    """Per layer: the one grid (see :func:`~autoquant.measure._requant.layer_grid`) that every
    consumer of its output reads through commuting ops (or None), and whether the output's only
    consumer is a ReLU. Consumers are layers (their input grid) and ``marks`` (an add's
    quantizer). ``nodes`` maps each layer to its located node (``.node``)."""
    graph = proto.graph
    uses = consumers(graph.node)
    outputs = {o.name for o in graph.output}
    layer_of = {id(ln.node): name for name, ln in nodes.items()}
    mark_of = {k: target for k, (_, target) in (marks or {}).items()}
    chains: dict[str, tuple[str | None, bool]] = {}
    for name, ln in nodes.items():
        t = ln.node.output[0]
        first = uses.get(t, [])
        relu = len(first) == 1 and first[0][0].op_type == "Relu" and t not in outputs
        grids: set[str] = set()
        pending, ok = [t], True
        while pending and ok:
            t = pending.pop()
            if t in outputs or not uses.get(t):
                ok = False
            for node, idx in uses.get(t, []):
                if id(node) in layer_of and idx == 0:
                    grids.add(layer_grid(layer_of[id(node)]))
                elif id(node) in mark_of:
                    grids.add(mark_of[id(node)])
                elif node.op_type in COMMUTING_OPS and idx == 0 and len(node.output) == 1:
                    pending.append(node.output[0])
                else:
                    ok = False
        chains[name] = (grids.pop() if ok and len(grids) == 1 else None, relu)
    return chains
