"""Learned quantizer parameters in QAT: their optimizer groups and learning rate, validity after
every step, stability at 2-3 bits, bf16 autocast and inference-mode evaluation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autoquant.quant import EPS, FakeQuantize
from autoquant.train import evaluate, param_groups, qat_finetune
from autoquant.transform import apply_plan, calibration
from autoquant.types import LayerPlan, QuantPlan, QuantSpec

W2 = QuantSpec(bits=2, granularity="per_channel", learned_scale=True)
A3 = QuantSpec(bits=3, symmetric=False, learned_scale=True, learned_zero_point=True, axis=1)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)
    ).eval()


def _quantized(net: nn.Module, lp: LayerPlan, x: torch.Tensor) -> nn.Module:
    q = apply_plan(net, QuantPlan({"0": lp, "3": lp}))
    with calibration(q):
        q(x)
    return q


def _data(n: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, 6, 6, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + 2 * (x[:, 0].mean(dim=(1, 2)) > 0).long()
    return [(x[i : i + 16], y[i : i + 16]) for i in range(0, n, 16)]


def test_quantizer_parameters_get_relative_learning_rates_and_no_weight_decay() -> None:
    data = _data()
    q = _quantized(_net(), LayerPlan(W2, A3), data[0][0])
    groups = param_groups(q, lr=0.1, quant_lr=0.01, weight_decay=0.5)
    base, quant = groups[0], groups[1:]
    fqs = [m for m in q.modules() if isinstance(m, FakeQuantize)]
    scales = [fq.scale for fq in fqs]
    zero_points = [fq.zero_point for fq in fqs if not fq.for_weight]
    assert (base["lr"], base["weight_decay"]) == (0.1, 0.5) and "quant" not in base
    assert {id(p) for p in base["params"]} == {
        id(p) for n, p in q.named_parameters() if "fq" not in n
    }
    lr_of = {id(p): g["lr"] for g in quant for p in g["params"]}
    assert all(g["weight_decay"] == 0.0 and g["quant"] for g in quant)
    for s in scales:
        assert lr_of[id(s)] == pytest.approx(0.01 * float(s.detach().abs().mean()))
    assert all(lr_of[id(z)] == pytest.approx(0.01 * 7) for z in zero_points)  # 3-bit grid
    assert len(lr_of) == len(scales) + len(zero_points)
    assert len(param_groups(q, lr=0.1, quant_lr=0.0)) == 1  # 0 freezes them


def test_learned_qparams_stay_valid_and_frozen_ones_do_not_move() -> None:
    data = _data()
    q = _quantized(_net(), LayerPlan(W2, A3), data[0][0])
    fqs = [m for m in q.modules() if isinstance(m, FakeQuantize)]
    before = [(fq.scale.detach().clone(), fq.zero_point.detach().clone()) for fq in fqs]
    record: dict = {}
    qat_finetune(
        q, data, F.cross_entropy, steps=8, lr=1e-3, optimizer="adam", quant_lr=200.0, record=record
    )
    for fq, (s0, _) in zip(fqs, before, strict=True):
        assert bool((fq.scale > 0).all()) and not torch.equal(fq.scale.detach(), s0)
        z = fq.zero_point.detach()
        assert bool(((z >= fq.qmin) & (z <= fq.qmax)).all())  # a huge step is projected back
    moved = [fq for fq in fqs if fq._learns("zero_point")]
    assert moved and any(float(fq.zero_point.detach()) in (0.0, 7.0) for fq in moved)
    assert record["quant_params"] == 6 and record["quant_lr"] == 200.0
    # quant_lr=0 keeps them as calibrated.
    q2 = _quantized(_net(), LayerPlan(W2, A3), data[0][0])
    fq2 = [m for m in q2.modules() if isinstance(m, FakeQuantize)]
    s_before = [fq.scale.detach().clone() for fq in fq2]
    qat_finetune(q2, data, F.cross_entropy, steps=3, lr=1e-3, optimizer="adam", quant_lr=0.0)
    assert all(torch.equal(fq.scale.detach(), s) for fq, s in zip(fq2, s_before, strict=True))


@pytest.mark.parametrize("bad", [-1.0, float("nan"), True])
def test_bad_quant_lr_names_the_field(bad: float) -> None:
    with pytest.raises(ValueError, match="quant_lr=.* is not allowed; allowed values"):
        qat_finetune(nn.Linear(2, 2), _data()[:1], F.cross_entropy, steps=1, lr=0.1, quant_lr=bad)


def _regression(learn: bool, bits_w: int, bits_a: int) -> tuple[float, float, list[float]]:
    """A heavy-tailed linear teacher: min/max grids at 2-3 bits round most weights to 0."""
    torch.manual_seed(0)
    w = torch.distributions.StudentT(2.0).sample((16, 32))
    x = torch.randn(1024, 32)
    x[::50] *= 6  # activation outliers stretch the min/max range
    y = x @ w.T
    batches = [(x[i : i + 128], y[i : i + 128]) for i in range(0, 1024, 128)]
    net = nn.Sequential(nn.Linear(32, 16, bias=False))
    net[0].weight.data.copy_(w)
    lp = LayerPlan(
        QuantSpec(bits=bits_w, granularity="per_channel", learned_scale=learn),
        QuantSpec(bits=bits_a, symmetric=False, learned_scale=learn, learned_zero_point=learn),
    )
    q = apply_plan(net, QuantPlan({"0": lp}))
    with calibration(q):
        q(x[:256])

    def mse() -> float:
        with torch.no_grad():
            return sum(float(F.mse_loss(q(a), b)) for a, b in batches) / len(batches)

    start = mse()
    history = qat_finetune(
        q, batches, F.mse_loss, steps=100, lr=1e-3, optimizer="adam", quant_lr=1e-2
    )
    return start, mse(), history


@pytest.mark.parametrize(("bits_w", "bits_a"), [(2, 3), (3, 3), (2, 4)])
def test_lsq_at_two_and_three_bits_is_stable_and_beats_fixed_scales(bits_w, bits_a) -> None:
    start, fixed, _ = _regression(False, bits_w, bits_a)
    start_lsq, learned, history = _regression(True, bits_w, bits_a)
    assert start == start_lsq  # same calibration: only the training differs
    assert all(math.isfinite(v) for v in history)
    assert sum(history[-8:]) < 0.9 * sum(history[:8])  # one pass over the 8 batches
    assert learned < 0.8 * fixed  # fixed min/max grids barely improve (~1 %)


def test_bf16_autocast_trains_and_evaluates_close_to_float32() -> None:
    data = _data(128)
    lp = LayerPlan(QuantSpec(bits=8, granularity="per_channel"), QuantSpec(bits=8, symmetric=False))
    q32 = _quantized(_net(), lp, data[0][0])
    qbf = _quantized(_net(), lp, data[0][0])
    dtypes: list[torch.dtype] = []
    qbf[0].register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
    kwargs = {"steps": 30, "lr": 1e-2, "optimizer": "adam"}
    h32 = qat_finetune(q32, data, F.cross_entropy, **kwargs)
    hbf = qat_finetune(qbf, data, F.cross_entropy, autocast="bf16", **kwargs)
    assert dtypes[0] == torch.bfloat16  # the conv ran in bfloat16
    assert all(math.isfinite(v) for v in hbf) and hbf[-1] < 0.7 * hbf[0]
    assert abs(hbf[-1] - h32[-1]) < 0.1 * h32[0]
    acc32 = evaluate(q32, data)
    assert abs(evaluate(qbf, data, autocast="bf16") - acc32) <= 0.1
    with pytest.raises(ValueError, match="autocast='fp8' is not allowed; allowed values: None"):
        evaluate(q32, data, autocast="fp8")


def test_evaluate_runs_in_inference_mode_and_qat_can_follow() -> None:
    data = _data()
    per_tensor_w = QuantSpec(bits=4)  # its eager cache is built lazily, on first use
    q = _quantized(_net(), LayerPlan(per_tensor_w, QuantSpec(bits=8, symmetric=False)), data[0][0])
    modes: list[bool] = []
    hook = q.register_forward_hook(lambda m, a, o: modes.append(torch.is_inference_mode_enabled()))
    for fq in q.modules():
        if isinstance(fq, FakeQuantize):
            fq._cache = None  # so evaluation builds the caches, inside inference mode
    evaluate(q, data)
    hook.remove()
    assert modes and all(modes)
    history = qat_finetune(q, data, F.cross_entropy, steps=3, lr=1e-3)
    assert all(math.isfinite(v) for v in history)
    assert q[0].weight_fq.kernel.shape == (4, 8) and float(q[0].weight_fq.kernel[1].min()) > EPS
