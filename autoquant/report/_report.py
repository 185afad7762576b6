"""The study report: a self-contained ``report.html``, ``report.md`` and CSV tables.

Stored values (plan summaries, fail reasons, names) are escaped in both files: no stored
string is ever passed on as HTML. The folder is written atomically (see
:func:`autoquant.search.output_folder`); ``force`` replaces a previous report, never other
files.

About 500 lines: the HTML and the Markdown renderers sit side by side, so that the two
reports stay in step.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import pandas as pd
from optuna.trial import TrialState

from autoquant.report._info import counts, study_facts
from autoquant.report._plots import FIGURES, report_figures
from autoquant.report._select import DEFAULT_TOLERANCE, deployed_warning, recommendations
from autoquant.report._strategy_plots import STRATEGY_FIGURES, strategy_figures
from autoquant.report._tables import (
    float_baseline_or_none,
    front_frame,
    points_text,
    sensitivity_cost,
    sensitivity_frame,
    sensitivity_table_frame,
    trials_frame,
)
from autoquant.search import (
    mask_password,
    output_folder,
    read_deployed_checks,
    read_record,
    read_remeasurement,
    read_study_record,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PLOT_CAPTIONS = {
    "accuracy_size": "Accuracy vs packed size. Red: the Pareto front (labelled #trial); "
    "hollow square/diamond: uniform w8a8/w4a8 baselines; star: float model; "
    "dashed: the accuracy-drop limit.",
    "accuracy_latency": "Accuracy vs measured median latency, same markers.",
    "size_latency": "Size vs latency coloured by accuracy; red rings mark the Pareto front.",
    "hypervolume": "Hypervolume of the feasible (accuracy, size) front after each complete "
    "trial (higher is better; 1 would be a zero-size model at 100 %).",
    "bitmap": "Weight and activation bit widths of each Pareto trial, layers in model order.",
    "sensitivity": "Damage of quantizing each unit (layer or tie group) alone with each "
    "weight option (activations float) and each activation option (weights float), "
    "calibrated, without QAT; the solver's proposals start from this table.",
    "pruning": "Wall time of each trial; trials stopped early by the pruning rule in orange, "
    "with the estimated time they would still have taken (the median complete trial's time "
    "minus what they spent) hatched.",
}
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;
max-width:1200px;padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.6em}h2{margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}
th,td{border:1px solid #ddd;padding:.25em .5em;text-align:right;vertical-align:top}
th{background:#f4f4f4}td.l,th.l{text-align:left}
table.facts td:first-child{font-weight:600;text-align:left;white-space:nowrap}
table.facts td{text-align:left}
figure{margin:1em 0}figure svg,figure img{max-width:100%;height:auto}
figcaption{font-size:.85em;color:#555}
code,pre{background:#f6f8fa;padding:.1em .3em;border-radius:3px;font-size:.9em}
pre{padding:.6em;overflow-x:auto}.none{color:#a00}.muted{color:#666;font-size:.85em}
"""


# -- figures ----------------------------------------------------------------------------


def _svg(fig: Figure) -> str:
    """Inline SVG without the XML prolog, DOCTYPE, metadata or namespace URLs.

    HTML5 parses an inline ``<svg>`` into the SVG namespace by itself, so dropping the
    ``xmlns`` URLs leaves the page free of any external reference. Falls back to an
    inline PNG if anything URL-like remains.
    """
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    text = text[text.index("<svg") :]
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)
    text = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", text)
    if re.search(r"https?:|//www\.", text):
        return _png_img(fig)
    return text


