"""A tiny user task for the CLI tests, named in study files as ``cli_tiny_task:tiny_task``.

An MLP (layers ``0`` and ``2``) on four well-separated Gaussian blobs: it trains in a
fraction of a second, so a whole search runs in seconds, and its accuracy is near 100 %, so
the deployed model agrees with the simulation sample for sample. ``broken_flag`` names a
file: while it exists, every QAT step raises (a broken task the user later fixes).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from autoquant.tasks import Task

_MODEL: nn.Module | None = None
_CENTERS = torch.randn(4, 8, generator=torch.Generator().manual_seed(0)) * 3


def _sample(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    return _CENTERS[y] + 0.5 * torch.randn(n, 8, generator=g), y


def _model() -> nn.Module:
    global _MODEL
    if _MODEL is None:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        x, y = _sample(512, 1)
        opt = torch.optim.Adam(net.parameters(), lr=0.02)
        for _ in range(150):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
        _MODEL = net.eval()
    return copy.deepcopy(_MODEL)


def tiny_task(broken_flag: str = "") -> Task:
    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if broken_flag and Path(broken_flag).exists():
            raise ValueError("tiny task is broken: label 7 is outside the 4 classes")
        return F.cross_entropy(out, y)

    return Task.from_tensors(
        "tiny",
        _model,
        train=_sample(512, 1),
        eval=_sample(1000, 2),
        calib_size=128,
        batch_size=64,
        loss_fn=loss_fn,
    )
