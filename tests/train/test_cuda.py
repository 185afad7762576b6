"""QAT and evaluation on CUDA (skipped without a GPU): results match the CPU, qparams live on
the GPU, the fake-quant step never synchronises with the host, bf16 autocast and compile work."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autoquant.quant import FakeQuantize
from autoquant.train import evaluate, qat_finetune
from autoquant.transform import apply_plan, calibration
from autoquant.types import LayerPlan, QuantPlan, QuantSpec

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

PLAN = QuantPlan(
    {
        n: LayerPlan(
            QuantSpec(bits=4, granularity="per_channel", learned_scale=True),
            QuantSpec(bits=4, symmetric=False, axis=1, learned_scale=True, learned_zero_point=True),
        )
        for n in ("0", "2", "5")
    }
    | {"7": LayerPlan(QuantSpec(bits=8), QuantSpec(bits=8, symmetric=False))}
)


def _model_and_data() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 8 * 8, 32),
        nn.ReLU(),
        nn.Linear(32, 4),
    ).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 3, 8, 8, generator=g)
    y = (x[:, 0].mean(dim=(1, 2)) > 0).long() * 2 + (x[:, 1].mean(dim=(1, 2)) > 0).long()
    return net, [(x[i : i + 32], y[i : i + 32]) for i in range(0, 256, 32)]


def _quantized(device: str) -> tuple[nn.Module, list]:
    net, data = _model_and_data()
    q = apply_plan(net, PLAN).to(device)
    with calibration(q):
        for x, _ in data[:2]:
            q(x.to(device))
    return q, data


def test_cuda_qat_matches_cpu_and_keeps_qparams_on_the_gpu() -> None:
    results = {}
    for device in ("cpu", "cuda"):
        q, data = _quantized(device)
        kwargs = {"steps": 40, "lr": 1e-3, "optimizer": "adam", "quant_lr": 1e-2}
        history = qat_finetune(q, data, F.cross_entropy, device=device, **kwargs)
        results[device] = (history, evaluate(q, data, device=device))
        if device == "cuda":
            for fq in q.modules():
                if isinstance(fq, FakeQuantize):
                    assert fq.scale.is_cuda and fq.zero_point.is_cuda and fq.kernel.is_cuda
    (h_cpu, acc_cpu), (h_gpu, acc_gpu) = results["cpu"], results["cuda"]
    assert h_gpu[0] == pytest.approx(h_cpu[0], rel=1e-4)  # cuDNN vs oneDNN summation order
    assert abs(h_gpu[-1] - h_cpu[-1]) < 0.05 and abs(acc_gpu - acc_cpu) <= 0.05


def test_fake_quant_step_has_no_host_sync() -> None:
    q, data = _quantized("cuda")
    q.train()
    x = data[0][0].cuda()
    q(x).sum().backward()  # warm-up: eager caches are built once after calibration
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        q.zero_grad(set_to_none=True)
        q(x).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_bf16_autocast_and_compile_on_cuda() -> None:
    q, data = _quantized("cuda")
    record: dict = {}
    history = qat_finetune(
        q,
        data,
        F.cross_entropy,
        steps=30,
        lr=1e-3,
        optimizer="adam",
        device="cuda",
        autocast="bf16",
        compile="auto",  # compiles on CUDA
        record=record,
    )
    assert record["compile"]["used"] and record["compile"]["fallback"] is None
    assert all(math.isfinite(v) for v in history) and history[-1] < history[0]
    acc = evaluate(q, data, device="cuda", autocast="bf16", compile="auto")
    assert acc > 0.4  # 4 balanced classes: chance is 0.25
