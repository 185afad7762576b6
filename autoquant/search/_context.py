"""One plan's pipeline: fake-quant model → calibrate → QAT → evaluate → size → latency.

:class:`SearchContext` holds what every trial of a study shares in one process (task, float
model, data, latency cache); :meth:`SearchContext.run_plan` scores one plan into a
:class:`TrialResult` whose :class:`~autoquant.search.TrialRecord` is what the trial stores.
Nothing here knows about Optuna's studies: :func:`replay` runs a stored trial again from its
parameters alone.

Checkpoints. With ``on_checkpoint``, :meth:`SearchContext.run_plan` measures size and latency
right after calibration (neither depends on the fine-tuned values; latency is cached by the
deployed graph's signature) and calls ``on_checkpoint`` after calibration (fraction 0.0) and
after each requested fraction of the QAT steps; the callback may raise to stop the trial (the
pruner, :mod:`autoquant.search._pruning`). Without it, the order and the results are as before.
"""

from __future__ import annotations

import copy
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from autoquant.measure import LatencyCache, measure_latencies
from autoquant.space import SearchSpace, fit_space, plan_from_trial, qat_params_from_trial
from autoquant.space._space import ChoiceTrial
from autoquant.tasks import Task, TaskError, cache_dir, get_task
from autoquant.train import (
    Distillation,
    cached_teacher_logits,
    evaluate,
    materialize_batches,
    qat_finetune,
)
from autoquant.transform import (
    apply_plan,
    calibration,
    call_model,
    excluded_layers_message,
    float_size_bytes,
    inputs_to,
    packed_size_bytes,
    quantizable_layers,
)
from autoquant.types import PlanError, QuantPlan

from ._record import TrialRecord, record_attrs
from ._spec import StudyFileError, StudySpec

MAX_CACHED_TRAIN_BYTES = 512 * 2**20  # a study's decoded QAT stream kept in memory
_MAX_HISTORY = 200  # loss points kept per trial; longer histories are subsampled

log = logging.getLogger("autoquant")


@dataclass
class Checkpoint:
    """A trial's state at a fidelity, for :meth:`SearchContext.run_plan`'s ``on_checkpoint``.

    Attributes:
        fraction: the fraction of the QAT steps done (0.0: right after calibration).
        step: QAT steps done.
        model: the model being fine-tuned (evaluate it; do not change it).
        size_bytes: its exact packed size.
        latencies: its measured latency per batch size (``LatencyResult.to_dict()``).
        elapsed_s: seconds since the trial started.
    """

    fraction: float
    step: int
    model: nn.Module
    size_bytes: int
    latencies: list[dict[str, Any]]
    elapsed_s: float


@dataclass
class TrialResult:
    """What :func:`SearchContext.run_plan` produces; ``record`` is what the trial stores.

    ``values`` holds every objective's score by name (see :data:`OBJECTIVES`).
    """

    model: nn.Module
    plan: QuantPlan
    values: dict[str, float]
    record: TrialRecord

    @property
    def attrs(self) -> dict[str, Any]:
        """The record as the trial's user attributes (kept for callers of earlier versions)."""
        return record_attrs(self.record)


