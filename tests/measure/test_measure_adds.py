"""Deploying quantized residual adds: ONNX Runtime runs them as QLinearAdd, values match."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from measure_models import LAYERS, calib_inputs, resnet8, tiny_model, w8a8
from torch import nn

from autoquant.measure import (
    artifact_weight_bytes,
    export_onnx,
    fused_op_types,
    get_backend,
    graph_signature,
    load_onnx,
    ort_session,
)
from autoquant.measure._torch_x86 import kernel_counts, lower_to_torch_x86
from autoquant.measure.onnx import run_onnx
from autoquant.tasks import CifarResNet
from autoquant.transform import apply_plan, calibration, packed_size_bytes, quantizable_names
from autoquant.types import LayerPlan, QuantPlan, QuantSpec

INT8_ADDS = QuantSpec(bits=8, symmetric=False)


def _calibrated(model: nn.Module, plan: QuantPlan, shape: tuple[int, ...]) -> nn.Module:
    q = apply_plan(model, plan)
    gen = torch.Generator().manual_seed(3)
    with calibration(q):
        for _ in range(3):
            q(torch.randn(16, *shape, generator=gen))
    return q.eval()


def _resnet_plan(adds: QuantSpec = INT8_ADDS) -> QuantPlan:
    names = quantizable_names(CifarResNet(8))
    return QuantPlan(w8a8(names).layers, adds=adds)


@pytest.fixture(scope="module")
def resnet_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, QuantPlan, Path]:
    plan = _resnet_plan()
    q = _calibrated(resnet8(), plan, (3, 32, 32))
    path = tmp_path_factory.mktemp("adds") / "m.onnx"
    calib = [torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(3))]
    export_onnx(q, plan, path, torch.randn(1, 3, 32, 32), calib_inputs=calib)
    return q, plan, path


def test_onnx_runtime_runs_the_whole_resnet_on_integer_kernels(resnet_export: tuple) -> None:
    q, plan, path = resnet_export
    ops = fused_op_types(path)
    # 7 convs, 3 residual adds, the pool, the classifier; no float conv or add left.
    assert ops["QLinearConv"] == 7 and ops["QLinearAdd"] == 3
    assert ops["QLinearGlobalAveragePool"] == 1 and ops["QGemm"] == 1
    assert ops["Conv"] == 0 and ops["Relu"] == 0
    assert ops["Add"] == 1  # the classifier's float bias after QGemm
    # Quantize only the input; the shortcuts' and the stem's zero pads run on uint8.
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 0 and ops["Pad"] == 3


def test_deployed_resnet_matches_the_simulation(resnet_export: tuple) -> None:
    q, _, path = resnet_export
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = q(x).numpy()
    out = run_onnx(ort_session(path), x)
    # Integer kernels round their requantization like the simulation: differences are a few
    # output steps, not a drift.
    assert np.abs(out - ref).max() <= 0.05 * np.abs(ref).max()
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.9


def test_every_block_output_feeds_its_add_exactly(resnet_export: tuple) -> None:
    q, plan, path = resnet_export
    proto = load_onnx(path)
    props = {p.key: p.value for p in proto.metadata_props}
    assert QuantPlan.from_json(props["autoquant.plan"]) == plan
    info = export_onnx(q, plan, path.parent / "again.onnx", torch.randn(1, 3, 32, 32))
    for block in ("layer1.0", "layer2.0", "layer3.0"):
        assert info.requant[f"{block}.conv2"] == f"exact (onto the {block}.add.in0 grid)"
    assert info.requant["conv1"] == "exact (onto layer1.0.conv1's input grid)"


def test_add_grids_are_extra_bytes_not_weight_bytes(resnet_export: tuple, tmp_path: Path) -> None:
    q, plan, path = resnet_export
    assert artifact_weight_bytes(path) == packed_size_bytes(q, plan)
    float_adds = QuantPlan(plan.layers)
    qf = _calibrated(resnet8(), float_adds, (3, 32, 32))
    info = export_onnx(qf, float_adds, tmp_path / "f.onnx", torch.randn(1, 3, 32, 32))
    again = export_onnx(q, plan, tmp_path / "q.onnx", torch.randn(1, 3, 32, 32))
    assert again.weight_bytes == info.weight_bytes == packed_size_bytes(qf, float_adds)
    # Three operand grids (4 B scale + 1 B zero-point each) and the last block's output grid;
    # the other output grids are the next conv's input grid, already counted. With float adds
    # the extra grids are the three conv2 outputs' and the stem's (it feeds two consumers).
    # Both also store the stem's channel pads (8 int64, see test_measure_onnx_lowering.py).
    assert again.extra_bytes == 4 * 5 + 64 and info.extra_bytes == 4 * 5 + 64


def test_int8_adds_change_the_graph_signature() -> None:
    model = resnet8()
    assert graph_signature(model, _resnet_plan()) != graph_signature(
        model, _resnet_plan(QuantSpec(bits="fp32"))
    )
    # Calibration of the adds does not change the kernels.
    assert graph_signature(model, _resnet_plan()) == graph_signature(
        model, _resnet_plan(INT8_ADDS.replace(calibration="mse"))
    )


@pytest.mark.parametrize("backend", ["onnxruntime", "torch-x86"])
def test_tiny_resnet_with_int8_adds_deploys_on_both_backends(backend: str) -> None:
    plan = QuantPlan(w8a8(LAYERS).layers, adds=INT8_ADDS)
    q = apply_plan(tiny_model(), plan)
    calib = calib_inputs()
    with calibration(q):
        for x in calib:
            q(x)
    q.eval()
    deployed = get_backend(backend).deploy(q, plan, calib[0][:1], threads=1, calib_inputs=calib)
    x = calib_inputs(1, 32)[0]
    with torch.no_grad():
        ref = q(x)
    out = torch.as_tensor(deployed.run(x))
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()


def test_torch_x86_runs_the_adds_as_quantized_add_kernels(resnet_export: tuple, vnni: None) -> None:
    q, plan, _ = resnet_export
    low, formats = lower_to_torch_x86(q, plan, torch.randn(1, 3, 32, 32))
    assert kernel_counts(low) == {"int8:Conv2d": 7, "int8:Linear": 1, "int8:add": 3}
    assert formats["layer1.0.conv2"].endswith(
        "on the layer1.0.add.in0 grid (handed over as quint8)"
    )
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref = q(x)
    out = low(x)
    # x86 requantization rounds differently from the simulation in every conv: this random
    # net drifts about 12 % of its largest logit with float adds as well.
    assert (out - ref).abs().max() <= 0.15 * ref.abs().max()
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.9


def test_sub_8_bit_consumer_gets_its_own_clipped_grid(tmp_path: Path) -> None:
    names = quantizable_names(CifarResNet(8))
    layers = dict(_resnet_plan().layers)
    six = LayerPlan(
        QuantSpec(bits=8, granularity="per_channel"), QuantSpec(bits=6, symmetric=False)
    )
    layers["layer2.0.conv1"] = six  # reads layer1.0's output: no shared 8-bit grid there
    plan = QuantPlan(layers, adds=INT8_ADDS)
    assert set(names) == set(layers)
    q = _calibrated(resnet8(), plan, (3, 32, 32))
    assert "layer1.0.add.out" in dict(q.named_modules())
    path = tmp_path / "m.onnx"
    export_onnx(q, plan, path, torch.randn(1, 3, 32, 32))
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = q(x).numpy()
    out = run_onnx(ort_session(path), x)
    assert np.abs(out - ref).max() <= 0.05 * np.abs(ref).max()
    assert fused_op_types(path)["QLinearAdd"] == 3


class _InplaceRes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        y += x  # operator.iadd
        return self.fc(torch.relu(y).flatten(1))


def test_in_place_add_runs_as_an_integer_add_on_both_backends(tmp_path: Path) -> None:
    plan = QuantPlan(w8a8(["conv", "fc"]).layers, adds=INT8_ADDS)
    q = _calibrated(_InplaceRes().eval(), plan, (4, 6, 6))
    x = torch.randn(8, 4, 6, 6, generator=torch.Generator().manual_seed(2))
    low, _ = lower_to_torch_x86(q, plan, x[:1])
    assert kernel_counts(low)["int8:add"] == 1
    export_onnx(q, plan, tmp_path / "m.onnx", x[:1])
    assert fused_op_types(tmp_path / "m.onnx")["QLinearAdd"] == 1
    with torch.no_grad():
        ref = q(x)
    for out in (low(x), torch.as_tensor(run_onnx(ort_session(tmp_path / "m.onnx"), x))):
        assert (out - ref).abs().max() <= 0.1 * ref.abs().max()
