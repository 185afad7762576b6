"""Packed size vs a hand-computed closed form."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from autoquant.transform import (
    apply_plan,
    calibration,
    float_size_bytes,
    packed_size_bytes,
    size_breakdown,
)
from autoquant.types import LayerPlan, PlanError, QuantPlan, QuantSpec


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, bias=False)  # 135 weights; BN folds in a 5-bias
        self.bn = nn.BatchNorm2d(5)
        self.conv2 = nn.Conv2d(5, 4, 1)  # 20 weights + 4 bias
        self.norm = nn.LayerNorm(4)  # 8 float params, never quantized
        self.fc = nn.Linear(4, 3)  # 12 weights + 3 bias
        self.head = nn.Linear(3, 2)  # 6 + 2, not in the plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(torch.relu(self.bn(self.conv(x))))
        x = self.norm(x.mean((2, 3)))
        return self.head(self.fc(x))


PLAN = QuantPlan(
    {
        "conv": LayerPlan(QuantSpec(bits=3, granularity="per_channel"), QuantSpec(bits=8)),
        "conv2": LayerPlan(QuantSpec(bits="fp16"), QuantSpec(bits="fp32")),
        "fc": LayerPlan(
            QuantSpec(bits=5, symmetric=False), QuantSpec(bits=6, granularity="per_channel", axis=1)
        ),
    }
)

EXPECTED = (
    math.ceil(135 * 3 / 8)
    + 5 * (4 + 1)
    + (4 + 1)
    + 5 * 4  # conv: w3 per-channel, a8, bias
    + 20 * 2
    + 4 * 4  # conv2: fp16 weights, fp32 bias
    + 8 * 4  # layernorm
    + math.ceil(12 * 5 / 8)
    + (4 + 1)
    + 4 * (4 + 1)
    + 3 * 4  # fc: w5 per-tensor, a6 per-chan
    + 8 * 4  # head, float
)


def test_packed_size_closed_form() -> None:
    assert packed_size_bytes(Tiny(), PLAN) == EXPECTED == 266


def test_same_size_on_the_quantized_model() -> None:
    model = Tiny().eval()
    q = apply_plan(model, PLAN)
    with calibration(q):
        q(torch.randn(2, 3, 6, 6))
    assert packed_size_bytes(q, PLAN) == EXPECTED
    assert float_size_bytes(q) == float_size_bytes(model)


def test_float_size_counts_folded_model() -> None:
    # 135 + 5 (folded bias) + 24 + 8 + 15 + 8 parameters; BN's 10 are gone.
    assert float_size_bytes(Tiny()) == 4 * (135 + 5 + 24 + 8 + 15 + 8)


def test_breakdown_rows() -> None:
    rows = size_breakdown(Tiny(), PLAN)
    by_tensor = {r.tensor: r for r in rows}
    assert by_tensor["conv.weight"].bits == 3 and by_tensor["conv.weight"].bytes == 51
    assert by_tensor["conv.weight_scale"].numel == 5
    assert by_tensor["conv.bias"].numel == 5 and by_tensor["conv.bias"].bytes == 20
    assert by_tensor["fc.act_scale"].numel == 4
    assert "conv2.weight_scale" not in by_tensor and "bn.weight" not in by_tensor
    assert sum(r.bytes for r in rows) == EXPECTED
    assert rows[0].to_dict()["bytes"] == rows[0].bytes


def test_unknown_layer_in_size_plan() -> None:
    with pytest.raises(PlanError, match="valid names"):
        packed_size_bytes(Tiny(), QuantPlan({"norm": LayerPlan()}))
