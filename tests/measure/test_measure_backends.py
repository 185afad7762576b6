"""Contract every latency backend must pass (one subclass per backend, as Optuna's
StorageTestCase), plus deployed-vs-simulated agreement on a small residual net."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from measure_models import LAYERS, calib_inputs, mixed_plan, tiny_model, w8a8
from torch import nn

from autoquant.measure import (
    BACKENDS,
    LatencyCache,
    LatencyResult,
    get_backend,
    measure_float_latency,
    measure_latencies,
    measure_latency,
)
from autoquant.types import LayerPlan, QuantPlan, QuantSpec

FAST = {"warmup": 1, "repeats": 5, "budget_s": 0.5}
X = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))
MakeQ = Callable[[QuantPlan], nn.Module]


class BackendContract:
    backend: str

    def measure(self, model: nn.Module, plan: QuantPlan | None, **kw: object) -> LatencyResult:
        return measure_latency(model, plan, X, backend=self.backend, **{**FAST, **kw})

    def test_positive_median_and_recorded_protocol(self, make_quantized: MakeQ) -> None:
        plan = w8a8()
        r = self.measure(make_quantized(plan), plan, threads=2)
        assert r.median_ms > 0 and r.iqr_ms >= 0
        assert (r.backend, r.threads, r.batch_size, r.cached) == (self.backend, 2, 1, False)
        assert 3 <= r.n <= 5 and r.measure_s > 0
        assert set(r.formats) == set(LAYERS)
        assert LatencyResult.from_dict(r.to_dict()) == r

    def test_threads_are_restored(self, make_quantized: MakeQ) -> None:
        before = torch.get_num_threads()
        plan = w8a8(["conv1"])
        self.measure(make_quantized(plan), plan, threads=1)
        assert torch.get_num_threads() == before

    def test_second_call_with_same_signature_is_a_cache_hit(
        self, make_quantized: MakeQ, vnni: None
    ) -> None:
        cache = LatencyCache()
        w8 = QuantPlan.uniform(LAYERS, QuantSpec(bits=8), QuantSpec(bits=8))
        w4 = QuantPlan.uniform(LAYERS, QuantSpec(bits=4), QuantSpec(bits=8, calibration="mse"))
        first = self.measure(make_quantized(w8), w8, cache=cache)
        again = self.measure(make_quantized(w4), w4, cache=cache)  # same kernels
        assert not first.cached and again.cached
        assert again.key == first.key and again.median_ms == first.median_ms
        assert (cache.hits, cache.misses) == (1, 1)
        # a different batch size or thread count is another measurement
        assert not self.measure(make_quantized(w8), w8, cache=cache, threads=2).cached

    def test_int8_and_fp32_layer_differ(self, make_quantized: MakeQ) -> None:
        cache = LatencyCache()
        int8 = w8a8(["conv1"])
        fp32 = QuantPlan({"conv1": LayerPlan(QuantSpec(bits="fp32"), QuantSpec(bits="fp32"))})
        a = self.measure(make_quantized(int8), int8, cache=cache)
        b = self.measure(make_quantized(fp32), fp32, cache=cache)
        assert a.signature != b.signature and not b.cached
        assert b.formats == {}
        # fp32 in a plan = the float model (its BatchNorm folded at deployment)
        c = measure_float_latency(tiny_model(), X, backend=self.backend, cache=cache, **FAST)
        assert c.cached and c.key == b.key

    def test_several_batch_sizes(self, make_quantized: MakeQ) -> None:
        plan = w8a8()
        rs = measure_latencies(make_quantized(plan), plan, X, [1, 4], backend=self.backend, **FAST)
        assert [r.batch_size for r in rs] == [1, 4]
        assert len({r.key for r in rs}) == 2

    def test_formats_show_mapped_and_float_layers(self, make_quantized: MakeQ) -> None:
        plan = mixed_plan()
        r = self.measure(make_quantized(plan), plan)
        assert "a6a→" in r.formats["conv1"] and "clip[0,63]" in r.formats["conv1"]
        assert r.formats["conv1"].startswith(
            "w4c→" + ("qint8" if self.backend == "torch-x86" else "int8")
        )
        assert "fp16→fp32" in r.formats["seq"] and "float kernel" in r.formats["seq"]
        assert "int8 kernel" in r.formats["fc"]

    def test_deployed_outputs_match_the_simulation(self, make_quantized: MakeQ) -> None:
        plan = mixed_plan()
        q = make_quantized(plan)
        x = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(3))
        deployed = get_backend(self.backend).deploy(
            q, plan, X, threads=1, calib_inputs=calib_inputs()
        )
        with torch.no_grad():
            ref = q(x)
        out = deployed.run(x)
        # Calibrated 8-bit output grids (stem, conv2) add a rounding the simulation lacks:
        # a few percent of the logit range at most.
        assert (out - ref).abs().max() < 0.1 * ref.abs().max()
        assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.9


class TestOnnxRuntime(BackendContract):
    backend = "onnxruntime"

    def test_integer_kernels_ran(self, make_quantized: MakeQ, vnni: None) -> None:
        plan = w8a8()
        r = self.measure(make_quantized(plan), plan)
        assert r.kernels.get("QLinearConv") == 4 and r.kernels.get("QGemm") == 1
        assert "Conv" not in r.kernels and "Gemm" not in r.kernels


class TestTorchX86(BackendContract):
    backend = "torch-x86"

    def test_integer_kernels_ran(self, make_quantized: MakeQ, vnni: None) -> None:
        plan = w8a8()
        r = self.measure(make_quantized(plan), plan)
        assert r.kernels == {"int8:Conv2d": 3, "int8:Conv1d": 1, "int8:Linear": 1}


def test_every_registered_backend_has_a_contract_test() -> None:
    tested = {cls.backend for cls in BackendContract.__subclasses__()}
    assert tested == set(BACKENDS)


def test_unknown_backend_is_rejected() -> None:
    with pytest.raises(ValueError, match="backend='tflite' is not allowed; allowed values"):
        measure_latency(nn.Linear(2, 2), None, torch.randn(1, 2), backend="tflite")


def test_bad_batch_size_is_rejected() -> None:
    with pytest.raises(ValueError, match="batch_size=0"):
        measure_latencies(nn.Linear(2, 2), None, torch.randn(1, 2), [0])
