"""At the end of a search the front's latency is re-timed interleaved with the float model,
stored on the study, and shown (with noisy figures flagged) by ``front`` and the report."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from autoquant.measure import Remeasurement
from autoquant.report import front_frame, write_report
from autoquant.search import _remeasure as remeasure_module
from autoquant.search import (
    pareto_front,
    read_record,
    read_remeasurement,
    run_search,
    study_spec_from_dict,
)

SPEC = {
    "study": {"name": "remeasure", "trials": 3, "seed": 0},
    "task": {"name": "digits-cnn"},
    "space": {"w_bits": [4, 8], "a_bits": [8]},
    "qat": {"steps": 4, "calib_batches": 1},
    "latency": {"warmup": 1, "repeats": 5, "budget_s": 0.05},
    "strategy": {"sensitivity": "off", "prune": False},
}


def _search(tmp_path: Path, **latency: object) -> optuna.Study:
    data = {**SPEC, "latency": {**SPEC["latency"], **latency}}
    spec = study_spec_from_dict(data, "s.toml")
    return run_search(spec, storage=f"sqlite:///{tmp_path / 's.db'}", progress=False)


@pytest.mark.slow
def test_the_front_is_remeasured_and_shown_next_to_the_stored_figure(tmp_path: Path) -> None:
    study = _search(tmp_path)
    again = read_remeasurement(study)
    assert again is not None
    front = pareto_front(study, SPEC.get("constraint", {}).get("max_accuracy_drop"))
    assert sorted(again["trials"]) == sorted(str(t.number) for t in front)
    for t in front:
        entry = again["trials"][str(t.number)]
        assert entry["stored_ms"] == read_record(t).latency_ms
        assert entry["latency_ms"] > 0 and again["float_ms"] > 0
    df = front_frame(study)
    fresh = {str(n): v for n, v in zip(df["trial"], df["remeasured_ms"], strict=True)}
    assert fresh == {n: v["latency_ms"] for n, v in again["trials"].items()}
    write_report(study, tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    assert "re-measured at the end of the search" in md and "re-measured (ms)" in md


@pytest.mark.slow
def test_a_drifting_machine_flags_every_front_figure_noisy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = remeasure_module.remeasure

    def drifting(*args: object, **kwargs: object) -> Remeasurement:
        out = real(*args, **kwargs)  # type: ignore[arg-type]
        return Remeasurement(out.results, out.float_result, float_drift=0.9, drifted=True)

    monkeypatch.setattr(remeasure_module, "remeasure", drifting)
    study = _search(tmp_path)
    again = read_remeasurement(study)
    assert again is not None and again["drifted"]
    assert all(v["noisy"] for v in again["trials"].values())
    assert front_frame(study)["noisy"].all()
    write_report(study, tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    assert "the machine's speed drifted: every figure is noisy" in md
    assert "(noisy)" in md


@pytest.mark.slow
def test_remeasure_front_can_be_switched_off(tmp_path: Path) -> None:
    study = _search(tmp_path, remeasure_front=False)
    assert read_remeasurement(study) is None
    assert front_frame(study)["remeasured_ms"].isna().all()
