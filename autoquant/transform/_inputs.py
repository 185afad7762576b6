"""Model inputs: one tensor, or a tuple of positional tensors (token ids and a mask, ...).

Every place that runs a model (calibration, QAT, evaluation, export, latency) goes through
these helpers, so a task's ``example_input`` and batches may use either form and any dtype.

Example:
    >>> import torch
    >>> from torch import nn
    >>> ids = (torch.tensor([[1, 2]]), torch.tensor([[1, 1]]))
    >>> call_model(lambda a, b: a * b, ids).tolist(), batch_len(ids)
    ([[1, 2]], 1)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

#: A model's positional inputs: one tensor, or a tuple of tensors.
Inputs = Tensor | tuple[Tensor, ...]


def as_tuple(inputs: Inputs) -> tuple[Tensor, ...]:
    """The positional inputs as a tuple (a lone tensor becomes a 1-tuple)."""
    if isinstance(inputs, Tensor):
        return (inputs,)
    if isinstance(inputs, (tuple, list)) and inputs and all(isinstance(t, Tensor) for t in inputs):
        return tuple(inputs)
    raise TypeError(
        f"model inputs must be a tensor or a non-empty tuple of tensors, got {_describe(inputs)}"
    )


def _describe(inputs: Any) -> str:
    if isinstance(inputs, (tuple, list)):
        return f"{type(inputs).__name__} of ({', '.join(type(t).__name__ for t in inputs)})"
    return type(inputs).__name__


def call_model(model: Callable[..., Any], inputs: Inputs) -> Any:
    """``model(*inputs)`` for a tuple, ``model(inputs)`` for a tensor."""
    if isinstance(inputs, Tensor):
        return model(inputs)
    return model(*as_tuple(inputs))


def inputs_to(inputs: Inputs, device: torch.device | str, non_blocking: bool = False) -> Inputs:
    """``inputs`` on ``device``, in the same form (dtypes kept: token ids stay integers)."""
    if isinstance(inputs, Tensor):
        return inputs.to(device, non_blocking=non_blocking)
    return tuple(t.to(device, non_blocking=non_blocking) for t in as_tuple(inputs))


def batch_len(inputs: Inputs) -> int:
    """The batch size: the first dimension of the first input."""
    first = as_tuple(inputs)[0]
    return int(first.shape[0]) if first.ndim else 1


def map_inputs(inputs: Inputs, fn: Callable[[Tensor], Tensor]) -> Inputs:
    """``fn`` applied to every input tensor, in the same form."""
    if isinstance(inputs, Tensor):
        return fn(inputs)
    return tuple(fn(t) for t in as_tuple(inputs))