def _png_img(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="plot" src="data:image/png;base64,{data}">'


# -- small formatting helpers -----------------------------------------------------------


def _num(v: Any, fmt: str, scale: float = 1.0) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return format(scale * v, fmt)


REPORT_FILES = frozenset({"report.html", "report.md", "trials.csv", "front.csv", "sensitivity.csv"})
_REPORT_FIGURES = (*FIGURES, *STRATEGY_FIGURES)


def report_file(rel: str) -> bool:
    """Whether a path (relative, POSIX) is one :func:`write_report` writes: what
    ``--force`` may replace."""
    return rel in REPORT_FILES or rel in {f"plots/{name}.png" for name in _REPORT_FIGURES}


def _front_display(df: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "trial": df["trial"],
            "accuracy (%)": [_num(v, ".2f", 100) for v in df["accuracy"]],
            "drop (points)": [_num(v, "+.2f", 100) for v in df["drop"]],
            "size (KB)": [_num(v, ".2f") for v in df["size_kb"]],
            "size (B)": df["size_bytes"],
            "size / float": [_num(v, ".3f") for v in df["size_ratio"]],
            "latency (ms)": [
                _num(v, ".4g") + (" (noisy)" if noisy else "")
                for v, noisy in zip(df["latency_ms"], df["noisy"], strict=True)
            ],
            "IQR (ms)": [_num(v, ".4g") for v in df["latency_iqr_ms"]],
            "re-measured (ms)": [_num(v, ".4g") for v in df["remeasured_ms"]],
            "speed-up": [_num(v, ".2f") and _num(v, ".2f") + "×" for v in df["speedup"]],
            "baseline": df["baseline"],
            "per-layer plan": df["plan"],
            "deployed check": df["deployed"],
        }
    )


def _sensitivity_display(df: pd.DataFrame, low: int = 4, high: int = 8) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "layer": df["layer"],
            "type": df["type"],
            "params": df["params"],
            f"trials w ≤ {low} bits": df[f"n_w_le{low}"],
            f"mean acc, w ≤ {low} bits (%)": [_num(v, ".2f", 100) for v in df[f"acc_w_le{low}"]],
            f"trials w {high} bits": df[f"n_w{high}"],
            f"mean acc, w {high} bits (%)": [_num(v, ".2f", 100) for v in df[f"acc_w{high}"]],
            "gain of protecting (points)": [_num(v, "+.2f", 100) for v in df["gain"]],
        }
    )


def _prepass_display(study: optuna.Study, df: pd.DataFrame) -> dict[str, Any]:
    """The pre-pass table as units × options of its metric, and the sentence on its cost."""
    cost = sensitivity_cost(study) or {}
    metric = cost.get("metric") or "eval_kl"
    if metric not in df.columns:
        metric = "eval_kl"
    wide = pd.DataFrame({"unit": list(dict.fromkeys(df["unit"]))}).set_index("unit")
    for _, row in df.iterrows():
        wide.loc[row["unit"], f"{row['kind'][0]}: {row['option']}"] = _num(row[metric], ".3g")
    per_trial = (
        f", ≈ {cost['trials']:.1f} trials at the median trial time" if cost.get("trials") else ""
    )
    text = (
        f"Measured once before the trials ({cost.get('mode')}): "
        f"{cost.get('evaluations')} post-training evaluations on "
        f"{cost.get('held_out') or 0:.0f} held-out samples in {cost.get('wall_s') or 0:.1f} s"
        f"{per_trial}. Cells: {metric} (w: weight options with float activations, a: "
        "activation options with float weights); lower is better. All rows are in "
        "sensitivity.csv."
    )
    return {"table": wide.reset_index().fillna(""), "text": text}


def _html_table(
    df: pd.DataFrame, *, row_ids: list[str] | None = None, left: tuple[str, ...] = ()
) -> str:
    cls = {c: ' class="l"' if c in left else "" for c in df.columns}
    head = "".join(f"<th{cls[c]}>{html.escape(str(c))}</th>" for c in df.columns)
    rows = []
    for i, (_, r) in enumerate(df.iterrows()):
        rid = f' id="{row_ids[i]}"' if row_ids else ""
        cells = "".join(
            f"<td{cls[c]}>{html.escape('' if pd.isna(v) else str(v))}</td>" for c, v in r.items()
        )
        rows.append(f"<tr{rid}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _md(value: Any) -> str:
    """Stored text made inert in Markdown: HTML escaped, one line."""
    return html.escape(str(value), quote=False).replace("\n", " ")


def _fence(text: str) -> list[str]:
    """A fenced code block that ``text`` cannot close early."""
    fence = "````" if "```" in text else "```"
    return [fence, text, fence]


def _md_table(df: pd.DataFrame) -> str:
    def cell(v: Any) -> str:
        return _md("" if pd.isna(v) else v).replace("|", "\\|")

    lines = [
        "| " + " | ".join(cell(c) for c in df.columns) + " |",
        "|" + "|".join("---" for _ in df.columns) + "|",
    ]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in df.itertuples(index=False)]
    return "\n".join(lines)


