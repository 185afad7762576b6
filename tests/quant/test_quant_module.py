"""FakeQuantize: states, float formats, LSQ parameter, persistence."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from autoquant.quant import FakeQuantize, fake_quantize, qparams_from_range
from autoquant.types import QuantSpec


def _calibrated(spec: QuantSpec, x: torch.Tensor, **kwargs: object) -> FakeQuantize:
    fq = FakeQuantize(spec, **kwargs)  # type: ignore[arg-type]
    fq.observing = True
    fq(x)
    fq.freeze()
    return fq


def test_states_identity_observe_then_quantize() -> None:
    spec = QuantSpec(bits=4, symmetric=False)
    fq = FakeQuantize(spec)
    x = torch.randn(50) * 3
    assert torch.equal(fq(x), x) and not fq.calibrated  # before calibration: identity
    fq.observing = True
    assert torch.equal(fq(x), x) and fq.has_observed  # observing: identity, observer fed
    fq.freeze()
    assert fq.calibrated and not fq.observing
    s, z = qparams_from_range(x.min(), x.max(), spec)
    assert torch.equal(fq.scale, s) and torch.equal(fq.zero_point, z)
    assert torch.equal(fq(x), fake_quantize(x, s, z, 0, 15))
    assert not torch.equal(fq(x), x)


def test_per_channel_weight_and_gradient() -> None:
    w = torch.randn(6, 3, 3, 3)
    spec = QuantSpec(bits=3, granularity="per_channel")
    fq = _calibrated(spec, w, for_weight=True, channels=6)
    s, z = qparams_from_range(w.reshape(6, -1).amin(1), w.reshape(6, -1).amax(1), spec)
    assert fq.scale.shape == (6,)
    wg = w.clone().requires_grad_()
    out = fq(wg)
    ref = torch.fake_quantize_per_channel_affine(w, s, z.int(), 0, -3, 3)
    assert torch.equal(out, ref)
    out.sum().backward()
    assert torch.equal(wg.grad, torch.ones_like(w))  # min/max range: nothing clipped


def test_weight_observer_observes_once() -> None:
    fq = FakeQuantize(QuantSpec(bits=8), for_weight=True)
    fq.observing = True
    fq(torch.tensor([1.0, -1.0]))
    fq(torch.tensor([100.0]))  # the weight does not change during calibration; ignored
    fq.freeze()
    assert float(fq.scale) == pytest.approx(1 / 127)


@pytest.mark.parametrize("bits", ["fp16", "fp32"])
def test_float_formats(bits: str) -> None:
    fq = FakeQuantize(QuantSpec(bits=bits))
    assert fq.calibrated and fq.observer is None
    x = (torch.randn(100) * 1e3).requires_grad_()
    out = fq(x)
    expected = x.detach().half().float() if bits == "fp16" else x.detach()
    assert torch.equal(out, expected)
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    if bits == "fp16":
        assert not torch.equal(out, x)


def test_lsq_scale_is_a_trained_parameter() -> None:
    x = torch.randn(256) * 2
    fq = _calibrated(QuantSpec(bits=4, learned_scale=True), x)
    assert isinstance(fq.scale, nn.Parameter)
    param = fq.scale
    opt = torch.optim.SGD(fq.parameters(), lr=0.01)
    before = float(param.detach())
    loss = ((fq(x) - x) ** 2).mean()
    loss.backward()
    assert param.grad is not None and float(param.grad) != 0.0
    opt.step()
    assert float(param.detach()) != before
    fq.observing = True  # recalibration keeps the Parameter object an optimizer holds
    fq(x * 2)
    fq.freeze()
    assert fq.scale is param


def test_state_dict_round_trip_with_lazily_sized_channels() -> None:
    spec = QuantSpec(bits=5, granularity="per_channel", axis=1, symmetric=False)
    x = torch.randn(8, 4, 3)
    fq = _calibrated(spec, x)  # channels not given: qparams sized at freeze()
    buf = io.BytesIO()
    torch.save(fq.state_dict(), buf)
    buf.seek(0)
    fresh = FakeQuantize(spec)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.calibrated and fresh.scale.shape == (4,)
    assert torch.equal(fresh(x), fq(x))
    assert torch.equal(copy.deepcopy(fq)(x), fq(x))


def test_per_tensor_state_dict_reload_refreshes_cached_floats() -> None:
    x = torch.randn(100)
    a = _calibrated(QuantSpec(bits=8), x)
    b = _calibrated(QuantSpec(bits=8), x * 10)
    b(x)  # caches b's qparams as floats
    b.load_state_dict(a.state_dict())
    assert torch.equal(b(x), a(x))


def test_freeze_without_data_raises() -> None:
    with pytest.raises(RuntimeError, match="no data"):
        FakeQuantize(QuantSpec(bits=8)).freeze()


# Compiled mode: qparams as tensors, same values as the eager float path ---------------------
COMPILED_CASES = {
    "act_per_tensor": (QuantSpec(bits=4, symmetric=False), False, (8, 5, 3, 3)),
    "weight_per_channel": (QuantSpec(bits=3, granularity="per_channel"), True, (6, 4, 3, 3)),
    "weight_per_tensor": (QuantSpec(bits=5), True, (6, 4, 3, 3)),
    "act_per_channel": (
        QuantSpec(bits=6, symmetric=False, granularity="per_channel", axis=1),
        False,
        (8, 5, 3, 3),
    ),
    "lsq": (QuantSpec(bits=2, learned_scale=True), False, (8, 5, 3, 3)),
    "lsq_plus": (
        QuantSpec(bits=3, symmetric=False, learned_scale=True, learned_zero_point=True),
        False,
        (8, 5),
    ),
}


@pytest.mark.parametrize("case", list(COMPILED_CASES))
def test_compiled_forward_and_gradients_equal_eager(case: str) -> None:
    spec, for_weight, shape = COMPILED_CASES[case]
    x = torch.randn(*shape) * 2 + 0.3
    fq = _calibrated(spec, x, for_weight=for_weight)
    compiled = torch.compile(fq, backend="aot_eager", fullgraph=True)  # same ATen ops as eager
    grad = torch.randn(*shape)
    results = []
    for run in (fq, compiled):
        fq.zero_grad(set_to_none=True)
        xi = (x * 1.6).requires_grad_()  # some values fall outside the calibrated range
        out = run(xi)
        out.backward(grad)
        results.append((out.detach(), xi.grad, [p.grad for p in fq.quant_parameters()]))
    (eager, eager_gx, eager_gq), (comp, comp_gx, comp_gq) = results
    assert torch.equal(eager, comp) and not torch.equal(eager, x * 1.6)
    assert torch.equal(eager_gx, comp_gx) and 0 < int((eager_gx == 0).sum()) < x.numel()
    assert len(eager_gq) == spec.learned_scale + spec.learned_zero_point
    for a, b in zip(eager_gq, comp_gq, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)  # the LSQ factor: float vs rsqrt


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_get_float32_codes(dtype: torch.dtype) -> None:
    x = torch.randn(4, 8, 5, 5) * 3
    fq = _calibrated(QuantSpec(bits=8, symmetric=False), x)
    xl = x.to(dtype).requires_grad_()
    out = fq(xl)
    assert out.dtype == dtype
    assert torch.equal(out, fq(xl.detach().float()).to(dtype))
    out.sum().backward()
    assert xl.grad is not None and xl.grad.dtype == dtype


def test_weight_per_tensor_kernel_holds_one_value_per_output_channel() -> None:
    w = torch.randn(6, 3, 3, 3)
    fq = _calibrated(QuantSpec(bits=4), w, for_weight=True)
    # Granularity is data for a compiled graph: the kernel is shaped like a per-channel one.
    assert fq.kernel.shape == (4, 6)
    assert torch.equal(fq.kernel[1], fq.scale.expand(6))
    assert torch.equal(fq(w), fake_quantize(w, fq.scale, fq.zero_point, -7, 7))
