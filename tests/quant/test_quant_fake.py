"""Fake quantization vs torch's built-in kernels, LSQ gradients, and grid properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from autoquant.quant import (
    dequantize,
    fake_quantize,
    fake_quantize_lsq,
    lsq_grad_factor,
    qparams_from_range,
    quantize,
)
from autoquant.types import QuantSpec

# torch.fake_quantize_per_{tensor,channel}_affine accept any quant_min <= quant_max with the
# zero-point inside (checked here for 2..8 bits, signed narrow and unsigned), so every grid we
# use is compared with them.
GRIDS = [QuantSpec(bits=b, symmetric=s) for b in range(2, 9) for s in (True, False)]
GRID_IDS = [s.short() for s in GRIDS]


@pytest.mark.parametrize("spec", GRIDS, ids=GRID_IDS)
def test_per_tensor_matches_torch(spec: QuantSpec, device: str, fq_path: str) -> None:
    qmin, qmax = spec.qrange
    x = (torch.randn(4, 3, 5, 5, device=device) * 2).requires_grad_()
    ref_x = x.detach().clone().requires_grad_()
    scale, zp = qparams_from_range(torch.tensor(-1.3), torch.tensor(2.9), spec)
    out = fake_quantize(x, scale.to(device), zp.to(device), qmin, qmax)
    ref = torch.fake_quantize_per_tensor_affine(
        ref_x, scale.to(device), zp.int().to(device), qmin, qmax
    )
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    assert torch.equal(out, ref)
    assert torch.equal(x.grad, ref_x.grad)
    # Some values must be clipped, or the gradient mask was not exercised.
    assert 0 < int((x.grad == 0).sum()) < x.numel()


@pytest.mark.parametrize("spec", GRIDS, ids=GRID_IDS)
def test_per_tensor_float_params_match_tensor_params(spec: QuantSpec) -> None:
    qmin, qmax = spec.qrange
    x = torch.randn(200) * 3
    scale, zp = qparams_from_range(torch.tensor(-2.0), torch.tensor(1.0), spec)
    assert torch.equal(
        fake_quantize(x, float(scale), float(zp), qmin, qmax),
        fake_quantize(x, scale, zp, qmin, qmax),
    )


@pytest.mark.parametrize("axis", [0, 1, 3])
@pytest.mark.parametrize("spec", GRIDS, ids=GRID_IDS)
def test_per_channel_matches_torch(spec: QuantSpec, axis: int, device: str, fq_path: str) -> None:
    qmin, qmax = spec.qrange
    x = (torch.randn(4, 6, 3, 5, device=device) * 2).requires_grad_()
    ref_x = x.detach().clone().requires_grad_()
    c = x.shape[axis]
    scale, zp = qparams_from_range(-torch.rand(c) * 3, torch.rand(c) * 3, spec)
    scale, zp = scale.to(device), zp.to(device)
    out = fake_quantize(x, scale, zp, qmin, qmax, axis)
    ref = torch.fake_quantize_per_channel_affine(ref_x, scale, zp.int(), axis, qmin, qmax)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    assert torch.equal(out, ref)
    assert torch.equal(x.grad, ref_x.grad)


def test_no_grad_path_matches_grad_path() -> None:
    x = torch.randn(100) * 4
    with torch.no_grad():
        a = fake_quantize(x, 0.05, 3.0, 0, 15)
    b = fake_quantize(x.requires_grad_(), 0.05, 3.0, 0, 15)
    assert torch.equal(a, b.detach())


@pytest.mark.parametrize("symmetric", [True, False])
def test_lsq_matches_torch_learnable_per_tensor(symmetric: bool) -> None:
    spec = QuantSpec(bits=4, symmetric=symmetric)
    qmin, qmax = spec.qrange
    x = torch.randn(500) * 2
    s0, zp = qparams_from_range(torch.tensor(-1.5), torch.tensor(2.5), spec)
    xa, sa = x.clone().requires_grad_(), s0.clone().requires_grad_()
    xb, sb = x.clone().requires_grad_(), s0.reshape(1).clone().requires_grad_()
    factor = lsq_grad_factor(x.numel(), 1, qmax)
    out = fake_quantize_lsq(xa, sa, zp, qmin, qmax)
    ref = torch._fake_quantize_learnable_per_tensor_affine(
        xb, sb, zp.reshape(1).clone().requires_grad_(), qmin, qmax, factor
    )
    grad = torch.randn(500)
    out.backward(grad)
    ref.backward(grad)
    assert torch.equal(out, ref)
    assert torch.equal(xa.grad, xb.grad)
    assert sa.grad.shape == ()
    torch.testing.assert_close(sa.grad, sb.grad[0], rtol=1e-5, atol=1e-6)


def test_lsq_matches_torch_learnable_per_channel() -> None:
    spec = QuantSpec(bits=3, granularity="per_channel")
    qmin, qmax = spec.qrange
    x = torch.randn(6, 4, 3, 3)
    s0, zp = qparams_from_range(-torch.rand(6) - 0.5, torch.rand(6) + 0.5, spec)
    xa, sa = x.clone().requires_grad_(), s0.clone().requires_grad_()
    xb, sb = x.clone().requires_grad_(), s0.clone().requires_grad_()
    factor = lsq_grad_factor(x.numel(), 6, qmax)
    out = fake_quantize_lsq(xa, sa, zp, qmin, qmax, axis=0)
    ref = torch._fake_quantize_learnable_per_channel_affine(
        xb, sb, zp.clone().requires_grad_(), 0, qmin, qmax, factor
    )
    grad = torch.randn_like(x)
    out.backward(grad)
    ref.backward(grad)
    assert torch.equal(out, ref)
    assert torch.equal(xa.grad, xb.grad)
    torch.testing.assert_close(sa.grad, sb.grad, rtol=1e-5, atol=1e-6)


def test_lsq_scale_gradient_closed_form() -> None:
    # Symmetric 3 bits: grid -3..3. x/S = [0.26, -0.74, 9, -9] / 0.25.
    x = torch.tensor([0.26, -0.74, 9.0, -9.0])
    s = torch.tensor(0.25, requires_grad=True)
    fake_quantize_lsq(x, s, 0.0, -3, 3).sum().backward()
    inside = (round(1.04) - 1.04) + (round(-2.96) - -2.96)  # round(x/S) - x/S
    outside = 3 + -3  # the clamp bounds
    expected = (inside + outside) / math.sqrt(4 * 3)
    assert float(s.grad) == pytest.approx(expected, rel=1e-5)


def test_lsq_default_grad_factor_and_positive_step() -> None:
    x = torch.randn(8, 10)
    s = torch.tensor(0.1, requires_grad=True)
    fake_quantize_lsq(x, s, 0.0, -7, 7, grad_factor=1.0).sum().backward()
    g1 = s.grad.clone()
    s.grad = None
    fake_quantize_lsq(x, s, 0.0, -7, 7).sum().backward()
    torch.testing.assert_close(s.grad, g1 / math.sqrt(80 * 7))
    # A non-positive step is clamped, never divides by zero.
    bad = torch.tensor(-1.0, requires_grad=True)
    assert torch.isfinite(fake_quantize_lsq(x, bad, 0.0, -7, 7)).all()


# Property tests on tiny shapes ----------------------------------------------------------------
values = st.lists(st.floats(-50, 50, width=32), min_size=1, max_size=12)
ranges = st.tuples(st.floats(-20, 20, width=32), st.floats(-20, 20, width=32))
grids = st.sampled_from(GRIDS)


def _params(spec: QuantSpec, r: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = min(r), max(r)
    return qparams_from_range(torch.tensor(lo), torch.tensor(hi), spec)


@settings(max_examples=150, deadline=None)
@given(grids, ranges, values)
def test_error_at_most_half_step_inside_range(
    spec: QuantSpec, r: tuple[float, float], xs: list[float]
) -> None:
    qmin, qmax = spec.qrange
    s, z = _params(spec, r)
    x = torch.tensor(xs)
    lo, hi = (qmin - z) * s, (qmax - z) * s
    inside = (x >= lo) & (x <= hi)
    err = (fake_quantize(x, s, z, qmin, qmax) - x).abs()
    assert bool((err[inside] <= s / 2 * (1 + 1e-5) + 1e-6).all())


@settings(max_examples=150, deadline=None)
@given(grids, ranges, values)
def test_idempotent(spec: QuantSpec, r: tuple[float, float], xs: list[float]) -> None:
    qmin, qmax = spec.qrange
    s, z = _params(spec, r)
    once = fake_quantize(torch.tensor(xs), s, z, qmin, qmax)
    assert torch.equal(fake_quantize(once, s, z, qmin, qmax), once)


@settings(max_examples=150, deadline=None)
@given(grids, ranges)
def test_zero_exactly_representable(spec: QuantSpec, r: tuple[float, float]) -> None:
    qmin, qmax = spec.qrange
    s, z = _params(spec, r)
    assert float(fake_quantize(torch.zeros(1), s, z, qmin, qmax)) == 0.0
    assert float(z) == round(float(z)) and qmin <= float(z) <= qmax
    if spec.symmetric:
        assert float(z) == 0.0


@settings(max_examples=150, deadline=None)
@given(grids, ranges, values)
def test_codes_inside_grid_and_dequantize_matches(
    spec: QuantSpec, r: tuple[float, float], xs: list[float]
) -> None:
    qmin, qmax = spec.qrange
    s, z = _params(spec, r)
    x = torch.tensor(xs)
    q = quantize(x, s, z, qmin, qmax)
    assert q.dtype == torch.int32
    assert bool(((q >= qmin) & (q <= qmax)).all())
    assert torch.equal(dequantize(q, s, z), fake_quantize(x, s, z, qmin, qmax))


@settings(max_examples=100, deadline=None)
@given(grids, st.floats(-(2.0**127), 2.0**127, width=32), values)
def test_degenerate_ranges_are_finite(spec: QuantSpec, c: float, xs: list[float]) -> None:
    qmin, qmax = spec.qrange
    s, z = qparams_from_range(torch.tensor(c), torch.tensor(c), spec)
    assert bool(torch.isfinite(s)) and float(s) > 0 and bool(torch.isfinite(z))
    x = torch.tensor(xs).requires_grad_()
    out = fake_quantize(x, s, z, qmin, qmax)
    out.sum().backward()
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(x.grad).all())


def test_per_channel_qparams_shapes_and_closed_form() -> None:
    spec = QuantSpec(bits=8, symmetric=False, granularity="per_channel")
    s, z = qparams_from_range(torch.tensor([-1.0, 0.5, 0.0]), torch.tensor([3.0, 2.0, 0.0]), spec)
    assert s.shape == z.shape == (3,)
    # [-1, 3]: S = 4/255, Z = round(255 - 3 / S) = round(63.75) = 64.
    assert float(s[0]) == pytest.approx(4 / 255) and float(z[0]) == 64
    # [0.5, 2] is extended to [0, 2]: Z = 0.
    assert float(s[1]) == pytest.approx(2 / 255) and float(z[1]) == 0
    sym = qparams_from_range(torch.tensor(-3.0), torch.tensor(1.0), QuantSpec(bits=4))
    assert float(sym[0]) == pytest.approx(3 / 7) and float(sym[1]) == 0
