"""Matplotlib figures of a study: Pareto projections, hypervolume and the per-layer bit map.

Figures use matplotlib's object-oriented API on an Agg canvas (no pyplot, no global
backend switch), so a report can be written from any process, headless or not.

One module (~700 lines) for all figures: they share the trial points, the styles and the
label placement that keeps front labels from overlapping.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from autoquant.report._tables import layer_order, points_text
from autoquant.search import (
    feasible,
    hypervolume_history,
    nondominated,
    pareto_front,
    read_float_baseline,
    read_record,
    read_study_record,
)
from autoquant.types import QuantSpec

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

FIGURES = ("accuracy_size", "accuracy_latency", "size_latency", "hypervolume", "bitmap")
BASELINE_STYLE = {"w8a8": ("s", "tab:blue"), "w4a8": ("D", "tab:orange")}
BIT_COLORS = {
    2: "#d73027",
    3: "#f46d43",
    4: "#fdae61",
    5: "#fee08b",
    6: "#d9ef8b",
    7: "#a6d96a",
    8: "#1a9850",
    "fp16": "#c6dbef",
    "fp32": "#e0e0e0",
}
FRONT_COLOR = "tab:red"
TRIAL_COLOR = "#8c8c8c"


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError(
            "the report's plots need matplotlib: pip install 'autoquant[plots]'"
        ) from None


def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


@dataclass
class _Points:
    """Complete trials of a study as arrays, in percent / KB / ms for plotting."""

    number: np.ndarray
    acc: np.ndarray
    kb: np.ndarray
    lat: np.ndarray
    feasible: np.ndarray
    front: np.ndarray
    baseline: list[str]
    float_acc: float
    float_kb: float
    float_lat: float
    max_drop: float | None
    n_objectives: int
    latency_desc: str

    @property
    def constraint(self) -> float | None:
        return None if self.max_drop is None else self.float_acc - 100 * self.max_drop


def _points(study: optuna.Study, max_drop: float | None) -> _Points:
    fb = read_float_baseline(study)
    scored = [
        (t, r)
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if (r := read_record(t)).accuracy is not None
    ]
    front = {t.number for t in pareto_front(study, max_drop)}
    lat = (read_study_record(study).spec or {}).get("latency", {})
    first = (fb.latency or [{}])[0]
    threads = first.get("threads", lat.get("threads", "?"))
    desc = (
        f"batch {first.get('batch_size', (lat.get('batch_sizes') or ['?'])[0])}, "
        f"{first.get('backend', lat.get('backend', '?'))}, "
        f"{threads} thread{'' if threads == 1 else 's'}"
    )

    def arr(f: Any, dtype: Any = float) -> np.ndarray:
        return np.array([f(t, r) for t, r in scored], dtype=dtype)

    return _Points(
        number=arr(lambda t, r: t.number, int),
        acc=arr(lambda t, r: 100 * r.accuracy),
        kb=arr(lambda t, r: r.size_bytes / 1024),
        lat=arr(lambda t, r: math.nan if r.latency_ms is None else r.latency_ms),
        feasible=arr(lambda t, r: feasible(t, max_drop), bool),
        front=arr(lambda t, r: t.number in front, bool),
        baseline=[r.baseline or "" for _, r in scored],
        float_acc=100 * fb.accuracy,
        float_kb=fb.size_bytes / 1024,
        float_lat=fb.latency_ms,
        max_drop=max_drop,
        n_objectives=len(study.directions),
        latency_desc=desc,
    )


def _accuracy_floor(p: _Points) -> float | None:
    """A lower accuracy limit that keeps the interesting region readable, or None.

    Trials that collapsed (e.g. 2-bit everywhere) would squash the front into a line;
    they are drawn clipped at the floor instead.
    """
    if len(p.acc) == 0:
        return None
    ref = [p.float_acc, *p.acc[p.front]]
    if p.constraint is not None:
        ref.append(p.constraint)
    lo, hi = min(ref), max(ref + [float(p.acc.max())])
    span = max(hi - lo, 1.0)
    if p.acc.min() >= lo - 3 * span:
        return None  # nothing far below: show every trial as it is
    return lo - 1.5 * span


# -- label placement --------------------------------------------------------------------


def _directions() -> list[tuple[float, float]]:
    angles = (45, 0, -45, 90, -90, 135, 180, -135)
    return [(math.cos(math.radians(a)), math.sin(math.radians(a))) for a in angles]


def _overlap(a: Any, b: Any) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def place_labels(
    fig: Figure,
    ax: Axes,
    xs: Sequence[float],
    ys: Sequence[float],
    texts: Sequence[str],
    obstacles: np.ndarray,
    *,
    fontsize: float = 8,
) -> list:
    """Annotate points with offset labels that overlap neither each other nor the markers.

    Greedy: for each label, rings of growing radius are tried in 8 directions; the first
    position free of overlap (with placed labels, with every marker in ``obstacles``: rows
    of x, y in data coordinates and a radius in points, and with the axes border) wins,
    else the least-overlapping one.
    Labels far from their point get a thin leader line. Call after everything else is
    drawn: the layout is frozen here so the positions stay valid when saving.
    """
    from matplotlib.transforms import Bbox

    fig.canvas.draw()
    fig.set_layout_engine("none")  # freeze the constrained layout: positions stay valid
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    obstacles = np.asarray(obstacles, float).reshape(-1, 3)
    pts = ax.transData.transform(obstacles[:, :2]) if len(obstacles) else np.zeros((0, 2))
    radii = obstacles[:, 2] * fig.dpi / 72
    markers = [
        Bbox([[x - r, y - r], [x + r, y + r]])
        for (x, y), r in zip(pts, radii, strict=True)
        if np.isfinite([x, y]).all()
    ]
    placed: list[Any] = []
    out = []
    for x, y, text in zip(xs, ys, texts, strict=True):
        best: tuple[float, float, float, float] | None = None
        for radius in (6, 12, 20, 30, 42, 56):
            for ux, uy in _directions():
                dx, dy = radius * ux, radius * uy
                ann = _annotate(ax, x, y, text, dx, dy, fontsize, leader=False)
                bb = ann.get_window_extent(renderer).padded(1.5)
                ann.remove()
                cost = sum(_overlap(bb, o) for o in placed) + sum(_overlap(bb, m) for m in markers)
                inside = _overlap(bb, frame)
                cost += 10 * (bb.width * bb.height - inside)  # leaving the axes is worst
                if best is None or cost < best[0]:
                    best = (cost, dx, dy, radius)
                if cost == 0:
                    break
            if best is not None and best[0] == 0:
                break
        assert best is not None
        _, dx, dy, radius = best
        ann = _annotate(ax, x, y, text, dx, dy, fontsize, leader=radius >= 12)
        placed.append(ann.get_window_extent(renderer).padded(1.5))
        out.append(ann)
    return out


def _annotate(
    ax: Axes, x: float, y: float, text: str, dx: float, dy: float, fontsize: float, *, leader: bool
) -> Any:
    ha = "left" if dx > 1 else "right" if dx < -1 else "center"
    va = "bottom" if dy > 1 else "top" if dy < -1 else "center"
    ann = ax.annotate(
        text,
        (x, y),
        xytext=(dx, dy),
        textcoords="offset points",
        ha=ha,
        va=va,
        fontsize=fontsize,
        color="#7a0c0c",
        zorder=6,
        bbox={"boxstyle": "round,pad=0.12", "fc": "white", "ec": "none", "alpha": 0.75},
        arrowprops={"arrowstyle": "-", "color": "#7a0c0c", "lw": 0.6, "shrinkA": 0, "shrinkB": 3}
        if leader
        else None,
    )
    ann.set_in_layout(False)
    return ann


def _obstacles(
    p: _Points, x: np.ndarray, y: np.ndarray, float_xy: tuple[float, float]
) -> np.ndarray:
    """Markers labels must avoid: (x, y, radius in points); reference markers are bigger."""
    r = np.where(p.front, 5.0, 3.5)
    r = np.where([bool(b) for b in p.baseline], 7.5, r)
    return np.vstack([np.column_stack([x, y, r]), [[float_xy[0], float_xy[1], 9.0]]])


def _front_labels(p: _Points, x: np.ndarray, y: np.ndarray) -> tuple[list, list, list]:
    """One label per distinct front position, e.g. ``#3`` or ``#3,#8`` for coincident trials."""
    groups: dict[tuple[float, float], list[int]] = {}
    for i in np.flatnonzero(p.front):
        groups.setdefault((float(x[i]), float(y[i])), []).append(int(p.number[i]))
    keys = sorted(groups)
    return (
        [k[0] for k in keys],
        [k[1] for k in keys],
        [",".join(f"#{n}" for n in sorted(groups[k])) for k in keys],
    )


