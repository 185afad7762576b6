"""Choosing trials: the best plan under a constraint, and the report's recommendations."""

from __future__ import annotations

import math
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from autoquant.report._tables import accuracy_drop, layer_order, points_text, speedup
from autoquant.search import (
    OBJECTIVES,
    TrialRecord,
    deployed_check_text,
    mask_password,
    read_deployed_checks,
    read_float_baseline,
    read_record,
    read_study_record,
)
from autoquant.types import QuantPlan

# What best_trial can minimise: every minimised objective, by the record field it is stored in.
MINIMIZE = {name: o.field for name, o in OBJECTIVES.items() if o.direction == "minimize"}
_EPS = 1e-12  # a drop equal to the threshold (up to float noise) qualifies

_Scored = tuple[FrozenTrial, TrialRecord]


def _complete(study: optuna.Study) -> list[_Scored]:
    """Complete trials with a stored accuracy, each with its record."""
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        record = read_record(t)
        if record.accuracy is not None:
            out.append((t, record))
    return out


def _pick(scored: list[_Scored], key: Callable[[_Scored], Any]) -> FrozenTrial | None:
    return min(scored, key=key)[0] if scored else None


# How the output names each minimised objective: (its optimum, its unit).
_WORDS = {"size": ("the smallest size", "bytes"), "latency": ("the lowest latency", "ms")}
DEFAULT_TOLERANCE = 0.01  # best: the most accurate trial within 1 % of the optimum


@dataclass(frozen=True)
class BestChoice:
    """What :func:`best_choice` picked: ``trial``, the most accurate trial within
    ``(1 + tolerance)`` × the optimum of ``minimize``, and ``optimum``, the trial at the
    optimum itself (often the same trial).

    Example:
        >>> choice = best_choice(study, max_drop=0.01, minimize="size")  # doctest: +SKIP
        >>> print(choice.text())  # doctest: +SKIP
        most accurate within 1 % of the smallest size: trial 12, +0.2 points for +4 bytes
    """

    trial: FrozenTrial
    optimum: FrozenTrial
    minimize: str
    tolerance: float

    def _metric(self, t: FrozenTrial) -> float:
        return float(getattr(read_record(t), MINIMIZE[self.minimize]))

    def text(self) -> str:
        """The rule and what it bought, e.g. "most accurate within 1 % of the smallest
        size: trial 12, +0.2 points for +4 bytes"."""
        best, unit = _WORDS.get(self.minimize, (f"the lowest {self.minimize}", ""))
        rule = f"most accurate within {_pct(self.tolerance)} % of {best}"
        if self.trial.number == self.optimum.number:
            return f"{rule}: trial {self.trial.number}, which has {best} itself"
        points = 100 * (read_record(self.trial).accuracy - read_record(self.optimum).accuracy)
        extra = self._metric(self.trial) - self._metric(self.optimum)
        amount = f"{extra:+.0f}" if self.minimize == "size" else f"{extra:+.4g}"
        return (
            f"{rule}: trial {self.trial.number}, {points:+.2g} points for {amount} {unit} "
            f"(trial {self.optimum.number} has {best})"
        ).replace("  ", " ")


