"""Stratified, shuffled subsets: any prefix of the returned order is a balanced sample.

Calibration reads the first few batches of its subset and a small evaluation reads the first
``eval_size`` images; a subset kept in index order over data stored class by class (the
CIFAR-10 arrays) covers only the first classes. :func:`stratified_subset` picks each class
in proportion, then interleaves the classes at random so that every prefix keeps the
proportions (each class within ``1 + classes × share`` items of its share).
"""

from __future__ import annotations

import numpy as np


def _quotas(counts: np.ndarray, size: int) -> np.ndarray:
    """Per-class sizes proportional to ``counts`` summing to ``size`` (largest remainder)."""
    exact = counts * (size / counts.sum())
    quota = np.floor(exact).astype(np.int64)
    # Ties go to the larger class, then the lower class index: deterministic, seed-free.
    order = np.lexsort((np.arange(len(counts)), -counts, -(exact - quota)))
    quota[order[: size - int(quota.sum())]] += 1
    return quota


def stratified_subset(labels: np.ndarray, size: int | None, seed: int) -> np.ndarray:
    """Indices of ``size`` items of ``labels``, stratified by label and shuffled under ``seed``.

    Each class gets its proportional share of ``size`` (largest remainder), drawn at random
    within the class. The order interleaves the classes evenly at random: item ``j`` of a
    class of ``m`` picked items gets the key ``(j + u) / m`` with ``u ~ U(0, 1)``, and items
    are sorted by key. Every prefix of length ``k`` then holds ``k × share`` items of each
    class, within ``1 + classes × share`` (within 2 for balanced classes).

    Args:
        labels: 1-D integer class labels of the whole split.
        size: how many to pick; None or ``>= len(labels)`` picks all (a shuffled order).
        seed: the same seed gives the same indices in the same order.

    Returns:
        ``int64`` indices into ``labels``, in the balanced order.

    Example:
        >>> labels = np.repeat(np.arange(3), 4)  # stored class by class
        >>> idx = stratified_subset(labels, 6, seed=0)
        >>> sorted(np.bincount(labels[idx[:3]]).tolist())
        [1, 1, 1]
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    n = len(labels)
    size = n if size is None else min(int(size), n)
    if size < 0:
        raise ValueError(f"size={size!r} is not allowed; allowed values: None or an integer >= 0")
    rng = np.random.default_rng(seed)
    classes, inverse = np.unique(labels, return_inverse=True)
    members = [np.flatnonzero(inverse == c) for c in range(len(classes))]
    quota = _quotas(np.array([len(m) for m in members], dtype=np.int64), size)
    picked, keys = [], []
    for idx, q in zip(members, quota, strict=True):
        if q == 0:
            continue
        picked.append(rng.permutation(idx)[:q])
        keys.append((np.arange(q) + rng.random(q)) / q)
    if not picked:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(np.concatenate(keys), kind="stable")
    return np.concatenate(picked)[order].astype(np.int64)
