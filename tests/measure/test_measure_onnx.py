from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from measure_models import LAYERS, calib_inputs, mixed_plan, quantized, tiny_model, w8a8
from onnx import numpy_helper
from torch import nn

from autoquant.measure import (
    SIDECAR_NAME,
    artifact_size_rows,
    artifact_weight_bytes,
    export_onnx,
    fused_op_types,
    load_onnx,
    ort_session,
    read_sidecar,
)
from autoquant.transform import packed_size_bytes, quantized_layers
from autoquant.types import LayerPlan, PlanError, QuantPlan, QuantSpec

X = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))
MakeQ = Callable[[QuantPlan], nn.Module]


def _inits(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}


def _codes(layer: nn.Module) -> np.ndarray:
    """Integer weight codes by torch's own quantizer (independent reference)."""
    fq = layer.weight_fq
    w = layer.weight.detach()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's quantized tensors are deprecated
        if fq.axis is None:
            q = torch.quantize_per_tensor(w, float(fq.scale), 0, torch.qint8)
        else:
            q = torch.quantize_per_channel(
                w, fq.scale.double(), fq.zero_point.long(), fq.axis, torch.qint8
            )
    return q.int_repr().numpy()


def test_w8a8_graph_has_qdq_pairs_and_int8_weights(
    make_quantized: MakeQ, tmp_path: Path, vnni: None
) -> None:
    plan = w8a8()
    q = make_quantized(plan)
    info = export_onnx(q, plan, tmp_path / "m.onnx", X)
    proto = onnx.load(str(info.path))
    onnx.checker.check_model(proto)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") >= len(LAYERS)
    assert ops.count("DequantizeLinear") >= 2 * len(LAYERS)
    inits = _inits(proto)
    for name, layer in quantized_layers(q).items():
        codes = inits[f"{name}.weight_quantized"]
        assert codes.dtype == np.int8
        np.testing.assert_array_equal(codes, _codes(layer))
        assert inits[f"{name}.weight_scale"].shape == (layer.weight.shape[0],)  # per channel
        assert inits[f"{name}.act_zero_point"].dtype == np.uint8  # asymmetric input
        assert f"{name}.weight" not in inits  # no float copy of a quantized weight
    assert info.sidecar is None and not (tmp_path / SIDECAR_NAME).exists()


def test_onnx_runtime_fuses_integer_kernels(make_quantized: MakeQ, tmp_path: Path) -> None:
    plan = w8a8()
    info = export_onnx(make_quantized(plan), plan, tmp_path / "m.onnx", X)
    optimized = tmp_path / "opt.onnx"
    ort_session(info.path, 1, optimized)  # SessionOptions.optimized_model_filepath
    ops = [n.op_type for n in onnx.load(str(optimized)).graph.node]
    assert ops.count("QLinearConv") == 4  # stem, conv1, conv2 and the Conv1d
    assert ops.count("QGemm") == 1
    assert not {"Conv", "Gemm", "FusedConv", "MatMul"} & set(ops)
    assert fused_op_types(info.path)["QLinearConv"] == 4


def test_sub_8_bit_weights_ship_packed_and_unpack_exactly(
    make_quantized: MakeQ, tmp_path: Path
) -> None:
    plan = mixed_plan()
    q = make_quantized(plan)
    info = export_onnx(q, plan, tmp_path / "m.onnx", X)
    assert info.sidecar == tmp_path / SIDECAR_NAME and info.sidecar.exists()
    packed = {f"{n}.weight_quantized" for n in ("conv1", "conv2", "fc")}
    assert set(info.packed) == packed
    shipped = _inits(onnx.load(str(info.path)))
    sidecar = read_sidecar(info.sidecar)
    for name in packed:  # the ONNX file holds the same codes, 8 bits each
        np.testing.assert_array_equal(shipped[name], sidecar[name].unpack())
    full = load_onnx(info.path)
    onnx.checker.check_model(full)
    inits = _inits(full)
    layers = quantized_layers(q)
    np.testing.assert_array_equal(inits["conv1.weight_quantized"], _codes(layers["conv1"]))
    # asymmetric 4-bit weight: uint8 codes 0..15 with a zero-point
    fq = layers["conv2"].weight_fq
    w = layers["conv2"].weight.detach()
    ref = torch.clamp(torch.round(w / fq.scale) + fq.zero_point, 0, 15).numpy()
    assert inits["conv2.weight_quantized"].dtype == np.uint8
    assert np.abs(inits["conv2.weight_quantized"].astype(int) - ref).max() <= 1  # ties
    assert np.mean(inits["conv2.weight_quantized"] == ref) > 0.99
    rows = {(r["tensor"], r["role"]): r for r in artifact_size_rows(info.path)}
    n = layers["conv1"].weight.numel()
    assert rows[("conv1.weight_quantized", "weight")]["bytes"] == math.ceil(n * 4 / 8)
    assert rows[("conv1.weight_quantized", "weight")]["file"] == SIDECAR_NAME
    assert rows[("conv1.weight_quantized", "unpacked")] == {
        "tensor": "conv1.weight_quantized",
        "role": "unpacked",
        "file": "m.onnx",
        "bytes": n,
    }
    # the full model runs and matches the simulation
    sess = ort_session(full, 1)
    x = torch.randn(16, 3, 8, 8)
    out = sess.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref_out = q(x).numpy()
    assert np.abs(out - ref_out).max() < 0.1 * np.abs(ref_out).max()


