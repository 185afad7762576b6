"""What every study starts with: the float baseline (measured once) and the uniform baselines.

The float model's accuracy, size and latency are measured by one worker and stored on the
study with the study's settings, layer table and machine (a :class:`StudyRecord`); the
others wait for it. The uniform baselines (every searched layer w8a8, and w4a8) are
enqueued first, so they anchor every front.
"""

from __future__ import annotations

import time
from typing import Any

import optuna
from optuna.trial import TrialState

from autoquant.measure import machine_info
from autoquant.space import baseline_params

from . import _optuna_compat as compat
from ._context import SearchContext
from ._liveness import grace_s, heartbeat_s
from ._locks import Beater, Claims
from ._record import (
    FloatBaseline,
    StudyRecord,
    TrialRecord,
    read_record,
    read_study_record,
    record_attrs,
    write_study_record,
)

BASELINES = (("w8a8", 8, 8), ("w4a8", 4, 8))
_SETTLED = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)


def enqueue_baselines(
    study: optuna.Study, ctx: SearchContext, claims: Claims | None = None
) -> list[str]:
    """Enqueue the uniform baselines once.

    A baseline is enqueued again unless a trial with its mark is complete, running or queued:
    one that was interrupted, pruned or failed is tried again by the next run (after the
    user fixed what made it fail). With ``claims``, one worker at a time enqueues (no
    duplicates when workers start together).
    """
    if claims is not None and not claims.try_claim("enqueue-baselines"):
        return []
    try:
        settled = set()
        for t in study.get_trials(deepcopy=False):
            record = read_record(t)
            if record.baseline is not None and t.state in _SETTLED:
                settled.add(record.baseline)
        seen: set[tuple[tuple[str, Any], ...]] = set()
        names = []
        for name, wb, ab in BASELINES:
            params = baseline_params(ctx.spec.space, ctx.layer_names, wb, ab)
            key = tuple(sorted((params or {}).items()))
            if params is None or key in seen:
                continue
            seen.add(key)
            if name in settled:
                continue
            study.enqueue_trial(params, user_attrs=record_attrs(TrialRecord(baseline=name)))
            names.append(name)
        return names
    finally:
        if claims is not None:
            claims.release("enqueue-baselines")


def ensure_float_baseline(
    study: optuna.Study, ctx: SearchContext, claims: Claims | None = None
) -> FloatBaseline:
    """Measure the float model once per study, store it on the study, enqueue the baselines.

    With ``claims``, one worker measures while the others wait for its result.
    """

    def stored() -> FloatBaseline | None:
        return read_study_record(study).float_baseline

    beater = None
    if claims is None:
        beater = Beater(heartbeat_s())
        claims = Claims(
            compat.storage_of(study), study.study_name, beater=beater, grace_s=grace_s()
        )
    try:
        baseline = claims.obtain("float_baseline", stored)
        if baseline is not None:
            return baseline
        try:
            baseline = FloatBaseline.from_dict(ctx.float_baseline())
            write_study_record(
                study,
                StudyRecord(
                    spec=ctx.spec.to_dict(),
                    layers=[vars(info) for info in ctx.layers],
                    task_info=_jsonable(getattr(ctx.task, "info", {}) or {}),
                    created=time.strftime("%Y-%m-%d %H:%M:%S"),
                    machine=machine_info(),
                ),
            )
            enqueue_baselines(study, ctx, claims)
            # Last: what waiting workers poll for.
            write_study_record(study, StudyRecord(float_baseline=baseline))
        finally:
            claims.release("float_baseline")
        return baseline
    finally:
        if beater is not None:
            claims.release_all()
            beater.close()


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if isinstance(v, (str, int, float, bool, list, dict))}
