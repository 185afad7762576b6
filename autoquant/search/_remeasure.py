"""Re-measure the front's latency at the end of a search, interleaved with the float model.

A trial's latency is measured when the trial runs, minutes apart from the others, so a loaded
moment can misrank plans. Before the front is reported, :func:`remeasure_front` times every
front plan again in rounds together with the float model
(:func:`autoquant.measure.remeasure`), stores the fresh figures on the study
(:func:`~autoquant.search.read_remeasurement`) and says which figures were noisy. Optuna
keeps a finished trial's objective values; ``front`` and the report show the re-measured
figure next to the stored one. Off with ``[latency] remeasure_front = false``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import optuna

from autoquant.measure import remeasure

from ._context import SearchContext
from ._locks import Claims
from ._pareto import pareto_front
from ._record import read_record, write_remeasurement

log = logging.getLogger("autoquant")

ROUNDS = 3
BUDGET_S = 0.3  # per model and round: a front of 10 plans costs ~10-30 s


def remeasure_front(
    study: optuna.Study, ctx: SearchContext, claims: Claims | None = None
) -> dict[str, Any] | None:
    """Re-time the feasible front at the study's first batch size, interleaved with float.

    Returns what was stored (None: nothing to do, or another worker is doing it).

    Example:
        >>> remeasure_front(study, ctx)["drifted"]  # doctest: +SKIP
        False
    """
    spec = ctx.spec
    front = pareto_front(study, spec.max_accuracy_drop)
    if not front or (claims is not None and not claims.try_claim("remeasure-front")):
        return None
    try:
        t0 = time.perf_counter()
        items, numbers = [], []
        for t in front:
            plan = read_record(t).quant_plan
            if plan is None:
                continue
            # Calibrated, not fine-tuned: the deployed graph, hence its speed, is the same.
            result = ctx.run_plan(plan, lr=0.0, steps=0, measure=False)
            items.append((result.model, plan))
            numbers.append(t)
        if not items:
            return None
        ls = spec.latency
        again = remeasure(
            items,
            ctx.float_model,
            ctx.example_input,
            backend=ls.backend,
            threads=ls.threads,
            rounds=ROUNDS,
            warmup=min(ls.warmup, 5),
            repeats=ls.repeats,
            budget_s=min(ls.budget_s, BUDGET_S),
            calib_inputs=[x for x, _ in ctx.calib],
            # Not into the latency cache: later trials of the same graph must keep the figure
            # their twins stored, so that one study's trials compare alike.
        )
        trials = {
            str(t.number): {
                "stored_ms": read_record(t).latency_ms,
                "latency_ms": r.median_ms,
                "noisy": bool(r.noisy or again.drifted),
            }
            for t, r in zip(numbers, again.results, strict=True)
        }
        data = {
            "when": time.strftime("%Y-%m-%d %H:%M:%S"),
            "batch_size": ls.batch_sizes[0],
            "float_ms": again.float_result.median_ms,
            "float_drift": round(again.float_drift, 4),
            "drifted": again.drifted,
            "seconds": round(time.perf_counter() - t0, 2),
            "trials": trials,
        }
        write_remeasurement(study, data)
        noisy = [n for n, v in trials.items() if v["noisy"]]
        log.info(
            "re-measured the latency of %d front trials interleaved with float in %.0f s%s",
            len(trials),
            data["seconds"],
            f"; noisy: trials {', '.join(noisy)}" if noisy else "",
        )
        return data
    finally:
        if claims is not None:
            claims.release("remeasure-front")