def test_missing_sidecar_leaves_the_model_loadable_but_not_sized(
    make_quantized: MakeQ, tmp_path: Path
) -> None:
    plan = mixed_plan()
    info = export_onnx(make_quantized(plan), plan, tmp_path / "m.onnx", X)
    info.sidecar.unlink()
    ort_session(load_onnx(info.path))  # complete without it
    with pytest.raises(FileNotFoundError, match=SIDECAR_NAME):
        artifact_weight_bytes(info.path)


def test_exports_without_sub_8_bit_codes_in_the_onnx_file_still_load(
    make_quantized: MakeQ, tmp_path: Path
) -> None:
    # Exports written before model.onnx held every weight: the codes only in the sidecar.
    plan = mixed_plan()
    info = export_onnx(make_quantized(plan), plan, tmp_path / "m.onnx", X)
    complete = load_onnx(info.path)
    old = onnx.load(str(info.path))
    keep = [i for i in old.graph.initializer if i.name not in info.packed]
    del old.graph.initializer[:]
    old.graph.initializer.extend(keep)
    onnx.save(old, str(info.path))
    restored = load_onnx(info.path)
    assert _inits(restored).keys() == _inits(complete).keys()
    for name in info.packed:
        np.testing.assert_array_equal(_inits(restored)[name], _inits(complete)[name])
    assert artifact_weight_bytes(info.path) == info.weight_bytes
    info.sidecar.unlink()
    with pytest.raises(FileNotFoundError, match=SIDECAR_NAME):
        load_onnx(info.path)


@pytest.mark.parametrize("bits", [4, 2])
def test_plain_onnx_runtime_runs_any_bit_width(bits: int, tmp_path: Path) -> None:
    from measure_models import quantized, tiny_model

    plan = QuantPlan.uniform(
        LAYERS, QuantSpec(bits=bits, granularity="per_channel"), QuantSpec(bits=8, symmetric=False)
    )
    calib = calib_inputs()
    q = quantized(tiny_model(), plan, calib)
    info = export_onnx(q, plan, tmp_path / "model.onnx", X, calib_inputs=calib)
    assert len(info.packed) == len(LAYERS)
    plain = ort.InferenceSession(str(info.path), providers=["CPUExecutionProvider"])
    x = calib[1]
    out = plain.run(None, {"input": x.numpy()})[0]
    np.testing.assert_array_equal(
        out, ort_session(load_onnx(info.path)).run(None, {"input": x.numpy()})[0]
    )
    with torch.no_grad():
        ref = q(x).numpy()
    # Calibrated 8-bit output grids (stem, conv2) add a rounding the simulation lacks.
    assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()
    assert artifact_weight_bytes(info.path) == info.weight_bytes == packed_size_bytes(q, plan)
    file_codes = sum(r["bytes"] for r in artifact_size_rows(info.path) if r["role"] == "unpacked")
    assert file_codes == sum(layer.weight.numel() for layer in quantized_layers(q).values())


@pytest.mark.parametrize(
    "plan",
    [
        w8a8(),
        w8a8(per_channel=False),
        mixed_plan(),
        QuantPlan(
            {
                "conv1": LayerPlan(
                    QuantSpec(bits=3, symmetric=False),
                    QuantSpec(bits=8, granularity="per_channel", axis=1),
                ),
                "fc": LayerPlan(QuantSpec(bits="fp16"), QuantSpec(bits=8)),
                "stem": LayerPlan(QuantSpec(bits=2), QuantSpec(bits="fp32")),
            }
        ),
    ],
    ids=["w8a8", "w8a8-per-tensor", "mixed", "odd"],
)
def test_artifact_bytes_equal_packed_size(
    plan: QuantPlan, make_quantized: MakeQ, tmp_path: Path
) -> None:
    q = make_quantized(plan)
    info = export_onnx(q, plan, tmp_path / "m.onnx", X, calib_inputs=calib_inputs())
    assert artifact_weight_bytes(info.path) == info.weight_bytes == packed_size_bytes(q, plan)


def test_float_model_export_matches_torch(tmp_path: Path) -> None:

    model = tiny_model()
    info = export_onnx(model, None, tmp_path / "f.onnx", X)
    x = torch.randn(5, 3, 8, 8)
    out = ort_session(info.path).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(out, model(x).numpy(), atol=1e-5)
    assert info.weight_bytes == sum(p.numel() for p in model.parameters()) * 4 - 8 * 4 * 2 + 8 * 4


class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.relu(self.conv(x)))


def test_a_layer_called_twice_is_rejected(tmp_path: Path) -> None:

    plan = QuantPlan.uniform(["conv"], QuantSpec(bits=8), QuantSpec(bits=8))
    q = quantized(_Twice().eval(), plan, [torch.randn(4, 3, 8, 8)])
    with pytest.raises(PlanError, match=r"\['conv'\] are called more than once"):
        export_onnx(q, plan, tmp_path / "m.onnx", X)


def test_float_model_with_a_plan_is_rejected(tmp_path: Path) -> None:

    with pytest.raises(PlanError, match="'conv1' is not a fake-quant layer.*apply_plan"):
        export_onnx(tiny_model(), w8a8(["conv1"]), tmp_path / "m.onnx", X)


def test_uncalibrated_model_is_rejected(tmp_path: Path) -> None:

    from autoquant.transform import apply_plan

    with pytest.raises(PlanError, match="not calibrated"):
        export_onnx(apply_plan(tiny_model(), w8a8()), w8a8(), tmp_path / "m.onnx", X)
