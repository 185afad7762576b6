"""Batches as the training loop and the teacher see them: ``(inputs, targets)`` pairs served
step by step (a list is cycled, an iterator drained), so step ``i`` gets the same batch in a
trial and in the teacher's pass over the same stream."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from torch import Tensor

from autoquant.transform import Inputs

Batch = tuple[Inputs, Tensor]


def split_batch(batch: Any) -> Batch:
    """``(inputs, targets)`` of one batch, or a ``ValueError`` naming what was given."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError(f"each batch must be a pair (inputs, targets), got {type(batch).__name__}")
    return batch[0], batch[1]


def stream(batches: Iterable[Any], steps: int) -> Iterator[Batch]:
    """Yield ``steps`` batches: cycle a re-iterable collection, drain a one-shot iterator.

    Example:
        >>> [int(y) for _, y in stream([(0, 1), (0, 2)], 3)]
        [1, 2, 1]
    """
    one_shot = isinstance(batches, Iterator)
    served = 0
    while served < steps:
        served_this_pass = 0
        for batch in batches:
            served += 1
            served_this_pass += 1
            yield split_batch(batch)
            if served == steps:
                return
        if served_this_pass == 0 or one_shot:
            raise ValueError(
                f"batches ran out after {served} batch(es) but steps={steps}; pass an infinite "
                "iterator (e.g. Task.train_batches) or a re-iterable list of batches"
            )


def materialize_batches(batches: Iterable[Any], steps: int) -> list[Batch]:
    """The first ``steps`` batches of a stream, as a list to reuse across trials.

    A study's training stream is the same for every trial; building it once (augmentation and
    preprocessing: ~1-3 s per 200 CIFAR batches of 64 on a 2-core CPU) and handing the list to
    each trial's :func:`~autoquant.train.qat_finetune` gives every trial the same batches in
    the same order, as long as no trial takes more than ``steps`` steps (a list is cycled).
    Memory: the batches themselves (200 × 64 × 3×32×32 float32 = 157 MB for CIFAR-10).

    Example:
        >>> data = materialize_batches(iter([(1, 2), (3, 4), (5, 6)]), 2)
        >>> data
        [(1, 2), (3, 4)]
    """
    return list(stream(batches, steps))
