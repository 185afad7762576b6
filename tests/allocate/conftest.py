"""Tiny models and data for the allocate tests."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn


class TinyResNet(nn.Module):
    """conv+BN, a residual conv, a linear head: traceable by torch.fx, with one add."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.conv2(h) + h)
        return self.fc(h.flatten(1))


class Untraceable(TinyResNet):
    """The same layers behind data-dependent control flow: torch.fx cannot trace it."""

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > -1e9:  # always true, but a traced Proxy has no truth value
            return super().forward(x)
        return super().forward(-x)  # pragma: no cover


def _init(model: nn.Module) -> nn.Module:
    torch.manual_seed(3)
    for p in model.parameters():
        nn.init.normal_(p, std=0.4)
    model.bn1.running_mean.uniform_(-0.2, 0.2)
    model.bn1.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture
def tiny() -> nn.Module:
    return _init(TinyResNet())


@pytest.fixture
def untraceable() -> nn.Module:
    return _init(Untraceable())


@pytest.fixture
def data() -> tuple[list[tuple[Tensor, Tensor]], list[tuple[Tensor, Tensor]]]:
    """(calibration batches, held-out batches) of random 1×8×8 inputs and 5 classes."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(96, 1, 8, 8, generator=g)
    y = torch.randint(0, 5, (96,), generator=g)
    calib = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 32, 16)]
    held_out = [(x[i : i + 24], y[i : i + 24]) for i in range(32, 96, 24)]
    return calib, held_out
