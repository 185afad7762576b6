"""Pooled grids: an average pool feeding an integer layer runs on that layer's input grid."""

from __future__ import annotations

from autoquant.measure.onnx._context import Pass, QDQContext
from autoquant.measure.onnx._graph import consumer_nodes, grid_rule, producers

_POOL_OPS = ("GlobalAveragePool", "AveragePool")


def run(ctx: QDQContext) -> None:
    """Give an average pool that reaches an integer layer through grid-keeping ops (reshapes)
    that layer's input grid right after it (exact: those ops commute with quantization), so
    that it runs on integers.
    """
    ed, an = ctx.editor, ctx.analysis
    readers = consumer_nodes(ed.nodes)
    made_by = producers(ed.nodes)
    for name, dl in an.layers.items():
        q = dl.act_q
        if q is None or q.axis is not None or q.clip or not dl.format.int_kernel:
            continue
        p = made_by.get(an.nodes[name].data)
        while p is not None and grid_rule(p) is not None:
            if len(readers.get(p.output[0], [])) != 1:
                break
            p = made_by.get(p.input[0])
        if p is not None and p.op_type in _POOL_OPS and len(readers[p.output[0]]) == 1:
            s, z = ed.qparams(f"{name}.act", q, "act")
            ed.requantize_output(p, s, z)


PASS = Pass("pooled_grids", run)
