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

import logging

import optuna

from ._context import SearchContext
from ._locks import Claims
from ._prepass import ensure_sensitivity
from ._proposals import Proposer, maybe_propose
from ._pruning import Pruner
from ._record import FloatBaseline

log = logging.getLogger("autoquant")


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
        self.prepass_failed = False
        strategy = ctx.spec.strategy
        if strategy.sensitivity != "off":
            try:
                ensure_sensitivity(study, ctx, claims)
            except Exception as e:  # task code may raise here first: the trials report it
                self.prepass_failed = True
                log.warning(
                    "the sensitivity pre-pass failed (%s: %s); this run goes on without it "
                    "(no solver proposals); a rerun tries it again",
                    type(e).__name__,
                    e,
                )
        self.pruner = Pruner(study, ctx, baseline) if strategy.prune else None

    def before_trial(self) -> None:
        """Enqueue the solver's next round if one is due (see ``_proposals``)."""
        if self.prepass_failed or not self.ctx.spec.strategy.proposing:
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
