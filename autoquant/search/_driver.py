"""What the worker loop calls for the search strategy: the pre-pass, proposal rounds, pruner.

:class:`StrategyDriver` is built once per worker after the baselines are queued: it runs the
sensitivity pre-pass (:mod:`autoquant.search._prepass`, once per study) and holds the pruner
(:mod:`autoquant.search._pruning`) when pruning is on; before each trial the loop calls
:meth:`StrategyDriver.before_trial`, which runs a proposal round when one is due
(:mod:`autoquant.search._proposals`). Kept apart from the loop so that ``_worker`` only calls it.

Example:
    >>> driver = StrategyDriver(study, ctx, claims, budget=40, baseline=baseline)  # doctest: +SKIP
    >>> driver.before_trial()  # doctest: +SKIP
"""

from __future__ import annotations

import optuna

from ._context import SearchContext
from ._locks import Claims
from ._prepass import ensure_sensitivity
from ._proposals import Proposer, maybe_propose
from ._pruning import Pruner
from ._record import FloatBaseline


class StrategyDriver:
    """The pre-pass (run once, on construction), the pruner, and the proposal rounds."""

    def __init__(
        self,
        study: optuna.Study,
        ctx: SearchContext,
        claims: Claims,
        budget: int | None,
        baseline: FloatBaseline,
    ) -> None:
        self.study, self.ctx, self.claims = study, ctx, claims
        self.budget, self.baseline = budget, baseline
        self.proposer: Proposer | None = None
        strategy = ctx.spec.strategy
        if strategy.sensitivity != "off":
            ensure_sensitivity(study, ctx, claims)
        self.pruner = Pruner(study, ctx, baseline) if strategy.prune else None

    def before_trial(self) -> None:
        """Enqueue the solver's next round if one is due (see ``_proposals``)."""
        if not self.ctx.spec.strategy.proposing:
            return
        if self.proposer is None:
            self.proposer = Proposer.build(self.ctx)
        maybe_propose(
            self.study,
            self.ctx,
            self.claims,
            budget=self.budget,
            baseline=self.baseline,
            proposer=self.proposer,
        )
