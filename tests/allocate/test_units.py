from __future__ import annotations

import random

import optuna
import pytest

from autoquant.allocate import UnitSpace
from autoquant.space import SearchSpace, baseline_params, plan_from_trial
from autoquant.types import PlanError

LAYERS = ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1", "fc"]
SPACE = SearchSpace(
    w_bits=(2, 4, 8, "fp16"),
    a_bits=(4, 8),
    w_gran=("per_channel", "per_tensor"),
    a_calib=("minmax", "mse"),
    tie={"stage1": ["layer1.*"]},
    overrides={"fc": {"w_bits": 8, "a_calib": "minmax"}},
    exclude=("layer2.*",),
    adds=("int8", "fp32"),
    lr=(1e-4, 1e-2),
    qat_steps=(10, 50),
)


def _random_choices(units: UnitSpace, n: int, seed: int = 0) -> list[tuple[int, ...]]:
    rng = random.Random(seed)
    return [tuple(rng.randrange(u.n_options) for u in units.units) for _ in range(n)]


def test_units_are_tie_groups_and_searched_layers() -> None:
    units = UnitSpace(SPACE, LAYERS)
    assert [(u.name, u.layers) for u in units.units] == [
        ("conv1", ("conv1",)),
        ("stage1", ("layer1.0.conv1", "layer1.0.conv2")),
        ("fc", ("fc",)),
    ]
    conv1, _, fc = units.units
    # weight options: 4 bit widths × 2 granularities; activation: 2 bit widths × 2 calibrations
    assert (conv1.n_weight, conv1.n_activation, conv1.n_options) == (8, 4, 32)
    assert (fc.n_weight, fc.n_activation) == (2, 2)  # overrides fix w_bits and a_calib
    assert fc.searched == ("a_bits", "w_gran")
    assert units.extra_names == ("adds", "qat/lr", "qat/steps")


def test_params_replay_with_fixed_trial_to_the_same_plan() -> None:
    units = UnitSpace(SPACE, LAYERS)
    extra = {"qat/lr": 3e-3}
    for choice in _random_choices(units, 25):
        params = units.params(choice, extra)
        replayed = plan_from_trial(optuna.trial.FixedTrial(params), SPACE, LAYERS)
        assert replayed == units.plan(choice)
        assert units.choice_of(replayed) == choice
        assert units.choice_of_params(params) == choice
    params = units.params(choice, {"qat/lr": 3e-3, "adds": "fp32", "qat/steps": 50})
    assert (params["adds"], params["qat/lr"], params["qat/steps"]) == ("fp32", 3e-3, 50)
    assert units.plan(choice, adds="fp32").adds.is_float


def test_only_knobs_with_several_choices_are_parameters() -> None:
    units = UnitSpace(SPACE, LAYERS)
    params = units.params(_random_choices(units, 1)[0], {"qat/lr": 1e-3})
    assert set(params) == set(SPACE.param_names(LAYERS)) | {"qat/lr", "qat/steps"}
    assert "fc/w_bits" not in params and "fc/w_gran" in params
    assert params["adds"] == "int8" and params["qat/steps"] == 10  # defaults


def test_optuna_sampled_plans_map_back_to_their_choice() -> None:
    units = UnitSpace(SPACE, LAYERS)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(10):
        trial = study.ask()
        plan = plan_from_trial(trial, SPACE, LAYERS)
        choice = units.choice_of(plan)
        assert choice is not None and units.plan(choice, adds=trial.params["adds"]) == plan


def test_single_plans_quantize_one_unit_and_one_tensor() -> None:
    units = UnitSpace(SPACE, LAYERS)
    i, u = 1, units.units[1]
    w = next(k for k, o in enumerate(u.weight_options) if o["w_bits"] == 2)
    plan = units.single_plan(i, units.weight_plan(i, w))
    assert sorted(plan.layers) == list(u.layers) and plan.adds.is_float
    lp = plan.layers["layer1.0.conv2"]
    assert lp.weight.bits == 2 and lp.activation.is_float
    lp = units.activation_plan(i, 0)
    assert lp.weight.is_float and lp.activation.bits == 4


def test_baseline_choice_matches_baseline_params() -> None:
    units = UnitSpace(SPACE, LAYERS)
    choice = units.baseline_choice(8, 8)
    params = {**baseline_params(SPACE, LAYERS, 8, 8), "qat/lr": 1e-3}
    assert units.plan(choice) == plan_from_trial(optuna.trial.FixedTrial(params), SPACE, LAYERS)
    assert UnitSpace(SearchSpace(w_bits=(2, 4)), LAYERS).baseline_choice(8, 8) is None


def test_bad_choices_and_missing_parameters_are_named() -> None:
    units = UnitSpace(SPACE, LAYERS)
    with pytest.raises(PlanError, match="option=32; allowed values: 0..31"):
        units.plan((32, 0, 0))
    with pytest.raises(PlanError, match="one per unit"):
        units.plan((0, 0))
    with pytest.raises(PlanError, match="missing \\['fc'\\]"):
        units.check({"conv1": 0, "stage1": 0})
    with pytest.raises(PlanError, match="qat/lr"):
        units.params((0, 0, 0))
    with pytest.raises(PlanError, match="unknown extra"):
        units.params((0, 0, 0), {"qat/lr": 1e-3, "lr": 1})
    with pytest.raises(PlanError, match="adds='fp32'; allowed values: \\['int8'\\]"):
        UnitSpace(SearchSpace(), LAYERS).plan((0,) * 5, adds="fp32")
    with pytest.raises(PlanError, match="conv1/a_bits' is missing"):
        units.choice_of_params({"conv1/w_bits": 2})  # conv1/a_bits and more are missing


def test_option_classes_ignore_the_named_knobs() -> None:
    units = UnitSpace(SPACE, LAYERS)
    classes = units.option_classes(["a_calib", "w_calib"])
    for u, cls in zip(units.units, classes, strict=True):
        for k in range(u.n_options):
            for j in range(u.n_options):
                a, b = u.knobs(k), u.knobs(j)
                same = all(a[n] == b[n] for n in a if n not in ("a_calib", "w_calib"))
                assert (cls[k] == cls[j]) is same
    assert units.option_classes()[0] == list(range(units.units[0].n_options))
    with pytest.raises(PlanError, match="unknown knob"):
        units.option_classes(["calib"])
