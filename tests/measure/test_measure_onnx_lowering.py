"""Exact ONNX lowerings that keep more of the graph on ONNX Runtime's integer kernels: zero
pads on the integer tensor, and a stem conv padded to 4 input channels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from measure_models import quantized, resnet8, w8a8
from onnx import numpy_helper
from torch import nn

from autoquant.measure import artifact_weight_bytes, export_onnx, fused_op_types, ort_session
from autoquant.measure.onnx import build_qdq, run_onnx, without
from autoquant.transform import packed_size_bytes, quantizable_names
from autoquant.types import LayerPlan, QuantPlan, QuantSpec

W8 = QuantSpec(bits=8, granularity="per_channel")
A8 = QuantSpec(bits=8, symmetric=False)


def _batches(shape: tuple[int, ...], n: int = 2) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randn(16, *shape, generator=gen) for _ in range(n)]


@pytest.fixture(scope="module")
def resnet_int8() -> tuple[nn.Module, QuantPlan]:
    plan = QuantPlan(w8a8(quantizable_names(resnet8())).layers, adds=A8)
    return quantized(resnet8(), plan, _batches((3, 32, 32))), plan


def test_integer_pads_and_padded_stem_change_no_output(resnet_int8: tuple) -> None:
    q, plan = resnet_int8
    x = _batches((3, 32, 32), 1)[0]
    new = build_qdq(q, plan, x[:1])
    # float zero pads, 3-channel stem
    reference = build_qdq(q, plan, x[:1], passes=without("integer_pads", "stem_channels"))

    np.testing.assert_array_equal(
        run_onnx(ort_session(new.proto), x), run_onnx(ort_session(reference.proto), x)
    )
    ops_new, ops_ref = fused_op_types(new.proto), fused_op_types(reference.proto)
    # Before: DequantizeLinear -> Pad -> QuantizeLinear in float at each zero-padding shortcut.
    assert ops_ref["DequantizeLinear"] == 2 and ops_ref["QuantizeLinear"] == 3
    assert ops_ref["Pad"] == 2
    # After: only the model input is quantized; the shortcuts' and the stem's pads are integer.
    assert ops_new["DequantizeLinear"] == 0 and ops_new["QuantizeLinear"] == 1
    assert ops_new["Pad"] == 3
    assert ops_new["QLinearConv"] == ops_ref["QLinearConv"] == 7


def test_stem_weights_are_stored_unpadded_and_padded_by_onnx_runtime(
    resnet_int8: tuple, tmp_path: Path
) -> None:
    q, plan = resnet_int8
    path = tmp_path / "m.onnx"
    info = export_onnx(q, plan, path, torch.randn(1, 3, 32, 32))
    stored = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    codes = stored["conv1.weight_quantized"]
    assert codes.shape == (16, 3, 3, 3)
    assert info.weight_bytes == artifact_weight_bytes(path) == packed_size_bytes(q, plan)

    # ONNX Runtime folds the pad into the constant weight that its conv kernel packs.
    optimized = tmp_path / "optimized.onnx"
    ort_session(path, 1, optimized)
    graph = onnx.load(str(optimized)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    stem = next(n for n in graph.node if n.op_type == "QLinearConv")
    w = inits[stem.input[3]]
    assert w.shape == (16, 4, 3, 3)
    np.testing.assert_array_equal(w[:, :3], codes)
    assert not w[:, 3].any()


@pytest.mark.parametrize(
    ("cin", "cout", "weight", "act", "extra"),
    [
        (3, 16, W8, A8, 1),
        (6, 16, QuantSpec(bits=4, granularity="per_channel"), A8, 2),  # 4-bit codes are int8
        (4, 16, W8, A8, 0),  # aligned already
        (3, 12, W8, A8, 0),  # output channels not a multiple of 8: no direct kernel anyway
        (3, 16, QuantSpec(bits=8, symmetric=False), A8, 0),  # uint8 weights: no direct kernel
        (3, 16, W8, QuantSpec(bits=8), 0),  # int8 inputs: no direct kernel on x86
    ],
)
def test_stem_padding_applies_where_the_direct_int8_conv_kernel_does(
    cin: int, cout: int, weight: QuantSpec, act: QuantSpec, extra: int
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU()).eval()
    plan = QuantPlan({"0": LayerPlan(weight, act)})
    q = quantized(model, plan, _batches((cin, 8, 8)))
    x = _batches((cin, 8, 8), 1)[0]
    qdq = build_qdq(q, plan, x[:1], calib_inputs=[x])
    inits = {i.name: numpy_helper.to_array(i) for i in qdq.proto.graph.initializer}
    if extra:
        np.testing.assert_array_equal(inits["0.channel_pads"], [0, 0, 0, 0, 0, extra, 0, 0])
    else:
        assert "0.channel_pads" not in inits
    # Either way ONNX Runtime reproduces the simulation, up to the deployed output's grid step
    # (the simulation does not quantize the model output).
    out = run_onnx(ort_session(qdq.proto), x)
    with torch.no_grad():
        ref = q(x).numpy()
    step = float(np.diff(np.unique(out)).min())
    assert np.abs(out - ref).max() <= step


class _PaddedShortcut(nn.Module):
    """A shortcut zero-padded along channels from a quantized add's signed output (its grid's
    zero point is not 0, so padding the integer tensor must use the zero point)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x) + x
        return self.conv2(h) + nn.functional.pad(h, (0, 0, 0, 0, 0, 4))


def test_integer_pad_fills_with_the_zero_point() -> None:
    torch.manual_seed(0)
    plan = QuantPlan({"conv1": LayerPlan(W8, A8), "conv2": LayerPlan(W8, A8)}, adds=A8)
    batches = _batches((4, 6, 6))
    q = quantized(_PaddedShortcut().eval(), plan, batches)
    x = batches[0]
    new = build_qdq(q, plan, x[:1], calib_inputs=batches)
    pad = next(n for n in new.proto.graph.node if n.op_type == "Pad")
    zp = {i.name: numpy_helper.to_array(i) for i in new.proto.graph.initializer}[pad.input[2]]
    assert zp.dtype == np.uint8 and zp != 0
    reference = build_qdq(q, plan, x[:1], calib_inputs=batches, passes=without("integer_pads"))
    np.testing.assert_array_equal(
        run_onnx(ort_session(new.proto), x), run_onnx(ort_session(reference.proto), x)
    )
    ops_new, ops_ref = fused_op_types(new.proto), fused_op_types(reference.proto)
    assert ops_ref["DequantizeLinear"] - ops_new["DequantizeLinear"] == 1
    assert ops_ref["QuantizeLinear"] - ops_new["QuantizeLinear"] == 1
