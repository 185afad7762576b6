"""autoquant.train: the QAT fine-tuning loop, distillation and held-out evaluation.

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

from autoquant.train._compile import COMPILE_CHOICES, CompiledRunner, compiled_graphs
from autoquant.train._data import materialize_batches
from autoquant.train._distill import (
    Distillation,
    TeacherLogitsCache,
    cached_teacher_logits,
    distillation_loss,
    teacher_key,
    teacher_logits,
    weights_sha256,
)
from autoquant.train._errors import NonFiniteLossError
from autoquant.train._loop import (
    AUTOCAST,
    METRICS,
    OPTIMIZERS,
    SCHEDULES,
    evaluate,
    qat_finetune,
    torch_threads,
)
from autoquant.train._optim import DEFAULT_QUANT_LR, learned_quantizers, param_groups

__all__ = [
    "AUTOCAST",
    "COMPILE_CHOICES",
    "DEFAULT_QUANT_LR",
    "METRICS",
    "OPTIMIZERS",
    "SCHEDULES",
    "CompiledRunner",
    "Distillation",
    "NonFiniteLossError",
    "TeacherLogitsCache",
    "cached_teacher_logits",
    "compiled_graphs",
    "distillation_loss",
    "evaluate",
    "learned_quantizers",
    "materialize_batches",
    "param_groups",
    "qat_finetune",
    "teacher_key",
    "teacher_logits",
    "torch_threads",
    "weights_sha256",
]
