"""Search spaces and the mapping from an Optuna trial to a :class:`~autoquant.QuantPlan`."""

from __future__ import annotations

from autoquant.space._space import (
    KNOBS,
    ChoiceTrial,
    SearchSpace,
    baseline_params,
    fit_space,
    plan_from_trial,
    qat_params_from_trial,
)

__all__ = [
    "KNOBS",
    "ChoiceTrial",
    "SearchSpace",
    "baseline_params",
    "fit_space",
    "plan_from_trial",
    "qat_params_from_trial",
]
