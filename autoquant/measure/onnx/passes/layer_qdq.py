"""Layer QDQ: each layer's real weight and bias, and QDQ around its inputs when quantized."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper
from torch import nn

from autoquant.measure._deploy import DeployedLayer, IntQ
from autoquant.measure._layers import deployment_of
from autoquant.measure.onnx._context import Pass, QDQContext
from autoquant.measure.onnx._editor import Editor
from autoquant.measure.onnx._export import LayerNode
from autoquant.measure.onnx._graph import grids_of


def _weight_axis(ln: LayerNode, axis: int | None) -> int | None:
    if axis is None or not ln.transposed:
        return axis
    return 1 - axis  # a 2-D weight stored as W^T


def _lookup(ed: Editor, name: str, ln: LayerNode, dl: DeployedLayer) -> None:
    """A lookup (``Gather``) of integer rows: the codes (and per-row scales and zero-points)
    are gathered, then only the rows read are dequantized, as ``DequantizeLinear`` computes it:
    ``(q - zp) * scale`` (exact; the whole table is never dequantized)."""
    node, q = ln.node, dl.weight_q
    ids = node.input[ln.op.data_input]
    codes = ed.init(f"{name}.weight_quantized", dl.weight_codes, "weight")
    ed.nodes.remove(node)
    out = node.output[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    rows = ed.add("Gather", [codes, ids], [f"{name}.rows_quantized"], **attrs).output[0]
    if q.axis != 0:  # one grid, or one per column: the last axis of the gathered rows
        s, z = ed.qparams(f"{name}.weight", q, "weight")
        ed.add("DequantizeLinear", [rows, s, z], [out], **({} if q.axis is None else {"axis": -1}))
        return
    # Per-row qparams as [V, 1] columns: gathered with the rows, they broadcast along them.
    column = {**attrs, "axis": 0}
    scale = ed.init(f"{name}.weight_scale", q.scale.reshape(-1, 1), "weight_scale")
    zp = ed.init(
        f"{name}.weight_zero_point", q.zero_point_array().reshape(-1, 1), "weight_zero_point"
    )
    ed.add("Gather", [scale, ids], [f"{name}.rows_scale"], **column)
    ed.add("Gather", [zp, ids], [f"{name}.rows_zero_point"], **column)
    ed.add("Cast", [rows], [f"{name}.rows_codes"], to=TensorProto.FLOAT)
    ed.add("Cast", [f"{name}.rows_zero_point"], [f"{name}.rows_zp"], to=TensorProto.FLOAT)
    ed.add("Sub", [f"{name}.rows_codes", f"{name}.rows_zp"], [f"{name}.rows_centered"])
    ed.add("Mul", [f"{name}.rows_centered", f"{name}.rows_scale"], [out])


def _weight(
    ed: Editor, name: str, ln: LayerNode, fm_layer: nn.Module, dl: DeployedLayer | None
) -> None:
    node, w, b = ln.node, ln.op.weight_input, ln.op.bias_input
    if ln.op.lookup and dl is not None and dl.weight_q is not None:
        _lookup(ed, name, ln, dl)
        return

    def oriented(arr: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(arr.T if ln.transposed else arr)

    weight = fm_layer.weight.detach().float().numpy()
    bias = getattr(fm_layer, "bias", None)
    if bias is not None and b is not None and len(node.input) > b:
        node.input[b] = ed.init(f"{name}.bias", bias.detach().float().numpy(), "bias")
    if dl is None or dl.format.weight.storage == "fp32":
        node.input[w] = ed.init(
            f"{name}.weight", oriented(weight), "weight" if dl is not None else "param"
        )
    elif dl.format.weight.storage == "fp16":
        w16 = ed.init(f"{name}.weight_fp16", oriented(weight).astype(np.float16), "weight")
        ed.add("Cast", [w16], [f"{name}.weight_float"], to=TensorProto.FLOAT)
        node.input[w] = f"{name}.weight_float"
    else:
        q, values = dl.weight_q, dl.weight_codes
        if dl.format.saturates and q.storage == "int8":
            # u8×s8 kernels saturate on this CPU; the same grid as uint8 runs U8U8, exactly.
            values = (values.astype(np.int16) + 128).astype(np.uint8)
            q = IntQ(q.scale, q.zero_point + 128, q.qmin + 128, q.qmax + 128, q.axis, "uint8")
        codes = ed.init(f"{name}.weight_quantized", oriented(values), "weight")
        s, z = ed.qparams(f"{name}.weight", q, "weight")
        axis = _weight_axis(ln, q.axis)
        ed.add(
            "DequantizeLinear",
            [codes, s, z],
            [f"{name}.weight_dequantized"],
            **({} if axis is None else {"axis": axis}),
        )
        node.input[w] = f"{name}.weight_dequantized"


def _input(
    ed: Editor, name: str, ln: LayerNode, fm_layer: nn.Module, dl: DeployedLayer, on_grid: dict
) -> None:
    node, d = ln.node, ln.op.data_input
    rank = deployment_of(fm_layer).input_rank  # type: ignore[union-attr]
    x = node.input[d]
    a = dl.plan.activation
    if a.bits == "fp16":
        ed.add("Cast", [x], [f"{name}.input_fp16"], to=TensorProto.FLOAT16)
        ed.add("Cast", [f"{name}.input_fp16"], [f"{name}.input_fp16_float"], to=TensorProto.FLOAT)
        node.input[d] = f"{name}.input_fp16_float"
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
                ndim = rank or fm_layer.weight.ndim
                shape = (1, -1) + (1,) * (ndim - 2)
                lo_t = ed.init(
                    f"{name}.act_clip_min", lo.astype(np.float32).reshape(shape), "extra"
                )
                ed.add("Max", [x, lo_t], [f"{name}.input_clipped_lo"])
                hi_t = ed.init(
                    f"{name}.act_clip_max", hi.astype(np.float32).reshape(shape), "extra"
                )
                ed.add("Min", [f"{name}.input_clipped_lo", hi_t], [f"{name}.input_clipped"])
            x = f"{name}.input_clipped"
        s, z = ed.qparams(f"{name}.act", q, "act")
        ed.qdq(x, f"{name}.input_dequantized", s, z, q.axis)
        node.input[d] = f"{name}.input_dequantized"


def run(ctx: QDQContext) -> None:
    """Write each layer's real weight and bias; a quantized weight becomes an integer
    initializer read through DequantizeLinear, a quantized input gets QuantizeLinear ->
    DequantizeLinear (after a Clip to its own grid when narrower than 8 bits).

    Integer weights are int8 (uint8 when asymmetric, or when this CPU's u8×s8 kernels saturate:
    codes +128 for an exact U8U8 kernel), per channel along the output axis; fp16 tensors pass
    a float16 round trip; an input already on the layer's grid (a DequantizeLinear right before
    it) gets no second QuantizeLinear. A lookup (an embedding's ``Gather``) gathers its integer
    rows and dequantizes only those.
    """
    ed, an = ctx.editor, ctx.analysis
    # Only a direct DequantizeLinear input: ONNX Runtime fuses DQ -> Flatten -> Gemm worse.
    on_grid = grids_of(ed.nodes, through_ops=False)
    modules = dict(an.float_model.named_modules())
    for name, ln in an.nodes.items():
        dl = an.layers.get(name)
        _weight(ed, name, ln, modules[name], dl)
        if dl is not None:
            _input(ed, name, ln, modules[name], dl, on_grid)


PASS = Pass("layer_qdq", run)
