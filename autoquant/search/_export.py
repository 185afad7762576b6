"""Turn a stored trial into files a user can ship, check them, and re-measure latency.

* **Atomic output folders** (:mod:`autoquant.search._folders`): the export appears whole or
  not at all; a non-empty ``out_dir`` is refused unless ``force``, which replaces only a
  previous export.
* **Exports that verify themselves.** :func:`export_trial` and :func:`verify_deployment`
  run the deployed ONNX model under ONNX Runtime on the held-out set and compare it with the
  replayed simulation: a gap over 0.5 points, or a deployed accuracy drop over the study's
  ``max_accuracy_drop``, fails the :class:`DeploymentCheck` (the CLI exits with code 4). The
  check is stored for the trial (:func:`~autoquant.search.read_deployed_checks`), and
  ``front`` and the report flag trials that failed it.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from torch import nn

from autoquant.measure import (
    LatencyCache,
    export_onnx,
    load_onnx,
    measure_latencies,
    ort_session,
    run_onnx,
)
from autoquant.train import evaluate

from ._context import SearchContext, TrialResult, replay
from ._folders import EXPORT_FILES, check_output_folder, output_folder
from ._record import (
    FloatBaseline,
    TrialRecord,
    read_float_baseline,
    read_record,
    read_study_record,
    write_deployed_check,
)
from ._resume import plan_difference, space_key_changes

MISMATCH_TOLERANCE = 0.005  # deployed vs simulated accuracy: 0.5 points
_EPS = 1e-9


# -- the deployment check ----------------------------------------------------------------------


@dataclass(frozen=True)
class DeploymentCheck:
    """The deployed model's accuracy against the simulation and the study's limit.

    Accuracies are fractions. ``mismatch``: deployed and simulated differ by more than
    ``tolerance`` (0.5 points); ``over_limit``: the deployed accuracy drop exceeds
    ``max_drop``.

    Example:
        >>> c = DeploymentCheck(3, "onnxruntime", accuracy=0.8989, simulated_accuracy=0.9100,
        ...                     float_accuracy=0.91, max_drop=0.01)
        >>> c.mismatch, c.over_limit, c.ok
        (True, True, False)
    """

    trial: int
    backend: str
    accuracy: float  # deployed
    simulated_accuracy: float  # the trial replayed in simulation
    float_accuracy: float
    max_drop: float | None
    tolerance: float = MISMATCH_TOLERANCE

    @property
    def gap(self) -> float:
        """Deployed minus simulated accuracy."""
        return self.accuracy - self.simulated_accuracy

    @property
    def drop(self) -> float:
        """Float minus deployed accuracy."""
        return self.float_accuracy - self.accuracy

    @property
    def mismatch(self) -> bool:
        return abs(self.gap) > self.tolerance + _EPS

    @property
    def over_limit(self) -> bool:
        return self.max_drop is not None and self.drop > self.max_drop + _EPS

    @property
    def ok(self) -> bool:
        return not (self.mismatch or self.over_limit)

    def problems(self) -> list[str]:
        """One phrase per failed condition (empty when the check passed)."""
        out = []
        if self.mismatch:
            out.append(
                f"deployed {100 * self.accuracy:.2f} % vs simulated "
                f"{100 * self.simulated_accuracy:.2f} % ({100 * abs(self.gap):.2f} points "
                f"apart; tolerance {100 * self.tolerance:g})"
            )
        if self.over_limit:
            assert self.max_drop is not None
            out.append(
                f"deployed drop {100 * self.drop:.2f} points exceeds the study's limit of "
                f"{100 * self.max_drop:g}"
            )
        return out

    def message(self) -> str:
        if self.ok:
            return (
                f"trial {self.trial}: deployed ({self.backend}) {100 * self.accuracy:.2f} %, "
                f"simulated {100 * self.simulated_accuracy:.2f} %: check passed"
            )
        return f"trial {self.trial}: deployed check FAILED ({self.backend}): " + "; ".join(
            self.problems()
        )

    def to_dict(self) -> dict[str, Any]:
        """What is stored for the trial: the fields plus ``drop``, ``mismatch``,
        ``over_limit``, ``ok`` and ``problems``."""
        return {
            **asdict(self),
            "drop": self.drop,
            "mismatch": self.mismatch,
            "over_limit": self.over_limit,
            "ok": self.ok,
            "problems": self.problems(),
        }


def deployed_check_text(check: dict[str, Any] | None) -> str:
    """A short flag for tables: "" (never checked), "ok", or what failed.

    Example:
        >>> deployed_check_text({"ok": False, "mismatch": True, "over_limit": False})
        'FAILED: mismatch'
    """
    if not check:
        return ""
    if check.get("ok"):
        return "ok"
    what = [k.replace("_", " ") for k in ("mismatch", "over_limit") if check.get(k)]
    return "FAILED: " + (", ".join(what) or "see metadata")


def _trial(study: optuna.Study, number: int) -> optuna.trial.FrozenTrial:
    trials = study.get_trials(deepcopy=False)
    if not 0 <= number < len(trials):
        raise ValueError(
            f"--trial {number} is not in study {study.study_name!r}; allowed: 0..{len(trials) - 1}"
        )
    trial = trials[number]
    if trial.state != optuna.trial.TrialState.COMPLETE:
        raise ValueError(
            f"trial {number} is {trial.state.name}, not COMPLETE; "
            "only complete trials can be exported"
        )
    return trial


def _replay(
    study: optuna.Study,
    ctx: SearchContext,
    trial: optuna.trial.FrozenTrial,
    record: TrialRecord,
    fb: FloatBaseline,
) -> TrialResult:
    stale = (
        f"trial {trial.number}: the study file's space no longer yields the stored plan; "
        "use the study file the search ran with"
    )
    try:
        result = replay(ctx, trial.params, float_accuracy=fb.accuracy)
    except ValueError as e:  # a parameter value the edited space does not offer
        raise ValueError(f"{stale} ({e})") from None
    stored = record.quant_plan
    if result.plan != stored:
        why = ["no plan stored" if stored is None else plan_difference(stored, result.plan)]
        stored_space = (read_study_record(study).spec or {}).get("space")
        if stored_space is not None:
            why += space_key_changes(stored_space, ctx.spec.space)
        raise ValueError(f"{stale} ({'; '.join(w for w in why if w)})")
    return result


def _check(
    study: optuna.Study,
    ctx: SearchContext,
    number: int,
    result: TrialResult,
    fb: FloatBaseline,
    onnx_path: Path,
) -> DeploymentCheck:
    max_drop = read_study_record(study).max_accuracy_drop
    check = DeploymentCheck(
        trial=number,
        backend="onnxruntime",
        accuracy=deployed_accuracy(ctx, onnx_path),
        simulated_accuracy=result.values["accuracy"],
        float_accuracy=fb.accuracy,
        max_drop=ctx.spec.max_accuracy_drop if max_drop is None else max_drop,
    )
    write_deployed_check(study, number, check.to_dict())
    return check


def verify_deployment(
    study: optuna.Study, ctx: SearchContext, trial: optuna.trial.FrozenTrial | int
) -> DeploymentCheck:
    """Replay a complete trial, deploy it (QDQ ONNX, ONNX Runtime), compare the deployed
    accuracy with the replayed simulation and the study's limit, and store the check.

    Nothing is written but the stored check (the ONNX model goes to a temporary folder).

    Example:
        >>> check = verify_deployment(study, ctx, 12)  # doctest: +SKIP
        >>> check.ok, check.problems()  # doctest: +SKIP
        (False, ['deployed drop 1.11 points exceeds the study's limit of 1'])
    """
    number = trial if isinstance(trial, int) else trial.number
    frozen = _trial(study, number)
    fb = read_float_baseline(study)
    result = _replay(study, ctx, frozen, read_record(frozen), fb)
    with tempfile.TemporaryDirectory(prefix="autoquant-verify-") as d:
        info = export_onnx(
            result.model.eval(),
            result.plan,
            Path(d) / "model.onnx",
            ctx.example_input,
            calib_inputs=[x for x, _ in ctx.calib],
        )
        return _check(study, ctx, number, result, fb, info.path)


def export_trial(
    study: optuna.Study,
    ctx: SearchContext,
    number: int,
    out_dir: str | Path,
    *,
    force: bool = False,
) -> dict[str, Any]:
    """Rebuild trial ``number`` (replayed from its parameters), write it to ``out_dir`` and
    check the deployed model (see :class:`DeploymentCheck`).

    Writes ``plan.json``, ``model.onnx`` (plus ``weights.packed.npz`` when a weight has
    fewer than 8 bits), ``metadata.json`` (stored, replayed and deployed metrics, the
    deployment check, float baseline, backend, per-layer formats) and ``state_dict.pt`` (the
    fine-tuned fake-quant model; rebuild it with ``apply_plan(task model, load_plan(...))``
    then ``load_state_dict``). The folder appears whole or not at all (see
    :func:`~autoquant.search.output_folder`, which also says what ``force`` replaces).

    Returns:
        The metadata; ``meta["deployed_check"]["ok"]`` is False when the check failed (the
        files are written all the same).

    Example:
        >>> meta = export_trial(study, SearchContext(spec), 3, "export-trial3")  # doctest: +SKIP
    """
    trial = _trial(study, number)
    check_output_folder(out_dir, force=force, owned=EXPORT_FILES.__contains__, what="export")
    baseline = read_float_baseline(study)
    record = read_record(trial)
    result = _replay(study, ctx, trial, record, baseline)
    model = result.model.eval()
    with output_folder(out_dir, force=force) as out:
        (out / "plan.json").write_text(result.plan.to_json(indent=2) + "\n", encoding="utf-8")
        torch.save(model.state_dict(), out / "state_dict.pt")
        info = export_onnx(
            model,
            result.plan,
            out / "model.onnx",
            ctx.example_input,
            calib_inputs=[x for x, _ in ctx.calib],
        )
        check = _check(study, ctx, number, result, baseline, info.path)
        meta = {
            "study": study.study_name,
            "trial": number,
            "task": ctx.spec.task,
            "stored": {
                k: getattr(record, k)
                for k in ("accuracy", "accuracy_drop", "size_bytes", "size_ratio", "latency_ms")
            },
            "replayed": {
                "accuracy": result.values["accuracy"],
                "size_bytes": result.record.size_bytes,
                "accuracy_drop": result.record.accuracy_drop,
            },
            "deployed_accuracy_onnxruntime": check.accuracy,
            "deployed_check": check.to_dict(),
            "float_baseline": {
                "accuracy": baseline.accuracy,
                "size_bytes": baseline.size_bytes,
                "latency_ms": baseline.latency_ms,
            },
            "latency": record.latency,
            "qat": record.qat,
            # file names, not the temporary folder's paths
            "onnx": {
                **info.to_dict(),
                "path": info.path.name,
                "sidecar": info.sidecar.name if info.sidecar else None,
            },
            "files": sorted([p.name for p in out.iterdir()] + ["metadata.json"]),
        }
        (out / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def bench_trial_latency(
    study: optuna.Study,
    ctx: SearchContext,
    number: int,
    *,
    repeats: int = 500,
    budget_s: float = 10.0,
    backend: str | None = None,
    batch_sizes: tuple[int, ...] | None = None,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """Re-measure one trial's deployed model with more repeats, bypassing the cache.

    The model is rebuilt from the plan and calibrated but not fine-tuned: integer kernels
    run at the same speed whatever the weight values, so the latency is the trial's.
    """
    plan = read_record(_trial(study, number)).quant_plan
    if plan is None:
        raise ValueError(f"trial {number} stores no plan")
    result = ctx.run_plan(plan, lr=0.0, steps=0, measure=False)
    ls = ctx.spec.latency
    sizes = batch_sizes or ls.batch_sizes
    results = measure_latencies(
        result.model,
        plan,
        ctx.task.example_input(sizes[0]),
        batch_sizes=list(sizes),
        backend=backend or ls.backend,
        threads=threads or ls.threads,
        warmup=ls.warmup,
        repeats=repeats,
        budget_s=budget_s,
        cache=LatencyCache(),
        calib_inputs=[x for x, _ in ctx.calib],
    )
    return [r.to_dict() for r in results]


class _OrtModel(nn.Module):
    """An ONNX Runtime session behind the ``nn.Module`` interface, so that the deployed model
    is scored by :func:`autoquant.train.evaluate` exactly like the simulated one."""

    def __init__(self, session: Any) -> None:
        super().__init__()
        self.session = session

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        # Each input as the model declares it (int64 token ids, a float mask, ...).
        return torch.from_numpy(run_onnx(self.session, inputs))


def deployed_accuracy(ctx: SearchContext, onnx_path: Path) -> float:
    """Accuracy of an exported ONNX model under ONNX Runtime on the task's held-out set
    (scored like the simulation: :func:`autoquant.train.evaluate`)."""
    return evaluate(_OrtModel(ort_session(load_onnx(onnx_path))), ctx.eval)