def _failed_frame(study: optuna.Study) -> pd.DataFrame:
    rows = [
        {
            "trial": t.number,
            "state": t.state.name,
            "run": read_record(t).run or "",
            "reason": read_record(t).fail_reason or "",
        }
        for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL, TrialState.PRUNED))
    ]
    return pd.DataFrame(rows, columns=["trial", "state", "run", "reason"])


def _dashboard_command(study: optuna.Study, storage: str | None = None) -> str:
    url = storage or (read_study_record(study).spec or {}).get("storage")
    url = url or f"sqlite:///autoquant-runs/{study.study_name}/study.db"
    # Masked again: studies written before every form was masked may hold a password.
    return f"optuna-dashboard {mask_password(url)}"


def _status(study: optuna.Study) -> str | None:
    """A plain statement for a study with nothing to plot or recommend, else None."""
    c = counts(study)
    if c["complete"]:
        return None
    return (
        f"This study has no complete trial yet ({c['fail']} failed, {c['pruned']} pruned, "
        f"{c['running']} running): there is nothing to plot or recommend."
        + (" The failed trials and their reasons are listed at the end." if c["fail"] else "")
    )


def _latency_note(study: optuna.Study, front: pd.DataFrame) -> str | None:
    """What the reader must know about the front's latency figures, or None."""
    again = read_remeasurement(study)
    noisy = [int(n) for n, flag in zip(front["trial"], front["noisy"], strict=True) if flag]
    text = ""
    if again is not None:
        text = (
            f"Latency of the front re-measured at the end of the search ({again['when']}), "
            f"interleaved with the float model (its drift between rounds: "
            f"{100 * again['float_drift']:.0f} %)"
            + ("; the machine's speed drifted: every figure is noisy" if again["drifted"] else "")
            + ". The column 're-measured (ms)' holds the fresh figures."
        )
    if noisy:
        text += (
            f" Noisy latency figures (the machine was busy): trials {', '.join(map(str, noisy))}; "
            "re-measure with `autoquant bench-latency` on a quiet machine before relying on them."
        )
    return text.strip() or None


def _deployed_warnings(study: optuna.Study, trials: list[int]) -> list[str]:
    """One line per listed trial whose deployed model failed its check."""
    checks = read_deployed_checks(study)
    out = []
    for n in dict.fromkeys(trials):
        warning = deployed_warning(checks.get(n))
        if warning:
            out.append(f"trial {n}: {warning}")
    return out


def _reco_text(rec: dict[str, Any]) -> str:
    if rec["trial"] is None:
        return "no trial qualifies"
    speed = f", {rec['speedup']:.2f}× float speed" if rec.get("speedup") else ""
    lat = f"{rec['latency_ms']:.4g} ms" if rec.get("latency_ms") is not None else "n/a"
    warning = deployed_warning(rec.get("deployed_check"))
    return (
        (f"{rec['choice']}. " if rec.get("choice") else "")
        + f"trial {rec['trial']}: top-1 {100 * rec['accuracy']:.2f} % (drop "
        f"{100 * rec['accuracy_drop']:+.2f} points), {rec['size_bytes'] / 1024:.2f} KB "
        f"({100 * rec['size_ratio']:.1f} % of float), {lat}{speed}; plan "
        f"{rec['plan_summary']}" + (f". {warning}" if warning else "")
    )


# -- the report -------------------------------------------------------------------------


