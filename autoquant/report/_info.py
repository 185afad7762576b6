"""The report header: task, float baseline, study settings, machine, trial counts, wall time."""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import TrialState

from autoquant.measure import machine_info
from autoquant.report._tables import points_text, pruning_summary, sensitivity_cost
from autoquant.search import read_record, read_study_record


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h} h {m:02d} min {sec:02d} s" if h else f"{m} min {sec:02d} s"


def _threads(n: object) -> str:
    return f"{n} thread" + ("" if n == 1 else "s")


def _space_text(space: dict[str, Any]) -> str:
    parts = []
    for knob in ("w_bits", "a_bits", "w_sym", "a_sym", "w_gran", "a_gran", "w_calib", "a_calib"):
        if knob in space:
            parts.append(f"{knob}={','.join(str(v) for v in space[knob])}")
    for key in ("include", "exclude"):
        if space.get(key) and space[key] != ["*"]:
            parts.append(f"{key}={','.join(space[key])}")
    for key in ("tie", "overrides"):
        if space.get(key):
            parts.append(f"{key}={space[key]}")
    if space.get("lr"):
        parts.append(f"lr∈[{space['lr'][0]:g}, {space['lr'][1]:g}]")
    if space.get("qat_steps"):
        parts.append(f"qat_steps={','.join(str(s) for s in space['qat_steps'])}")
    return "; ".join(parts)


def counts(study: optuna.Study) -> dict[str, int]:
    """Number of trials in each state (lower-case state names)."""
    out = {s.name.lower(): 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name.lower()] += 1
    return out


def wall_time_s(study: optuna.Study) -> float | None:
    """Seconds from the first trial's start to the last complete trial's end."""
    trials = study.get_trials(deepcopy=False)
    starts = [t.datetime_start for t in trials if t.datetime_start is not None]
    ends = [
        t.datetime_complete
        for t in trials
        if t.state == TrialState.COMPLETE and t.datetime_complete is not None
    ]
    if not starts or not ends:
        return None
    return (max(ends) - min(starts)).total_seconds()


def study_facts(study: optuna.Study) -> list[tuple[str, str]]:
    """(label, value) rows of the report header, in display order.

    The machine is the one stored on the study (:attr:`StudyRecord.machine`) if any, else
    this machine, marked as such.
    """
    record = read_study_record(study)
    spec: dict[str, Any] = record.spec or {}
    fb = record.float_baseline
    qat = spec.get("qat", {})
    lat = spec.get("latency", {})
    machine = record.machine
    where = "" if machine else " (this machine; the study stores none)"
    machine = machine or machine_info()
    c = counts(study)
    wall = wall_time_s(study)
    max_drop = record.max_accuracy_drop
    n_layers = len(record.layers or [])
    rows = [
        ("study", study.study_name),
        ("task", str(spec.get("task", "?"))),
        (
            "float model",
            (
                f"top-1 {100 * fb.accuracy:.2f} %, {fb.size_bytes / 1024:.1f} KB "
                f"({fb.size_bytes} B), latency {fb.latency_ms:.4g} ms"
                if fb is not None
                else "not measured yet (no search got past its start)"
            )
            + (f", {n_layers} quantizable layers" if n_layers else ""),
        ),
        (
            "objectives",
            ", ".join(
                f"{o} ({d.name.lower()})"
                for o, d in zip(spec.get("objectives", []), study.directions, strict=False)
            ),
        ),
        (
            "constraint",
            f"accuracy drop ≤ {points_text(max_drop)}" if max_drop is not None else "none",
        ),
        (
            "budget / sampler / seed",
            _budget_text(spec) + f", {spec.get('sampler', '?')}, seed {spec.get('seed', '?')}",
        ),
        ("search space", _space_text(spec.get("space", {})) or "?"),
        (
            "QAT",
            f"{qat.get('steps', '?')} steps, lr {qat.get('lr', '?')}, "
            f"{qat.get('optimizer', '?')}, batch {qat.get('batch_size', '?')}",
        ),
        (
            "latency",
            f"{lat.get('backend', '?')}, {_threads(lat.get('threads', '?'))}, batch "
            f"{','.join(str(b) for b in lat.get('batch_sizes', ['?']))}, "
            f"{lat.get('repeats', '?')} repeats (median of runs)",
        ),
        (
            "machine",
            f"{machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, "
            f"{machine.get('platform', '?')}{where}",
        ),
        (
            "trials",
            f"{c['complete']} complete, {c['pruned']} pruned, {c['fail']} failed"
            + (f", {c['running']} running" if c["running"] else ""),
        ),
        (
            "wall time",
            _fmt_seconds(wall) + " (first trial start to last complete)"
            if wall is not None
            else "n/a",
        ),
        ("created", str(record.created or "?")),
        *([("forked from", f"study {record.forked_from}")] if record.forked_from else []),
    ]
    return rows + strategy_facts(study)


def _budget_text(spec: dict[str, Any]) -> str:
    trials = spec.get("trials", "?")
    text = "no trial limit" if trials is None else f"{trials} trials"
    if spec.get("timeout"):
        text += f", timeout {_fmt_seconds(spec['timeout'])}"
    return text


def strategy_facts(study: optuna.Study) -> list[tuple[str, str]]:
    """Header rows on the sensitivity pre-pass, the solver's proposals and the pruning, each
    only when the study used it."""
    rows = []
    cost = sensitivity_cost(study)
    if cost is not None:
        per_trial = (
            f" (≈ {cost['trials']:.1f} trials at the median trial time)" if cost["trials"] else ""
        )
        rows.append(
            (
                "sensitivity pre-pass",
                f"{cost['mode']}: {cost['evaluations']} evaluations on {cost['held_out']:.0f} "
                f"held-out samples, {cost['wall_s']:.1f} s{per_trial}",
            )
        )
    rounds = read_study_record(study).proposal_rounds or []
    if rounds:
        made = [read_record(t) for t in study.get_trials(deepcopy=False)]
        made = [r for r in made if r.proposal is not None and r.retry_of is None]
        rows.append(
            (
                "solver proposals",
                f"{len(made)} trials proposed in {len(rounds)} rounds "
                f"({sum(r.accuracy is not None for r in made)} complete)",
            )
        )
    p = pruning_summary(study)
    if p["pruned"]:
        where = ", ".join(f"{n} at {f}" for f, n in sorted(p["by_fidelity"].items()))
        why = ", ".join(f"{n} {r}" for r, n in sorted(p["by_reason"].items()))
        rows.append(
            (
                "pruning",
                f"{p['pruned']} trials stopped early ({where} of QAT; {why}), saving "
                f"≈ {_fmt_seconds(p['saved_s'])} of trial time",
            )
        )
    return rows
