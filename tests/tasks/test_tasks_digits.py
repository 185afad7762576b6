from __future__ import annotations

import time
from itertools import islice
from pathlib import Path

import pytest
import torch

from autoquant.tasks import DigitsCNN, Task, get_task
from autoquant.train import evaluate


def _rows(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> set[bytes]:
    return {x.numpy().tobytes() for xb, _ in batches for x in xb}


@pytest.fixture(scope="module")
def first(tmp_cache: Path) -> tuple[Task, float]:
    t0 = time.perf_counter()
    task = get_task("digits-cnn")
    return task, time.perf_counter() - t0


def test_trains_to_95_percent_on_held_out(first: tuple[Task, float]) -> None:
    task, _ = first
    assert task.info["trained_now"]
    model = task.model_factory()
    assert isinstance(model, DigitsCNN) and not model.training
    acc = evaluate(model, task.eval_batches())  # recomputed, not the cached figure
    assert acc >= 0.95
    assert acc == pytest.approx(task.float_accuracy)
    assert task.info["eval_size"] == 719 and task.info["train_size"] == 1078


def test_eval_is_disjoint_from_train_and_calib(first: tuple[Task, float]) -> None:
    task, _ = first
    # One batch of the whole training split (the digits images have no exact duplicates).
    train = _rows([next(task.train_batches(task.info["train_size"], seed=0))])
    calib = _rows(task.calib_batches())
    held_out = _rows(task.eval_batches())
    assert len(train) == 1078 and len(held_out) == 719 and len(calib) == 256
    assert calib <= train
    assert not held_out & train and not held_out & calib


def test_second_call_loads_cache(first: tuple[Task, float]) -> None:
    task, first_seconds = first
    t0 = time.perf_counter()
    again = get_task("digits-cnn")
    seconds = time.perf_counter() - t0
    assert not again.info["trained_now"]
    assert seconds < first_seconds / 3
    a, b = task.model_factory().state_dict(), again.model_factory().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_corrupted_cache_is_rebuilt_identically(first: tuple[Task, float]) -> None:
    task, _ = first
    path = Path(task.info["checkpoint"])
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # one flipped byte: the sidecar checksum must catch it
    path.write_bytes(bytes(blob))
    with pytest.warns(UserWarning, match="corrupt cache"):
        rebuilt = get_task("digits-cnn")
    assert rebuilt.info["trained_now"]
    # Training is deterministic: the rebuild reproduces the same weights.
    a, b = task.model_factory().state_dict(), rebuilt.model_factory().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_eval_subset_and_batches(first: tuple[Task, float]) -> None:
    task = get_task("digits-cnn", eval_size=100, calib_size=64, batch_size=16)
    assert not task.info["trained_now"]
    assert task.info["eval_size"] == 100
    assert _rows(task.eval_batches()) <= _rows(first[0].eval_batches())
    assert task.float_accuracy == pytest.approx(
        evaluate(task.model_factory(), task.eval_batches(7))
    )
    assert [len(y) for _, y in task.calib_batches()] == [16] * 4
    assert task.example_input(3).shape == (3, 1, 8, 8)


def test_train_batches_are_seeded(first: tuple[Task, float]) -> None:
    task, _ = first

    def labels(seed: int) -> torch.Tensor:
        return torch.cat([y for _, y in islice(task.train_batches(32, seed=seed), 3)])

    assert torch.equal(labels(1), labels(1))
    assert not torch.equal(labels(1), labels(2))