def write_report(
    study: optuna.Study,
    out_dir: str | Path,
    *,
    compare: optuna.Study | None = None,
    max_drop_reco: float = 0.01,
    size_fraction: float = 0.25,
    study_ref: str = "<study file>",
    storage: str | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    force: bool = False,
) -> dict[str, Path]:
    """Write ``report.html`` (self-contained, opens offline), ``report.md`` (with
    ``plots/*.png``), ``trials.csv`` and ``front.csv`` into ``out_dir``.

    The folder appears whole or not at all. A study without a complete trial (or without a
    float baseline) gets a report that says so, with its failed trials.

    Args:
        study: a study written by :func:`autoquant.search.run_search`.
        out_dir: output folder: new or empty, or (with ``force``) a previous report.
        compare: another study whose hypervolume curve is drawn beside this one's.
        max_drop_reco: accuracy-drop limit of the "smallest"/"fastest" recommendations.
        size_fraction: size limit (fraction of float) of the "most accurate" one.
        study_ref: how the export commands name the study (the study file path).
        storage: the storage URL when it is not the study file's (added to the commands,
            password masked).
        tolerance: the recommendations take the most accurate trial within
            ``(1 + tolerance)`` × the minimum (see :func:`autoquant.report.best_choice`).
        force: replace a previous report in ``out_dir`` (other files are never deleted).

    Returns:
        The written paths: ``html``, ``markdown``, ``trials_csv``, ``front_csv`` and
        ``plot_<name>`` for each PNG.

    Raises:
        autoquant.search.OutputFolderError: ``out_dir`` is a file, or holds other files.

    Example:
        >>> paths = write_report(study, "out/", study_ref="studies/digits.toml")  # doctest: +SKIP
        >>> paths["html"]  # doctest: +SKIP
        PosixPath('out/report.html')
    """
    target = Path(out_dir)
    with output_folder(target, force=force, owned=report_file, what="report") as tmp:
        names = _write_report(
            study,
            tmp,
            compare=compare,
            max_drop_reco=max_drop_reco,
            size_fraction=size_fraction,
            study_ref=study_ref,
            storage=storage,
            tolerance=tolerance,
        )
    return {key: target / rel for key, rel in names.items()}


def _write_report(
    study: optuna.Study,
    out: Path,
    *,
    compare: optuna.Study | None,
    max_drop_reco: float,
    size_fraction: float,
    study_ref: str,
    storage: str | None,
    tolerance: float,
) -> dict[str, str]:
    """Write the report into ``out``; the written files by key, as relative paths."""
    (out / "plots").mkdir()
    max_drop = read_study_record(study).max_accuracy_drop
    paths: dict[str, str] = {}

    trials = trials_frame(study)
    front = front_frame(study, max_drop)
    paths["trials_csv"] = "trials.csv"
    trials.to_csv(out / "trials.csv", index=False)
    paths["front_csv"] = "front.csv"
    front.to_csv(out / "front.csv", index=False)

    # Without a float baseline there is nothing to draw against (and no complete trial).
    has_baseline = float_baseline_or_none(study) is not None
    figs = report_figures(study, compare=compare, max_drop=max_drop) if has_baseline else {}
    if has_baseline:
        figs.update(strategy_figures(study))
    svgs = {}
    for name, fig in figs.items():
        paths[f"plot_{name}"] = f"plots/{name}.png"
        fig.savefig(out / paths[f"plot_{name}"])
        svgs[name] = _svg(fig)

    facts = study_facts(study)
    recos = recommendations(
        study,
        max_drop=max_drop_reco,
        size_fraction=size_fraction,
        study_ref=study_ref,
        storage=storage,
        tolerance=tolerance,
    )
    sens = _sensitivity_display(sensitivity_frame(study))
    table = sensitivity_table_frame(study)
    if table is not None:
        paths["sensitivity_csv"] = "sensitivity.csv"
        table.to_csv(out / "sensitivity.csv", index=False)
    failed = _failed_frame(study)
    front_disp = _front_display(front)
    for column in ("deployed check", "re-measured (ms)"):
        if not (front_disp[column] != "").any():
            front_disp = front_disp.drop(columns=[column])
    flagged = list(front["trial"]) + [r["trial"] for r in recos if r["trial"] is not None]
    context = {
        "facts": facts,
        "status": _status(study),
        "warnings": _deployed_warnings(study, flagged),
        "latency_note": _latency_note(study, front),
        "recos": recos,
        "sens": sens,
        "prepass": None if table is None else _prepass_display(study, table),
        "failed": failed,
        "front": front_disp,
        "front_trials": list(front["trial"]),
        "dash": _dashboard_command(study, storage),
        "generated": time.strftime("%Y-%m-%d %H:%M:%S"),
        "max_drop": max_drop,
        "compare": compare,
        "figures": set(figs),
    }

    paths["html"] = "report.html"
    (out / "report.html").write_text(_html(study, context, svgs), encoding="utf-8")
    paths["markdown"] = "report.md"
    (out / "report.md").write_text(_markdown(study, context, set(svgs)), encoding="utf-8")
    return paths