def best_choice(
    study: optuna.Study,
    *,
    max_drop: float | None,
    minimize: str = "size",
    tolerance: float = DEFAULT_TOLERANCE,
) -> BestChoice | None:
    """The most accurate complete trial whose ``minimize`` metric is within
    ``(1 + tolerance)`` × the best one, among trials with accuracy drop ≤ ``max_drop`` (no
    constraint when None). ``tolerance=0`` takes the optimum itself.

    Among the trials within tolerance, ties go to the smaller metric, then to the better
    other metric (latency or size: a cached latency is often shared), then to the lower
    trial number. None when no trial qualifies (or the study has no complete trial).

    Example:
        >>> best_choice(study, max_drop=0.01, minimize="size").trial.number  # doctest: +SKIP
    """
    if minimize not in MINIMIZE:
        raise ValueError(
            f"minimize={minimize!r} is not allowed; allowed values: "
            f"{', '.join(repr(m) for m in MINIMIZE)}"
        )
    if max_drop is not None and not (max_drop >= 0 and math.isfinite(max_drop)):
        raise ValueError(f"max_drop={max_drop!r} is not allowed; allowed values: a number >= 0")
    if not (tolerance >= 0 and math.isfinite(tolerance)):
        raise ValueError(
            f"tolerance={tolerance!r} is not allowed; allowed values: a number >= 0 "
            "(a fraction: 0.01 = 1 %)"
        )
    attr = MINIMIZE[minimize]
    scored = [(t, r) for t, r in _complete(study) if getattr(r, attr) is not None]
    if not scored:
        return None
    fb = read_study_record(study).float_baseline
    base = fb.accuracy if fb is not None else math.nan
    ok = [
        (t, r) for t, r in scored if max_drop is None or accuracy_drop(t, base) <= max_drop + _EPS
    ]
    if not ok:
        return None
    others = [f for name, f in MINIMIZE.items() if name != minimize]

    def rest(r: TrialRecord) -> list[float]:
        return [math.inf if getattr(r, f) is None else getattr(r, f) for f in others]

    optimum = _pick(ok, lambda s: (getattr(s[1], attr), -s[1].accuracy, *rest(s[1]), s[0].number))
    assert optimum is not None
    limit = (1 + tolerance) * getattr(read_record(optimum), attr) + _EPS
    within = [(t, r) for t, r in ok if getattr(r, attr) <= limit]
    trial = _pick(within, lambda s: (-s[1].accuracy, getattr(s[1], attr), *rest(s[1]), s[0].number))
    assert trial is not None
    return BestChoice(trial=trial, optimum=optimum, minimize=minimize, tolerance=tolerance)


def best_trial(
    study: optuna.Study,
    *,
    max_drop: float | None,
    minimize: str = "size",
    tolerance: float = DEFAULT_TOLERANCE,
) -> FrozenTrial | None:
    """The trial :func:`best_choice` picks: the most accurate within ``(1 + tolerance)`` ×
    the smallest size (or latency) among trials with accuracy drop ≤ ``max_drop``.

    Example:
        >>> t = best_trial(study, max_drop=0.01, minimize="latency")  # doctest: +SKIP
        >>> t.number, read_record(t).latency_ms  # doctest: +SKIP
    """
    choice = best_choice(study, max_drop=max_drop, minimize=minimize, tolerance=tolerance)
    return None if choice is None else choice.trial


def most_accurate_within_size(study: optuna.Study, *, size_fraction: float) -> FrozenTrial | None:
    """The most accurate complete trial of at most ``size_fraction`` × the float size;
    ties go to the smaller, then the faster, then the lower trial number."""
    if not size_fraction > 0:
        raise ValueError(
            f"size_fraction={size_fraction!r} is not allowed; allowed values: a number > 0"
        )
    fb = read_study_record(study).float_baseline
    if fb is None:  # no float size to compare with (and no complete trial yet)
        return None
    limit = size_fraction * fb.size_bytes
    ok = [(t, r) for t, r in _complete(study) if r.size_bytes is not None and r.size_bytes <= limit]
    return _pick(
        ok,
        lambda s: (
            -s[1].accuracy,
            s[1].size_bytes,
            math.inf if s[1].latency_ms is None else s[1].latency_ms,
            s[0].number,
        ),
    )


def export_command(study_ref: str, trial: int, storage: str | None = None) -> str:
    """The ``autoquant export`` command line for one trial.

    ``storage``: the storage URL when it is not the one the study file names (the password
    is masked: replace ``***`` with it).

    Example:
        >>> export_command("s.toml", 3, "postgresql://u:pw@h/db")
        "autoquant export s.toml --trial 3 --out export-trial3 --storage 'postgresql://u:***@h/db'"
    """
    ref = study_ref if study_ref.startswith("<") else shlex.quote(study_ref)
    command = f"autoquant export {ref} --trial {trial} --out export-trial{trial}"
    if storage:
        command += f" --storage {shlex.quote(mask_password(storage))}"
    return command


