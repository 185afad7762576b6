"""Models, plans and helpers shared by the measure tests (imported by name)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autoquant.transform import apply_plan, calibration
from autoquant.types import LayerPlan, QuantPlan, QuantSpec


class TinyResNet(nn.Module):
    """Conv+BN stem, one residual block (float add), a Conv1d branch, a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.seq = nn.Conv1d(8, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 16, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn(self.stem(x)))
        y = F.relu(self.conv1(x))
        x = F.relu(self.conv2(y) + x)
        x = F.max_pool2d(x, 2).flatten(2)  # [N, 8, 16]: a sequence for the Conv1d
        x = F.relu(self.seq(x))
        return self.fc(x.flatten(1))


LAYERS = ["stem", "conv1", "conv2", "seq", "fc"]


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    model = TinyResNet().eval()
    with torch.no_grad():  # non-trivial BN statistics, so folding matters
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model


def resnet8() -> nn.Module:
    """CIFAR ResNet-8 (RGB stem, two zero-padding shortcuts) with non-trivial BN statistics."""
    from autoquant.tasks import CifarResNet

    torch.manual_seed(0)
    model = CifarResNet(8).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def calib_inputs(n: int = 4, batch: int = 16) -> list[Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(batch, 3, 8, 8, generator=gen) for _ in range(n)]


def w8a8(names: Iterable[str] = LAYERS, per_channel: bool = True) -> QuantPlan:
    return QuantPlan.uniform(
        names,
        QuantSpec(bits=8, granularity="per_channel" if per_channel else "per_tensor"),
        QuantSpec(bits=8, symmetric=False),
    )


def mixed_plan() -> QuantPlan:
    """4- and 8-bit weights, sym/asym and sub-8-bit inputs, one fp16 layer."""
    return QuantPlan(
        {
            "stem": LayerPlan(QuantSpec(bits=8, granularity="per_channel"), QuantSpec(bits=8)),
            "conv1": LayerPlan(
                QuantSpec(bits=4, granularity="per_channel"), QuantSpec(bits=6, symmetric=False)
            ),
            "conv2": LayerPlan(
                QuantSpec(bits=4, symmetric=False), QuantSpec(bits=8, symmetric=False)
            ),
            "seq": LayerPlan(QuantSpec(bits="fp16"), QuantSpec(bits="fp16")),
            "fc": LayerPlan(QuantSpec(bits=6, granularity="per_channel"), QuantSpec(bits=5)),
        }
    )


def quantized(model: nn.Module, plan: QuantPlan, batches: Iterable[Tensor]) -> nn.Module:
    """apply_plan + calibration on ``batches``."""
    q = apply_plan(model, plan)
    with calibration(q):
        for x in batches:
            q(x)
    return q.eval()