def _front_heading(max_drop: float | None, n: int) -> str:
    within = (
        f"complete trials within {points_text(max_drop)} of float accuracy"
        if max_drop is not None
        else "complete trials (no accuracy constraint)"
    )
    return f"Pareto front: {n} non-dominated {within}"


_NOT_DRAWN = "Not drawn: the study has no float baseline yet (no search got past its start)."


def _html(study: optuna.Study, c: dict[str, Any], svgs: dict[str, str]) -> str:
    e = html.escape

    def figure(name: str, caption: str) -> str:
        if name not in svgs:
            return f'<p class="none" id="plot-{name}">{e(_NOT_DRAWN)}</p>'
        return f'<figure id="plot-{name}">{svgs[name]}<figcaption>{caption}</figcaption></figure>'

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>autoquant report: {e(study.study_name)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>autoquant report: {e(study.study_name)}</h1>",
        '<table class="facts">'
        + "".join(f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in c["facts"])
        + "</table>",
        f'<p class="muted">Generated {e(c["generated"])}. Tables: <code>trials.csv</code>, '
        f"<code>front.csv</code>. Explore the same storage interactively with "
        f"<code>{e(c['dash'])}</code> (pip install optuna-dashboard).</p>",
    ]
    if c["status"]:
        parts.append(f'<p class="none" id="status">{e(c["status"])}</p>')
    if c["warnings"]:
        parts.append(
            '<div class="none" id="deployed-warnings"><p><b>Deployed models that failed '
            "their check</b> (ONNX Runtime vs simulation, or over the accuracy limit):</p><ul>"
            + "".join(f"<li>{e(w)}</li>" for w in c["warnings"])
            + "</ul></div>"
        )
    if c["latency_note"]:
        parts.append(f'<p class="muted" id="latency-note">{e(c["latency_note"])}</p>')
    parts.append("<h2>Pareto plots</h2>")
    for name in ("accuracy_size", "accuracy_latency", "size_latency"):
        parts.append(figure(name, e(PLOT_CAPTIONS[name])))
    compared = f" Compared with study {e(c['compare'].study_name)}." if c["compare"] else ""
    parts += [
        "<h2>Hypervolume over trials</h2>",
        figure("hypervolume", e(PLOT_CAPTIONS["hypervolume"]) + compared),
        "<h2>Per-layer bit map of the front</h2>",
        figure("bitmap", e(PLOT_CAPTIONS["bitmap"])),
        f"<h2>{e(_front_heading(c['max_drop'], len(c['front'])))}</h2>",
    ]
    if len(c["front"]):
        parts.append(
            _html_table(
                c["front"],
                row_ids=[f"front-trial-{n}" for n in c["front_trials"]],
                left=("baseline", "per-layer plan", "deployed check"),
            )
        )
        parts.append(
            '<p class="muted">Plan notation: w&lt;bits&gt;a&lt;bits&gt; per layer, '
            "c = per-channel weight scales, a = asymmetric, ×n = n layers in a row. "
            "Speed-up is float latency / trial latency.</p>"
        )
    else:
        parts.append('<p class="none">No complete trial satisfies the constraint.</p>')
    parts.append("<h2>Recommendations</h2>")
    for rec in c["recos"]:
        parts.append(
            f'<h3 id="reco-{rec["key"]}">{e(rec["title"])}</h3>'
            f'<p class="muted">{e(rec["criterion"])}</p>'
        )
        if rec["trial"] is None:
            parts.append('<p class="none">No trial qualifies.</p>')
        else:
            parts.append(f"<p>{e(_reco_text(rec))}</p><pre>{e(rec['command'])}</pre>")
    if "pruning" in svgs:
        parts += [
            "<h2>Time per trial and pruning</h2>",
            f'<figure id="plot-pruning">{svgs["pruning"]}'
            f"<figcaption>{e(PLOT_CAPTIONS['pruning'])}</figcaption></figure>",
        ]
    if c["prepass"] is not None:  # the measured table replaces what trials suggested
        parts += [
            "<h2>Layer sensitivity (pre-pass)</h2>",
            f'<p class="muted">{e(c["prepass"]["text"])}</p>',
            f'<figure id="plot-sensitivity">{svgs["sensitivity"]}'
            f"<figcaption>{e(PLOT_CAPTIONS['sensitivity'])}</figcaption></figure>",
            _html_table(c["prepass"]["table"], left=("unit",)),
        ]
    else:
        parts += [
            "<h2>Layer sensitivity observed across trials</h2>",
            '<p class="muted">Mean accuracy of complete trials by the bit width of each '
            "layer's weights. A large gain means trials that squeezed this layer lost "
            "accuracy: the search learned to protect it. Counts are small in short "
            "studies; read this as evidence, not proof.</p>",
            _html_table(c["sens"], left=("layer", "type")),
        ]
    if len(c["failed"]):
        parts += [
            "<h2>Failed and pruned trials</h2>",
            _html_table(c["failed"], left=("state", "run", "reason")),
        ]
    parts.append("</body></html>")
    return "\n".join(parts)


