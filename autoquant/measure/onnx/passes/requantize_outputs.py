"""Requantize outputs: each integer layer's output gets the grid its analysis chose."""

from __future__ import annotations

from autoquant.measure._requant import Requant
from autoquant.measure.onnx._context import Pass, QDQContext
from autoquant.measure.onnx._graph import consumers


def requant_text(rq: Requant) -> str:
    """How a layer's output is quantized, e.g. ``exact (onto conv2's input grid)``."""
    return {
        "exact": f"exact (onto {rq.consumer}'s input grid)"
        if rq.consumer
        else f"exact (onto the {rq.grid} grid)",
        "calibrated": "calibrated uint8" + (" after ReLU" if rq.after_relu else ""),
        "float": "float",
    }[rq.mode]


def run(ctx: QDQContext) -> None:
    """Quantize each integer layer's output onto its chosen grid (exact or calibrated).

    An exact grid is the next layer's or quantized add's, reached through ops that commute with
    quantization; a calibrated one is an 8-bit grid of the observed range, after the following
    ReLU when there is one. A layer kept with a float output (a Gemm: QGemm) gets its bias added
    after the kernel instead, as ONNX Runtime fuses it only without a float bias.
    """
    ed, an = ctx.editor, ctx.analysis
    uses = consumers(ed.nodes)
    for name, rq in an.requant.items():
        node, b = an.nodes[name].node, an.nodes[name].op.bias_input
        if rq.mode == "float":
            if b is not None and len(node.input) > b and node.input[b]:
                bias = node.input[b]
                del node.input[b]
                t = node.output[0]
                node.output[0] = f"{name}.output_no_bias"
                ed.add("Add", [node.output[0], bias], [t])
            continue
        producer = uses[node.output[0]][0][0] if rq.after_relu else node
        t = producer.output[0]
        raw = f"{name}.output_float"
        producer.output[0] = raw
        if rq.mode == "exact":
            s, z = f"{rq.grid}_scale", f"{rq.grid}_zero_point"
        else:
            s, z = ed.qparams(f"{name}.output", rq.q)
        ed.qdq(raw, t, s, z, None)


PASS = Pass("requantize_outputs", run)
