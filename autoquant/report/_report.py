"""The study report: a self-contained ``report.html``, ``report.md`` and CSV tables."""

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

from autoquant.report._info import study_facts
from autoquant.report._plots import report_figures
from autoquant.report._select import recommendations
from autoquant.report._tables import (
    front_frame,
    points_text,
    sensitivity_frame,
    trials_frame,
)
from autoquant.search import mask_password, read_record, read_study_record

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


def _num(v: Any, fmt: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return format(v, fmt)


def _front_display(df: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "trial": df["trial"],
            "accuracy (%)": [_num(100 * v, ".2f") for v in df["accuracy"]],
            "drop (points)": [_num(100 * v, "+.2f") for v in df["drop"]],
            "size (KB)": [_num(v, ".2f") for v in df["size_kb"]],
            "size (B)": df["size_bytes"],
            "size / float": [_num(v, ".3f") for v in df["size_ratio"]],
            "latency (ms)": [_num(v, ".4g") for v in df["latency_ms"]],
            "IQR (ms)": [_num(v, ".4g") for v in df["latency_iqr_ms"]],
            "speed-up": [_num(v, ".2f") and _num(v, ".2f") + "×" for v in df["speedup"]],
            "baseline": df["baseline"],
            "per-layer plan": df["plan"],
        }
    )


def _sensitivity_display(df: pd.DataFrame, low: int = 4, high: int = 8) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "layer": df["layer"],
            "type": df["type"],
            "params": df["params"],
            f"trials w ≤ {low} bits": df[f"n_w_le{low}"],
            f"mean acc, w ≤ {low} bits (%)": [_num(100 * v, ".2f") for v in df[f"acc_w_le{low}"]],
            f"trials w {high} bits": df[f"n_w{high}"],
            f"mean acc, w {high} bits (%)": [_num(100 * v, ".2f") for v in df[f"acc_w{high}"]],
            "gain of protecting (points)": [_num(100 * v, "+.2f") for v in df["gain"]],
        }
    )


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


def _md_table(df: pd.DataFrame) -> str:
    def cell(v: Any) -> str:
        return ("" if pd.isna(v) else str(v)).replace("|", "\\|").replace("\n", " ")

    lines = [
        "| " + " | ".join(cell(c) for c in df.columns) + " |",
        "|" + "|".join("---" for _ in df.columns) + "|",
    ]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in df.itertuples(index=False)]
    return "\n".join(lines)


def _failed_frame(study: optuna.Study) -> pd.DataFrame:
    rows = [
        {"trial": t.number, "state": t.state.name, "reason": read_record(t).fail_reason or ""}
        for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL, TrialState.PRUNED))
    ]
    return pd.DataFrame(rows, columns=["trial", "state", "reason"])


def _dashboard_command(study: optuna.Study) -> str:
    storage = (read_study_record(study).spec or {}).get("storage")
    url = storage or f"sqlite:///autoquant-runs/{study.study_name}/study.db"
    # Masked again: studies written before every form was masked may hold a password.
    return f"optuna-dashboard {mask_password(url)}"


def _reco_text(rec: dict[str, Any]) -> str:
    if rec["trial"] is None:
        return "no trial qualifies"
    speed = f", {rec['speedup']:.2f}× float speed" if rec.get("speedup") else ""
    lat = f"{rec['latency_ms']:.4g} ms" if rec.get("latency_ms") is not None else "n/a"
    return (
        f"trial {rec['trial']}: top-1 {100 * rec['accuracy']:.2f} % (drop "
        f"{100 * rec['accuracy_drop']:+.2f} points), {rec['size_bytes'] / 1024:.2f} KB "
        f"({100 * rec['size_ratio']:.1f} % of float), {lat}{speed}; plan "
        f"{rec['plan_summary']}"
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
) -> dict[str, Path]:
    """Write ``report.html`` (self-contained, opens offline), ``report.md`` (with
    ``plots/*.png``), ``trials.csv`` and ``front.csv`` into ``out_dir``.

    Args:
        study: a study written by :func:`autoquant.search.run_search`.
        out_dir: output folder (created).
        compare: another study whose hypervolume curve is drawn beside this one's.
        max_drop_reco: accuracy-drop limit of the "smallest"/"fastest" recommendations.
        size_fraction: size limit (fraction of float) of the "most accurate" one.
        study_ref: how the export commands name the study (the study file path).

    Returns:
        The written paths: ``html``, ``markdown``, ``trials_csv``, ``front_csv`` and
        ``plot_<name>`` for each PNG.

    Example:
        >>> paths = write_report(study, "out/", study_ref="studies/digits.toml")  # doctest: +SKIP
        >>> paths["html"]  # doctest: +SKIP
        PosixPath('out/report.html')
    """
    out = Path(out_dir)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    max_drop = read_study_record(study).max_accuracy_drop
    paths: dict[str, Path] = {}

    trials = trials_frame(study)
    front = front_frame(study, max_drop)
    paths["trials_csv"] = out / "trials.csv"
    trials.to_csv(paths["trials_csv"], index=False)
    paths["front_csv"] = out / "front.csv"
    front.to_csv(paths["front_csv"], index=False)

    figs = report_figures(study, compare=compare, max_drop=max_drop)
    svgs = {}
    for name, fig in figs.items():
        paths[f"plot_{name}"] = out / "plots" / f"{name}.png"
        fig.savefig(paths[f"plot_{name}"])
        svgs[name] = _svg(fig)

    facts = study_facts(study)
    recos = recommendations(
        study, max_drop=max_drop_reco, size_fraction=size_fraction, study_ref=study_ref
    )
    sens = _sensitivity_display(sensitivity_frame(study))
    failed = _failed_frame(study)
    front_disp = _front_display(front)
    dash = _dashboard_command(study)
    generated = time.strftime("%Y-%m-%d %H:%M:%S")
    context = {
        "facts": facts,
        "recos": recos,
        "sens": sens,
        "failed": failed,
        "front": front_disp,
        "front_trials": list(front["trial"]),
        "dash": dash,
        "generated": generated,
        "max_drop": max_drop,
        "compare": compare,
    }

    paths["html"] = out / "report.html"
    paths["html"].write_text(_html(study, context, svgs), encoding="utf-8")
    paths["markdown"] = out / "report.md"
    paths["markdown"].write_text(_markdown(study, context), encoding="utf-8")
    return paths