def _markdown(study: optuna.Study, c: dict[str, Any], drawn: set[str]) -> str:
    def figure(name: str, caption: str) -> list[str]:
        if name not in drawn:
            return [_NOT_DRAWN, ""]
        return [f"![{name}](plots/{name}.png)", "", caption, ""]

    lines = [f"# autoquant report: {_md(study.study_name)}", "", "| | |", "|---|---|"]
    lines += [f"| {_md(k)} | {_md(v).replace('|', '/')} |" for k, v in c["facts"]]
    lines += ["", f"Generated {c['generated']}. Interactive view: `{c['dash']}`.", ""]
    if c["status"]:
        lines += [f"**{_md(c['status'])}**", ""]
    if c["warnings"]:
        lines += ["**Deployed models that failed their check:**", ""]
        lines += [f"- {_md(w)}" for w in c["warnings"]] + [""]
    if c["latency_note"]:
        lines += [_md(c["latency_note"]), ""]
    lines += ["## Pareto plots", ""]
    for name in ("accuracy_size", "accuracy_latency", "size_latency"):
        lines += figure(name, PLOT_CAPTIONS[name])
    compared = f" Compared with study {_md(c['compare'].study_name)}." if c["compare"] else ""
    lines += ["## Hypervolume over trials", ""]
    lines += figure("hypervolume", PLOT_CAPTIONS["hypervolume"] + compared)
    lines += ["## Per-layer bit map of the front", ""]
    lines += figure("bitmap", PLOT_CAPTIONS["bitmap"])
    lines += [
        f"## {_front_heading(c['max_drop'], len(c['front']))}",
        "",
        _md_table(c["front"]) if len(c["front"]) else "No complete trial satisfies the constraint.",
        "",
        "## Recommendations",
        "",
    ]
    for rec in c["recos"]:
        lines += [f"### {_md(rec['title'])}", "", f"_{_md(rec['criterion'])}_", ""]
        if rec["trial"] is None:
            lines += ["No trial qualifies.", ""]
        else:
            lines += [_md(_reco_text(rec)), "", *_fence(rec["command"]), ""]
    if "pruning" in c["figures"]:
        lines += ["## Time per trial and pruning", "", "![pruning](plots/pruning.png)", ""]
        lines += [PLOT_CAPTIONS["pruning"], ""]
    if c["prepass"] is not None:
        lines += ["## Layer sensitivity (pre-pass)", "", _md(c["prepass"]["text"]), ""]
        if "sensitivity" in c["figures"]:
            lines += ["![sensitivity](plots/sensitivity.png)", ""]
        lines += [_md_table(c["prepass"]["table"]), ""]
    else:
        lines += ["## Layer sensitivity observed across trials", "", _md_table(c["sens"]), ""]
    if len(c["failed"]):
        lines += ["## Failed and pruned trials", "", _md_table(c["failed"]), ""]
    return "\n".join(lines)