# -- Pareto projections -----------------------------------------------------------------


def _plain_log_ticks(axis: Any) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator

    fmt = FuncFormatter(lambda v, _: f"{v:g}")
    axis.set_major_locator(LogLocator(subs=(1.0,)))
    axis.set_major_formatter(fmt)
    axis.set_minor_locator(LogLocator(subs=(2.0, 3.0, 5.0)))
    axis.set_minor_formatter(fmt)


def _log_if_wide(ax: Axes, values: np.ndarray, axis: str) -> None:
    finite = values[np.isfinite(values) & (values > 0)]
    if len(finite) and finite.max() / finite.min() > 6:
        getattr(ax, f"set_{axis}scale")("log")
        _plain_log_ticks(ax.xaxis if axis == "x" else ax.yaxis)


def _reference_markers(
    ax: Axes, p: _Points, x: np.ndarray, y: np.ndarray, float_xy: tuple[float, float]
) -> None:
    for name, (marker, color) in BASELINE_STYLE.items():
        idx = [i for i, b in enumerate(p.baseline) if b == name]
        if idx:
            numbers = ", ".join(f"#{p.number[i]}" for i in idx)
            ax.scatter(
                x[idx],
                y[idx],
                s=130,
                marker=marker,
                facecolors="none",
                edgecolors=color,
                linewidths=2.0,
                zorder=5,
                label=f"uniform {name} baseline ({numbers})",
            )
    ax.scatter(
        *float_xy,
        s=260,
        marker="*",
        c="gold",
        edgecolors="black",
        linewidths=0.8,
        zorder=5,
        label="float32 model",
    )


