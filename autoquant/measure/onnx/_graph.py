"""Reading an ONNX graph: attributes, producers and consumers, grids, layer output chains."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import onnx
from onnx import helper

from autoquant.measure._requant import layer_grid
from autoquant.transform import (
    ONNX_GRID_RULES,
    RELU_RULE,
    SHAPE_ONLY_ONNX_OPS,
    GridRule,
    GridUse,
    reached_grid,
)

MARK_DOMAIN = "autoquant"
#: Op type of the marks where the fake-quant model calls a quantized add's quantizer.
ADD_MARK = "Mark"


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


def grid_rule(node: onnx.NodeProto) -> GridRule | None:
    """The rule (:data:`~autoquant.transform.GRID_RULES`) by which ``node`` keeps its first
    input's grid, or None."""
    rule = ONNX_GRID_RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
    if rule is None or (rule.zero_pad_only and not is_zero_pad(node)) or len(node.output) != 1:
        return None
    return rule


def grids_of(nodes: list[onnx.NodeProto], through_ops: bool = True) -> dict[str, str]:
    """``{tensor: grid prefix}`` of the tensors on a per-tensor grid: DequantizeLinear outputs
    and (``through_ops``) what reaches them through grid-keeping ops."""
    on = {
        n.output[0]: n.input[1][: -len("_scale")]
        for n in nodes
        if n.op_type == "DequantizeLinear" and n.input[1].endswith("_scale") and not n.attribute
    }
    changed = through_ops
    while changed:
        changed = False
        for n in nodes:
            if grid_rule(n) and n.input[0] in on and n.output[0] not in on:
                on[n.output[0]] = on[n.input[0]]
                changed = True
    return on


def layer_chains(
    proto: onnx.ModelProto,
    nodes: Mapping[str, Any],
    marks: Mapping[int, tuple[onnx.NodeProto, str]] | None = None,
) -> dict[str, tuple[str | None, bool]]:
    """Per layer: the one grid (see :func:`~autoquant.measure._requant.layer_grid`) that every
    reader of its output reads it on through grid-keeping ops
    (:func:`~autoquant.transform.reached_grid`), or None, and whether the output's only reader
    is a ReLU. Readers with a grid are layers (their input grid) and ``marks`` (an add's
    quantizer). ``nodes`` maps each layer to its :class:`~autoquant.measure.onnx.LayerNode`."""
    graph = proto.graph
    readers = consumers(graph.node)
    outputs = {o.name for o in graph.output}

    def value_readers(t: str) -> list[tuple[onnx.NodeProto, int]]:
        return [(n, i) for n, i in readers.get(t, []) if n.op_type not in SHAPE_ONLY_ONNX_OPS]

    layer_of = {id(ln.node): name for name, ln in nodes.items()}
    mark_of = {k: target for k, (_, target) in (marks or {}).items()}

    def uses(t: Any) -> list[GridUse]:
        if t in outputs:
            return []
        out = []
        for node, idx in value_readers(t):
            if id(node) in layer_of and idx == nodes[layer_of[id(node)]].op.data_input:
                out.append(GridUse(grid=layer_grid(layer_of[id(node)])))
            elif id(node) in mark_of:
                out.append(GridUse(grid=mark_of[id(node)]))
            elif idx == 0 and grid_rule(node) is not None:
                out.append(GridUse(passes=node.output[0]))
            else:
                out.append(GridUse())
        return out

    chains: dict[str, tuple[str | None, bool]] = {}
    for name, ln in nodes.items():
        t = ln.node.output[0]
        first = value_readers(t)
        relu = len(first) == 1 and grid_rule(first[0][0]) is RELU_RULE and t not in outputs
        chains[name] = (reached_grid(t, uses), relu)
    return chains
