"""The :class:`Task` record: a pretrained model plus its data splits, loss and metric."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autoquant.tasks._subsets import stratified_subset
from autoquant.train import METRICS, evaluate
from autoquant.transform import Inputs, as_tuple, map_inputs

#: ``(inputs, targets)``: inputs are one tensor or a tuple of tensors (token ids, mask, ...).
Batch = tuple[Inputs, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]
#: Turns stored samples (e.g. uint8 images) into model inputs.
Preprocess = Callable[[Inputs], Inputs]
#: Random training augmentation on stored samples, drawing from the given generator.
Augment = Callable[[Inputs, torch.Generator], Inputs]


@dataclass
class Task:
    """Everything a search needs to know about one model and its data.

    Attributes:
        name: task name (used in reports and cache paths).
        model_factory: returns a fresh pretrained float model in eval mode on the CPU.
        train_batches: ``train_batches(batch_size=None, seed=0)`` -> infinite, shuffled
            iterator of ``(x, y)``; the same seed gives the same stream.
        calib_batches: ``calib_batches(batch_size=None)`` -> list of ``(x, y)`` for
            calibration, drawn from the training split (deterministic, no augmentation).
        eval_batches: ``eval_batches(batch_size=None)`` -> list of ``(x, y)`` from the
            held-out split, never seen in training or calibration.
        example_input: ``example_input(batch_size=1)`` -> a real input batch (for tracing,
            export and latency): a tensor, or a tuple of tensors for multi-input models.
        loss_fn: ``loss_fn(model(x), y)`` -> scalar loss matching the model's output.
        metric: accuracy metric for :func:`autoquant.train.evaluate` (``"top1"``).
        float_accuracy: the float model's metric on ``eval_batches``, or None if unknown
            (see :meth:`measure_float_accuracy`).
        info: free-form facts (split sizes, accuracy before/after a float fine-tune, ...).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> x, y = torch.randn(40, 3), torch.randint(0, 2, (40,))
        >>> task = Task.from_tensors("toy", lambda: nn.Linear(3, 2).eval(),
        ...                          train=(x[:30], y[:30]), eval=(x[30:], y[30:]))
        >>> next(task.train_batches(8, seed=0))[0].shape
        torch.Size([8, 3])
    """

    name: str
    model_factory: Callable[[], nn.Module]
    train_batches: Callable[..., Iterator[Batch]]
    calib_batches: Callable[..., list[Batch]]
    eval_batches: Callable[..., list[Batch]]
    example_input: Callable[..., Inputs]
    loss_fn: LossFn = F.cross_entropy
    metric: str = "top1"
    float_accuracy: float | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Task.name={self.name!r} must be a non-empty string")
        for name in (
            "model_factory",
            "train_batches",
            "calib_batches",
            "eval_batches",
            "example_input",
            "loss_fn",
        ):
            if not callable(getattr(self, name)):
                raise ValueError(
                    f"Task.{name} must be callable, got {type(getattr(self, name)).__name__}"
                )
        if self.metric not in METRICS:
            raise ValueError(
                f"Task.metric={self.metric!r} is not allowed; allowed values: "
                f"{', '.join(map(repr, METRICS))}"
            )

    def measure_float_accuracy(
        self, batch_size: int | None = None, device: str | torch.device = "cpu"
    ) -> float:
        """Evaluate the float model on ``eval_batches``, store it in ``float_accuracy``."""
        acc = evaluate(self.model_factory(), self.eval_batches(batch_size), self.metric, device)
        self.float_accuracy = acc
        return acc

    @classmethod
    def from_tensors(
        cls,
        name: str,
        model_factory: Callable[[], nn.Module],
        *,
        train: tuple[Inputs, Tensor],
        eval: tuple[Inputs, Tensor],
        calib: tuple[Inputs, Tensor] | None = None,
        calib_size: int = 256,
        preprocess: Preprocess | None = None,
        augment: Augment | None = None,
        batch_size: int = 64,
        eval_batch_size: int = 256,
        seed: int = 0,
        loss_fn: LossFn = F.cross_entropy,
        metric: str = "top1",
        float_accuracy: float | None = None,
        info: dict[str, Any] | None = None,
    ) -> Task:
        """Build a task from in-memory ``(inputs, targets)`` splits.

        Args:
            name: task name.
            model_factory: returns a fresh pretrained float model (eval mode).
            train: training split ``(inputs, targets)``, in stored form (what ``preprocess``
                takes); inputs are a tensor or a tuple of tensors with one row per target.
            eval: held-out split; must not overlap ``train``.
            calib: calibration split; default: ``calib_size`` samples of ``train`` picked
                with ``seed``, stratified by class (1-D targets) and shuffled, so that any
                prefix of it (the first calibration batches) is balanced.
            calib_size: size of the default calibration subset.
            preprocess: stored samples -> model inputs, applied per batch (default identity).
            augment: random augmentation of stored training samples (training only).
            batch_size: default training/calibration batch size.
            eval_batch_size: default evaluation batch size.
            seed: seed for the default calibration subset.
            loss_fn: loss on the model output.
            metric: evaluation metric.
            float_accuracy: known float accuracy on ``eval``, if any.
            info: extra facts.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> x, y = torch.randn(20, 4), torch.arange(20) % 2
            >>> t = Task.from_tensors("t", lambda: nn.Linear(4, 2), train=(x, y), eval=(x, y))
            >>> len(t.calib_batches(8))
            3
        """
        if calib is None:
            x, y = _check_pair("train", train)
            idx = torch.from_numpy(_calib_indices(y, calib_size, seed))
            calib = (_take(x, idx), y[idx])
        splits = TensorSplits(
            train,
            calib,
            eval,
            preprocess=preprocess,
            augment=augment,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
        )
        meta = {
            "train_size": len(splits.train[1]),
            "calib_size": len(splits.calib[1]),
            "eval_size": len(splits.eval[1]),
        }
        return cls(
            name=name,
            model_factory=model_factory,
            train_batches=splits.train_batches,
            calib_batches=splits.calib_batches,
            eval_batches=splits.eval_batches,
            example_input=splits.example_input,
            loss_fn=loss_fn,
            metric=metric,
            float_accuracy=float_accuracy,
            info={**meta, **(info or {})},
        )


def _calib_indices(y: Tensor, size: int, seed: int) -> np.ndarray:
    """The default calibration subset: stratified by class for 1-D targets, else shuffled."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"calib_size={size!r} is not allowed; allowed values: an integer >= 1")
    if y.ndim == 1:
        return stratified_subset(y.numpy(), size, seed)
    return np.random.default_rng(seed).permutation(len(y))[:size]