def _front_heading(max_drop: float | None, n: int) -> str:
    within = (
        f"complete trials within {points_text(max_drop)} of float accuracy"
        if max_drop is not None
        else "complete trials (no accuracy constraint)"
    )
    return f"Pareto front: {n} non-dominated {within}"


def _html(study: optuna.Study, c: dict[str, Any], svgs: dict[str, str]) -> str:
    e = html.escape
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
        "<h2>Pareto plots</h2>",
    ]
    for name in ("accuracy_size", "accuracy_latency", "size_latency"):
        parts.append(
            f'<figure id="plot-{name}">{svgs[name]}'
            f"<figcaption>{e(PLOT_CAPTIONS[name])}</figcaption></figure>"
        )
    parts += [
        "<h2>Hypervolume over trials</h2>",
        f'<figure id="plot-hypervolume">{svgs["hypervolume"]}<figcaption>'
        f"{e(PLOT_CAPTIONS['hypervolume'])}"
        + (f" Compared with study {e(c['compare'].study_name)}." if c["compare"] else "")
        + "</figcaption></figure>",
        "<h2>Per-layer bit map of the front</h2>",
        f'<figure id="plot-bitmap">{svgs["bitmap"]}'
        f"<figcaption>{e(PLOT_CAPTIONS['bitmap'])}</figcaption></figure>",
        f"<h2>{e(_front_heading(c['max_drop'], len(c['front'])))}</h2>",
    ]
    if len(c["front"]):
        parts.append(
            _html_table(
                c["front"],
                row_ids=[f"front-trial-{n}" for n in c["front_trials"]],
                left=("baseline", "per-layer plan"),
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
            _html_table(c["failed"], left=("state", "reason")),
        ]
    parts.append("</body></html>")
    return "\n".join(parts)


def _markdown(study: optuna.Study, c: dict[str, Any]) -> str:
    lines = [f"# autoquant report: {study.study_name}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {str(v).replace('|', '/')} |" for k, v in c["facts"]]
    lines += [
        "",
        f"Generated {c['generated']}. Interactive view: `{c['dash']}`.",
        "",
        "## Pareto plots",
        "",
    ]
    for name in ("accuracy_size", "accuracy_latency", "size_latency"):
        lines += [f"![{name}](plots/{name}.png)", "", PLOT_CAPTIONS[name], ""]
    lines += [
        "## Hypervolume over trials",
        "",
        "![hypervolume](plots/hypervolume.png)",
        "",
        PLOT_CAPTIONS["hypervolume"],
        "",
        "## Per-layer bit map of the front",
        "",
        "![bitmap](plots/bitmap.png)",
        "",
        f"## {_front_heading(c['max_drop'], len(c['front']))}",
        "",
    ]
    lines += [
        _md_table(c["front"]) if len(c["front"]) else "No complete trial satisfies the constraint.",
        "",
        "## Recommendations",
        "",
    ]
    for rec in c["recos"]:
        lines += [f"### {rec['title']}", "", f"_{rec['criterion']}_", "", _reco_text(rec), ""]
        if rec["trial"] is not None:
            lines += ["```", rec["command"], "```", ""]
    lines += ["## Layer sensitivity observed across trials", "", _md_table(c["sens"]), ""]
    if len(c["failed"]):
        lines += ["## Failed and pruned trials", "", _md_table(c["failed"]), ""]
    return "\n".join(lines)
