"""autoquant.train: a plain QAT fine-tuning loop and held-out evaluation.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from autoquant.train import evaluate, qat_finetune
    >>> net = nn.Linear(4, 3)
    >>> data = [(torch.randn(16, 4), torch.randint(0, 3, (16,)))]
    >>> _ = qat_finetune(net, data, nn.functional.cross_entropy, steps=3, lr=0.05)
    >>> 0.0 <= evaluate(net, data) <= 1.0
    True
"""

from __future__ import annotations

from autoquant.train._loop import (
    METRICS,
    OPTIMIZERS,
    SCHEDULES,
    NonFiniteLossError,
    evaluate,
    qat_finetune,
    torch_threads,
)

__all__ = [
    "METRICS",
    "OPTIMIZERS",
    "SCHEDULES",
    "NonFiniteLossError",
    "evaluate",
    "qat_finetune",
    "torch_threads",
]
