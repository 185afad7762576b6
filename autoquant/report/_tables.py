"""pandas tables of a study's trials and Pareto front, and of how the search chose them."""

from __future__ import annotations

from typing import Any

import optuna
import pandas as pd
from optuna.trial import TrialState

from autoquant.search import (
    FloatBaseline,
    TrialRecord,
    deployed_check_text,
    pareto_front,
    read_deployed_checks,
    read_record,
    read_remeasurement,
    read_study_record,
)


def _text(value: str | None) -> str:
    return "" if value is None else value


def speedup(record: TrialRecord, baseline: FloatBaseline | None) -> float | None:
    """Float latency / trial latency (None without a latency or a float baseline)."""
    if baseline is None or not record.latency_ms:
        return None
    return baseline.latency_ms / record.latency_ms


def float_baseline_or_none(study: optuna.Study) -> FloatBaseline | None:
    """The study's float baseline, or None when no search has measured it yet."""
    return read_study_record(study).float_baseline


def _row(
    t: optuna.trial.FrozenTrial,
    baseline: FloatBaseline | None,
    check: dict[str, Any] | None,
    again: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One trial's row; without a float baseline the stored drop and size ratio are used."""
    r = read_record(t)
    acc, size = r.accuracy, r.size_bytes
    if baseline is not None:
        drop = (baseline.accuracy - acc) if acc is not None else None
        ratio = size / baseline.size_bytes if size is not None else None
    else:
        drop, ratio = r.accuracy_drop, r.size_ratio
    return {
        "trial": t.number,
        "state": t.state.name,
        "baseline": _text(r.baseline),
        "accuracy": acc,
        "drop": drop,
        "size_bytes": size,
        "size_kb": size / 1024 if size is not None else None,
        "size_ratio": ratio,
        "latency_ms": r.latency_ms,
        "latency_iqr_ms": r.latency_iqr_ms,
        # The end-of-search re-measurement (interleaved with float), when there is one.
        "remeasured_ms": (again or {}).get("latency_ms"),
        "noisy": bool(r.latency_noisy or (again or {}).get("noisy")),
        "speedup": speedup(r, baseline),
        "plan": _text(r.plan_summary),
        "qat_lr": r.qat_lr,
        "qat_steps": r.qat_steps,
        "trial_s": r.total_s,
        "deployed": deployed_check_text(check),
        "run": _text(r.run),
        "fail_reason": _text(r.fail_reason),
        "source": trial_source(r),
        "pruned_at": (r.pruned or {}).get("fidelity"),
    }


def _rows(study: optuna.Study, trials: list[optuna.trial.FrozenTrial]) -> list[dict[str, Any]]:
    baseline = float_baseline_or_none(study)
    checks = read_deployed_checks(study, trials)
    again = (read_remeasurement(study) or {}).get("trials", {})
    return [_row(t, baseline, checks.get(t.number), again.get(str(t.number))) for t in trials]


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial (every state) with metrics relative to the float baseline.

    ``deployed`` flags the deployment check ("", "ok" or "FAILED: ..."), ``run`` names the
    run that started the trial.
    """
    rows = _rows(study, study.get_trials(deepcopy=False))
    return pd.DataFrame(rows, columns=list(_row_columns()))


def _row_columns() -> list[str]:
    return [
        "trial",
        "state",
        "baseline",
        "accuracy",
        "drop",
        "size_bytes",
        "size_kb",
        "size_ratio",
        "latency_ms",
        "latency_iqr_ms",
        "remeasured_ms",
        "noisy",
        "speedup",
        "plan",
        "qat_lr",
        "qat_steps",
        "trial_s",
        "deployed",
        "run",
        "fail_reason",
        "source",
        "pruned_at",
    ]


def front_frame(study: optuna.Study, max_drop: float | None = None) -> pd.DataFrame:
    """The Pareto front (complete, feasible, non-dominated trials) as a table.

    Works without a float baseline (drop and size ratio as stored, no speed-up). The
    ``deployed`` column flags trials whose deployed model failed its check ("FAILED: ...").

    Example:
        >>> front_frame(study, max_drop=0.01)[["trial", "accuracy", "size_kb"]]  # doctest: +SKIP
    """
    rows = _rows(study, pareto_front(study, max_drop))
    df = pd.DataFrame(rows, columns=_row_columns())
    return df.drop(columns=["state", "run", "fail_reason", "pruned_at"])


def failed_frame(study: optuna.Study) -> pd.DataFrame:
    """Every failed trial, of every run, with its run and recorded reason."""
    rows = _rows(study, study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))
    return pd.DataFrame(rows, columns=_row_columns())[["trial", "run", "plan", "fail_reason"]]


def format_table(df: pd.DataFrame) -> str:
    """Human-readable fixed-width table."""
    fmt = {
        "accuracy": "{:.4f}".format,
        "drop": "{:+.4f}".format,
        "size_kb": "{:.2f}".format,
        "size_ratio": "{:.3f}".format,
        "latency_ms": "{:.4g}".format,
        "latency_iqr_ms": "{:.4g}".format,
        "speedup": "{:.2f}x".format,
        "trial_s": "{:.1f}".format,
    }
    cols = [
        c
        for c in (
            "trial",
            "baseline",
            "accuracy",
            "drop",
            "size_kb",
            "size_ratio",
            "latency_ms",
            "speedup",
            "plan",
            "deployed",
        )
        if c in df.columns and (c != "deployed" or (df[c] != "").any())
    ]
    if "fail_reason" in df.columns and "accuracy" not in df.columns:
        cols = list(df.columns)
    out = df[cols].copy()
    for c, f in fmt.items():
        if c in out.columns:
            out[c] = out[c].map(lambda v, f=f: "" if v is None or pd.isna(v) else f(v))
    return out.to_string(index=False)


FORMATS = ("table", "json", "csv")


def points_text(fraction: float) -> str:
    """An accuracy difference as percentage points, e.g. ``1 point`` or ``0.5 points``."""
    pts = round(100 * fraction, 6)
    return f"{pts:g} point" + ("" if pts == 1 else "s")


def format_frame(df: pd.DataFrame, fmt: str = "table") -> str:
    """Render a frame for the CLI: ``table`` (fixed width), ``json`` (records) or ``csv``.

    Example:
        >>> print(format_frame(pd.DataFrame({"trial": [3], "accuracy": [0.9]}), "csv"), end="")
        trial,accuracy
        3,0.9
    """
    if fmt == "json":
        return df.to_json(orient="records", indent=2)
    if fmt == "csv":
        return df.to_csv(index=False)
    if fmt == "table":
        if df.empty:
            return "(no rows)"
        return format_table(df) if "accuracy" in df.columns else df.to_string(index=False)
    raise ValueError(
        f"format={fmt!r} is not allowed; allowed values: {', '.join(repr(f) for f in FORMATS)}"
    )


def accuracy_drop(trial: optuna.trial.FrozenTrial, float_accuracy: float) -> float:
    """The stored accuracy drop, else float accuracy minus the trial's accuracy."""
    r = read_record(trial)
    if r.accuracy_drop is not None:
        return float(r.accuracy_drop)
    if r.accuracy is None:
        raise ValueError(f"trial {trial.number} has no accuracy")
    return float(float_accuracy - r.accuracy)


def layer_order(study: optuna.Study) -> list[str]:
    """Layer names in model order (study attrs), then any other layer the plans name."""
    names = read_study_record(study).layer_names
    seen = set(names)
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        for name in (read_record(t).plan or {}).get("layers", {}):
            if name not in seen:
                seen.add(name)
                names.append(name)
    return names


def sensitivity_frame(
    study: optuna.Study, *, low_bits: int = 4, high_bits: int = 8
) -> pd.DataFrame:
    """Per layer: mean accuracy of complete trials whose weight had ≤ ``low_bits`` vs
    exactly ``high_bits`` bits, with counts.

    A large ``gain`` (mean at ``high_bits`` minus mean at ≤ ``low_bits``) marks a layer
    that costs accuracy when squeezed, i.e. one the search learned to protect. Float
    layers (absent from a plan, or fp16/fp32) and other bit widths are in neither group.

    Example:
        >>> sensitivity_frame(study).sort_values("gain", ascending=False)  # doctest: +SKIP
    """
    names = layer_order(study)
    groups: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in names}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        r = read_record(t)
        if r.quant_plan is None or r.accuracy is None:
            continue
        for name, lp in r.quant_plan.layers.items():
            bits = lp.weight.bits
            if isinstance(bits, str):
                continue
            if bits <= low_bits:
                groups[name][0].append(r.accuracy)
            elif bits == high_bits:
                groups[name][1].append(r.accuracy)
    types = {la["name"]: la for la in read_study_record(study).layers or []}
    rows = []
    for name in names:
        low, high = groups[name]
        mean_low = sum(low) / len(low) if low else None
        mean_high = sum(high) / len(high) if high else None
        rows.append(
            {
                "layer": name,
                "type": types.get(name, {}).get("type_name", ""),
                "params": types.get(name, {}).get("params"),
                f"n_w_le{low_bits}": len(low),
                f"acc_w_le{low_bits}": mean_low,
                f"n_w{high_bits}": len(high),
                f"acc_w{high_bits}": mean_high,
                "gain": (mean_high - mean_low) if low and high else None,
            }
        )
    return pd.DataFrame(
        rows,
        columns=[
            "layer",
            "type",
            "params",
            f"n_w_le{low_bits}",
            f"acc_w_le{low_bits}",
            f"n_w{high_bits}",
            f"acc_w{high_bits}",
            "gain",
        ],
    )