def _take(x: Inputs, idx: Tensor | slice) -> Inputs:
    """Rows ``idx`` of every input tensor, in the same form."""
    return map_inputs(x, lambda t: t[idx])


def _check_pair(name: str, pair: tuple[Inputs, Tensor]) -> tuple[Inputs, Tensor]:
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise ValueError(f"{name} must be a pair (inputs, targets)")
    raw_x, raw_y = pair
    if isinstance(raw_x, (tuple, list)):
        x: Inputs = as_tuple(tuple(torch.as_tensor(t) for t in raw_x))
    else:
        x = torch.as_tensor(raw_x)
    y = torch.as_tensor(raw_y)
    lengths = [len(t) for t in as_tuple(x)]
    if len(set(lengths)) != 1 or lengths[0] != len(y) or len(y) == 0:
        raise ValueError(
            f"{name} needs as many rows in every input as targets (> 0); got inputs "
            f"{lengths} and {len(y)} targets"
        )
    return x, y.long()


def _check_batch_size(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} is not allowed; allowed values: an integer >= 1")
    return value


class TensorSplits:
    """Batching over stored train / calib / eval tensors (preprocessed per batch).

    Stored samples stay in their compact form (e.g. uint8 images); ``preprocess`` runs per
    batch. Inputs are one tensor or a tuple of tensors (token ids and attention mask), each
    with one row per target. Calibration and evaluation batches are built once per batch size
    and reused, in stored order: store them in a balanced order (see
    :func:`~autoquant.tasks.stratified_subset`) so that a prefix is a fair sample.
    """

    def __init__(
        self,
        train: tuple[Inputs, Tensor],
        calib: tuple[Inputs, Tensor],
        eval: tuple[Inputs, Tensor],
        *,
        preprocess: Preprocess | None = None,
        augment: Augment | None = None,
        batch_size: int = 64,
        eval_batch_size: int = 256,
    ) -> None:
        self.train = _check_pair("train", train)
        self.calib = _check_pair("calib", calib)
        self.eval = _check_pair("eval", eval)
        self.preprocess: Preprocess = preprocess if preprocess is not None else (lambda x: x)
        self.augment = augment
        self.batch_size = _check_batch_size("batch_size", batch_size)
        self.eval_batch_size = _check_batch_size("eval_batch_size", eval_batch_size)
        self._memo: dict[tuple[str, int], list[Batch]] = {}

    def train_batches(self, batch_size: int | None = None, seed: int = 0) -> Iterator[Batch]:
        """Infinite iterator of shuffled, augmented training batches (full batches only)."""
        bs = _check_batch_size("batch_size", self.batch_size if batch_size is None else batch_size)
        return self._train_iter(min(bs, len(self.train[1])), seed)

    def _train_iter(self, bs: int, seed: int) -> Iterator[Batch]:
        x, y = self.train
        gen = torch.Generator().manual_seed(seed)
        while True:
            perm = torch.randperm(len(y), generator=gen)
            for i in range(0, len(y) - bs + 1, bs):
                idx = perm[i : i + bs]
                xb = _take(x, idx)
                if self.augment is not None:
                    xb = self.augment(xb, gen)
                yield self.preprocess(xb), y[idx]

    def _batches(self, which: str, bs: int) -> list[Batch]:
        key = (which, bs)
        if key not in self._memo:
            # Keep one batching per split: bounded memory when callers vary the size.
            self._memo = {k: v for k, v in self._memo.items() if k[0] != which}
            x, y = getattr(self, which)
            self._memo[key] = [
                (self.preprocess(_take(x, slice(i, i + bs))), y[i : i + bs])
                for i in range(0, len(y), bs)
            ]
        return list(self._memo[key])

    def calib_batches(self, batch_size: int | None = None) -> list[Batch]:
        """Calibration batches in a fixed order (last one may be short)."""
        return self._batches(
            "calib",
            _check_batch_size("batch_size", self.batch_size if batch_size is None else batch_size),
        )

    def eval_batches(self, batch_size: int | None = None) -> list[Batch]:
        """Held-out evaluation batches in a fixed order (last one may be short)."""
        bs = _check_batch_size(
            "batch_size", self.eval_batch_size if batch_size is None else batch_size
        )
        return self._batches("eval", bs)

    def example_input(self, batch_size: int = 1) -> Inputs:
        """The first ``batch_size`` calibration inputs (cycled if fewer are stored)."""
        bs = _check_batch_size("batch_size", batch_size)
        x, y = self.calib
        idx = torch.arange(bs) % len(y)
        return self.preprocess(_take(x, idx))
