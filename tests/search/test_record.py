"""The trial and study records: round trips, old studies, newer versions, one writer."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

from autoquant.search import (
    RECORD_VERSION,
    FloatBaseline,
    RecordVersionError,
    StudyRecord,
    TrialRecord,
    read_float_baseline,
    read_record,
    read_study_record,
    record_attrs,
    write_record,
    write_study_record,
)
from autoquant.search._record import VERSION_KEY, retry_record, twin_record
from autoquant.types import LayerPlan, QuantPlan, QuantSpec

PLAN = QuantPlan(
    {"fc": LayerPlan(weight=QuantSpec(bits=4, granularity="per_channel"), activation=QuantSpec())}
)
LATENCY = [
    {
        "median_ms": 1.25,
        "iqr_ms": 0.05,
        "backend": "onnxruntime",
        "threads": 1,
        "batch_size": 1,
        "n": 50,
        "formats": {"fc": "w4→int8"},
        "cached": False,
        "measure_s": 0.4,
        "key": "abc",
    }
]
# Every field set (no real trial has all of them at once: a round trip must keep each).
FULL = TrialRecord(
    worker="host:123",
    worker_process={"host": "host", "pid": 123, "start": 456, "boot": "b-1", "pidns": "pid:[1]"},
    baseline="w4a8",
    retry_of=3,
    duplicate_of=2,
    run="2026-01-01T09:00:00-a1b2c3",
    forked_from={"study": "old", "trial": 4},
    plan=PLAN.to_dict(),
    plan_summary=PLAN.summary(),
    qat={"lr": 0.001, "steps": 60, "optimizer": "adam"},
    seed=7,
    accuracy=0.9125,
    accuracy_drop=0.0075,
    size_bytes=1234,
    size_ratio=0.25,
    latency_ms=1.25,
    latency=LATENCY,
    loss_history=[1.5, 0.75, 0.5],
    timing_s={"calibrate": 0.1, "qat": 2.0, "eval": 0.3, "measure": 0.5, "total": 2.9},
    deployed={"backend": "onnxruntime", "accuracy": 0.9, "ok": True},
    fail_reason="ValueError: x",
    traceback="Traceback (most recent call last): ...",
    proposal={"source": "min-size", "round": 1, "predicted_drop": 0.004},
    fidelity_scores={"0.0": 0.85, "0.5": 0.9},
    pruned={"fidelity": 0.5, "reason": "infeasible"},
    extra={"my_note": {"by": "a user"}},
)

# The user attributes of a complete trial as autoquant wrote them before records existed
# (no "_version"), copied from a study of that time.
OLD_ATTRS: dict[str, Any] = {
    "worker": "old-host:42",
    "baseline": "w8a8",
    "plan": PLAN.to_dict(),
    "plan_summary": "w4ca8a",
    "qat": {"lr": 0.001, "steps": 60, "optimizer": "adam"},
    "accuracy": 0.9,
    "size_bytes": 1000,
    "latency_ms": 0.5,
    "latency": LATENCY,
    "loss_history": [1.0, 0.5],
    "timing_s": {"calibrate": 0.5, "qat": 20.0, "eval": 2.0, "measure": 3.0, "total": 25.5},
    "seed": 0,
    "accuracy_drop": 0.02,
    "size_ratio": 0.3,
}


def _frozen(user_attrs: dict[str, Any], number: int = 0) -> FrozenTrial:
    now = dt.datetime(2026, 1, 1)
    return FrozenTrial(
        number=number,
        state=TrialState.COMPLETE,
        value=None,
        values=[1.0],
        datetime_start=now,
        datetime_complete=now,
        params={},
        distributions={},
        user_attrs=user_attrs,
        system_attrs={},
        intermediate_values={},
        trial_id=number,
    )


@pytest.fixture(params=["memory", "sqlite"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> str | None:
    return None if request.param == "memory" else f"sqlite:///{tmp_path / 'r.db'}"


def test_every_field_is_stored_under_its_own_key_and_nothing_else() -> None:
    attrs = record_attrs(FULL)
    fields = {f.name for f in dataclasses.fields(TrialRecord)} - {"extra"}
    assert set(attrs) == fields | {VERSION_KEY, "my_note"}
    assert attrs[VERSION_KEY] == RECORD_VERSION
    # Every key of the old format is a field of the record, under the same name.
    assert set(OLD_ATTRS) <= fields
    # None means "absent": an empty record stores only the version.
    assert record_attrs(TrialRecord()) == {VERSION_KEY: RECORD_VERSION}


def test_trial_record_round_trips_through_a_real_study(storage: str | None) -> None:
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    write_record(trial, FULL)
    frozen = study.tell(trial, 1.0)
    assert frozen.user_attrs[VERSION_KEY] == RECORD_VERSION
    assert read_record(frozen) == FULL
    assert read_record(study.trials[0]) == FULL  # reloaded from the storage
    assert read_record(frozen).quant_plan == PLAN


def test_records_written_in_steps_merge_and_none_keeps_what_is_stored(
    storage: str | None,
) -> None:
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    write_record(trial, TrialRecord(worker="w:1", baseline="w8a8"))
    write_record(trial, TrialRecord(accuracy=0.5, size_bytes=10))
    write_record(trial, TrialRecord(worker="w:2"))  # a later write of a field replaces it
    record = read_record(study.tell(trial, 1.0))
    assert record == TrialRecord(worker="w:2", baseline="w8a8", accuracy=0.5, size_bytes=10)


def test_record_attrs_feed_create_trial_and_enqueue_trial() -> None:
    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(value=1.0, user_attrs=record_attrs(FULL)))
    study.enqueue_trial({}, user_attrs=record_attrs(TrialRecord(baseline="w8a8")))
    done, queued = study.get_trials()
    assert read_record(done) == FULL
    assert read_record(queued) == TrialRecord(baseline="w8a8")


def test_an_old_format_trial_reads_correctly() -> None:
    record = read_record(_frozen(dict(OLD_ATTRS)))
    assert record == TrialRecord(**OLD_ATTRS)
    assert (record.worker, record.baseline, record.accuracy, record.size_bytes) == (
        "old-host:42",
        "w8a8",
        0.9,
        1000,
    )
    assert record.latency_iqr_ms == 0.05 and record.qat_lr == 0.001 and record.qat_steps == 60
    assert record.total_s == 25.5 and record.extra == {} and not record.failed
    assert record.quant_plan == PLAN
    # The old keys of a failed and of a lost trial.
    lost = read_record(_frozen({"fail_reason": "worker lost: no heartbeat", "retry_of": 1}))
    assert lost.failed and lost.worker_lost and not lost.interrupted and lost.retry_of == 1
    stopped = read_record(_frozen({"fail_reason": "interrupted (Ctrl-C)"}))
    assert stopped.interrupted and not stopped.worker_lost


def test_an_old_format_study_reads_correctly() -> None:
    study = optuna.create_study()
    old = {
        "float_baseline": {"accuracy": 0.92, "size_bytes": 4000, "latency_ms": 0.6},
        "spec": {"name": "s", "max_accuracy_drop": 0.01, "sampler": "tpe"},
        "layers": [{"name": "conv1", "type_name": "Conv2d", "params": 10, "macs": 20}],
        "task_info": {},
        "created": "2026-01-05 09:00:00",
        "machine": {"cpu": "x", "cores": 2},
        "latency:abc": {"median_ms": 1.0},  # a latency cache entry: not part of the record
    }
    for key, value in old.items():
        study.set_user_attr(key, value)
    record = read_study_record(study)
    assert record.float_baseline == FloatBaseline(accuracy=0.92, size_bytes=4000, latency_ms=0.6)
    assert record.max_accuracy_drop == 0.01 and record.layer_names == ["conv1"]
    assert (record.created, record.machine) == ("2026-01-05 09:00:00", {"cpu": "x", "cores": 2})
    assert read_float_baseline(study).size_bytes == 4000


def test_study_record_round_trips(storage: str | None) -> None:
    study = optuna.create_study(storage=storage, study_name="s")
    record = StudyRecord(
        spec={"name": "s", "max_accuracy_drop": 0.02},
        layers=[{"name": "a", "type_name": "Linear", "params": 3, "macs": 3}],
        task_info={"classes": 10},
        created="2026-01-05 09:00:00",
        machine={"cpu": "x"},
        forked_from="old",
        float_baseline=FloatBaseline(0.9, 100, 1.5, [{"median_ms": 1.5}]),
    )
    write_study_record(study, record)
    again = optuna.load_study(study_name="s", storage=storage) if storage else study
    assert read_study_record(again) == record
    assert again.user_attrs[VERSION_KEY] == RECORD_VERSION


def test_a_study_without_a_baseline_is_a_clear_error() -> None:
    study = optuna.create_study(study_name="empty")
    assert read_study_record(study) == StudyRecord()
    with pytest.raises(ValueError, match="study 'empty' has no float baseline yet"):
        read_float_baseline(study)


@pytest.mark.parametrize("version", [RECORD_VERSION + 1, 99])
def test_a_newer_record_version_is_a_clear_error(version: int) -> None:
    with pytest.raises(RecordVersionError) as info:
        read_record(_frozen({VERSION_KEY: version, "accuracy": 0.9}, number=5))
    msg = str(info.value)
    assert f"trial 5 was written by a newer autoquant (record version {version}" in msg
    assert f"reads versions 0..{RECORD_VERSION}" in msg and "upgrade autoquant" in msg

    study = optuna.create_study(study_name="future")
    study.set_user_attr(VERSION_KEY, version)
    with pytest.raises(RecordVersionError, match=r"study 'future' was written by a newer"):
        read_study_record(study)


@pytest.mark.parametrize("version", ["1", -1, 1.0, True])
def test_a_malformed_record_version_is_a_clear_error(version: object) -> None:
    with pytest.raises(RecordVersionError, match=r"trial 0: _version = .* is not allowed"):
        read_record(_frozen({VERSION_KEY: version}))


def test_the_retry_keeps_the_baseline_and_proposal_marks_and_names_the_lost_trial() -> None:
    expected = TrialRecord(baseline="w4a8", proposal=FULL.proposal, retry_of=4)
    assert retry_record(FULL, 4) == expected  # the proposal is a mark too


def test_a_twin_copies_the_outcome_but_not_the_twins_own_marks() -> None:
    twin = twin_record(FULL, 2)
    assert (twin.worker, twin.baseline, twin.retry_of, twin.proposal) == (None,) * 4
    assert (twin.run, twin.forked_from, twin.deployed) == (None, None, None)
    assert twin.duplicate_of == 2 and twin.timing_s == {"total": 0.0}
    for name in ("plan", "accuracy", "size_bytes", "latency", "qat", "extra"):
        assert getattr(twin, name) == getattr(FULL, name), name