# -- how the search chose and judged its trials (pre-pass, proposals, pruning) -----------------

_SHORT = {"per_channel": "c", "per_tensor": "t", True: "sym", False: "asym"}


def _option_label(kind: str, knobs: dict[str, Any], varying: list[str]) -> str:
    """A short label of one option from the knobs that vary, e.g. ``w4 t`` or ``a8 mse``."""
    parts = []
    for k in varying:
        v = knobs[k]
        if k.endswith("_bits"):
            parts.append(f"{kind[0]}{v}")
        else:
            parts.append(str(_SHORT.get(v, v)))
    return " ".join(parts) or "fixed"


def sensitivity_table_frame(study: optuna.Study) -> pd.DataFrame | None:
    """The stored pre-pass table (:mod:`autoquant.search._prepass`), one row per unit and
    option: ``unit``, ``kind`` (weight / activation), ``option`` (a short label of the knobs
    that vary), the knob values, and every damage metric (``eval_kl``, ``eval_acc``, ...).
    None when the study has no table (it ran without the pre-pass, or before it existed).

    Example:
        >>> sensitivity_table_frame(study).query("kind == 'weight'")  # doctest: +SKIP
    """
    from autoquant.allocate import SensitivityTable

    stored = read_study_record(study).sensitivity
    if not stored:
        return None
    table = SensitivityTable.from_dict(stored["table"])
    rows = table.rows()
    knob_names = [k for k in rows[0] if k.startswith(("w_", "a_"))] if rows else []
    for kind in ("weight", "activation"):
        mine = [r for r in rows if r["kind"] == kind]
        knobs = [k for k in knob_names if k.startswith(kind[0] + "_")]
        varying = [k for k in knobs if len({str(r.get(k)) for r in mine}) > 1]
        for r in mine:
            r["option"] = _option_label(kind, r, varying)
    columns = ["unit", "kind", "option", *knob_names, *table.metrics]
    return pd.DataFrame([{c: r.get(c) for c in columns} for r in rows], columns=columns)


