"""Tables: sensitivity by hand, format_frame round trips, trial/front frames, header facts."""

from __future__ import annotations

import io
import json

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from autoquant.report import (
    format_frame,
    front_frame,
    sensitivity_frame,
    study_facts,
    trials_frame,
)
from autoquant.search import (
    FloatBaseline,
    StudyRecord,
    TrialRecord,
    pareto_front,
    read_record,
    record_attrs,
    write_study_record,
)
from autoquant.types import LayerPlan, QuantPlan, QuantSpec


def _tiny_study(rows: list[tuple[dict[str, object], float]]) -> optuna.Study:
    """Layers a, b, c; each row: {layer: weight bits} (missing = float) and accuracy."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    write_study_record(
        study,
        StudyRecord(
            layers=[
                {"name": n, "type_name": "Linear", "params": 10, "macs": 10}
                for n in ("a", "b", "c")
            ],
            float_baseline=FloatBaseline(accuracy=0.9, size_bytes=1000, latency_ms=1.0),
        ),
    )
    for bits, acc in rows:
        plan = QuantPlan(
            {
                n: LayerPlan(weight=QuantSpec(bits=b), activation=QuantSpec(bits=8))
                for n, b in bits.items()
            }
        )
        study.add_trial(
            optuna.trial.create_trial(
                values=[acc, 100.0],
                user_attrs=record_attrs(
                    TrialRecord(plan=plan.to_dict(), accuracy=acc, size_bytes=100, latency_ms=1.0)
                ),
            )
        )
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.FAIL, user_attrs=record_attrs(TrialRecord(fail_reason="boom"))
        )
    )
    return study


def test_sensitivity_matches_hand_computation() -> None:
    study = _tiny_study(
        [
            ({"a": 8, "b": 4, "c": 2}, 0.90),
            ({"a": 4, "b": 4, "c": 8}, 0.60),
            ({"a": 8, "b": 8, "c": 6}, 0.80),
            ({"a": 3, "b": "fp16"}, 0.50),  # c absent: float, counted nowhere
        ]
    )
    df = sensitivity_frame(study).set_index("layer")
    # a: ≤4 bits in trials 2 and 4 -> (0.60 + 0.50) / 2; 8 bits in 1 and 3 -> (0.90 + 0.80) / 2
    assert df.loc["a", "n_w_le4"] == 2 and df.loc["a", "acc_w_le4"] == pytest.approx(0.55)
    assert df.loc["a", "n_w8"] == 2 and df.loc["a", "acc_w8"] == pytest.approx(0.85)
    assert df.loc["a", "gain"] == pytest.approx(0.30)
    # b: ≤4 in trials 1, 2 -> 0.75; 8 in trial 3 -> 0.80; fp16 is in neither group
    assert (df.loc["b", "n_w_le4"], df.loc["b", "n_w8"]) == (2, 1)
    assert df.loc["b", "acc_w_le4"] == pytest.approx(0.75)
    assert df.loc["b", "gain"] == pytest.approx(0.05)
    # c: 2 bits in trial 1, 8 bits in trial 2, 6 bits (neither) in trial 3, float in 4
    assert (df.loc["c", "n_w_le4"], df.loc["c", "n_w8"]) == (1, 1)
    assert df.loc["c", "gain"] == pytest.approx(0.60 - 0.90)
    assert list(df.index) == ["a", "b", "c"]


def test_sensitivity_without_one_group_has_no_gain() -> None:
    df = sensitivity_frame(_tiny_study([({"a": 8}, 0.9), ({"a": 8}, 0.7)])).set_index("layer")
    assert df.loc["a", "acc_w8"] == pytest.approx(0.8)
    assert pd.isna(df.loc["a", "gain"]) and df.loc["b", "n_w8"] == 0


def test_sensitivity_on_toy_study_counts_every_trial(toy_study: optuna.Study) -> None:
    df = sensitivity_frame(toy_study).set_index("layer")
    complete = toy_study.get_trials(states=(TrialState.COMPLETE,))
    for name in df.index:
        bits = [
            QuantPlan.from_dict(read_record(t).plan).layers[name].weight.bits
            for t in complete
            if name in read_record(t).plan["layers"]
        ]
        assert df.loc[name, "n_w_le4"] == sum(isinstance(b, int) and b <= 4 for b in bits)
        assert df.loc[name, "n_w8"] == sum(b == 8 for b in bits)
    # the toy accuracy model penalises conv1 and linear most: they gain most from 8 bits
    top2 = set(df["gain"].astype(float).nlargest(3).index)
    assert {"conv1", "linear"} <= top2


@pytest.mark.parametrize("fmt", ["csv", "json", "table"])
def test_format_frame_round_trips(toy_study: optuna.Study, fmt: str) -> None:
    df = front_frame(toy_study, 0.01)
    text = format_frame(df, fmt)
    if fmt == "csv":
        back = pd.read_csv(io.StringIO(text))
        assert list(back["trial"]) == list(df["trial"])
        assert back["size_bytes"].tolist() == df["size_bytes"].tolist()
    elif fmt == "json":
        records = json.loads(text)
        assert [r["trial"] for r in records] == list(df["trial"])
    else:
        lines = text.splitlines()
        assert len(lines) == len(df) + 1 and "accuracy" in lines[0]


def test_format_frame_rejects_unknown_format() -> None:
    with pytest.raises(ValueError, match=r"format='xml'.*'table', 'json', 'csv'"):
        format_frame(pd.DataFrame({"a": [1]}), "xml")


def test_frames_cover_trials_and_front(toy_study: optuna.Study) -> None:
    df = trials_frame(toy_study)
    assert list(df["trial"]) == [t.number for t in toy_study.trials]
    assert df.set_index("trial").loc[4, "fail_reason"].startswith("NonFiniteLossError")
    front = front_frame(toy_study, 0.01)
    assert list(front["trial"]) == [t.number for t in pareto_front(toy_study, 0.01)]
    assert (front["drop"] <= 0.01 + 1e-9).all()


def test_study_facts_counts_and_wall_time(toy_study: optuna.Study) -> None:
    facts = dict(study_facts(toy_study))
    states = [t.state for t in toy_study.trials]
    assert facts["trials"] == (
        f"{states.count(TrialState.COMPLETE)} complete, "
        f"{states.count(TrialState.PRUNED)} pruned, "
        f"{states.count(TrialState.FAIL)} failed"
    )
    start = min(t.datetime_start for t in toy_study.trials)
    end = max(t.datetime_complete for t in toy_study.trials if t.state == TrialState.COMPLETE)
    secs = int((end - start).total_seconds())
    assert facts["wall time"].startswith(f"{secs // 60} min {secs % 60:02d} s")
    assert "1 point" in facts["constraint"] and "onnxruntime" in facts["latency"]
