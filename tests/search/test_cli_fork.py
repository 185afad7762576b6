"""Which trials a fork copies, and how a changed space is described (no pipeline: synthetic
studies with the records a search stores)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from autoquant.search import (
    FloatBaseline,
    StudyFileError,
    StudyNotFoundError,
    StudyRecord,
    StudySpec,
    TrialRecord,
    fork_study,
    load_existing_study,
    load_study,
    param_distributions,
    read_record,
    read_study_record,
    record_attrs,
    write_deployed_check,
    write_study_record,
)
from autoquant.search._resume import space_changes
from autoquant.space import SearchSpace, plan_from_trial, qat_params_from_trial

LAYERS = ["fc1", "fc2"]


def _source(tmp_path: Path, space: SearchSpace) -> tuple[StudySpec, str]:
    """A study over ``space`` with one complete trial per (fc1, fc2, lr) combination."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    spec = StudySpec(name="src", task="digits-cnn", space=space, max_accuracy_drop=0.02)
    study = load_study(spec, url)
    write_study_record(
        study,
        StudyRecord(
            spec=spec.to_dict(),
            layers=[{"name": n} for n in LAYERS],
            float_baseline=FloatBaseline(0.9, 1000, 1.0),
        ),
    )
    study.set_user_attr("latency:k1", {"median_ms": 0.5})
    dists = param_distributions(space, LAYERS)
    for w1 in (4, 8):
        for w2 in (4, 8):
            for lr in (1e-4, 1e-2):
                params = {"fc1/w_bits": w1, "fc2/w_bits": w2, "qat/lr": lr}
                fixed = optuna.trial.FixedTrial(params)
                plan = plan_from_trial(fixed, space, LAYERS)
                qat = qat_params_from_trial(fixed, space, 1e-3, 50)
                acc = 0.9 - 0.01 * (w1 == 4) - 0.005 * (w2 == 4)
                study.add_trial(
                    optuna.trial.create_trial(
                        values=[acc, 100.0 * (w1 + w2), 1.0],
                        params=params,
                        distributions=dists,
                        user_attrs=record_attrs(
                            TrialRecord(
                                plan=plan.to_dict(),
                                qat={**qat, "optimizer": "adam"},
                                accuracy=acc,
                                accuracy_drop=0.9 - acc,
                                size_bytes=100 * (w1 + w2),
                                latency_ms=1.0,
                                run="r1",
                            )
                        ),
                    )
                )
    study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL))
    write_deployed_check(study, 0, {"ok": False, "mismatch": True})
    return spec, url


SPACE = SearchSpace(w_bits=(4, 8), lr=(1e-5, 1e-1))


@pytest.mark.parametrize(
    ("new_space", "copied"),
    [
        # fc2 fixed at 8 by an override: its parameter goes, and only fc2 = 8 plans remain
        (replace(SPACE, overrides={"fc2": {"w_bits": 8}}), lambda w1, w2, lr: w2 == 8),
        # 4 bits removed from every layer
        (replace(SPACE, w_bits=(6, 8)), lambda w1, w2, lr: w1 == w2 == 8),
        # a narrower learning-rate range: 1e-2 is outside it
        (replace(SPACE, lr=(1e-5, 1e-3)), lambda w1, w2, lr: lr < 1e-3),
        # the QAT lr no longer searched: only trials at the file's lr (1e-3: none) are valid
        (replace(SPACE, lr=None), lambda w1, w2, lr: False),
        # the same space: everything is copied
        (SPACE, lambda w1, w2, lr: True),
    ],
    ids=["override", "bits", "lr-range", "lr-fixed", "same"],
)
def test_fork_copies_exactly_the_trials_valid_in_the_new_space(
    tmp_path: Path, new_space: SearchSpace, copied: object
) -> None:
    spec, url = _source(tmp_path, SPACE)
    result = fork_study(replace(spec, space=new_space), storage=url)
    source = load_existing_study(spec, url)
    want = [
        t.number
        for t in source.get_trials(states=(TrialState.COMPLETE,))
        if copied(t.params["fc1/w_bits"], t.params["fc2/w_bits"], t.params["qat/lr"])  # type: ignore[operator]
    ]
    assert list(result.copied) == want and result.complete == 8
    assert result.spec.name == "src-fork1" and result.float_baseline
    fork = load_existing_study(result.spec, url)
    assert [read_record(t).forked_from["trial"] for t in fork.trials] == want
    dists = param_distributions(new_space, LAYERS)
    for t in fork.trials:
        original = source.trials[read_record(t).forked_from["trial"]]
        assert t.state == TrialState.COMPLETE and t.values == original.values
        assert t.distributions == dists and t.params == {n: original.params[n] for n in dists}
        assert read_record(t).plan == read_record(original).plan
        assert t.constraints == {"accuracy_drop": pytest.approx(0.88 - original.values[0])}
    # The study-level measurements, but not the per-trial checks, are copied as they are.
    assert fork.user_attrs["latency:k1"] == {"median_ms": 0.5}
    assert "deployed:0" not in fork.user_attrs
    if 0 in want:
        assert read_record(fork.trials[0]).deployed == {"ok": False, "mismatch": True}
    assert read_study_record(fork).spec["space"] == new_space.to_dict()
    assert len(source.trials) == 9  # untouched


