"""Stratified, shuffled subsets: balanced prefixes, determinism, and every built-in task's
calibration and evaluation subsets."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

from autoquant.tasks import BUILTIN_TASKS, Task, stratified_subset
from autoquant.tasks._common import calib_eval_subsets

CALIB_BATCH, CALIB_BATCHES = 64, 4  # the study defaults: [qat] batch_size, calib_batches


def _prefix_excess(labels: np.ndarray) -> float:
    """The largest ``|count_c(k) - k * share_c| - (1 + classes * share_c)`` over all prefixes
    ``k`` and classes ``c``: negative when every prefix keeps the documented bound."""
    classes = np.unique(labels)
    share = np.array([(labels == c).mean() for c in classes])
    counts = np.cumsum(labels[:, None] == classes[None, :], axis=0)  # [k, classes]
    k = np.arange(1, len(labels) + 1)[:, None]
    return float((np.abs(counts - k * share) - (1 + len(classes) * share)).max())


def _class_sorted(per_class: list[int]) -> np.ndarray:
    """Labels stored class by class, as the CIFAR-10 arrays are."""
    return np.repeat(np.arange(len(per_class)), per_class)


@pytest.mark.parametrize(
    ("per_class", "size"),
    [([5000] * 10, 512), ([1000] * 10, 2000), ([3310, 3610], 256), ([50, 30, 7, 1], 40)],
)
def test_subset_is_proportional_and_every_prefix_is_balanced(
    per_class: list[int], size: int
) -> None:
    labels = _class_sorted(per_class)
    idx = stratified_subset(labels, size, seed=3)
    assert len(idx) == size and len(set(idx.tolist())) == size
    counts = np.bincount(labels[idx], minlength=len(per_class))
    # Largest remainder: each class within one item of its exact proportional share.
    exact = np.array(per_class) * size / sum(per_class)
    assert np.all(np.abs(counts - exact) < 1) and counts.sum() == size
    assert _prefix_excess(labels[idx]) < 0


def test_prefix_bound_is_tight_enough_to_fail_for_a_plain_shuffle() -> None:
    labels = _class_sorted([5000] * 10)
    shuffled = np.random.default_rng(0).permutation(labels)[:512]
    assert _prefix_excess(shuffled) > 0  # an unstratified random order breaks the bound
    assert _prefix_excess(np.sort(shuffled)) > 30  # a class-sorted order breaks it badly


def test_subset_is_seeded_and_shuffled() -> None:
    labels = _class_sorted([500] * 10)
    a, b = stratified_subset(labels, 200, seed=1), stratified_subset(labels, 200, seed=1)
    assert np.array_equal(a, b)
    c = stratified_subset(labels, 200, seed=2)
    assert not np.array_equal(a, c) and set(a.tolist()) != set(c.tolist())
    full = stratified_subset(labels, None, seed=1)  # all items, in a balanced order
    assert sorted(full.tolist()) == list(range(len(labels)))
    assert not np.array_equal(full, np.sort(full))
    assert _prefix_excess(labels[full]) < 0


def test_subset_rejects_bad_labels() -> None:
    with pytest.raises(ValueError, match="1-D"):
        stratified_subset(np.zeros((4, 2)), 2, seed=0)


def test_calib_eval_subsets_on_class_sorted_arrays() -> None:
    """The helper every built-in task picks its subsets with, on data stored class by class."""
    y_train = torch.from_numpy(_class_sorted([500] * 10))
    y_test = torch.from_numpy(_class_sorted([100] * 10))
    train = (torch.arange(len(y_train))[:, None], y_train)  # a row holds its own index
    test = (-1 - torch.arange(len(y_test))[:, None], y_test)
    calib, evals, eval_idx = calib_eval_subsets(train, test, 0, 512, 500)
    calib_y = calib[1].numpy()
    assert set(calib_y[: CALIB_BATCH * CALIB_BATCHES].tolist()) == set(range(10))
    assert _prefix_excess(calib_y) < 0 and _prefix_excess(evals[1].numpy()) < 0
    # Rows travel with their labels; calibration comes from train only, evaluation from test.
    assert torch.equal(y_train[calib[0][:, 0]], calib[1])
    assert torch.equal(y_test[torch.from_numpy(eval_idx)], evals[1])
    assert (calib[0] >= 0).all() and (evals[0] < 0).all()
    assert len(set(calib[0][:, 0].tolist())) == 512 and len(set(eval_idx.tolist())) == 500
    again = calib_eval_subsets(train, test, 0, 512, 500)
    assert torch.equal(calib[0], again[0][0]) and torch.equal(evals[0], again[1][0])
    other = calib_eval_subsets(train, test, 1, 512, 500)
    assert not torch.equal(calib[0], other[0][0]) and not torch.equal(evals[0], other[1][0])
    # Tuple inputs (token ids, mask) are indexed together.
    pair = ((train[0], train[0] * 2), y_train)
    (ids, doubled), _ = calib_eval_subsets(pair, test, 0, 512, 500)[0]
    assert torch.equal(doubled, ids * 2) and torch.equal(ids, calib[0])


def test_from_tensors_default_calibration_is_stratified() -> None:
    y = torch.from_numpy(_class_sorted([100] * 10))
    x = torch.arange(len(y), dtype=torch.float32)[:, None]
    task = Task.from_tensors(
        "t", lambda: nn.Linear(1, 10), train=(x, y), eval=(x[:10], y[:10]), calib_size=256
    )
    batches = task.calib_batches(CALIB_BATCH)
    assert [len(b) for b, _ in batches] == [64] * 4
    assert all(set(b.tolist()) == set(range(10)) for _, b in batches[:1])
    labels = torch.cat([b for _, b in batches]).numpy()
    assert _prefix_excess(labels) < 0
    rows = torch.cat([b for b, _ in batches])[:, 0].long()
    assert torch.equal(y[rows], torch.from_numpy(labels))  # inputs match their targets


def test_from_tensors_accepts_tuple_inputs() -> None:
    ids = torch.arange(40).view(20, 2)
    mask = torch.ones(20, 2, dtype=torch.long)
    y = torch.arange(20) % 2
    task = Task.from_tensors(
        "pairs",
        lambda: nn.Identity(),
        train=((ids, mask), y),
        eval=((ids[:6], mask[:6]), y[:6]),
        calib_size=8,
        batch_size=4,
    )
    (ids_b, mask_b), y_b = task.calib_batches()[0]
    assert ids_b.dtype == torch.int64 and ids_b.shape == (4, 2) and mask_b.shape == (4, 2)
    assert torch.equal(ids_b[:, 0] // 2 % 2, y_b)  # each row kept with its own target
    ex = task.example_input(3)
    assert isinstance(ex, tuple) and ex[0].shape == (3, 2)
    (tb, _), ty = next(task.train_batches(5, seed=0))
    assert torch.equal(tb[:, 0] // 2 % 2, ty)
    with pytest.raises(ValueError, match="as many rows"):
        Task.from_tensors("bad", nn.Identity, train=((ids, mask[:3]), y), eval=((ids, mask), y))


# --------------------------------------------------------------------------- built-in tasks

_NAMES = [
    pytest.param(name, marks=pytest.mark.slow) if name.startswith(("cifar", "sst2")) else name
    for name in BUILTIN_TASKS
]


def _options(name: str, **options: object) -> dict[str, object]:
    # The subsets do not depend on the CIFAR float fine-tune: skip it here.
    return {"finetune_epochs": 0, **options} if name.startswith("cifar") else options


@pytest.mark.parametrize("name", _NAMES)
def test_builtin_subsets_cover_every_class(name: str, built_task: Callable[..., Task]) -> None:
    task = built_task(name, **_options(name, eval_size=500))
    calib = task.calib_batches(CALIB_BATCH)[:CALIB_BATCHES]
    calib_y = torch.cat([y for _, y in calib]).numpy()
    eval_y = torch.cat([y for _, y in task.eval_batches()]).numpy()
    classes = set(eval_y.tolist())
    assert len(classes) == (2 if name.startswith("sst2") else 10)
    assert set(calib_y.tolist()) == classes  # the default calibration sees every class
    assert len(eval_y) == 500
    assert _prefix_excess(eval_y) < 0 and _prefix_excess(calib_y) < 0

    again = built_task(name, **_options(name, eval_size=500))
    other = built_task(name, **_options(name, eval_size=500, seed=1))
    assert np.array_equal(torch.cat([y for _, y in again.eval_batches()]).numpy(), eval_y)
    first_x = task.calib_batches(CALIB_BATCH)[0][0]
    assert torch.equal(_first(again.calib_batches(CALIB_BATCH)[0][0]), _first(first_x))
    assert not torch.equal(_first(other.calib_batches(CALIB_BATCH)[0][0]), _first(first_x))


def _first(inputs: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    return inputs[0] if isinstance(inputs, tuple) else inputs
