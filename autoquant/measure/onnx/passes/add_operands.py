"""Add operands: an operand reaching a grid through slices and zero pads is kept on it."""

from __future__ import annotations

from autoquant.measure.onnx._context import Pass, QDQContext
from autoquant.measure.onnx._graph import attr, consumer_nodes, grid_rule, producers


def run(ctx: QDQContext) -> None:
    """Give each operand of a quantized add that reaches a DequantizeLinear through grid-keeping
    ops (a shortcut's slice and zero pad) that grid again after each of those ops: exact, and
    ONNX Runtime then runs the ops and the add on integers.

    A quantized add is one whose output goes only to QuantizeLinear, possibly through one ReLU.
    """
    ed = ctx.editor
    readers = consumer_nodes(ed.nodes)
    made_by = producers(ed.nodes)
    for add in [n for n in ed.nodes if n.op_type == "Add" and len(n.input) == 2]:
        cons = readers.get(add.output[0], [])
        if len(cons) == 1 and cons[0].op_type == "Relu":
            cons = readers.get(cons[0].output[0], [])
        if not cons or any(c.op_type != "QuantizeLinear" for c in cons):
            continue
        for t in add.input:
            chain = []
            p = made_by.get(t)
            while p is not None and grid_rule(p) is not None:
                chain.append(p)
                p = made_by.get(p.input[0])
            if not chain or p is None or p.op_type != "DequantizeLinear" or attr(p, "axis", None):
                continue
            for node in chain:
                ed.requantize_output(node, p.input[1], p.input[2])


PASS = Pass("add_operands", run)