class SearchContext:
    """The task, float model, data and caches shared by all trials of one study in a process.

    Example:
        >>> ctx = SearchContext(StudySpec(name="d", task="digits-cnn"))  # doctest: +SKIP
        >>> result = ctx.run_plan(plan, lr=1e-3, steps=20)  # doctest: +SKIP
    """

    def __init__(
        self,
        spec: StudySpec,
        *,
        task: Task | None = None,
        latency_cache: LatencyCache | None = None,
    ) -> None:
        self.spec = spec
        self.task = task or get_task(spec.task, **dict(spec.task_options))
        self.device = torch.device(spec.device)
        self.float_model = self.task.model_factory().eval()
        self.example_input = self.task.example_input(spec.latency.batch_sizes[0])
        # Every quantizable layer with its discovery status; only the ``ok`` ones are searched.
        self.layers = quantizable_layers(self.float_model, self.example_input)
        self.layer_names = [info.name for info in self.layers if info.ok]
        excluded = excluded_layers_message(self.layers)
        if excluded:
            log.warning(excluded)
        # Embeddings take token ids and attention matmuls have no weight: fix those knobs.
        fitted = fitted_space(spec.space, [vars(info) for info in self.layers])
        self.spec = spec = replace(spec, space=fitted)
        self.searched = spec.space.select(self.layer_names)
        self.calib = self.task.calib_batches(spec.qat.calib_batch_size)[: spec.qat.calib_batches]
        self.eval = self.task.eval_batches(spec.qat.eval_batch_size)
        self.latency_cache = latency_cache or LatencyCache()
        self._train: list[Any] | None = None  # see train_batches

    # -- baseline ----------------------------------------------------------------------

    def float_baseline(self) -> dict[str, Any]:
        """Float accuracy, size and latency of the (BN-folded) float model."""
        model = copy.deepcopy(self.float_model).to(self.device)
        acc = evaluate(model, self.eval, device=self.device)
        lat = self._latencies(model.cpu(), None)
        return {
            "accuracy": acc,
            "size_bytes": float_size_bytes(self.float_model, example_input=self.example_input),
            "latency_ms": lat[0]["median_ms"],
            "latency": lat,
        }

    # -- one trial ---------------------------------------------------------------------

    def plan_for(self, trial: ChoiceTrial) -> tuple[QuantPlan, dict[str, Any]]:
        plan = plan_from_trial(trial, self.spec.space, self.layer_names)
        qat = qat_params_from_trial(trial, self.spec.space, self.spec.qat.lr, self.spec.qat.steps)
        return plan, qat

    def run_plan(
        self,
        plan: QuantPlan,
        *,
        lr: float,
        steps: int,
        quant_lr: float | None = None,
        distill: bool | None = None,
        float_accuracy: float | None = None,
        measure: bool = True,
        checkpoints: Sequence[float] = (),
        on_checkpoint: Callable[[Checkpoint], None] | None = None,
    ) -> TrialResult:
        """Apply, calibrate, fine-tune and score one plan (deterministic under the study seed).

        Args:
            plan: the plan.
            lr: QAT learning rate.
            steps: QAT steps.
            quant_lr: relative learning rate of learned quantizers (default ``[qat]``'s).
            distill: distil from the float model (default: when ``[qat] distill`` is set);
                the teacher's logits come from :meth:`teacher_logits`.
            float_accuracy: the float model's accuracy (for ``accuracy_drop``).
            measure: measure the latency (else NaN).
            checkpoints: fractions of the QAT steps, in [0, 1), at which ``on_checkpoint`` is
                called (0.0: after calibration; see the module doc).
            on_checkpoint: called with a :class:`Checkpoint`; it may raise to stop the trial.
                Its time is recorded as ``timing_s["checkpoints"]``.

        Raises:
            autoquant.train.NonFiniteLossError: the QAT loss became NaN or inf.
        """
        spec = self.spec
        timing: dict[str, float] = {"checkpoints": 0.0}
        t0 = time.perf_counter()
        torch.manual_seed(spec.seed)
        model = apply_plan(self.float_model, plan, example_input=self.example_input).to(self.device)
        with calibration(model), torch.no_grad():
            for x, _ in self.calib:
                call_model(model, inputs_to(x, self.device))
        timing["calibrate"] = time.perf_counter() - t0

        early = on_checkpoint is not None
        size: int | None = None
        latencies: list[dict[str, Any]] = []
        if early:  # both known before QAT, so that the pruner can compare plans
            size, latencies = self._measure(model, plan, measure, timing)
        # QAT steps done at each checkpoint (0: after calibration); none without QAT, where
        # the final score is as cheap as an early one.
        at_step = {0 if f == 0 else max(1, round(f * steps)): f for f in checkpoints}
        at_step = {k: f for k, f in at_step.items() if k < steps}

        def check(done: int) -> None:
            if on_checkpoint is None or size is None or done not in at_step:
                return
            t = time.perf_counter()
            on_checkpoint(Checkpoint(at_step[done], done, model, size, latencies, t - t0))
            timing["checkpoints"] += time.perf_counter() - t

        check(0)
        use_kd = spec.qat.distill is not None if distill is None else distill
        kd = (spec.qat.distill or Distillation()) if use_kd and steps > 0 else None
        t = time.perf_counter()
        teacher = self.teacher_logits(steps) if kd is not None else None
        timing["teacher"] = time.perf_counter() - t  # ~0 once cached
        t, before = time.perf_counter(), timing["checkpoints"]
        run: dict[str, Any] = {}
        history = (
            qat_finetune(
                model,
                self.train_batches(steps),
                self.task.loss_fn,
                steps=steps,
                lr=lr,
                optimizer=spec.qat.optimizer,
                device=self.device,
                callback=(lambda step, _loss: check(step + 1)) if early else None,
                quant_lr=spec.qat.quant_lr if quant_lr is None else quant_lr,
                distill=kd,
                teacher_logits=teacher,
                compile=spec.qat.compile,
                autocast=spec.qat.autocast,
                record=run,
            )
            if steps > 0
            else []
        )
        timing["qat"] = time.perf_counter() - t - (timing["checkpoints"] - before)

        t = time.perf_counter()
        accuracy = evaluate(
            model,
            self.eval,
            device=self.device,
            compile=spec.qat.compile,
            autocast=spec.qat.autocast,
        )
        timing["eval"] = time.perf_counter() - t

        if not early:
            size, latencies = self._measure(model, plan, measure, timing)
        model = model.cpu().eval()
        assert size is not None
        timing["total"] = time.perf_counter() - t0
        if not early:
            del timing["checkpoints"]

        record = TrialRecord(
            plan=plan.to_dict(),
            plan_summary=plan.summary(),
            qat=_qat_record(lr, steps, spec.qat.optimizer, quant_lr, distill, kd, run),
            accuracy=accuracy,
            accuracy_drop=None if float_accuracy is None else float_accuracy - accuracy,
            size_bytes=size,
            latency_ms=latencies[0]["median_ms"],
            latency=latencies,
            loss_history=_subsample(history, _MAX_HISTORY),
            timing_s={k: round(v, 4) for k, v in timing.items()},
            seed=spec.seed,
        )
        values = {"accuracy": accuracy, "size": float(size), "latency": latencies[0]["median_ms"]}
        return TrialResult(model=model, plan=plan, values=values, record=record)

    def train_batches(self, steps: int) -> Iterable[Any]:
        """The study's QAT stream for ``steps`` steps, decoded once per process and reused.

        Every trial sees the same batches (the stream is fixed by the seed), so they are kept
        as a list (up to :data:`MAX_CACHED_TRAIN_BYTES`; a larger stream is decoded per trial).
        """
        if self._train is not None and len(self._train) >= steps:
            return self._train[:steps]
        stream = iter(self.task.train_batches(self.spec.qat.batch_size, seed=self.spec.seed))
        first = next(stream)
        if _nbytes(first) * steps > MAX_CACHED_TRAIN_BYTES:
            return itertools.chain([first], stream)
        self._train = [first, *materialize_batches(stream, steps - 1)] if steps > 1 else [first]
        return self._train

    def teacher_logits(self, steps: int) -> torch.Tensor:
        """The float model's logits on the study's QAT stream, computed once per study.

        Kept in memory and under ``$AUTOQUANT_CACHE/teacher-logits`` (keyed by the task, its
        options, the seed, the batch size and the float weights), so every trial and every
        worker on this machine reuses them.
        """
        qat = self.spec.qat
        return cached_teacher_logits(
            self.float_model,
            lambda: self.train_batches(steps),
            steps=steps,
            stream={
                "task": self.spec.task,
                "options": dict(self.spec.task_options),
                "seed": self.spec.seed,
                "batch_size": qat.batch_size,
            },
            cache_dir=cache_dir() / "teacher-logits",
            device=self.device,
        )

    def _measure(
        self, model: nn.Module, plan: QuantPlan, measure: bool, timing: dict[str, float]
    ) -> tuple[int, list[dict[str, Any]]]:
        """Packed size and latency of the (calibrated) model, timed as ``measure``."""
        t = time.perf_counter()
        cpu = model if self.device.type == "cpu" else copy.deepcopy(model).cpu()
        was_training = cpu.training
        cpu.eval()
        size = packed_size_bytes(cpu, plan)
        latencies = self._latencies(cpu, plan) if measure else [{"median_ms": float("nan")}]
        cpu.train(was_training)
        timing["measure"] = time.perf_counter() - t
        return size, latencies

    def _latencies(self, model: nn.Module, plan: QuantPlan | None) -> list[dict[str, Any]]:
        """Latency at every configured batch size, deploying the model once (cached)."""
        ls = self.spec.latency
        results = measure_latencies(
            model,
            plan,
            self.task.example_input(ls.batch_sizes[0]),
            list(ls.batch_sizes),
            backend=ls.backend,
            threads=ls.threads,
            warmup=ls.warmup,
            repeats=ls.repeats,
            budget_s=ls.budget_s,
            cache=self.latency_cache,
            calib_inputs=None if plan is None else [x for x, _ in self.calib],
        )
        return [r.to_dict() for r in results]


