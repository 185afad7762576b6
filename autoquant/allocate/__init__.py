"""Per-unit sensitivity, a surrogate of a plan's accuracy drop, and exact allocation.

No Optuna and no study: pure functions and data classes over a model, a task's batches and a
:class:`~autoquant.space.SearchSpace`. The search calls them; the plans come back as trial
parameters.

Example:
    >>> import torch.nn.functional as F
    >>> from autoquant.allocate import (SizeModel, Surrogate, UnitSpace, measure_sensitivity,
    ...                                 propose, sample_batches)
    >>> units = UnitSpace(space, layer_names)  # doctest: +SKIP
    >>> table = measure_sensitivity(model, units, calib, sample_batches(held_out, 1024),
    ...                             F.cross_entropy)  # doctest: +SKIP
    >>> proposals = propose(units, Surrogate(table, units), SizeModel.build(model, units),
    ...                     max_drop=0.005)  # doctest: +SKIP
    >>> proposals[0].params  # doctest: +SKIP
    {'convnet.c1/w_bits': 4, ...}
"""

from __future__ import annotations

from autoquant.allocate._costs import CATEGORIES, LatencyModel, SizeModel, kernel_category
from autoquant.allocate._graph import FloatState, PartialRunner
from autoquant.allocate._hessian import hessian_sensitivity, hutchinson_traces
from autoquant.allocate._propose import Proposal, propose, tried_choices
from autoquant.allocate._sensitivity import (
    OptionModules,
    SensitivityCost,
    estimate_sensitivity_cost,
    measure_sensitivity,
    sample_batches,
)
from autoquant.allocate._solver import Allocation, Problem, geometric_budgets, ladder, solve
from autoquant.allocate._surrogate import Prediction, Surrogate, kendall, prior_scale, spearman
from autoquant.allocate._table import METRICS, SensitivityTable, UnitDamage
from autoquant.allocate._units import Choice, Unit, UnitSpace

__all__ = [
    "CATEGORIES",
    "METRICS",
    "Allocation",
    "Choice",
    "FloatState",
    "LatencyModel",
    "OptionModules",
    "PartialRunner",
    "Prediction",
    "Problem",
    "Proposal",
    "SensitivityCost",
    "SensitivityTable",
    "SizeModel",
    "Surrogate",
    "Unit",
    "UnitDamage",
    "UnitSpace",
    "estimate_sensitivity_cost",
    "geometric_budgets",
    "hessian_sensitivity",
    "hutchinson_traces",
    "kendall",
    "kernel_category",
    "ladder",
    "measure_sensitivity",
    "prior_scale",
    "propose",
    "sample_batches",
    "solve",
    "spearman",
    "tried_choices",
]