def _accuracy_plot(p: _Points, which: str) -> Figure:
    fig = _figure(9.0, 6.4)
    ax = fig.add_subplot()
    if which == "size":
        x, fx = p.kb, p.float_kb
        xlabel = "packed model size (KB, log scale)"
    else:
        x, fx = p.lat, p.float_lat
        xlabel = f"median latency (ms; {p.latency_desc})"
    floor = _accuracy_floor(p)
    y = p.acc.copy()
    clipped = np.zeros(len(y), bool) if floor is None else y < floor
    if floor is not None:
        y[clipped] = floor
    plain = ~p.front & ~clipped
    if (plain & p.feasible).any():
        ax.scatter(
            x[plain & p.feasible],
            y[plain & p.feasible],
            s=24,
            c=TRIAL_COLOR,
            alpha=0.75,
            zorder=2,
            label="trial",
        )
    if (plain & ~p.feasible).any():
        ax.scatter(
            x[plain & ~p.feasible],
            y[plain & ~p.feasible],
            s=30,
            marker="x",
            c=TRIAL_COLOR,
            zorder=2,
            label="trial over the accuracy-drop limit",
        )
    if clipped.any():
        ax.scatter(
            x[clipped],
            y[clipped],
            s=34,
            marker="v",
            c=TRIAL_COLOR,
            zorder=2,
            clip_on=False,
            label=f"trial below {floor:.1f} % (drawn at the axis)",
        )
    # The 2-D front of this pair among feasible trials, as a staircase.
    ok = p.feasible & np.isfinite(x)
    pts = np.column_stack([x[ok], -p.acc[ok]])
    nd = pts[nondominated(pts)] if len(pts) else pts
    if len(np.unique(nd, axis=0)) > 1:
        nd = nd[np.argsort(nd[:, 0])]
        sy = np.maximum(-nd[:, 1], floor if floor is not None else -np.inf)
        ax.step(
            nd[:, 0],
            sy,
            where="post",
            color=FRONT_COLOR,
            alpha=0.35,
            lw=1.2,
            zorder=1,
            label=f"front of accuracy vs {which} alone",
        )
    if p.front.any():
        ax.scatter(
            x[p.front],
            y[p.front],
            s=55,
            c=FRONT_COLOR,
            edgecolors="black",
            linewidths=0.6,
            zorder=4,
            label=f"Pareto front ({p.n_objectives} objectives), #trial",
        )
    _reference_markers(ax, p, x, y, (fx, p.float_acc))
    if p.constraint is not None:
        ax.axhline(
            p.constraint,
            ls="--",
            lw=1.2,
            color=FRONT_COLOR,
            zorder=1,
            label=f"accuracy limit: float − {points_text(p.max_drop)} = {p.constraint:.2f} %",
        )
    if which == "size":
        _log_if_wide(ax, np.append(x, fx), "x")
        sec = ax.secondary_xaxis(
            "top", functions=(lambda v: 100 * v / p.float_kb, lambda r: r * p.float_kb / 100)
        )
        sec.set_xlabel("% of float size")
        if ax.get_xscale() == "log":
            _plain_log_ticks(sec.xaxis)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 accuracy (%)")
    if floor is not None:
        top = max(float(y.max()), p.float_acc)
        ax.set_ylim(floor - 0.03 * (top - floor), top + 0.08 * (top - floor))
    ax.grid(True, alpha=0.3, which="major")
    ax.set_title(
        f"Accuracy vs {'size' if which == 'size' else 'latency'} — {len(p.acc)} complete trials"
    )
    fig.legend(loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    lx, ly, lt = _front_labels(p, x, y)
    place_labels(fig, ax, lx, ly, lt, _obstacles(p, x, y, (fx, p.float_acc)))
    return fig


def _size_latency_plot(p: _Points) -> Figure:
    from matplotlib import colormaps

    fig = _figure(9.0, 6.4)
    ax = fig.add_subplot()
    floor = _accuracy_floor(p)
    vmin = floor if floor is not None else float(np.nanmin(np.append(p.acc, p.float_acc)))
    vmax = float(np.nanmax(np.append(p.acc, p.float_acc)))
    cmap = colormaps["viridis"]
    kw = {"cmap": cmap, "vmin": vmin, "vmax": vmax, "zorder": 3}
    f = p.feasible
    sc = ax.scatter(
        p.kb[f],
        p.lat[f],
        c=p.acc[f],
        s=40,
        edgecolors="white",
        linewidths=0.4,
        label="trial (colour = accuracy)",
        **kw,
    )
    if (~f).any():
        ax.scatter(
            p.kb[~f],
            p.lat[~f],
            c=p.acc[~f],
            s=40,
            marker="x",
            label="trial over the accuracy-drop limit",
            **kw,
        )
    if p.front.any():
        ax.scatter(
            p.kb[p.front],
            p.lat[p.front],
            s=150,
            facecolors="none",
            edgecolors=FRONT_COLOR,
            linewidths=1.6,
            zorder=4,
            label=f"Pareto front ({p.n_objectives} objectives), #trial",
        )
    _reference_markers(ax, p, p.kb, p.lat, (p.float_kb, p.float_lat))
    cb = fig.colorbar(sc, ax=ax, extend="min" if floor is not None else "neither", pad=0.01)
    cb.set_label(
        "top-1 accuracy (%)" + (f"; arrow: below {floor:.1f} %" if floor is not None else "")
    )
    _log_if_wide(ax, np.append(p.kb, p.float_kb), "x")
    ax.set_xlabel(
        "packed model size (KB, log scale)"
        if ax.get_xscale() == "log"
        else "packed model size (KB)"
    )
    ax.set_ylabel(f"median latency (ms; {p.latency_desc})")
    ax.grid(True, alpha=0.3)
    ax.set_title("Size vs latency, coloured by accuracy")
    fig.legend(loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    lx, ly, lt = _front_labels(p, p.kb, p.lat)
    place_labels(fig, ax, lx, ly, lt, _obstacles(p, p.kb, p.lat, (p.float_kb, p.float_lat)))
    return fig


def _empty(title: str, message: str) -> Figure:
    fig = _figure(7.0, 2.5)
    ax = fig.add_subplot()
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes)
    return fig


def pareto_figures(study: optuna.Study, *, max_drop: float | None = None) -> dict[str, Figure]:
    """Accuracy vs size, accuracy vs latency, and size vs latency coloured by accuracy.

    Front points (complete, within ``max_drop``, non-dominated in the study's objectives)
    are highlighted and labelled ``#trial``; uniform baselines and the float model are
    reference markers; the accuracy-drop limit is a dashed line.

    Example:
        >>> figs = pareto_figures(study, max_drop=0.01)  # doctest: +SKIP
        >>> figs["accuracy_size"].savefig("front.png")  # doctest: +SKIP
    """
    _require_matplotlib()
    p = _points(study, max_drop)
    if len(p.acc) == 0:
        return {k: _empty(k.replace("_", " vs "), "no complete trials") for k in FIGURES[:3]}
    return {
        "accuracy_size": _accuracy_plot(p, "size"),
        "accuracy_latency": _accuracy_plot(p, "latency"),
        "size_latency": _size_latency_plot(p),
    }


# -- hypervolume ------------------------------------------------------------------------


def _study_max_drop(study: optuna.Study) -> float | None:
    return read_study_record(study).max_accuracy_drop


def hypervolume_figure(study: optuna.Study, compare: optuna.Study | None = None) -> Figure:
    """Hypervolume of the normalised (1 − accuracy, size/float) front after each complete
    trial, for ``study`` and optionally a second study on the same axes.

    Example:
        >>> hypervolume_figure(tpe_study, compare=random_study)  # doctest: +SKIP
    """
    _require_matplotlib()
    fig = _figure(8.0, 4.6)
    ax = fig.add_subplot()
    for s, color in ((study, "tab:red"), (compare, "tab:blue")):
        if s is None:
            continue
        trials = s.get_trials(deepcopy=False)
        hv = hypervolume_history(trials, read_float_baseline(s).size_bytes, _study_max_drop(s))
        if not hv:
            continue
        n = np.arange(1, len(hv) + 1)
        sampler = (read_study_record(s).spec or {}).get("sampler", "")
        ax.step(
            n,
            hv,
            where="post",
            color=color,
            lw=1.8,
            label=f"{s.study_name} ({sampler}): final {hv[-1]:.4f}",
        )
        ax.plot(n, hv, "o", ms=3, color=color)
    ax.set_xlabel("complete trials (in trial order)")
    ax.set_ylabel("hypervolume (unitless; max 1)")
    ax.set_title("Hypervolume of the accuracy–size front, reference (accuracy 0, float size)")
    ax.grid(True, alpha=0.3)
    ax.set_xlim(left=0)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=9)
    return fig


