"""Solver-proposed plans: enqueued as trials after the uniform baselines, refreshed as results come.

A *round* fits the surrogate (:class:`autoquant.allocate.Surrogate`, prior from the study's
sensitivity table) on the complete trials (plan, accuracy drop), fits the latency model on the
measured latencies (float model, baselines, trials) when latency is an objective, asks
:func:`autoquant.allocate.propose` for plans that no trial of the study has (complete,
running, queued, pruned or failed), and enqueues up to ``[strategy] proposals`` of them as
WAITING trials with a ``proposal`` record (source, budget, predicted drop ± std, round). They
are ordinary trials: seeded, resumable, shared by every worker, replayable with
``FixedTrial(params)``, and the sampler learns from their results.

When rounds happen (:func:`maybe_propose`, called by every worker before it asks a trial):

* round 1 as soon as the sensitivity table exists (the surrogate's prior);
* round n + 1 once ``[strategy] refresh`` more trials completed than round n was fitted on,
  and no proposal is still queued.

How many: at most ``proposals`` per round, never more than the free budget slots, and in all
at most ``proposal_share`` of the trial budget (without a count limit: of the trials so far,
the new ones included; round 1 is then only capped by ``proposals``); the sampler explores
the rest. One worker at a time runs a round (the ``proposals`` claim; the others go on). The
round's inputs are the study's trials, so a round is deterministic given them.

Example:
    >>> maybe_propose(study, ctx, claims, budget=40, baseline=baseline)  # doctest: +SKIP
    8
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from autoquant.allocate import (
    LatencyModel,
    SensitivityTable,
    SizeModel,
    Surrogate,
    UnitSpace,
    propose,
)
from autoquant.types import PlanError, QuantPlan

from ._baselines import BASELINES
from ._budget import taken_slots
from ._context import SearchContext
from ._locks import Claims
from ._prepass import stored_sensitivity, unit_space
from ._record import (
    FloatBaseline,
    StudyRecord,
    TrialRecord,
    read_record,
    read_study_record,
    record_attrs,
    write_study_record,
)

log = logging.getLogger("autoquant")

CLAIM = "proposals"


@dataclass
class Proposer:
    """What a worker needs for rounds, built once: units, exact sizes, layer MACs.

    Example:
        >>> proposer = Proposer.build(ctx)  # doctest: +SKIP
    """

    ctx: SearchContext
    units: UnitSpace
    sizes: SizeModel

    @classmethod
    def build(cls, ctx: SearchContext) -> Proposer:
        units = unit_space(ctx)
        return cls(ctx, units, SizeModel.build(ctx.float_model, units))

    # -- inputs ----------------------------------------------------------------------

    def observations(self, trials: Sequence[FrozenTrial]) -> list[tuple[QuantPlan, float]]:
        """(plan, accuracy drop) of complete trials that ran (twins excluded), in the space."""
        out = []
        for t in sorted(trials, key=lambda t: t.number):
            r = read_record(t)
            if t.state != TrialState.COMPLETE or r.duplicate_of is not None:
                continue
            if r.quant_plan is None or r.accuracy_drop is None:
                continue
            if self.units.choice_of(r.quant_plan) is not None:
                out.append((r.quant_plan, float(r.accuracy_drop)))
        return out

    def latency_model(
        self, trials: Sequence[FrozenTrial], baseline: FloatBaseline
    ) -> LatencyModel | None:
        """The latency model fitted on the float model and every measured trial, when latency
        is an objective (noisy measurements left out)."""
        if "latency" not in self.ctx.spec.objectives:
            return None
        obs: list[tuple[QuantPlan | None, float]] = []
        if _usable(baseline.latency_ms, (baseline.latency or [{}])[0]):
            obs.append((None, baseline.latency_ms))
        for t in sorted(trials, key=lambda t: t.number):
            r = read_record(t)
            if r.quant_plan is None or r.latency_ms is None or r.duplicate_of is not None:
                continue
            if _usable(r.latency_ms, (r.latency or [{}])[0]):
                obs.append((r.quant_plan, float(r.latency_ms)))
        if not obs:
            return None
        macs = {i.name: float(i.macs) for i in self.ctx.layers if i.ok}
        return LatencyModel(self.units, macs).fit(obs)

    def extra(self) -> dict[str, Any]:
        """Values of the searched non-unit parameters: the study's QAT lr (clipped into the
        searched range) and steps (if among the choices)."""
        space, qat = self.ctx.spec.space, self.ctx.spec.qat
        out: dict[str, Any] = {}
        names = self.units.extra_names
        if "qat/lr" in names and space.lr is not None:
            out["qat/lr"] = min(max(qat.lr, space.lr[0]), space.lr[1])
        if "qat/steps" in names and space.qat_steps and qat.steps in space.qat_steps:
            out["qat/steps"] = qat.steps
        return out

    def tried(self, trial: FrozenTrial) -> Any:
        """What ``trial`` tries, as ``propose`` takes it: its stored plan; for a queued trial
        (whose parameters Optuna sets only when it runs) its proposal's choice or its
        baseline's; else its parameters (skipped by ``propose`` if incomplete)."""
        r = read_record(trial)
        if r.quant_plan is not None:
            return r.quant_plan
        if r.proposal is not None and r.proposal.get("choice") is not None:
            return tuple(r.proposal["choice"])
        for name, w_bits, a_bits in BASELINES:
            if r.baseline == name:
                return self.units.baseline_choice(w_bits, a_bits) or dict(trial.params)
        return dict(trial.params)

    # -- one round ---------------------------------------------------------------------

    def round(
        self,
        table: SensitivityTable,
        trials: Sequence[FrozenTrial],
        baseline: FloatBaseline,
        limit: int,
    ) -> tuple[list[Any], Surrogate, LatencyModel | None, str | None]:
        """Fit on ``trials`` and propose up to ``limit`` plans that none of them has; the
        last item is why no plan came (None when the solver ran)."""
        spec = self.ctx.spec
        surrogate = Surrogate(table, self.units, spec.strategy.metric).fit(
            self.observations(trials)
        )
        latency = self.latency_model(trials, baseline)
        tried = [self.tried(t) for t in trials]
        error = None
        # With latency an objective, fall back to size alone if the solver fails on it.
        for lat in dict.fromkeys([latency, None]):
            objectives = [o for o in spec.objectives if o != "latency" or lat is not None]
            if objectives == ["accuracy"]:
                break
            try:
                proposals = propose(
                    self.units,
                    surrogate,
                    self.sizes,
                    objectives=objectives,
                    max_drop=spec.max_accuracy_drop or None,
                    latency=lat,
                    tried=tried,
                    extra=self.extra(),
                    limit=limit,
                )
                return proposals, surrogate, lat, error
            except (PlanError, RuntimeError, ValueError) as e:
                # A solver failure costs this round, never the search: the sampler goes on.
                error = f"{type(e).__name__}: {e}"
                log.warning("the solver failed (%s); objectives %s", error, objectives)
        return [], surrogate, latency, error