def test_fork_names_and_errors(tmp_path: Path) -> None:
    spec, url = _source(tmp_path, SPACE)
    assert fork_study(spec, storage=url).spec.name == "src-fork1"
    assert fork_study(spec, storage=url).spec.name == "src-fork2"
    assert fork_study(spec, "mine", storage=url).spec.name == "mine"
    with pytest.raises(StudyFileError, match="--fork mine: study 'mine' already exists in sqlite"):
        fork_study(spec, "mine", storage=url)
    with pytest.raises(StudyFileError, match="study.name = '../x' is not allowed"):
        fork_study(spec, "../x", storage=url)
    with pytest.raises(StudyNotFoundError, match="study 'nope' not found in .*studies there: "):
        fork_study(replace(spec, name="nope"), storage=url)
    assert sorted(optuna.get_all_study_names(url)) == ["mine", "src", "src-fork1", "src-fork2"]


def test_param_distributions_are_what_optuna_records() -> None:
    space = SearchSpace(
        w_bits=(2, 4, 8),
        a_bits=(4, 8),
        w_gran=("per_channel", "per_tensor"),
        tie={"g": ("fc*",)},
        overrides={"head": {"a_bits": 8}},
        lr=(1e-4, 1e-2),
        qat_steps=(10, 20),
        adds=("int8", "fp32"),
    )
    layers = ["fc1", "fc2", "head"]
    study = optuna.create_study()
    trial = study.ask()
    plan_from_trial(trial, space, layers)
    qat_params_from_trial(trial, space, 1e-3, 5)
    study.tell(trial, 0.0)
    assert param_distributions(space, layers) == study.trials[0].distributions


def test_space_changes_name_what_changed() -> None:
    old = SearchSpace(w_bits=(4, 8)).to_dict()
    assert space_changes(old, LAYERS, SearchSpace(w_bits=(4, 8)), LAYERS) == []
    # percentile changes plans, not parameters: Optuna can go on
    assert space_changes(old, LAYERS, SearchSpace(w_bits=(4, 8), percentile=99.9), LAYERS) == []
    lines = space_changes(old, LAYERS, SearchSpace(w_bits=(4, 8), a_bits=(6, 8)), [*LAYERS, "x"])
    assert lines[0] == "space.a_bits: [8] -> [6, 8]"
    assert lines[1] == "the model's layers: 1 added (x), 0 removed ()"
    assert lines[2] == ("parameters: 4 added (fc1/a_bits, fc2/a_bits, x/w_bits, x/a_bits)")


def test_a_stored_space_from_another_version_is_compared_through_the_trials() -> None:
    unreadable = {**SearchSpace(w_bits=(4, 8)).to_dict(), "w_bitz": [4]}
    recorded = param_distributions(SearchSpace(w_bits=(4, 8)), LAYERS)
    same, other = SearchSpace(w_bits=(4, 8)), SearchSpace(w_bits=(2, 8))
    assert space_changes(unreadable, LAYERS, same, LAYERS, recorded=recorded) == []
    assert space_changes(unreadable, LAYERS, other, LAYERS, recorded={}) == []
    (line,) = space_changes(unreadable, LAYERS, other, LAYERS, recorded=recorded)
    assert line.startswith("parameters: 2 changed (fc1/w_bits: choices [4, 8] -> choices [2, 8]")
