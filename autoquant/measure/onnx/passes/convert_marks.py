"""Convert marks: each quantizer call outside a layer's node becomes QuantizeLinear ->
DequantizeLinear."""

from __future__ import annotations

import numpy as np

from autoquant.measure._requant import grid_prefix, is_layer_grid
from autoquant.measure.onnx._context import Pass, QDQContext
from autoquant.measure.onnx._graph import grids_of, is_mark, mark_target


def run(ctx: QDQContext) -> None:
    """Replace each mark (a quantized add's quantizer, or an attention matmul's operand
    quantizer) by QuantizeLinear -> DequantizeLinear on its quantizer's grid, after a Clip to
    the grid when it is narrower than 8 bits.

    A mark whose input is on that grid already (an earlier layer's output requantized onto it)
    becomes an Identity: one grid per tensor, as ONNX Runtime fuses best.
    """
    ed, grids = ctx.editor, ctx.analysis.grids
    on_grid = grids_of(ed.nodes)
    for node in [n for n in ed.nodes if is_mark(n)]:
        target = mark_target(node)
        prefix, q = grid_prefix(target), grids[target]
        # A layer's own grid is counted in the size (act_scale/act_zero_point rows).
        s, z = ed.qparams(prefix, q, "act" if is_layer_grid(target) else None)
        ed.nodes.remove(node)
        x = node.input[0]
        if on_grid.get(x) == prefix:
            ed.add("Identity", [x], [node.output[0]])
            continue
        if q.clip:
            lo, hi = (np.asarray(v, np.float32) for v in q.clip_range())
            bounds = [
                ed.init(f"{prefix}_clip_{k}", v, "extra") for k, v in (("min", lo), ("max", hi))
            ]
            x = ed.add("Clip", [x, *bounds], [f"{prefix}_clipped"]).output[0]
        ed.qdq(x, node.output[0], s, z, None)


PASS = Pass("convert_marks", run)
