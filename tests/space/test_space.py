from __future__ import annotations

import optuna
import pytest

from autoquant.space import SearchSpace, baseline_params, plan_from_trial, qat_params_from_trial
from autoquant.types import PlanError, QuantPlan

LAYERS = ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1", "fc"]


def _sample(space: SearchSpace, seed: int = 0) -> tuple[QuantPlan, dict]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    trial = study.ask()
    return plan_from_trial(trial, space, LAYERS), trial.params


def test_parameter_names_are_stable_and_readable() -> None:
    space = SearchSpace(w_bits=(4, 8), a_bits=(6, 8))
    assert space.param_names(LAYERS)[:2] == ["conv1/w_bits", "conv1/a_bits"]
    assert "layer1.0.conv1/w_bits" in space.param_names(LAYERS)


def test_fixed_trial_replays_the_sampled_plan() -> None:
    space = SearchSpace(
        w_bits=(2, 4, 8), a_bits=(4, 8), w_sym=(True, False), a_calib=("minmax", "mse", "kl")
    )
    for seed in range(5):
        plan, params = _sample(space, seed)
        assert plan_from_trial(optuna.trial.FixedTrial(params), space, LAYERS) == plan


def test_knob_values_land_in_the_right_spec_fields() -> None:
    space = SearchSpace(w_bits=(4, 8), a_bits=(6, 8), a_sym=(True, False))
    params = {
        f"{n}/{k}": v for n in LAYERS for k, v in (("w_bits", 4), ("a_bits", 6), ("a_sym", True))
    }
    plan = plan_from_trial(optuna.trial.FixedTrial(params), space, LAYERS)
    lp = plan.layers["fc"]
    assert (lp.weight.bits, lp.activation.bits, lp.activation.symmetric) == (4, 6, True)
    assert lp.weight.granularity.value == "per_channel" and lp.weight.axis == 0
    assert lp.activation.axis == 1


def test_include_exclude_and_overrides() -> None:
    space = SearchSpace(w_bits=(2, 4, 8), exclude=("fc",), overrides={"conv1": {"w_bits": 8}})
    assert space.select(LAYERS) == LAYERS[:-1]
    plan, params = _sample(space)
    assert "fc" not in plan.layers  # excluded layers stay float
    assert plan.layers["conv1"].weight.bits == 8 and "conv1/w_bits" not in params
    narrowed = SearchSpace(w_bits=(2, 4, 8), overrides={"layer*": {"w_bits": [4, 8]}})
    assert narrowed.knob_choices("layer1.0.conv1")["w_bits"] == (4, 8)


def test_tie_groups_share_one_choice() -> None:
    space = SearchSpace(w_bits=(2, 4, 8), tie={"stage1": ["layer1.*"]})
    for seed in range(5):
        plan, params = _sample(space, seed)
        assert plan.layers["layer1.0.conv1"] == plan.layers["layer1.0.conv2"]
        assert "stage1/w_bits" in params and "layer1.0.conv1/w_bits" not in params


def test_qat_hyperparameters_can_be_searched() -> None:
    space = SearchSpace(lr=(1e-4, 1e-2), qat_steps=(10, 50))
    hp = qat_params_from_trial(
        optuna.trial.FixedTrial({"qat/lr": 3e-3, "qat/steps": 50}), space, lr=1.0, steps=1
    )
    assert hp == {"lr": 3e-3, "steps": 50}
    assert qat_params_from_trial(optuna.trial.FixedTrial({}), SearchSpace(), 0.1, 7) == {
        "lr": 0.1,
        "steps": 7,
    }


def test_baseline_params_are_uniform() -> None:
    space = SearchSpace(w_bits=(2, 4, 8), a_bits=(4, 8), w_gran=("per_tensor", "per_channel"))
    for wb in (8, 4):
        plan = plan_from_trial(
            optuna.trial.FixedTrial(baseline_params(space, LAYERS, wb, 8)), space, LAYERS
        )
        assert {lp.short() for lp in plan.layers.values()} == {f"w{wb}ca8a"}
    assert baseline_params(SearchSpace(w_bits=(2, 8)), LAYERS, 4, 8) is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"w_bits": (1, 8)}, "space.w_bits has 1; allowed values: 2, 3"),
        ({"a_bits": (9,)}, "space.a_bits has 9"),
        ({"w_bits": ()}, "space.w_bits is empty"),
        ({"a_calib": ("median",)}, "allowed values: 'minmax', 'moving_average'"),
        ({"overrides": {"fc": {"bits": 8}}}, "unknown knob 'bits'"),
        ({"lr": (1e-2, 1e-4)}, "0 < low <= high"),
        ({"qat_steps": (-1,)}, "integers >= 0"),
    ],
)
def test_bad_space_names_the_field_and_allowed_values(kwargs: dict, message: str) -> None:
    with pytest.raises(PlanError, match=message.replace("(", r"\(")):
        SearchSpace(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"include": ("nothing*",)}, "space.include pattern 'nothing\\*' matches no layer"),
        ({"exclude": ("*",)}, "the search space is empty"),
        ({"overrides": {"head": {"w_bits": 8}}}, "space.overrides pattern 'head'"),
        ({"tie": {"g": ["zzz"]}}, "space.tie.g pattern 'zzz'"),
        (
            {
                "w_bits": (4, 8),
                "tie": {"g": ["layer1.*"]},
                "overrides": {"layer1.0.conv1": {"w_bits": 8}},
            },
            "space.tie.g: its layers \\['layer1.0.conv1', 'layer1.0.conv2'\\] get different",
        ),
    ],
)
def test_patterns_that_match_nothing_are_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(PlanError, match=message) as info:
        SearchSpace(**kwargs).select(LAYERS)
    assert "conv1" in str(info.value) or "empty" in str(info.value)


def test_adds_default_to_int8_and_can_be_searched() -> None:
    plan, params = _sample(SearchSpace(a_calib=("percentile",), percentile=99.9))
    assert (plan.adds.bits, plan.adds.symmetric, plan.adds.calibration.value) == (
        8,
        False,
        "percentile",
    )
    assert plan.adds.percentile == 99.9 and "adds" not in params
    assert _sample(SearchSpace(adds="fp32"))[0].adds.is_float
    space = SearchSpace(adds=("int8", "fp32"))
    assert space.param_names(LAYERS)[-1] == "adds"
    seen = {_sample(space, seed)[0].adds.is_float for seed in range(8)}
    assert seen == {True, False}
    fixed = optuna.trial.FixedTrial({**baseline_params(space, LAYERS, 8, 8), "adds": "fp32"})
    assert plan_from_trial(fixed, space, LAYERS).adds.is_float
    assert baseline_params(space, LAYERS, 8, 8)["adds"] == "int8"


def test_bad_adds_choice_names_the_allowed_values() -> None:
    with pytest.raises(PlanError, match=r"space.adds has 'int4'; allowed values: 'int8', 'fp32'"):
        SearchSpace(adds=("int8", "int4"))