def _pct(x: float) -> str:
    return f"{100 * x:g}"


def recommendations(
    study: optuna.Study,
    *,
    max_drop: float = 0.01,
    size_fraction: float = 0.25,
    study_ref: str = "<study file>",
    storage: str | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> list[dict[str, Any]]:
    """The report's three picks, each a dict with ``title``, ``criterion``, ``trial``
    (None when no trial qualifies) and, when there is one, its metrics, ``choice`` (what
    the tolerance rule of :func:`best_choice` bought, for the first two) and export command
    (with ``--storage`` when ``storage`` is given).

    Example:
        >>> [r["trial"] for r in recommendations(study, max_drop=0.01)]  # doctest: +SKIP
        [12, 7, 12]
    """
    within = f"within {_pct(tolerance)} % of the minimum"
    smallest = best_choice(study, max_drop=max_drop, minimize="size", tolerance=tolerance)
    fastest = best_choice(study, max_drop=max_drop, minimize="latency", tolerance=tolerance)
    picks = [
        (
            "smallest",
            f"smallest within {_pct(max_drop)} % accuracy drop",
            f"the most accurate complete trial {within} packed size, among trials with "
            f"accuracy drop ≤ {points_text(max_drop)}",
            smallest,
        ),
        (
            "fastest",
            f"fastest within {_pct(max_drop)} % accuracy drop",
            f"the most accurate complete trial {within} median latency, among trials with "
            f"accuracy drop ≤ {points_text(max_drop)}",
            fastest,
        ),
        (
            "most_accurate",
            f"most accurate at ≤ {_pct(size_fraction)} % of float size",
            f"maximum accuracy among complete trials with size ≤ {_pct(size_fraction)} % of "
            "the float model",
            most_accurate_within_size(study, size_fraction=size_fraction),
        ),
    ]
    out = []
    for key, title, criterion, pick in picks:
        t = pick.trial if isinstance(pick, BestChoice) else pick
        rec: dict[str, Any] = {
            "key": key,
            "title": title,
            "criterion": criterion,
            "trial": None if t is None else t.number,
        }
        if t is not None:
            rec.update(trial_metrics(study, t))
            if isinstance(pick, BestChoice):
                rec["choice"] = pick.text()
            rec["command"] = export_command(study_ref, t.number, storage)
        out.append(rec)
    return out


def trial_metrics(study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
    """Accuracy, drop, size and latency of a complete trial, relative to the float model."""
    fb = read_float_baseline(study)
    r = read_record(trial)
    if r.accuracy is None or r.size_bytes is None:
        raise ValueError(f"trial {trial.number} has no scores; only complete trials have")
    return {
        "accuracy": r.accuracy,
        "accuracy_drop": accuracy_drop(trial, fb.accuracy),
        "size_bytes": r.size_bytes,
        "size_ratio": r.size_bytes / fb.size_bytes,
        "latency_ms": r.latency_ms,
        "latency_iqr_ms": r.latency_iqr_ms,
        "speedup": speedup(r, fb),
        "plan_summary": r.plan_summary or "",
        "baseline": r.baseline,
        # the deployment check (DeploymentCheck.to_dict()), None when never checked
        "deployed_check": read_deployed_checks(study, [trial]).get(trial.number),
    }


def _plan(trial: FrozenTrial) -> QuantPlan:
    plan = read_record(trial).quant_plan
    if plan is None:
        raise ValueError(f"trial {trial.number} stores no plan")
    return plan


def plan_rows(study: optuna.Study, trial: FrozenTrial) -> list[dict[str, Any]]:
    """One row per layer in model order: the weight and activation spec (float if absent)."""
    plan = _plan(trial)
    rows = []
    for name in layer_order(study):
        lp = plan.layers.get(name)
        row: dict[str, Any] = {"layer": name}
        for prefix, spec in (("w", lp and lp.weight), ("a", lp and lp.activation)):
            quantized = spec is not None and not spec.is_float
            row[f"{prefix}_bits"] = "fp32" if spec is None else str(spec.bits)
            row[f"{prefix}_sym"] = spec.symmetric if quantized else None
            row[f"{prefix}_granularity"] = spec.granularity.value if quantized else None
            row[f"{prefix}_calibration"] = spec.calibration.value if quantized else None
        rows.append(row)
    return rows


def plan_frame(study: optuna.Study, trial: FrozenTrial) -> pd.DataFrame:
    """:func:`plan_rows` as a table (what ``autoquant best --format csv`` prints).

    Example:
        >>> format_frame(plan_frame(study, trial), "csv")  # doctest: +SKIP
    """
    return pd.DataFrame(plan_rows(study, trial))


def best_payload(
    study: optuna.Study,
    trial: FrozenTrial,
    *,
    study_ref: str = "<study file>",
    storage: str | None = None,
    choice: BestChoice | None = None,
) -> dict[str, Any]:
    """A JSON-serialisable description of one trial: metrics, QAT settings, full plan, the
    deployment check, how it was chosen (``choice``, from :func:`best_choice`) and the
    export command (what ``autoquant best --json`` prints).

    Example:
        >>> t = best_trial(study, max_drop=0.01, minimize="size")  # doctest: +SKIP
        >>> json.dumps(best_payload(study, t, study_ref="studies/digits.toml"))  # doctest: +SKIP
    """
    fb = read_float_baseline(study)
    record = read_record(trial)
    return {
        "study": study.study_name,
        "trial": trial.number,
        **trial_metrics(study, trial),
        "float": {
            "accuracy": fb.accuracy,
            "size_bytes": fb.size_bytes,
            "latency_ms": fb.latency_ms,
        },
        "choice": None if choice is None else choice.text(),
        "qat": record.qat,
        "plan": record.plan,
        "layers": plan_rows(study, trial),
        "command": export_command(study_ref, trial.number, storage),
    }


def deployed_warning(check: dict[str, Any] | None) -> str | None:
    """A warning line for a trial whose deployed model failed its check, else None."""
    if not check or check.get("ok"):
        return None
    problems = "; ".join(check.get("problems") or []) or deployed_check_text(check)
    return f"WARNING: the deployed model failed its check: {problems}"


def format_best(
    study: optuna.Study,
    trial: FrozenTrial,
    *,
    study_ref: str = "<study file>",
    storage: str | None = None,
    choice: BestChoice | None = None,
) -> str:
    """Human-readable form of :func:`best_payload`: how it was chosen, metrics, then the
    plan layer by layer, and the export command."""
    m = best_payload(study, trial, study_ref=study_ref, storage=storage, choice=choice)
    speed = f", {m['speedup']:.2f}x float" if m["speedup"] else ""
    lat = f"{m['latency_ms']:.4g} ms" if m["latency_ms"] is not None else "n/a"
    warning = deployed_warning(m["deployed_check"])
    lines = [
        *([m["choice"]] if m["choice"] else []),
        f"trial {m['trial']}" + (f" (baseline {m['baseline']})" if m["baseline"] else ""),
        f"  accuracy  {100 * m['accuracy']:.2f} %  (drop {100 * m['accuracy_drop']:+.2f} points)",
        f"  size      {m['size_bytes'] / 1024:.2f} KB  ({100 * m['size_ratio']:.1f} % of float)",
        f"  latency   {lat} median{speed}",
        f"  plan      {m['plan_summary']}",
        *([f"  {warning}"] if warning else []),
        "",
        pd.DataFrame(m["layers"]).astype(object).fillna("").to_string(index=False),
        "",
        f"export: {m['command']}",
    ]
    return "\n".join(lines)
