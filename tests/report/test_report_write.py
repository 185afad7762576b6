"""write_report's files, the HTML's self-containedness, and what the figures draw."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from autoquant.report import (
    bitmap_figure,
    hypervolume_figure,
    pareto_figures,
    recommendations,
    write_report,
)
from autoquant.search import (
    FloatBaseline,
    StudyRecord,
    TrialRecord,
    hypervolume_history,
    pareto_front,
    read_float_baseline,
    read_record,
    read_study_record,
    record_attrs,
    write_study_record,
)
from autoquant.types import QuantPlan

pytest.importorskip("matplotlib")
MAX_DROP = 0.01  # the toy study's constraint (conftest)


@pytest.fixture(scope="module")
def report(
    toy_study: optuna.Study,
    make_toy_study: Callable[..., optuna.Study],
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Path]:
    compare = make_toy_study(None, name="toy-random", seed=3)
    return write_report(
        toy_study, tmp_path_factory.mktemp("report"), compare=compare, study_ref="studies/toy.toml"
    )


def test_report_files_exist(report: dict[str, Path]) -> None:
    for key in (
        "html",
        "markdown",
        "trials_csv",
        "front_csv",
        "plot_accuracy_size",
        "plot_accuracy_latency",
        "plot_size_latency",
        "plot_hypervolume",
        "plot_bitmap",
    ):
        assert report[key].is_file() and report[key].stat().st_size > 0, key
    assert report["plot_bitmap"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_front_trial_is_in_front_csv_and_html(
    toy_study: optuna.Study, report: dict[str, Path]
) -> None:
    front = [t.number for t in pareto_front(toy_study, MAX_DROP)]
    assert front, "the toy study must have a front"
    csv = pd.read_csv(report["front_csv"])
    assert sorted(csv["trial"]) == sorted(front)
    page = report["html"].read_text(encoding="utf-8")
    for n in front:
        assert f'id="front-trial-{n}"' in page
    md = report["markdown"].read_text(encoding="utf-8")
    rows = [line for line in md.splitlines() if re.match(r"\| \d+ \| \d", line)]
    assert [int(r.split("|")[1]) for r in rows] == front
    trials = pd.read_csv(report["trials_csv"])
    assert list(trials["trial"]) == [t.number for t in toy_study.trials]


def test_html_has_no_external_references(report: dict[str, Path]) -> None:
    page = report["html"].read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page
    refs = re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]+)""", page)
    assert all(r.startswith(("#", "data:")) for r in refs), {r[:40] for r in refs}
    assert "<script" not in page and "<link" not in page and "@import" not in page
    assert page.count("<svg") == 5  # the five figures, inline


def test_html_states_recommendations_and_header(
    toy_study: optuna.Study, report: dict[str, Path]
) -> None:
    page = report["html"].read_text(encoding="utf-8")
    for rec in recommendations(toy_study, max_drop=0.01, size_fraction=0.25):
        assert f'id="reco-{rec["key"]}"' in page
        if rec["trial"] is not None:
            n = rec["trial"]
            assert f"autoquant export studies/toy.toml --trial {n} --out export-trial{n}" in page
    assert "12 complete, 1 pruned, 1 failed" in page
    assert "NonFiniteLossError" in page  # the failed trial's reason
    assert "optuna-dashboard sqlite:///autoquant-runs/toy/study.db" in page


def test_report_of_a_study_without_complete_trials(tmp_path: Path) -> None:
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    write_study_record(
        study,
        StudyRecord(float_baseline=FloatBaseline(accuracy=0.9, size_bytes=4000, latency_ms=1.0)),
    )
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.FAIL, user_attrs=record_attrs(TrialRecord(fail_reason="OOM"))
        )
    )
    paths = write_report(study, tmp_path)
    page = paths["html"].read_text(encoding="utf-8")
    assert page.count("No trial qualifies.") == 3
    assert "No complete trial satisfies the constraint." in page
    assert pd.read_csv(paths["front_csv"]).empty


