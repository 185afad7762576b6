"""Stem channels: zero input channels for ONNX Runtime's direct int8 conv kernel."""

from __future__ import annotations

import numpy as np

from autoquant.measure._deploy import DeployedLayer
from autoquant.measure.onnx._context import Pass, QDQContext
from autoquant.measure.onnx._export import LayerNode
from autoquant.measure.onnx._graph import attr, producers


def extra_channels(ln: LayerNode, dl: DeployedLayer | None) -> int:
    """Input channels to append to a 2-D conv (0 when the direct kernel does not apply).

    MLAS's direct int8 conv (``ConvSym``, on x86 for uint8 inputs and int8 weights with zero
    zero-points) needs input channels in multiples of 4 and 16+ output channels in multiples of
    8; else ONNX Runtime falls back to im2col and a GEMM, 2-3x slower on an RGB stem.
    """
    if (
        dl is None
        or ln.node.op_type != "Conv"
        or attr(ln.node, "group", 1) != 1
        or dl.weight_q is None
        or dl.weight_codes is None
        or dl.weight_codes.ndim != 4
        or dl.weight_q.storage != "int8"
        or np.any(dl.weight_q.zero_point != 0)
        or dl.act_q is None
        or dl.act_q.axis is not None
        or dl.act_q.storage != "uint8"
    ):
        return 0
    o, c = dl.weight_codes.shape[:2]
    return -c % 4 if o >= 16 and o % 8 == 0 else 0


def run(ctx: QDQContext) -> None:
    """Give a symmetric int8 conv whose input channels are not a multiple of 4 (an RGB stem)
    zero channels: its weight codes are padded in the graph with zeros (stored unpadded; ONNX
    Runtime folds the pad when it loads the model) and its input with the zero point (an
    integer Pad after the integer-pads pass). No value changes.
    """
    ed, an = ctx.editor, ctx.analysis
    made_by = producers(ed.nodes)
    for name, ln in an.nodes.items():
        dl = an.layers.get(name)
        extra = extra_channels(ln, dl)
        if not extra:
            continue
        pads = np.zeros(2 * dl.weight_codes.ndim, np.int64)
        pads[dl.weight_codes.ndim + 1] = extra  # end of the channel axis
        # Placed where the layer's own rewrite put its nodes and initializers (see Editor.init).
        stem_pads = ed.init(
            f"{name}.channel_pads", pads, "extra", before=f"{name}.weight_quantized"
        )
        dq = made_by[ln.node.input[ln.op.weight_input]]  # the weight's DequantizeLinear
        ed.add(
            "Pad",
            [dq.input[0], stem_pads],
            [f"{name}.weight_quantized_padded"],
            at=ed.nodes.index(dq),
        )
        dq.input[0] = f"{name}.weight_quantized_padded"
        s, z = ed.qparams(f"{name}.act", dl.act_q, "act")
        x = ln.data
        at = 1 + max(ed.nodes.index(dq), ed.nodes.index(made_by[x]) if x in made_by else -1)
        ed.add("Pad", [x, stem_pads], [f"{name}.input_padded"], at=at)
        ed.qdq(f"{name}.input_padded", f"{name}.input_padded_dequantized", s, z, None, at=at + 1)
        ln.node.input[ln.op.data_input] = f"{name}.input_padded_dequantized"


PASS = Pass("stem_channels", run)
