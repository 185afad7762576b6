"""Hutchinson traces against the exact Hessian (torch.autograd.functional.hessian)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.functional import hessian

from autoquant.allocate import UnitSpace, hessian_sensitivity, hutchinson_traces
from autoquant.quant import FakeQuantize
from autoquant.space import SearchSpace
from autoquant.transform import quantizable_names


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).eval()


def _batch() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(16, 3, generator=g), torch.randint(0, 3, (16,), generator=g)


def _exact_traces(model: nn.Sequential, x: Tensor, y: Tensor) -> dict[str, float]:
    """Exact traces of the weight blocks and of the second layer's input activation."""
    w0, b0, w2, b2 = (p.detach() for p in model.parameters())

    def loss_w0(w: Tensor) -> Tensor:
        return F.cross_entropy(F.linear(torch.tanh(F.linear(x, w, b0)), w2, b2), y)

    def loss_w2(w: Tensor) -> Tensor:
        return F.cross_entropy(F.linear(torch.tanh(F.linear(x, w0, b0)), w, b2), y)

    def loss_a(a: Tensor) -> Tensor:
        return F.cross_entropy(F.linear(a, w2, b2), y)

    a = torch.tanh(F.linear(x, w0, b0))
    out = {}
    for name, fn, t in (("0", loss_w0, w0), ("2", loss_w2, w2), ("act2", loss_a, a)):
        h = hessian(fn, t).reshape(t.numel(), t.numel())
        out[name] = float(torch.trace(h))
    return out


def test_hutchinson_matches_the_exact_trace_within_its_own_error() -> None:
    model = _mlp()
    x, y = _batch()
    w0, b0, w2, b2 = (p.detach() for p in model.parameters())
    n0 = w0.numel()

    def loss_of(flat: Tensor) -> Tensor:
        a, c = flat[:n0].reshape(w0.shape), flat[n0:].reshape(w2.shape)
        return F.cross_entropy(F.linear(torch.tanh(F.linear(x, a, b0)), c, b2), y)

    h = hessian(loss_of, torch.cat([w0.reshape(-1), w2.reshape(-1)]))
    samples = 400
    loss = F.cross_entropy(model(x), y)
    params = [model[0].weight, model[2].weight]
    got = hutchinson_traces(loss, params, samples, torch.Generator().manual_seed(0))
    for est, (own, other) in zip(
        got, ((slice(0, n0), slice(n0, None)), (slice(n0, None), slice(0, n0))), strict=True
    ):
        block = h[own, own]
        exact = float(torch.trace(block))
        # The estimator's exact variance for independent Rademacher vectors on all tensors:
        # 2·Σ_{i≠j} H_ij² inside the block, plus Σ H_ij² of the cross block.
        var = 2 * float((block**2).sum() - (torch.diag(block) ** 2).sum())
        var += float((h[own, other] ** 2).sum())
        bound = 4 * (var / samples) ** 0.5
        assert bound < 0.3 * abs(exact)  # the check is sharp enough to catch a wrong trace
        assert abs(est - exact) <= bound
    # a diagonal Hessian is exact for any Rademacher vector
    w = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    assert hutchinson_traces((w**2 * torch.tensor([1.0, 2.0, 3.0])).sum(), [w], 3) == [12.0]


def test_hessian_table_uses_the_traces_and_the_quantization_error() -> None:
    model = _mlp()
    x, y = _batch()
    exact = _exact_traces(model, x, y)
    space = SearchSpace(w_bits=(2, 4, 8), a_bits=(3, 8), a_sym=(True,))
    units = UnitSpace(space, quantizable_names(model))
    table = hessian_sensitivity(model, units, [(x, y)], [(x, y)], F.cross_entropy, samples=300)
    traces = table.details["hessian_trace"]
    # 300 samples: over 8 seeds the worst error was 17 %; 0.3 still separates the three traces
    assert traces["0"]["weight_per_element"] * 12 == pytest.approx(exact["0"], rel=0.3)
    assert traces["2"]["weight_per_element"] * 12 == pytest.approx(exact["2"], rel=0.3)
    assert traces["2"]["activation"] == pytest.approx(exact["act2"], rel=0.3)
    assert table.metrics == ("hessian",)
    # weight damage = ½ · tr/n · ||Q(W) - W||² with Q calibrated on W (HAWQ-V3)
    u = 1  # the second Linear
    for k in range(units.units[u].n_weight):
        fq = FakeQuantize(units.weight_plan(u, k).weight, for_weight=True)
        fq.observing = True
        w = model[2].weight.detach()
        fq(w)
        fq.freeze()
        expected = 0.5 * traces["2"]["weight_per_element"] * float(((fq(w) - w) ** 2).sum())
        assert table.units[u].weight["hessian"][k] == pytest.approx(expected, rel=1e-5)
    # activation damage = ½ · tr(H_A) · mean((Q(A) - A)²), Q calibrated on the calib batch
    a = torch.tanh(model[0](x)).detach()
    for k in range(units.units[u].n_activation):
        fq = FakeQuantize(units.activation_plan(u, k).activation)
        fq.observing = True
        fq(a)
        fq.freeze()
        expected = 0.5 * traces["2"]["activation"] * float(((fq(a) - a) ** 2).mean())
        assert table.units[u].activation["hessian"][k] == pytest.approx(expected, rel=1e-5)
    a3, a8 = table.units[u].activation["hessian"]
    assert a3 > 10 * a8 > 0