def _offsets(ax: object, label_start: str) -> np.ndarray:
    for coll in ax.collections:  # type: ignore[attr-defined]
        if coll.get_label().startswith(label_start):
            return np.asarray(coll.get_offsets())
    raise AssertionError(f"no collection labelled {label_start!r}")


def test_pareto_figures_draw_front_references_and_limit(toy_study: optuna.Study) -> None:
    assert read_study_record(toy_study).max_accuracy_drop == MAX_DROP
    figs = pareto_figures(toy_study, max_drop=MAX_DROP)
    front = pareto_front(toy_study, MAX_DROP)
    fb = read_float_baseline(toy_study)
    ax = figs["accuracy_size"].axes[0]
    got = {tuple(np.round(p, 6)) for p in _offsets(ax, "Pareto front")}
    want = {
        (round(read_record(t).size_bytes / 1024, 6), round(100 * read_record(t).accuracy, 6))
        for t in front
    }
    assert got == want
    assert {a.get_text() for a in ax.texts} == {f"#{t.number}" for t in front}
    limit = [ln for ln in ax.get_lines() if ln.get_label().startswith("accuracy limit")]
    assert limit and limit[0].get_ydata()[0] == pytest.approx(100 * (fb.accuracy - MAX_DROP))
    star = _offsets(ax, "float32")
    assert star.tolist() == [[fb.size_bytes / 1024, 100 * fb.accuracy]]
    w8 = _offsets(ax, "uniform w8a8")
    (base,) = [t for t in toy_study.trials if read_record(t).baseline == "w8a8"]
    assert w8[0, 0] == pytest.approx(read_record(base).size_bytes / 1024)
    assert ax.get_xlabel().startswith("packed model size (KB")
    assert ax.get_ylabel() == "top-1 accuracy (%)"
    assert "ms" in figs["accuracy_latency"].axes[0].get_xlabel()
    assert figs["accuracy_size"].legends  # legend present


def test_front_labels_do_not_overlap(make_toy_study: Callable[..., optuna.Study]) -> None:
    # Without the constraint the front is large and crowded: the hardest case.
    study = make_toy_study(None, n_random=40, seed=1)
    figs = pareto_figures(study, max_drop=None)
    for name in ("accuracy_size", "accuracy_latency", "size_latency"):
        fig = figs[name]
        renderer = fig.canvas.get_renderer()
        boxes = [t.get_window_extent(renderer) for t in fig.axes[0].texts]
        assert len(boxes) >= 5
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                assert not boxes[i].overlaps(boxes[j]), (name, i, j)


def test_hypervolume_figure_draws_both_studies(
    toy_study: optuna.Study, make_toy_study: Callable[..., optuna.Study]
) -> None:
    other = make_toy_study(None, name="toy-random", seed=3)
    fig = hypervolume_figure(toy_study, other)
    steps = [ln for ln in fig.axes[0].get_lines() if ln.get_label().startswith("toy")]
    assert len(steps) == 2
    for line, study in zip(steps, (toy_study, other), strict=True):
        hv = hypervolume_history(study.trials, read_float_baseline(study).size_bytes, MAX_DROP)
        assert np.allclose(line.get_ydata(), hv)
        assert line.get_label().startswith(study.study_name)


def test_bitmap_cells_match_plans(toy_study: optuna.Study) -> None:
    front = pareto_front(toy_study, MAX_DROP)
    fig = bitmap_figure(toy_study, front)
    layers = [la["name"] for la in read_study_record(toy_study).layers]
    for ax, part in zip(fig.axes[:2], ("weight", "activation"), strict=True):
        cells = {
            (round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts
        }
        for r, trial in enumerate(front):
            plan = QuantPlan.from_dict(read_record(trial).plan)
            for c, name in enumerate(layers):
                lp = plan.layers.get(name)
                want = (
                    "fp32"
                    if lp is None
                    else (
                        str(getattr(lp, part).bits)
                        if getattr(lp, part).is_float
                        else getattr(lp, part).short()
                    )
                )
                assert cells[(r, c)] == want
    # a front trial with a float layer exists, so the float styling is exercised
    assert any(any(t.get_text().startswith("fp") for t in ax.texts) for ax in fig.axes[:2])
