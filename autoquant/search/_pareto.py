"""Pareto fronts under the accuracy-drop constraint, and hypervolume."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from ._record import read_record


def feasible(trial: FrozenTrial, max_drop: float | None) -> bool:
    """Whether a complete trial satisfies ``accuracy drop <= max_drop``."""
    if max_drop is None:
        return True
    drop = read_record(trial).accuracy_drop
    return (float("inf") if drop is None else drop) <= max_drop + 1e-12


def nondominated(points: np.ndarray) -> np.ndarray:
    """Mask of the non-dominated rows of ``points`` (all objectives minimised).

    Example:
        >>> nondominated(np.array([[1, 2], [2, 1], [2, 2]])).tolist()
        [True, True, False]
    """
    n = len(points)
    keep = np.ones(n, dtype=bool)
    for i in range(n):
        dominated = np.all(points <= points[i], axis=1) & np.any(points < points[i], axis=1)
        keep[i] = not dominated.any()
    return keep


def _signs(directions: Sequence[StudyDirection]) -> np.ndarray:
    return np.array([-1.0 if d == StudyDirection.MAXIMIZE else 1.0 for d in directions])


def pareto_front(study: optuna.Study, max_drop: float | None = None) -> list[FrozenTrial]:
    """Complete, feasible, non-dominated trials, sorted by the first objective (best first).

    A trial that repeated an earlier plan (``duplicate_of``) is left out: its twin stands.
    """
    trials = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if feasible(t, max_drop) and read_record(t).duplicate_of is None
    ]
    if not trials:
        return []
    signs = _signs(study.directions)
    pts = np.array([t.values for t in trials], dtype=float) * signs
    front = [t for t, k in zip(trials, nondominated(pts), strict=True) if k]
    return sorted(front, key=lambda t: (signs[0] * t.values[0], t.number))


def hypervolume_2d(points: np.ndarray, reference: Sequence[float]) -> float:
    """Area dominated by ``points`` (both objectives minimised) up to ``reference``.

    Example:
        >>> hypervolume_2d(np.array([[0.0, 1.0], [1.0, 0.0]]), (2.0, 2.0))
        3.0
    """
    ref = np.asarray(reference, dtype=float)
    pts = points[np.all(points < ref, axis=1)]
    if len(pts) == 0:
        return 0.0
    pts = pts[nondominated(pts)]
    pts = pts[np.argsort(pts[:, 0])]
    area, prev_y = 0.0, ref[1]
    for x, y in pts:
        area += (ref[0] - x) * (prev_y - y)
        prev_y = y
    return float(area)


def normalised_accuracy_size(
    accuracy: Sequence[float], size_bytes: Sequence[float], float_size: float
) -> np.ndarray:
    """Points to minimise in [0, 1]²: ``(1 - accuracy, size / float size)``."""
    return np.column_stack(
        [1.0 - np.asarray(accuracy, float), np.asarray(size_bytes, float) / float_size]
    )


def hypervolume_history(
    trials: Sequence[FrozenTrial], float_size: float, max_drop: float | None = None
) -> list[float]:
    """Hypervolume of the normalised (accuracy, size) front after each complete trial.

    The reference point is (1, 1): zero accuracy at float size. Infeasible trials
    (accuracy drop over ``max_drop``) do not count.
    """
    out, acc, size = [], [], []
    for t in sorted(trials, key=lambda t: t.number):
        if t.state != TrialState.COMPLETE:
            continue
        if feasible(t, max_drop):
            record = read_record(t)
            acc.append(record.accuracy)
            size.append(record.size_bytes)
        hv = (
            hypervolume_2d(normalised_accuracy_size(acc, size, float_size), (1.0, 1.0))
            if acc
            else 0.0
        )
        out.append(hv)
    return out
