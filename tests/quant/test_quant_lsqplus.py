"""LSQ+ (learned zero-point): gradients against torch's learnable fake-quant kernels and
finite differences, the deployed integer zero-point, validation and projection."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autoquant.quant import EPS, FakeQuantize, fake_quantize, fake_quantize_lsq, lsq_grad_factor
from autoquant.types import PlanError, QuantSpec


def _lsq_plus(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmin: int, qmax: int, axis=None):
    xa, sa, za = (t.clone().requires_grad_() for t in (x, s, z))
    out = fake_quantize_lsq(xa, sa, za, qmin, qmax, axis)
    return xa, sa, za, out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_lsq_plus_per_tensor_matches_torch_learnable(bits: int, fq_path: str) -> None:
    qmin, qmax = QuantSpec(bits=bits, symmetric=False).qrange
    x = torch.randn(600) * 2 + 0.5
    s, z = torch.tensor(4.0 / qmax), torch.tensor(qmax * 0.37)  # non-integer zero-point
    xa, sa, za, out = _lsq_plus(x, s, z, qmin, qmax)
    xb, sb, zb = (t.clone().reshape(-1 if t.ndim else 1).requires_grad_() for t in (x, s, z))
    factor = lsq_grad_factor(x.numel(), 1, qmax)
    ref = torch._fake_quantize_learnable_per_tensor_affine(xb, sb, zb, qmin, qmax, factor)
    grad = torch.randn_like(x)
    out.backward(grad)
    ref.backward(grad)
    assert torch.equal(out, ref)
    assert torch.equal(xa.grad, xb.grad)
    torch.testing.assert_close(sa.grad, sb.grad[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(za.grad, zb.grad[0], rtol=1e-5, atol=1e-6)
    assert float(za.grad) != 0.0 and za.grad.shape == ()  # values were clipped on both sides


@pytest.mark.parametrize("axis", [0, 1])
def test_lsq_plus_per_channel_matches_torch_learnable(axis: int, fq_path: str) -> None:
    qmin, qmax = 0, 15
    x = torch.randn(6, 5, 4, 3) * 2
    c = x.shape[axis]
    s = torch.rand(c) * 0.3 + 0.1
    z = torch.rand(c) * 12 + 1.2
    z[z.frac().sub(0.5).abs() < 0.05] += 0.2  # keep away from .5: torch rounds half up there
    xa, sa, za, out = _lsq_plus(x, s, z, qmin, qmax, axis)
    xb, sb, zb = (t.clone().requires_grad_() for t in (x, s, z))
    factor = lsq_grad_factor(x.numel(), c, qmax)
    ref = torch._fake_quantize_learnable_per_channel_affine(xb, sb, zb, axis, qmin, qmax, factor)
    grad = torch.randn_like(x)
    out.backward(grad)
    ref.backward(grad)
    assert torch.equal(out, ref)
    assert torch.equal(xa.grad, xb.grad)
    torch.testing.assert_close(sa.grad, sb.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(za.grad, zb.grad, rtol=1e-5, atol=1e-6)


def _surrogate(x, s, z, s0, z0, qmin, qmax):
    """The function whose exact derivatives LSQ/LSQ+ report at (s0, z0), in float64: the
    straight-through estimator replaces ``round(v)`` by ``v`` plus its residual frozen at
    (s0, z0), and keeps the clip decision made there."""
    code = torch.round(x / s0) + round(z0)
    r = torch.round(x / s0) - x / s0
    zr = round(z0) - z0
    lo, hi = qmin - (z + zr), qmax - (z + zr)
    inside = x / s + r
    q = torch.where(code < qmin, lo, torch.where(code > qmax, hi, inside))
    return q * s


def test_lsq_plus_gradients_match_finite_differences() -> None:
    qmin, qmax = 0, 7
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(400, generator=g) * 1.5 + 0.3).double()
    w = torch.randn(400, generator=g).double()
    s0, z0 = 0.37, 2.3
    _, sa, za, out = _lsq_plus(x.float(), torch.tensor(s0), torch.tensor(z0), qmin, qmax)
    (out.double() * w).sum().backward()
    factor = lsq_grad_factor(400, 1, qmax)
    code = torch.round(x / s0) + 2
    assert int((code < qmin).sum()) > 10 and int((code > qmax).sum()) > 10  # both sides clip
    h = 1e-6
    for which, analytic in (("s", sa.grad), ("z", za.grad)):
        ds, dz = (h, 0.0) if which == "s" else (0.0, h)

        def f(sign: float, ds: float = ds, dz: float = dz) -> float:
            val = _surrogate(x, s0 + sign * ds, z0 + sign * dz, s0, z0, qmin, qmax)
            return float((val * w).sum())

        numeric = (f(1.0) - f(-1.0)) / (2 * h)
        assert float(analytic) / factor == pytest.approx(numeric, rel=1e-4, abs=1e-6)
    # The surrogate equals the real forward at (s0, z0): it is the right function to check.
    ref = _surrogate(x, s0, z0, s0, z0, qmin, qmax)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)


def test_forward_uses_the_rounded_clamped_zero_point_as_deployed() -> None:
    x = torch.randn(300) * 3
    s = torch.tensor(0.2)
    for z, deployed in ((3.4, 3.0), (3.6, 4.0), (-2.0, 0.0), (40.0, 15.0)):
        out = fake_quantize_lsq(x, s, torch.tensor(z, requires_grad=True), 0, 15)
        assert torch.equal(out, fake_quantize(x, s, torch.tensor(deployed), 0, 15))


def test_learned_zero_point_module_trains_and_stays_on_the_grid() -> None:
    spec = QuantSpec(bits=3, symmetric=False, learned_scale=True, learned_zero_point=True)
    fq = FakeQuantize(spec)
    x = torch.rand(512) * 4 - 0.5  # skewed range: the zero-point matters
    fq.observing = True
    fq(x)
    fq.freeze()
    assert isinstance(fq.zero_point, nn.Parameter) and fq.quant_parameters() == [
        fq.scale,
        fq.zero_point,
    ]
    z0 = float(fq.zero_point.detach())
    opt = torch.optim.SGD(fq.quant_parameters(), lr=50.0)
    for _ in range(5):
        opt.zero_grad()
        ((fq(x) - x) ** 2).mean().backward()
        opt.step()
        fq.constrain_()
    assert float(fq.zero_point.detach()) != z0
    # Projection: a step far outside the grid is pulled back; the scale stays positive.
    with torch.no_grad():
        fq.zero_point.fill_(-3.7)
        fq.scale.fill_(-1.0)
    fq.constrain_()
    assert float(fq.zero_point.detach()) == 0.0 and float(fq.scale.detach()) == pytest.approx(EPS)


def test_learned_zero_point_needs_an_asymmetric_grid() -> None:
    with pytest.raises(PlanError, match="learned_zero_point=True.*symmetric") as info:
        QuantSpec(bits=4, symmetric=True, learned_zero_point=True)
    assert "allowed values" in str(info.value)
    with pytest.raises(PlanError, match="learned_zero_point"):
        QuantSpec(bits=4, symmetric=False, learned_zero_point="yes")  # type: ignore[arg-type]
    # Plans written before the field existed keep their JSON; a set flag round-trips.
    assert "learned_zero_point" not in QuantSpec(bits=4, symmetric=False).to_dict()
    spec = QuantSpec(bits=4, symmetric=False, learned_scale=True, learned_zero_point=True)
    assert QuantSpec.from_dict(spec.to_dict()) == spec
