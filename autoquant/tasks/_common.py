"""What the built-in tasks share: cache versions, subset picking, checkpoints, float accuracy."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import Tensor, nn

from autoquant.tasks._datasets import Arrays
from autoquant.tasks._files import cache_dir, cached_json, config_key
from autoquant.tasks._subsets import stratified_subset
from autoquant.tasks._task import Task, _take
from autoquant.train import evaluate
from autoquant.transform import Inputs

# Bump when a model class, recipe or preprocessing changes: old caches are then ignored.
CACHE_VERSION = 1
# Bump when the choice or order of subsets changes. Part of the key of every cache that
# depends on a subset (float accuracy on an eval subset, the digits model trained on its
# split); not of the CIFAR fine-tunes, which see the whole train split.
# 2: stratified, shuffled subsets (were: a seeded choice in index order).
SUBSETS_VERSION = 2

StateDict = dict[str, Tensor]


def check_size(name: str, value: int | None, limit: int) -> int:
    """``value`` capped at ``limit`` (None: ``limit``); an error naming ``name`` otherwise."""
    if value is None:
        return limit
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value:
        raise ValueError(
            f"{name}={value!r} is not allowed; allowed values: None or an integer in [1, {limit}]"
        )
    return min(value, limit)


Pair = tuple[Inputs, Tensor]


def arrays_split(data: Arrays, split: str) -> tuple[Tensor, Tensor]:
    """``(x, y)`` tensors of a data set's ``x_<split>`` / ``y_<split>`` arrays."""
    return torch.from_numpy(data[f"x_{split}"]), torch.from_numpy(data[f"y_{split}"])


def calib_eval_subsets(
    train: Pair, test: Pair, seed: int, calib_size: int | None, eval_size: int | None
) -> tuple[Pair, Pair, np.ndarray]:
    """``(calib, eval, eval_idx)``: the calibration subset of ``train`` and the evaluation
    subset of ``test``, each stratified by class and shuffled with ``seed`` (see
    :func:`stratified_subset`), so that the first batches of either are balanced.

    Every built-in task picks its subsets here; ``eval_idx`` (rows of ``test``, in order)
    keys the float-accuracy caches.
    """
    n_train, n_test = len(train[1]), len(test[1])
    calib_idx = stratified_subset(
        train[1].numpy(), check_size("calib_size", calib_size, n_train), seed + 1
    )
    eval_idx = stratified_subset(
        test[1].numpy(), check_size("eval_size", eval_size, n_test), seed + 2
    )

    def rows(pair: Pair, idx: np.ndarray) -> Pair:
        index = torch.from_numpy(idx)
        return _take(pair[0], index), pair[1][index]

    return rows(train, calib_idx), rows(test, eval_idx), eval_idx


def save_checkpoint(obj: dict[str, Any], f: IO[bytes]) -> None:
    torch.save(obj, f)


def load_checkpoint(path: Path) -> dict[str, Any]:
    obj = torch.load(path, weights_only=True, map_location="cpu")
    if not isinstance(obj, dict) or "state_dict" not in obj or "meta" not in obj:
        raise ValueError("not an autoquant checkpoint (needs 'state_dict' and 'meta')")
    return obj


def state_factory(cls: Callable[[], nn.Module], state: StateDict) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        model = cls()
        model.load_state_dict(state, strict=True)
        return model.eval()

    return make


def cached_float_accuracy(task: Task, cache_name: str, config: dict[str, Any]) -> float:
    """Float accuracy on the task's eval set, cached on disk by configuration."""
    path = cache_dir() / cache_name / f"float-accuracy-{config_key(config)}.json"

    def build() -> dict[str, Any]:
        return {
            "accuracy": evaluate(task.model_factory(), task.eval_batches(), task.metric),
            "config": config,
        }

    return float(cached_json(path, build)["accuracy"])
