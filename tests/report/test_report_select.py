"""best_trial, recommendations and best_payload against brute-force choices."""

from __future__ import annotations

import json

import optuna
import pytest
from optuna.trial import TrialState

from autoquant.report import (
    best_payload,
    best_trial,
    export_command,
    format_best,
    most_accurate_within_size,
    recommendations,
)
from autoquant.search import (
    FloatBaseline,
    StudyRecord,
    TrialRecord,
    read_float_baseline,
    read_record,
    read_study_record,
    record_attrs,
    write_study_record,
)
from autoquant.types import QuantPlan


def _complete(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(states=(TrialState.COMPLETE,))


def _brute_min(study: optuna.Study, max_drop: float | None, attr: str) -> int | None:
    """Independent reference: sort qualifying trials by (metric, -accuracy, other, number)."""
    base = read_float_baseline(study).accuracy
    other = "latency_ms" if attr == "size_bytes" else "size_bytes"
    rows = sorted(
        (
            getattr(read_record(t), attr),
            -read_record(t).accuracy,
            getattr(read_record(t), other),
            t.number,
        )
        for t in _complete(study)
        if max_drop is None or base - read_record(t).accuracy <= max_drop + 1e-9
    )
    return rows[0][3] if rows else None


@pytest.mark.parametrize("minimize,attr", [("size", "size_bytes"), ("latency", "latency_ms")])
@pytest.mark.parametrize("max_drop", [0.0, 0.004, 0.01, 0.02, 0.5, None])
def test_best_trial_matches_brute_force(
    toy_study: optuna.Study, minimize: str, attr: str, max_drop: float | None
) -> None:
    t = best_trial(toy_study, max_drop=max_drop, minimize=minimize)
    assert (None if t is None else t.number) == _brute_min(toy_study, max_drop, attr)


def test_best_trial_constraint_binds(toy_study: optuna.Study) -> None:
    # The unconstrained smallest trial collapsed; under 1 % drop another one is chosen.
    free = best_trial(toy_study, max_drop=None, minimize="size")
    tight = best_trial(toy_study, max_drop=0.01, minimize="size")
    assert free is not None and tight is not None and free.number != tight.number
    assert read_record(free).accuracy_drop > 0.01 >= read_record(tight).accuracy_drop
    assert read_record(free).size_bytes < read_record(tight).size_bytes


def test_best_trial_rejects_bad_arguments(toy_study: optuna.Study) -> None:
    with pytest.raises(ValueError, match=r"minimize='accuracy'.*'size', 'latency'"):
        best_trial(toy_study, max_drop=0.01, minimize="accuracy")
    with pytest.raises(ValueError, match="max_drop"):
        best_trial(toy_study, max_drop=-0.1, minimize="size")


@pytest.mark.parametrize("max_drop,fraction", [(0.01, 0.25), (0.005, 0.15), (0.03, 0.5)])
def test_recommendations_satisfy_constraints_and_are_optimal(
    toy_study: optuna.Study, max_drop: float, fraction: float
) -> None:
    fb = read_float_baseline(toy_study)
    recos = {
        r["key"]: r
        for r in recommendations(
            toy_study, max_drop=max_drop, size_fraction=fraction, study_ref="studies/toy.toml"
        )
    }
    by_number = {t.number: t for t in _complete(toy_study)}
    ok_drop = [
        t for t in by_number.values() if fb.accuracy - read_record(t).accuracy <= max_drop + 1e-9
    ]
    ok_size = [
        t for t in by_number.values() if read_record(t).size_bytes <= fraction * fb.size_bytes
    ]
    for key, attr in (("smallest", "size_bytes"), ("fastest", "latency_ms")):
        chosen = by_number[recos[key]["trial"]]
        assert fb.accuracy - read_record(chosen).accuracy <= max_drop + 1e-9
        assert getattr(read_record(chosen), attr) == min(
            getattr(read_record(t), attr) for t in ok_drop
        )
    if ok_size:
        chosen = by_number[recos["most_accurate"]["trial"]]
        assert read_record(chosen).size_bytes <= fraction * fb.size_bytes
        assert read_record(chosen).accuracy == max(read_record(t).accuracy for t in ok_size)
    else:
        assert recos["most_accurate"]["trial"] is None
    for r in recos.values():
        if r["trial"] is not None:
            n = r["trial"]
            assert r["command"] == (
                f"autoquant export studies/toy.toml --trial {n} --out export-trial{n}"
            )


def test_recommendations_say_when_nothing_qualifies(toy_study: optuna.Study) -> None:
    smallest = min(read_record(t).size_bytes for t in _complete(toy_study))
    fraction = 0.5 * smallest / read_float_baseline(toy_study).size_bytes
    assert most_accurate_within_size(toy_study, size_fraction=fraction) is None
    rec = recommendations(toy_study, size_fraction=fraction)[2]
    assert rec["trial"] is None and "command" not in rec


def test_best_payload_is_json_and_carries_the_plan(toy_study: optuna.Study) -> None:
    t = best_trial(toy_study, max_drop=0.01, minimize="size")
    assert t is not None
    payload = json.loads(json.dumps(best_payload(toy_study, t, study_ref="my study.toml")))
    fb = read_float_baseline(toy_study)
    assert payload["trial"] == t.number
    assert QuantPlan.from_dict(payload["plan"]) == QuantPlan.from_dict(read_record(t).plan)
    assert payload["size_ratio"] == pytest.approx(read_record(t).size_bytes / fb.size_bytes)
    assert payload["speedup"] == pytest.approx(fb.latency_ms / read_record(t).latency_ms)
    assert payload["accuracy_drop"] == pytest.approx(fb.accuracy - read_record(t).accuracy)
    assert [r["layer"] for r in payload["layers"]] == [
        la["name"] for la in read_study_record(toy_study).layers
    ]
    assert (
        payload["command"] == f"autoquant export 'my study.toml' --trial {t.number} "
        f"--out export-trial{t.number}"
    )
    text = format_best(toy_study, t, study_ref="s.toml")
    assert f"trial {t.number}" in text and export_command("s.toml", t.number) in text


def test_plan_rows_show_layers_absent_from_the_plan_as_float(toy_study: optuna.Study) -> None:
    t = next(t for t in _complete(toy_study) if "linear" not in read_record(t).plan["layers"])
    rows = {r["layer"]: r for r in best_payload(toy_study, t)["layers"]}
    assert rows["linear"]["w_bits"] == rows["linear"]["a_bits"] == "fp32"
    assert rows["linear"]["w_sym"] is None
    plan = QuantPlan.from_dict(read_record(t).plan)
    conv1 = plan.layers["conv1"]
    assert rows["conv1"]["w_bits"] == str(conv1.weight.bits)
    assert rows["conv1"]["w_granularity"] == conv1.weight.granularity.value
    assert rows["conv1"]["a_sym"] is conv1.activation.symmetric


def test_ties_go_to_accuracy_then_the_other_metric() -> None:
    # Same latency (a shared cached measurement) and accuracy: the smaller trial wins.
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    write_study_record(
        study,
        StudyRecord(float_baseline=FloatBaseline(accuracy=0.9, size_bytes=1000, latency_ms=1.0)),
    )
    for acc, size, lat in [(0.9, 500, 2.0), (0.9, 300, 2.0), (0.8, 100, 2.0), (0.9, 300, 3.0)]:
        study.add_trial(
            optuna.trial.create_trial(
                values=[acc, size, lat],
                user_attrs=record_attrs(TrialRecord(accuracy=acc, size_bytes=size, latency_ms=lat)),
            )
        )
    assert best_trial(study, max_drop=0.5, minimize="latency").number == 1
    assert best_trial(study, max_drop=0.5, minimize="size").number == 2
    assert best_trial(study, max_drop=0.05, minimize="size").number == 1
    assert most_accurate_within_size(study, size_fraction=0.4).number == 1
