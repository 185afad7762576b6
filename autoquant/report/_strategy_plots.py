"""Figures of how the search chose and judged trials: the sensitivity heat map of the pre-pass
and the time per trial with what pruning saved. Each is drawn only when the study has it."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import optuna
import pandas as pd
from optuna.trial import TrialState

from autoquant.report._plots import _figure, _require_matplotlib
from autoquant.report._tables import pruning_summary, sensitivity_table_frame
from autoquant.search import read_record, read_study_record

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PRUNED_COLOR = "tab:orange"
COMPLETE_COLOR = "#8c8c8c"


def sensitivity_figure(study: optuna.Study) -> Figure | None:
    """Heat map of the pre-pass's damage metric: units as rows, weight options (left) and
    activation options (right) as columns, log colour scale, values written in the cells.
    None without a stored table.

    Example:
        >>> sensitivity_figure(study).savefig("sensitivity.png")  # doctest: +SKIP
    """
    df = sensitivity_table_frame(study)
    if df is None or df.empty:
        return None
    _require_matplotlib()
    from matplotlib.colors import LogNorm

    stored = read_study_record(study).sensitivity or {}
    metric = stored.get("metric") or "eval_kl"
    if metric not in df.columns:
        metric = "eval_kl"
    units = list(dict.fromkeys(df["unit"]))
    kinds = ("weight", "activation")
    fig = _figure(max(8.0, 3.0 + 0.55 * df["option"].nunique()), 1.6 + 0.32 * len(units))
    axes = fig.subplots(1, 2, gridspec_kw={"width_ratios": [_n(df, k) for k in kinds]})
    values = df[metric].astype(float).clip(lower=0)
    positive = values[values > 0]
    low = float(positive.min()) if len(positive) else 1e-6
    high = max(float(values.max()), low * 10)
    norm = LogNorm(vmin=low, vmax=high)
    image = None
    for ax, kind in zip(axes, kinds, strict=True):
        part = df[df["kind"] == kind]
        options = list(dict.fromkeys(part["option"]))
        grid = np.full((len(units), len(options)), np.nan)
        for _, row in part.iterrows():
            grid[units.index(row["unit"]), options.index(row["option"])] = max(row[metric], low)
        image = ax.imshow(grid, cmap="magma_r", norm=norm, aspect="auto", interpolation="nearest")
        for (r, c), v in np.ndenumerate(grid):
            if not math.isnan(v):
                ax.text(
                    c,
                    r,
                    f"{v:.2g}",
                    ha="center",
                    va="center",
                    fontsize=6.5,
                    color="w" if v > math.sqrt(low * high) else "k",
                )
        ax.set_xticks(range(len(options)), options, rotation=45, ha="right", fontsize=7.5)
        ax.set_yticks(range(len(units)), units if kind == "weight" else [], fontsize=7.5)
        ax.set_title(f"{kind} options (the rest float)", fontsize=9, loc="left")
    if image is not None:
        fig.colorbar(image, ax=list(axes), shrink=0.8, label=f"{metric} (damage; lower is better)")
    fig.suptitle(
        f"Sensitivity pre-pass: damage of quantizing one unit alone, no QAT ({metric})",
        fontsize=10,
    )
    return fig


def _n(df: pd.DataFrame, kind: str) -> int:
    return max(1, df[df["kind"] == kind]["option"].nunique())


STRATEGY_FIGURES = ("sensitivity", "pruning")


def strategy_figures(study: optuna.Study) -> dict[str, Figure]:
    """The figures of this module that the study has data for, by name."""
    figs = {"sensitivity": sensitivity_figure(study), "pruning": pruning_figure(study)}
    return {k: v for k, v in figs.items() if v is not None}


def pruning_figure(study: optuna.Study) -> Figure | None:
    """Wall time of each trial in trial order: complete trials grey, trials stopped by the
    pruning rule orange with their estimated saved time hatched on top. None when no trial
    was pruned by the rule.

    Example:
        >>> pruning_figure(study).savefig("pruning.png")  # doctest: +SKIP
    """
    summary = pruning_summary(study)
    if not summary["pruned"]:
        return None
    _require_matplotlib()
    numbers, spent, saved, colors = [], [], [], []
    for t in study.get_trials(deepcopy=False):
        r = read_record(t)
        if t.state == TrialState.COMPLETE and r.duplicate_of is None and r.total_s:
            numbers.append(t.number)
            spent.append(r.total_s)
            saved.append(0.0)
            colors.append(COMPLETE_COLOR)
        elif t.state == TrialState.PRUNED and r.pruned:
            numbers.append(t.number)
            spent.append(r.pruned.get("spent_s") or 0.0)
            saved.append(r.pruned.get("saved_s") or 0.0)
            colors.append(PRUNED_COLOR)
    fig = _figure(8.0, 3.8)
    ax = fig.add_subplot()
    ax.bar(numbers, spent, color=colors, width=0.8)
    ax.bar(
        numbers,
        saved,
        bottom=spent,
        color="none",
        edgecolor=PRUNED_COLOR,
        hatch="///",
        width=0.8,
        label="estimated time saved",
    )
    from matplotlib.patches import Patch

    ax.legend(
        handles=[
            Patch(color=COMPLETE_COLOR, label="complete trial"),
            Patch(color=PRUNED_COLOR, label="stopped by the pruning rule"),
            Patch(fc="none", ec=PRUNED_COLOR, hatch="///", label="estimated time saved"),
        ],
        fontsize=8,
        loc="upper right",
    )
    total = sum(spent)
    ax.set_xlabel("trial")
    ax.set_ylabel("wall time (s)")
    ax.set_title(
        f"{summary['pruned']} trials stopped early saved ≈ {summary['saved_s']:.0f} s "
        f"({100 * summary['saved_s'] / max(total + summary['saved_s'], 1e-9):.0f} % of the "
        "trial time it would have taken)",
        fontsize=9,
    )
    ax.grid(True, axis="y", alpha=0.3)
    return fig
