"""autoquant: per-layer quantization search with QAT trials and measured latency."""

from __future__ import annotations

from autoquant.types import (
    CalibrationMethod,
    Granularity,
    LayerPlan,
    PlanError,
    QuantPlan,
    QuantSpec,
    load_plan,
)

__version__ = "0.1.0"

__all__ = [
    "CalibrationMethod",
    "Granularity",
    "LayerPlan",
    "PlanError",
    "QuantPlan",
    "QuantSpec",
    "__version__",
    "load_plan",
]
