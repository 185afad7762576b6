"""Convert marks: each quantized add's quantizer call becomes QuantizeLinear -> DequantizeLinear."""

from __future__ import annotations

from autoquant.measure._requant import grid_prefix
from autoquant.measure.onnx._context import Pass, QDQContext
from autoquant.measure.onnx._graph import grids_of, is_mark, mark_target


def run(ctx: QDQContext) -> None:
    """Replace each add mark by QuantizeLinear -> DequantizeLinear on its quantizer's grid.

    A mark whose input is on that grid already (an earlier layer's output requantized onto it)
    becomes an Identity: one grid per tensor, as ONNX Runtime fuses best.
    """
    ed, grids = ctx.editor, ctx.analysis.grids
    on_grid = grids_of(ed.nodes)
    for node in [n for n in ed.nodes if is_mark(n)]:
        target = mark_target(node)
        shared = target.endswith(".act_fq")  # a layer's input grid: counted in the size
        s, z = ed.qparams(grid_prefix(target), grids[target], "act" if shared else None)
        ed.nodes.remove(node)
        if on_grid.get(node.input[0]) == grid_prefix(target):
            ed.add("Identity", [node.input[0]], [node.output[0]])
        else:
            ed.qdq(node.input[0], node.output[0], s, z, None)


PASS = Pass("convert_marks", run)
