"""Choosing trials: the best plan under a constraint, and the report's recommendations."""

from __future__ import annotations

import math
import shlex
from collections.abc import Callable
from typing import Any

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from autoquant.report._tables import accuracy_drop, layer_order, points_text, speedup
from autoquant.search import OBJECTIVES, TrialRecord, read_float_baseline, read_record
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


def best_trial(
    study: optuna.Study, *, max_drop: float | None, minimize: str = "size"
) -> FrozenTrial | None:
    """The complete trial with the smallest size (or latency) whose accuracy drop is at
    most ``max_drop`` (no constraint when None). Ties go to higher accuracy, then to the
    better other metric (latency or size: a cached latency is often shared), then to the
    lower trial number. None when no trial qualifies.

    Example:
        >>> t = best_trial(study, max_drop=0.01, minimize="latency")  # doctest: +SKIP
        >>> t.number, read_record(t).latency_ms  # doctest: +SKIP
    """
    if minimize not in MINIMIZE:
        raise ValueError(
            f"minimize={minimize!r} is not allowed; allowed values: "
            f"{', '.join(repr(m) for m in MINIMIZE)}"
        )
    if max_drop is not None and not max_drop >= 0:
        raise ValueError(f"max_drop={max_drop!r} is not allowed; allowed values: a number >= 0")
    base = read_float_baseline(study).accuracy
    attr = MINIMIZE[minimize]
    others = [f for name, f in MINIMIZE.items() if name != minimize]
    ok = [
        (t, r)
        for t, r in _complete(study)
        if max_drop is None or accuracy_drop(t, base) <= max_drop + _EPS
    ]

    def key(scored: _Scored) -> tuple[Any, ...]:
        t, r = scored
        rest = [math.inf if getattr(r, f) is None else getattr(r, f) for f in others]
        return (getattr(r, attr), -r.accuracy, *rest, t.number)

    return _pick(ok, key)


def most_accurate_within_size(study: optuna.Study, *, size_fraction: float) -> FrozenTrial | None:
    """The most accurate complete trial of at most ``size_fraction`` × the float size;
    ties go to the smaller, then the faster, then the lower trial number."""
    if not size_fraction > 0:
        raise ValueError(
            f"size_fraction={size_fraction!r} is not allowed; allowed values: a number > 0"
        )
    limit = size_fraction * read_float_baseline(study).size_bytes
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


def export_command(study_ref: str, trial: int) -> str:
    """The ``autoquant export`` command line for one trial."""
    ref = study_ref if study_ref.startswith("<") else shlex.quote(study_ref)
    return f"autoquant export {ref} --trial {trial} --out export-trial{trial}"


def _pct(x: float) -> str:
    return f"{100 * x:g}"


def recommendations(
    study: optuna.Study,
    *,
    max_drop: float = 0.01,
    size_fraction: float = 0.25,
    study_ref: str = "<study file>",
) -> list[dict[str, Any]]:
    """The report's three picks, each a dict with ``title``, ``criterion``, ``trial``
    (None when no trial qualifies) and, when there is one, its metrics and export command.

    Example:
        >>> [r["trial"] for r in recommendations(study, max_drop=0.01)]  # doctest: +SKIP
        [12, 7, 12]
    """
    picks = [
        (
            "smallest",
            f"smallest within {_pct(max_drop)} % accuracy drop",
            f"minimum packed size among complete trials with accuracy drop ≤ "
            f"{points_text(max_drop)}",
            best_trial(study, max_drop=max_drop, minimize="size"),
        ),
        (
            "fastest",
            f"fastest within {_pct(max_drop)} % accuracy drop",
            f"minimum median latency among complete trials with accuracy drop ≤ "
            f"{points_text(max_drop)}",
            best_trial(study, max_drop=max_drop, minimize="latency"),
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
    for key, title, criterion, t in picks:
        rec: dict[str, Any] = {
            "key": key,
            "title": title,
            "criterion": criterion,
            "trial": None if t is None else t.number,
        }
        if t is not None:
            rec.update(trial_metrics(study, t))
            rec["command"] = export_command(study_ref, t.number)
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
    study: optuna.Study, trial: FrozenTrial, *, study_ref: str = "<study file>"
) -> dict[str, Any]:
    """A JSON-serialisable description of one trial: metrics, QAT settings, full plan and
    the export command (what ``autoquant best --json`` prints).

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
        "qat": record.qat,
        "plan": record.plan,
        "layers": plan_rows(study, trial),
        "command": export_command(study_ref, trial.number),
    }


def format_best(study: optuna.Study, trial: FrozenTrial, *, study_ref: str = "<study file>") -> str:
    """Human-readable form of :func:`best_payload`: metrics, then the plan layer by layer."""
    m = best_payload(study, trial, study_ref=study_ref)
    speed = f", {m['speedup']:.2f}x float" if m["speedup"] else ""
    lat = f"{m['latency_ms']:.4g} ms" if m["latency_ms"] is not None else "n/a"
    lines = [
        f"trial {m['trial']}" + (f" (baseline {m['baseline']})" if m["baseline"] else ""),
        f"  accuracy  {100 * m['accuracy']:.2f} %  (drop {100 * m['accuracy_drop']:+.2f} points)",
        f"  size      {m['size_bytes'] / 1024:.2f} KB  ({100 * m['size_ratio']:.1f} % of float)",
        f"  latency   {lat} median{speed}",
        f"  plan      {m['plan_summary']}",
        "",
        pd.DataFrame(m["layers"]).astype(object).fillna("").to_string(index=False),
        "",
        f"export: {m['command']}",
    ]
    return "\n".join(lines)
