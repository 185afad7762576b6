"""Int8 kernels that saturate (x86 without VNNI) never change the deployed outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from measure_models import LAYERS, calib_inputs, quantized, tiny_model, w8a8
from onnx import numpy_helper

from autoquant.measure import (
    SATURATION_ENV,
    LayerFormat,
    export_onnx,
    get_backend,
    graph_signature,
    int8_saturates,
)
from autoquant.measure._formats import _cpu_flags
from autoquant.types import LayerPlan, QuantSpec

X = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))
W8A8 = LayerPlan(QuantSpec(bits=8, granularity="per_channel"), QuantSpec(bits=8, symmetric=False))


@pytest.fixture
def saturating(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SATURATION_ENV, "1")


def test_detection_follows_the_cpu_flags_and_the_override(monkeypatch: pytest.MonkeyPatch) -> None:
    import platform

    monkeypatch.delenv(SATURATION_ENV, raising=False)
    if platform.machine().lower() in ("x86_64", "amd64"):
        has_vnni = bool(_cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})
        assert int8_saturates() is (not has_vnni)
    monkeypatch.setenv(SATURATION_ENV, "1")
    assert int8_saturates()
    monkeypatch.setenv(SATURATION_ENV, "0")
    assert not int8_saturates()


def test_only_full_8_bit_weights_times_8_bit_inputs_are_at_risk(saturating: None) -> None:
    # 2 x 255 x 63 and 2 x 127 x 127 fit in int16: narrower grids never overflow.
    assert LayerFormat.of(W8A8).saturates
    for lp in (
        LayerPlan(QuantSpec(bits=7, granularity="per_channel"), W8A8.activation),
        LayerPlan(W8A8.weight, QuantSpec(bits=7, symmetric=False)),
        LayerPlan(QuantSpec(bits=4), QuantSpec(bits=8)),
        LayerPlan(W8A8.weight, QuantSpec(bits=8, granularity="per_channel", axis=1)),
    ):
        assert not LayerFormat.of(lp).saturates, lp.short()


def test_saturating_cpu_has_its_own_signature(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model()
    plan = w8a8()
    monkeypatch.setenv(SATURATION_ENV, "0")
    plain = graph_signature(model, plan)
    monkeypatch.setenv(SATURATION_ENV, "1")
    assert graph_signature(model, plan) != plain


def test_onnx_stores_8_bit_weights_as_uint8_codes_shifted_by_128(
    saturating: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = w8a8()
    q = quantized(tiny_model(), plan, calib_inputs())
    export_onnx(q, plan, tmp_path / "sat.onnx", X)
    monkeypatch.setenv(SATURATION_ENV, "0")
    export_onnx(q, plan, tmp_path / "plain.onnx", X)
    sat = {
        i.name: numpy_helper.to_array(i) for i in onnx.load(tmp_path / "sat.onnx").graph.initializer
    }
    plain = {
        i.name: numpy_helper.to_array(i)
        for i in onnx.load(tmp_path / "plain.onnx").graph.initializer
    }
    for name in LAYERS:
        codes, zp = sat[f"{name}.weight_quantized"], sat[f"{name}.weight_zero_point"]
        assert codes.dtype == np.uint8 and np.all(zp == 128)
        ref = plain[f"{name}.weight_quantized"]
        assert ref.dtype == np.int8
        np.testing.assert_array_equal(codes.astype(np.int16) - 128, ref.astype(np.int16))


@pytest.mark.parametrize("backend", ["onnxruntime", "torch-x86"])
def test_saturation_safe_deployment_matches_the_simulation(saturating: None, backend: str) -> None:
    # Large inputs fill the 8-bit input grid: where u8 x s8 kernels saturate, they go wrong.
    plan = w8a8()
    calib = [3 * x for x in calib_inputs()]
    q = quantized(tiny_model(), plan, calib)
    x = 3 * torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    deployed = get_backend(backend).deploy(q, plan, X, threads=1, calib_inputs=calib)
    with torch.no_grad():
        ref = q(x)
    out = deployed.run(x)
    # Only the calibrated 8-bit output grid of the stem adds a rounding (see test_measure_backends).
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    if backend == "torch-x86":
        assert all("saturate" in f for f in deployed.formats.values())
