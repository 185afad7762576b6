"""The objectives a study may optimise: name → :class:`Objective` (direction, stored field).

Study files are validated against :data:`OBJECTIVES` (``[objectives] use``), the study's
Optuna directions come from it, and the report reads each objective's value from the
trial record field it names.

Example:
    >>> OBJECTIVES["size"].direction, OBJECTIVES["size"].field
    ('minimize', 'size_bytes')
    >>> objective_values({"accuracy": 0.9, "size": 10.0, "latency": 1.0}, ("accuracy", "size"))
    [0.9, 10.0]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Objective:
    """One objective: ``direction`` for Optuna, ``field`` of the :class:`TrialRecord` it is.

    A trial's pipeline (:meth:`SearchContext.run_plan`) scores every objective under its
    name in ``TrialResult.values``.
    """

    direction: str  # "maximize" or "minimize"
    field: str


OBJECTIVES: dict[str, Objective] = {
    "accuracy": Objective("maximize", "accuracy"),
    "size": Objective("minimize", "size_bytes"),
    "latency": Objective("minimize", "latency_ms"),
}
REQUIRED_OBJECTIVE = "accuracy"  # the constraint and every report are about accuracy


def directions(objectives: Sequence[str]) -> list[str]:
    """Optuna directions of the named objectives, in order."""
    return [OBJECTIVES[o].direction for o in objectives]


def objective_values(values: Mapping[str, float], objectives: Sequence[str]) -> list[float]:
    """The values Optuna is told, in the study's objective order; all must be finite.

    Raises:
        FloatingPointError: a value is NaN or infinite (the trial fails with this reason).
    """
    out = [values[o] for o in objectives]
    if not all(math.isfinite(v) for v in out):
        raise FloatingPointError(
            f"non-finite objective values {dict(zip(objectives, out, strict=True))}"
        )
    return out
