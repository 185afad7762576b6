"""Each pass of the QDQ export alone, on a tiny graph: what it rewrites, and that ONNX Runtime's
outputs do not change where the pass is exact."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import pytest
import torch
from measure_models import quantized
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from autoquant.measure._deploy import IntQ
from autoquant.measure.onnx import (
    QDQ_PASSES,
    Analysis,
    Editor,
    QDQContext,
    analyse,
    ort_session,
    without,
)
from autoquant.measure.onnx.passes import (
    add_operands,
    convert_marks,
    float_params,
    integer_pads,
    layer_qdq,
    pooled_grids,
    requantize_outputs,
    stem_channels,
)
from autoquant.types import LayerPlan, QuantPlan, QuantSpec

W8 = QuantSpec(bits=8, granularity="per_channel")
A8 = QuantSpec(bits=8, symmetric=False)
GRID = IntQ(np.array(0.05, np.float32), np.array(7, np.int64), 0, 255, None, "uint8")


# Hand-built graphs --------------------------------------------------------------------------
def _model(nodes: list, inits: dict[str, np.ndarray], shape: Sequence[int]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _grid_inits(prefix: str = "g") -> dict[str, np.ndarray]:
    return {f"{prefix}_scale": GRID.scale, f"{prefix}_zero_point": GRID.zero_point_array()}


def _qdq(x: str, out: str, prefix: str = "g") -> list:
    s, z = f"{prefix}_scale", f"{prefix}_zero_point"
    return [
        helper.make_node("QuantizeLinear", [x, s, z], [out + "_q"]),
        helper.make_node("DequantizeLinear", [out + "_q", s, z], [out]),
    ]


def _run_pass(proto: onnx.ModelProto, run: object, analysis: Analysis | None = None) -> object:
    ed = Editor(proto)
    run(QDQContext(analysis, ed))  # type: ignore[operator, arg-type]
    return ed.finish()


def _ops(proto: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in proto.graph.node]


def _out(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort_session(proto).run(None, {"x": x})[0]


X = np.random.default_rng(0).normal(size=(2, 3, 4, 4)).astype(np.float32)


def _padded(value: float | None = None) -> onnx.ModelProto:
    pads = np.array([0, 1, 0, 0, 0, 1, 0, 0], np.int64)
    inits = {**_grid_inits(), "pads": pads}
    pad_inputs = ["a", "pads"]
    if value is not None:
        inits["value"] = np.array(value, np.float32)
        pad_inputs.append("value")
    nodes = [
        *_qdq("x", "a"),
        helper.make_node("Pad", pad_inputs, ["p"], mode="constant"),
        *_qdq("p", "y"),
    ]
    return _model(nodes, inits, X.shape)


def test_integer_pads_pads_the_integer_tensor_with_the_zero_point() -> None:
    before = _padded()
    after = _run_pass(_padded(), integer_pads.run)
    assert _ops(before) == ["QuantizeLinear", "DequantizeLinear", "Pad", "QuantizeLinear"] + [
        "DequantizeLinear"
    ]
    assert _ops(after) == ["QuantizeLinear", "Pad", "DequantizeLinear"]
    pad = next(n for n in after.graph.node if n.op_type == "Pad")
    assert pad.input[2] == "g_zero_point"  # padded with code 7: the value 0
    np.testing.assert_array_equal(_out(after, X), _out(before, X))
    assert (_out(after, X)[:, 0] == 0).all()


def test_integer_pads_leaves_a_pad_by_another_value() -> None:
    assert _ops(_run_pass(_padded(1.0), integer_pads.run)) == _ops(_padded(1.0))


def test_add_operands_puts_a_shortcuts_slice_and_pad_on_its_grid() -> None:
    pads = np.array([0, 0, 0, 0, 0, 0, 0, 0], np.int64)
    nodes = [
        *_qdq("x", "a"),
        helper.make_node(
            "Slice",
            ["a", "starts", "ends"],
            ["s"],
        ),
        helper.make_node("Pad", ["s", "pads"], ["p"], mode="constant"),
        helper.make_node("Add", ["p", "x"], ["sum"]),
        helper.make_node("QuantizeLinear", ["sum", "g_scale", "g_zero_point"], ["y_q"]),
        helper.make_node("DequantizeLinear", ["y_q", "g_scale", "g_zero_point"], ["y"]),
    ]
    inits = {
        **_grid_inits(),
        "pads": pads,
        "starts": np.array([0], np.int64),
        "ends": np.array([4], np.int64),
    }
    proto = _model(nodes, inits, X.shape)
    before = _out(proto, X)
    after = _run_pass(proto, add_operands.run)
    # Slice and Pad outputs each pass QuantizeLinear -> DequantizeLinear on the operand's grid.
    assert _ops(after).count("QuantizeLinear") == 4
    for op in ("Slice", "Pad"):
        node = next(n for n in after.graph.node if n.op_type == op)
        q = next(n for n in after.graph.node if n.input and n.input[0] == node.output[0])
        assert q.op_type == "QuantizeLinear" and q.input[1] == "g_scale"
    np.testing.assert_array_equal(_out(after, X), before)  # the values were on the grid


def test_convert_marks_quantizes_a_mark_or_drops_it_on_its_grid() -> None:
    def marked(on_grid: bool) -> onnx.ModelProto:
        first = _qdq("x", "a", prefix="m") if on_grid else [helper.make_node("Relu", ["x"], ["a"])]
        mark = helper.make_node("Mark", ["a"], ["y"], domain="autoquant", name="mk")
        mark.attribute.append(helper.make_attribute("name", "m"))
        proto = _model([*first, mark], _grid_inits("m") if on_grid else {}, X.shape)
        proto.opset_import.append(helper.make_opsetid("autoquant", 1))
        return proto

    analysis = Analysis(QuantPlan(), {}, nn.Identity(), None, {}, {}, {"m": GRID})  # type: ignore[arg-type]
    converted = _run_pass(marked(False), convert_marks.run, analysis)
    assert _ops(converted) == ["Relu", "QuantizeLinear", "DequantizeLinear"]
    ref = GRID.scale * (np.clip(np.round(np.maximum(X, 0) / GRID.scale) + 7, 0, 255) - 7)
    np.testing.assert_allclose(_out(converted, X), ref, rtol=1e-6)
    again = _run_pass(marked(True), convert_marks.run, analysis)
    assert _ops(again) == ["QuantizeLinear", "DequantizeLinear", "Identity"]


# Passes that read the analysis: tiny models -----------------------------------------------
def _analysed(model: nn.Module, plan: QuantPlan, shape: tuple[int, ...]) -> tuple:
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(8, *shape, generator=gen) for _ in range(2)]
    q = quantized(model.eval(), plan, batches)
    an = analyse(q, plan, batches[0][:1], batches)
    return q, an, batches[0]


def _only(an: Analysis, *runs: object) -> onnx.ModelProto:
    ctx = QDQContext(an, Editor(an.proto))
    for run in runs:
        run(ctx)  # type: ignore[operator]
    return ctx.editor.finish()


def _node_reading(proto: onnx.ModelProto, tensor: str) -> onnx.NodeProto:
    return next(n for n in proto.graph.node if tensor in n.input)


def test_requantize_outputs_puts_each_output_on_the_next_grid_after_the_relu() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.Flatten())
    model.append(nn.Linear(4 * 4 * 4, 3))
    plan = QuantPlan({n: LayerPlan(W8, A8) for n in ("0", "2", "4")})
    _, an, _ = _analysed(model, plan, (2, 6, 6))
    assert an.requant["0"].mode == "exact" and an.requant["0"].after_relu
    ed = Editor(an.proto)
    requantize_outputs.run(QDQContext(an, ed))  # the grid's qparams come with layer_qdq
    relu = next(n for n in ed.nodes if n.op_type == "Relu")
    q = next(n for n in ed.nodes if relu.output[0] in n.input)
    assert q.op_type == "QuantizeLinear" and q.input[1] == "2.act_scale"
    # The last Linear keeps a float output (QGemm): its bias moves to an Add after the kernel.
    gemm = next(n for n in ed.nodes if n.op_type == "Gemm")
    assert len(gemm.input) == 2
    assert next(n for n in ed.nodes if gemm.output[0] in n.input).op_type == "Add"


def test_layer_qdq_stores_the_integer_codes_and_quantizes_inputs() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1))
    plan = QuantPlan(
        {
            "0": LayerPlan(QuantSpec(bits=4, granularity="per_channel"), QuantSpec(bits=6)),
            "2": LayerPlan(QuantSpec(bits="fp16"), QuantSpec(bits="fp16")),
        }
    )
    _, an, x = _analysed(model, plan, (2, 6, 6))
    proto = _only(an, layer_qdq.run)
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    np.testing.assert_array_equal(inits["0.weight_quantized"], an.layers["0"].weight_codes)
    assert "0.weight" not in inits and inits["2.weight_fp16"].dtype == np.float16
    conv = next(n for n in proto.graph.node if n.name == an.nodes["0"].node.name)
    assert conv.input[0] == "0.input_dequantized" and conv.input[1] == "0.weight_dequantized"
    ops = _ops(proto)
    assert ops.count("Clip") == 1  # the 6-bit input is clamped to its own grid first
    assert ops.count("Cast") == 3  # the fp16 weight, and the fp16 input's round trip


def test_stem_channels_pads_an_rgb_conv_to_four_channels_without_changing_it() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
    _, an, x = _analysed(model, QuantPlan({"0": LayerPlan(W8, A8)}), (3, 8, 8))
    plain = _only(an, layer_qdq.run)
    _, an, x = _analysed(model, QuantPlan({"0": LayerPlan(W8, A8)}), (3, 8, 8))
    padded = _only(an, layer_qdq.run, stem_channels.run)
    pads = {i.name: numpy_helper.to_array(i) for i in padded.graph.initializer}["0.channel_pads"]
    np.testing.assert_array_equal(pads, [0, 0, 0, 0, 0, 1, 0, 0])
    assert _ops(padded).count("Pad") == 2  # the weight codes and the input
    feed = {"input": x.numpy()}
    np.testing.assert_array_equal(
        ort_session(padded).run(None, feed)[0], ort_session(plain).run(None, feed)[0]
    )


def test_pooled_grids_quantizes_an_average_pool_onto_the_next_layers_grid() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model.append(nn.Linear(4, 3))
    _, an, _ = _analysed(model, QuantPlan({"3": LayerPlan(W8, A8)}), (2, 6, 6))
    proto = _only(an, pooled_grids.run)
    pool = next(n for n in proto.graph.node if n.op_type == "GlobalAveragePool")
    q = _node_reading(proto, pool.output[0])
    assert q.op_type == "QuantizeLinear" and q.input[1] == "3.act_scale"


def test_float_params_writes_the_real_values_of_parameters_outside_layers() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(2), nn.Conv2d(2, 4, 3))  # a BN with no conv before it
    with torch.no_grad():
        model[0].weight.uniform_(0.5, 2.0)
    q, an, x = _analysed(model, QuantPlan({"1": LayerPlan(W8, A8)}), (2, 6, 6))
    ed = Editor(an.proto)
    float_params.run(QDQContext(an, ed))
    np.testing.assert_array_equal(
        numpy_helper.to_array(ed.inits["0.weight"]), model[0].weight.detach().numpy()
    )
    assert ed.roles["0.weight"] == "param"


# The manager -------------------------------------------------------------------------------
def test_passes_are_declared_once_each_with_a_summary() -> None:
    names = [p.name for p in QDQ_PASSES]
    assert len(set(names)) == len(names) == 8
    assert all(p.summary for p in QDQ_PASSES)
    assert names.index("requantize_outputs") < names.index("convert_marks")  # grids first
    assert names.index("stem_channels") < names.index("integer_pads")


def test_without_names_an_unknown_pass() -> None:
    with pytest.raises(ValueError, match=r"\['nope'\] are not allowed; allowed values"):
        without("nope")
