"""Integer pads: a zero Pad between two tensors on one grid pads the integer tensor."""

from __future__ import annotations

from autoquant.measure.onnx._context import Pass, QDQContext
from autoquant.measure.onnx._graph import attr, consumers, is_zero_pad, producers


def run(ctx: QDQContext) -> None:
    """Turn ``DequantizeLinear -> Pad(zeros) -> QuantizeLinear`` on one per-tensor grid into a
    Pad of the integer tensor by its zero point: exact, and ONNX Runtime, which fuses no QDQ
    around a Pad, then runs no float op there (a shortcut's channel padding, a padded stem).
    """
    ed = ctx.editor
    uses = consumers(ed.nodes)
    made_by = producers(ed.nodes)
    for pad in [n for n in ed.nodes if n.op_type == "Pad" and is_zero_pad(n)]:
        dq = made_by.get(pad.input[0])
        after = uses.get(pad.output[0], [])
        if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 3 or len(after) != 1:
            continue
        q = after[0][0]
        if q.op_type != "QuantizeLinear" or list(q.input[1:]) != list(dq.input[1:]):
            continue
        if attr(dq, "axis", None) is not None or attr(q, "axis", None) is not None:
            continue
        pads = pad.input[1]
        del pad.input[:]
        pad.input.extend([dq.input[0], pads, dq.input[2]])
        pad.output[0] = q.output[0]
        ed.nodes.remove(q)
        if len(uses[dq.output[0]]) == 1:
            ed.nodes.remove(dq)


PASS = Pass("integer_pads", run)
