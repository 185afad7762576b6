"""The function Optuna calls for one trial: budget check, reuse of a twin, run, record.

It checks the trial's budget slot (pruned when earlier trials fill the budget), reuses the
result of an earlier complete trial with the same plan and QAT settings (training is
deterministic), else runs the plan through :class:`SearchContext` (with the pruner's
checkpoints, :mod:`autoquant.search._pruning`, when pruning is on), and writes the
:class:`TrialRecord`. Every failure leaves a ``fail_reason`` (and ``traceback``).
"""

from __future__ import annotations

import gc
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from autoquant.train import NonFiniteLossError

from ._budget import full, slot, taken_slots
from ._context import SearchContext
from ._objectives import objective_values
from ._pruning import Pruner
from ._record import FloatBaseline, TrialRecord, read_record, twin_record, write_record

_OOM: tuple[type[BaseException], ...] = (
    getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),
    MemoryError,
)


def _is_oom(e: BaseException) -> bool:
    # CPU allocation failures are plain RuntimeErrors from torch's allocator.
    return isinstance(e, _OOM) or "can't allocate memory" in str(e)


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _fail(trial: optuna.Trial, reason: str, tb: str | None = None) -> None:
    write_record(trial, TrialRecord(fail_reason=reason, traceback=tb))


def make_objective(
    study: optuna.Study,
    ctx: SearchContext,
    budget: int | None,
    worker: str | None = None,
    *,
    baseline: FloatBaseline,
    run: str | None = None,
    pruner: Pruner | None = None,
) -> Callable[[optuna.Trial], list[float]]:
    """The trial function: budget check, then plan → QAT → metrics (see :class:`SearchContext`).

    Every failure leaves a ``fail_reason`` (and ``traceback``) on the trial; ``run`` is
    recorded on every trial, so a run counts only its own failures (``_runs.py``). With
    ``pruner`` a trial may stop early with :class:`optuna.TrialPruned` and its ``pruned``
    record.
    """
    spec = ctx.spec

    def objective(trial: optuna.Trial) -> list[float]:
        if worker or run:
            write_record(trial, TrialRecord(worker=worker, run=run))
        trials = study.get_trials(deepcopy=False)
        mine = next((t for t in trials if t.number == trial.number), None)
        before = slot(mine) if mine is not None else trial.number
        if full(taken_slots(trials, before=before), budget):
            _fail(trial, f"budget of {budget} judged trials filled by earlier trials")
            raise optuna.TrialPruned("budget reached")
        try:
            plan, qat = ctx.plan_for(trial)
            twin = _complete_twin(trials, plan.to_dict(), qat)
            if twin is not None:  # same plan and QAT: deterministic, so reuse, don't retrain
                write_record(trial, twin_record(read_record(twin), twin.number))
                for key, value in twin.constraints.items():
                    trial.set_constraint(key, value)
                return list(twin.values)
            monitor = pruner.monitor(trial, plan, qat) if pruner is not None else None
            result = ctx.run_plan(
                plan,
                **qat,
                float_accuracy=baseline.accuracy,
                checkpoints=pruner.fidelities if pruner is not None else (),
                on_checkpoint=monitor,
            )
            values = objective_values(result.values, spec.objectives)
        except optuna.TrialPruned:  # by the pruning rule, with its record
            raise
        except NonFiniteLossError as e:
            _fail(trial, f"non-finite QAT loss: {e}")
            raise
        except Exception as e:
            if _is_oom(e):
                _free_memory()
                reason = f"out of memory: {type(e).__name__}: {e}"
            else:
                reason = f"{type(e).__name__}: {e}"
            _fail(trial, reason[:2000], traceback.format_exc()[-4000:])
            raise
        record = replace(
            result.record,
            size_ratio=result.values["size"] / baseline.size_bytes,
            fidelity_scores=(monitor.scores or None) if monitor is not None else None,
        )
        write_record(trial, record)
        if spec.max_accuracy_drop is not None:  # feasible when <= 0
            assert record.accuracy_drop is not None  # run with the float accuracy
            trial.set_constraint("accuracy_drop", record.accuracy_drop - spec.max_accuracy_drop)
        return values

    return objective


def _complete_twin(
    trials: Sequence[FrozenTrial], plan: dict[str, Any], qat: Mapping[str, Any]
) -> FrozenTrial | None:
    """An earlier complete trial with the same plan and QAT settings, if any."""
    for t in trials:
        if t.state != TrialState.COMPLETE:
            continue
        record = read_record(t)
        if (
            record.plan == plan
            and record.duplicate_of is None
            and {k: (record.qat or {}).get(k) for k in qat} == qat
        ):
            return t
    return None