def _nbytes(batch: Any) -> int:
    """Bytes of the tensors in a batch (nested tuples and lists)."""
    if isinstance(batch, torch.Tensor):
        return batch.nelement() * batch.element_size()
    if isinstance(batch, (tuple, list)):
        return sum(_nbytes(b) for b in batch)
    return 0


def fitted_space(space: SearchSpace, layers: Sequence[Mapping[str, Any]]) -> SearchSpace:
    """``space`` fitted to the model's layers, as the study record stores them
    (``vars(LayerInfo)``; older records lack the flags: True): see
    :func:`autoquant.space.fit_space`."""
    return fit_space(
        space,
        float_inputs=[i["name"] for i in layers if not i.get("quantizes_input", True)],
        no_weights=[i["name"] for i in layers if not i.get("quantizes_weight", True)],
    )


def _qat_record(
    lr: float,
    steps: int,
    optimizer: str,
    quant_lr: float | None,
    distill: bool | None,
    kd: Distillation | None,
    run: dict[str, Any],
) -> dict[str, Any]:
    """The trial's ``qat`` record: searched values only when given (so that trials stored
    before they existed still match their twins), then what the run did."""
    out: dict[str, Any] = {"lr": lr, "steps": steps, "optimizer": optimizer}
    if quant_lr is not None:
        out["quant_lr"] = quant_lr
    if distill is not None:
        out["distill"] = distill
    if kd is not None:
        out["distillation"] = kd.to_dict()
    if run:
        out["run"] = run
    return out


def _subsample(values: list[float], n: int) -> list[float]:
    if len(values) <= n:
        return [float(v) for v in values]
    step = len(values) / n
    return [float(values[int(i * step)]) for i in range(n)]


def build_context(spec: StudySpec, cache: LatencyCache) -> SearchContext:
    """The search context; a space or task that does not fit names the study file."""
    where = spec.source or spec.name
    try:
        return SearchContext(spec, latency_cache=cache)
    except StudyFileError:
        raise
    except PlanError as e:
        raise StudyFileError(f"{where}: [space]: {e}") from None
    except TaskError as e:
        raise StudyFileError(f"{where}: task.name = {spec.task!r}: {e}") from None


def replay(
    ctx: SearchContext, params: dict[str, Any], float_accuracy: float | None = None
) -> TrialResult:
    """Re-run a stored trial from its parameters with Optuna's ``FixedTrial``.

    Example:
        >>> result = replay(ctx, study.trials[0].params)  # doctest: +SKIP
    """
    import optuna

    plan, qat = ctx.plan_for(optuna.trial.FixedTrial(params))
    return ctx.run_plan(plan, **qat, float_accuracy=float_accuracy)