def sensitivity_cost(study: optuna.Study) -> dict[str, Any] | None:
    """What the pre-pass cost: ``wall_s``, ``evaluations``, ``mode``, ``metric``, and
    ``trials`` (wall time over the median complete trial's; None before any trial).

    Example:
        >>> sensitivity_cost(study)["trials"]  # doctest: +SKIP
        0.6
    """
    stored = read_study_record(study).sensitivity
    if not stored:
        return None
    times = sorted(
        s
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if (r := read_record(t)).duplicate_of is None and (s := r.total_s)
    )
    median = times[len(times) // 2] if times else None
    settings = stored["table"].get("settings", {})
    return {
        "mode": stored.get("mode"),
        "metric": stored.get("metric"),
        "wall_s": stored.get("wall_s"),
        "evaluations": settings.get("evaluations"),
        "held_out": settings.get("eval_samples"),
        "median_trial_s": median,
        "trials": stored["wall_s"] / median if median else None,
    }


def pruning_summary(study: optuna.Study) -> dict[str, Any]:
    """Trials stopped by the pruning rule: how many (per fidelity and reason), and the time
    they spent and are estimated to have saved (seconds).

    Example:
        >>> pruning_summary(study)["saved_s"]  # doctest: +SKIP
        41.5
    """
    out: dict[str, Any] = {"pruned": 0, "by_fidelity": {}, "by_reason": {}, "spent_s": 0.0}
    out["saved_s"] = 0.0
    for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)):
        p = read_record(t).pruned
        if not p:
            continue
        out["pruned"] += 1
        f = f"{100 * p.get('fidelity', 0.0):g} %"
        out["by_fidelity"][f] = out["by_fidelity"].get(f, 0) + 1
        reason = str(p.get("reason"))
        out["by_reason"][reason] = out["by_reason"].get(reason, 0) + 1
        out["spent_s"] += p.get("spent_s") or 0.0
        out["saved_s"] += p.get("saved_s") or 0.0
    return out


def trial_source(record: TrialRecord) -> str:
    """Where a trial's plan came from: ``baseline w8a8``, ``proposal r1 min-size`` (the
    solver, round 1) or ``sampler``."""
    if record.baseline:
        return f"baseline {record.baseline}"
    if record.proposal:
        return f"proposal r{record.proposal.get('round', '?')} {record.proposal.get('source', '')}"
    return "sampler"