def _usable(value: float | None, entry: dict[str, Any]) -> bool:
    return value is not None and math.isfinite(value) and value > 0 and not entry.get("noisy")


def proposal_trials(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """Trials enqueued by a round (retries of lost ones excluded: they repeat a proposal)."""
    return [
        t for t in trials if read_record(t).proposal is not None and read_record(t).retry_of is None
    ]


def allowed(
    trials: Sequence[FrozenTrial], budget: int | None, per_round: int, share: float, first: bool
) -> int:
    """How many proposals a round may enqueue now (see the module doc).

    Example:
        >>> allowed([], budget=40, per_round=8, share=0.6, first=True)
        8
        >>> allowed([], budget=10, per_round=8, share=0.6, first=True)
        6
    """
    made = len(proposal_trials(trials))
    if budget is not None:
        by_share = math.floor(share * budget + 1e-9) - made
        free = budget - taken_slots(trials)
        return max(0, min(per_round, by_share, free))
    if first or share >= 1.0:
        return per_round
    # made + n <= share * (slots + n)  <=>  n <= (share * slots - made) / (1 - share)
    slots = taken_slots(trials)
    return max(0, min(per_round, math.floor((share * slots - made) / (1.0 - share) + 1e-9)))


def due(trials: Sequence[FrozenTrial], rounds: Sequence[dict[str, Any]], refresh: int) -> bool:
    """Whether a round is due: none yet, or ``refresh`` more complete trials than the last
    round was fitted on and no proposal still queued."""
    if not rounds:
        return True
    if any(t.state == TrialState.WAITING for t in proposal_trials(trials)):
        return False
    complete = sum(
        t.state == TrialState.COMPLETE and read_record(t).duplicate_of is None for t in trials
    )
    return complete >= int(rounds[-1]["fitted_on"]) + refresh


def maybe_propose(
    study: optuna.Study,
    ctx: SearchContext,
    claims: Claims,
    *,
    budget: int | None,
    baseline: FloatBaseline,
    proposer: Proposer | None = None,
) -> int:
    """Run a round if one is due and this worker gets the claim; the number enqueued.

    Does nothing when ``[strategy]`` proposes nothing or the study has no sensitivity table.
    """
    strategy = ctx.spec.strategy
    if not strategy.proposing:
        return 0
    trials = study.get_trials(deepcopy=False)
    rounds = read_study_record(study).proposal_rounds or []
    if not due(trials, rounds, strategy.refresh):
        return 0
    if allowed(trials, budget, strategy.proposals, strategy.proposal_share, not rounds) <= 0:
        return 0
    if not claims.try_claim(CLAIM):
        return 0  # another worker runs this round
    try:
        # Read again under the claim: the round may just have been run by another worker.
        trials = study.get_trials(deepcopy=False)
        rounds = read_study_record(study).proposal_rounds or []
        first = not rounds
        limit = allowed(trials, budget, strategy.proposals, strategy.proposal_share, first)
        if not due(trials, rounds, strategy.refresh) or limit <= 0:
            return 0
        proposer = proposer or Proposer.build(ctx)
        table = stored_sensitivity(study, proposer.units, strategy.metric)
        if table is None:
            return 0
        t0 = time.perf_counter()
        proposals, surrogate, latency, error = proposer.round(table, trials, baseline, limit)
        number = len(rounds) + 1
        for p in proposals:
            record = {**p.record(), "round": number}
            study.enqueue_trial(p.params, user_attrs=record_attrs(TrialRecord(proposal=record)))
        fitted_on = sum(
            t.state == TrialState.COMPLETE and read_record(t).duplicate_of is None for t in trials
        )
        rounds = [
            *rounds,
            {
                "round": number,
                "fitted_on": fitted_on,
                "enqueued": len(proposals),
                "surrogate": surrogate.to_dict(),
                "latency_model": None if latency is None else latency.to_dict(),
                "time_s": round(time.perf_counter() - t0, 4),
                "error": error,
            },
        ]
        write_study_record(study, StudyRecord(proposal_rounds=rounds))
        log.info(
            "proposal round %d: %d plans from the solver (fitted on %d trials)",
            number,
            len(proposals),
            fitted_on,
        )
        return len(proposals)
    finally:
        claims.release(CLAIM)