# -- per-layer bit map ------------------------------------------------------------------


def _cell(spec: QuantSpec | None) -> tuple[Any, str]:
    """(colour key, label) of one tensor: bits with ``c`` per-channel, ``a`` asymmetric."""
    if spec is None:
        return "fp32", "fp32"
    if spec.is_float:
        return spec.bits, str(spec.bits)
    return spec.bits, spec.short()


def bitmap_figure(
    study: optuna.Study, trials: Sequence[FrozenTrial] | None = None, *, max_rows: int = 40
) -> Figure:
    """Heat map of weight and activation bits: trials as rows, layers (model order) as columns.

    Cells read e.g. ``4c`` (4 bits, per-channel, symmetric) or ``8a`` (8 bits, per-tensor,
    asymmetric); float layers are grey and hatched. ``trials`` defaults to the Pareto
    front under the study's accuracy-drop constraint.

    Example:
        >>> bitmap_figure(study).savefig("bits.png")  # doctest: +SKIP
    """
    _require_matplotlib()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch, Rectangle

    if trials is None:
        trials = pareto_front(study, _study_max_drop(study))
    trials = list(trials)[:max_rows]
    layers = layer_order(study)
    if not trials or not layers:
        return _empty("Per-layer bits", "no Pareto trials to show")
    keys = list(BIT_COLORS)
    cmap = ListedColormap([BIT_COLORS[k] for k in keys])
    records = [read_record(t) for t in trials]
    fb = read_float_baseline(study)
    nr, nc = len(trials), len(layers)
    fontsize = 8 if nc <= 16 else 7 if nc <= 26 else 5.5
    fig = _figure(max(8.0, 2.6 + 0.5 * nc + 1.6), 2 * (0.28 * nr + 0.5) + 2.2)
    axes = fig.subplots(2, 1, sharex=True)
    used_idx: list[np.ndarray] = []
    for ax, part, title in (
        (axes[0], "weight", "weights"),
        (axes[1], "activation", "activations (layer inputs)"),
    ):
        idx = np.zeros((nr, nc), int)
        for r, record in enumerate(records):
            plan = record.quant_plan
            assert plan is not None, "a front trial without a plan"
            for c, name in enumerate(layers):
                lp = plan.layers.get(name)
                key, label = _cell(None if lp is None else getattr(lp, part))
                idx[r, c] = keys.index(key)
                light = key not in (2, 8)
                ax.text(
                    c,
                    r,
                    label,
                    ha="center",
                    va="center",
                    fontsize=fontsize,
                    color="black" if light else "white",
                )
                if isinstance(key, str):
                    ax.add_patch(
                        Rectangle(
                            (c - 0.5, r - 0.5), 1, 1, fill=False, hatch="///", ec="#a0a0a0", lw=0
                        )
                    )
        used_idx.append(idx.ravel())
        ax.imshow(
            idx, cmap=cmap, vmin=-0.5, vmax=len(keys) - 0.5, aspect="auto", interpolation="nearest"
        )
        ax.set_yticks(
            range(nr),
            [
                f"#{t.number}  {100 * rec.accuracy:.1f} %  {rec.size_bytes / 1024:.1f} KB"
                + (f"  ({rec.baseline})" if rec.baseline else "")
                for t, rec in zip(trials, records, strict=True)
            ],
            fontsize=fontsize + 0.5,
        )
        ax.set_xticks(np.arange(nc + 1) - 0.5, minor=True)
        ax.set_yticks(np.arange(nr + 1) - 0.5, minor=True)
        ax.grid(which="minor", color="white", lw=1.2)
        ax.tick_params(which="minor", length=0)
        ax.set_title(title, fontsize=10, loc="left")
    axes[1].set_xticks(
        range(nc), layers, rotation=50, ha="right", rotation_mode="anchor", fontsize=fontsize + 0.5
    )
    axes[1].set_xlabel("layer (model order)")
    fig.supylabel("Pareto trial  (accuracy, size)", fontsize=9)
    used = set(np.unique(np.concatenate(used_idx)))
    handles = [
        Patch(
            fc=BIT_COLORS[k],
            ec="#808080",
            label=f"{k} bits" if isinstance(k, int) else f"{k} (float)",
            hatch="///" if isinstance(k, str) else None,
        )
        for i, k in enumerate(keys)
        if i in used
    ]
    fig.legend(
        handles=handles,
        loc="outside right upper",
        fontsize=8,
        frameon=False,
        title="cell colour",
        title_fontsize=8,
    )
    fig.suptitle(
        f"Per-layer bit widths of the Pareto trials (float: {100 * fb.accuracy:.1f} %, "
        f"{fb.size_bytes / 1024:.1f} KB)\n"
        "label: bits, c = per-channel scales, a = asymmetric (zero-point); "
        "no letter = per-tensor symmetric",
        fontsize=9,
    )
    return fig


def report_figures(
    study: optuna.Study, *, compare: optuna.Study | None = None, max_drop: float | None = None
) -> dict[str, Figure]:
    """All report figures by name (see :data:`FIGURES`)."""
    figs = pareto_figures(study, max_drop=max_drop)
    figs["hypervolume"] = hypervolume_figure(study, compare)
    figs["bitmap"] = bitmap_figure(study, pareto_front(study, max_drop))
    return figs
