"""The sensitivity pre-pass: measured once per study, shared through the storage.

At the start of a search (after the float baseline and the uniform baselines are queued),
:func:`ensure_sensitivity` measures how much each unit (a tie group or a searched layer)
suffers from each weight option and each activation option, with no QAT
(:func:`autoquant.allocate.measure_sensitivity`), on the study's own calibration batches and a
seeded random sample of ``[strategy] held_out`` held-out examples. ``sensitivity = "hessian"``
adds the Hutchinson estimate (:func:`autoquant.allocate.hessian_sensitivity`) and the solver
uses it. The table is claimed like the float baseline (one worker measures, the others wait
for it) and stored on the study (``StudyRecord.sensitivity``, with the wall time it took), so
N workers, the report and ``autoquant sensitivity`` pay once.

Example:
    >>> table = ensure_sensitivity(study, ctx, claims)  # doctest: +SKIP
    >>> table.damage("eval_kl")[0]  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

import optuna

from autoquant.allocate import (
    SensitivityTable,
    UnitSpace,
    hessian_sensitivity,
    measure_sensitivity,
    sample_batches,
)
from autoquant.types import PlanError

from ._context import SearchContext
from ._liveness import grace_s, heartbeat_s
from ._locks import Beater, Claims
from ._optuna_compat import storage_of
from ._record import StudyRecord, read_study_record, write_study_record

log = logging.getLogger("autoquant")

CLAIM = "sensitivity"
HESSIAN_BATCHES = 2  # calibration batches the Hutchinson traces average over


def unit_space(ctx: SearchContext) -> UnitSpace:
    """The units of the study's space over the searched layers (what trial parameters name)."""
    return UnitSpace(ctx.spec.space, ctx.layer_names)


def held_out_batches(ctx: SearchContext, samples: int) -> list[Any]:
    """A seeded random sample of the held-out set (a prefix of an ordered set is no sample)."""
    return sample_batches(
        ctx.eval, samples, batch_size=ctx.spec.qat.eval_batch_size, seed=ctx.spec.seed
    )


def compute_sensitivity(ctx: SearchContext, mode: str | None = None) -> SensitivityTable:
    """Measure the table for ``ctx``'s study (``mode``: ``"kl"`` or ``"hessian"``; default the
    study's ``[strategy] sensitivity``)."""
    strategy = ctx.spec.strategy
    mode = mode or strategy.sensitivity
    units = unit_space(ctx)
    held_out = held_out_batches(ctx, strategy.held_out)
    table = measure_sensitivity(
        ctx.float_model, units, ctx.calib, held_out, ctx.task.loss_fn, device=ctx.device
    )
    if mode == "hessian":
        table = table.merge(
            hessian_sensitivity(
                ctx.float_model,
                units,
                ctx.calib,
                ctx.calib[:HESSIAN_BATCHES],
                ctx.task.loss_fn,
                seed=ctx.spec.seed,
                device=ctx.device,
            )
        )
    return table


def stored_sensitivity(
    study: optuna.Study, units: UnitSpace | None = None, metric: str | None = None
) -> SensitivityTable | None:
    """The study's stored table, or None when there is none, or (given ``units`` / ``metric``)
    when it was measured for another space or lacks the metric."""
    stored = read_study_record(study).sensitivity
    if not stored:
        return None
    table = SensitivityTable.from_dict(stored["table"])
    if metric is not None and metric not in table.metrics:
        return None
    if units is not None:
        try:
            table.check(units)
        except PlanError:
            return None
    return table


def ensure_sensitivity(
    study: optuna.Study,
    ctx: SearchContext,
    claims: Claims | None = None,
    mode: str | None = None,
) -> SensitivityTable | None:
    """The study's sensitivity table: stored, else measured by exactly one worker.

    Args:
        study: the study.
        ctx: this worker's search context.
        claims: the worker's claims (another worker measuring it is waited for); default:
            claims of their own for this call.
        mode: ``"kl"`` / ``"hessian"``; default the study's ``[strategy] sensitivity``, and
            ``"off"`` there returns None without measuring.

    A stored table measured for another space (the study file changed) or without the
    metric ``mode`` needs is measured again and replaces it.
    """
    mode = mode or ctx.spec.strategy.sensitivity
    if mode == "off":
        return None
    if claims is None:
        beater = Beater(heartbeat_s())
        own = Claims(storage_of(study), study.study_name, beater=beater, grace_s=grace_s())
        try:
            return ensure_sensitivity(study, ctx, own, mode)
        finally:
            own.release_all()
            beater.close()
    units = unit_space(ctx)
    metric = "hessian" if mode == "hessian" else "eval_kl"

    def lookup() -> SensitivityTable | None:
        return stored_sensitivity(study, units, metric)

    table = claims.obtain(CLAIM, lookup)
    if table is not None:
        return table
    try:
        if read_study_record(study).sensitivity:
            log.warning("the stored sensitivity table does not fit this study file: measuring it")
        log.info("sensitivity pre-pass (%s) on %d units", mode, len(units))
        t0 = time.perf_counter()
        table = compute_sensitivity(ctx, mode)
        wall = time.perf_counter() - t0
        write_study_record(
            study,
            StudyRecord(
                sensitivity={
                    "table": table.to_dict(),
                    "mode": mode,
                    "metric": metric,
                    "wall_s": round(wall, 3),
                    "worker": f"{socket.gethostname()}:{os.getpid()}",
                    "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                }
            ),
        )
        log.info("sensitivity pre-pass done in %.1f s", wall)
    finally:
        claims.release(CLAIM)
    return table
