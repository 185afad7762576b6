"""Learned quantizer knobs (w_learn, a_learn), the legacy learned_scale switch, and the
searchable QAT knobs distill and quant_lr."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from autoquant.search import load_study_spec, study_spec_from_dict
from autoquant.space import SearchSpace, baseline_params, plan_from_trial, qat_params_from_trial
from autoquant.types import PlanError

LAYERS = ["conv1", "layer1.0.conv1", "layer1.0.conv2", "fc"]


def _space(**kwargs: object) -> SearchSpace:
    return SearchSpace(**{"w_bits": (8,), **kwargs})  # type: ignore[arg-type]


def _plan(space: SearchSpace, params: dict):
    return plan_from_trial(optuna.trial.FixedTrial(params), space, LAYERS)


def _flags(spec) -> tuple[bool, bool]:
    return spec.learned_scale, spec.learned_zero_point


def test_learn_knobs_are_per_layer_parameters_mapped_to_spec_fields() -> None:
    space = _space(w_learn=("none", "scale"), a_learn=("none", "scale", "scale+zero_point"))
    names = space.param_names(LAYERS)
    assert "conv1/w_learn" in names and "fc/a_learn" in names
    params = {f"{n}/w_learn": "none" for n in LAYERS} | {f"{n}/a_learn": "none" for n in LAYERS}
    params |= {"conv1/w_learn": "scale", "fc/a_learn": "scale+zero_point"}
    params |= {"layer1.0.conv1/a_learn": "scale"}
    plan = _plan(space, params)
    assert _flags(plan.layers["conv1"].weight) == (True, False)
    assert _flags(plan.layers["conv1"].activation) == (False, False)
    assert _flags(plan.layers["layer1.0.conv1"].activation) == (True, False)
    assert _flags(plan.layers["fc"].activation) == (True, True)  # a_sym default: asymmetric
    assert _flags(plan.layers["fc"].weight) == (False, False)


def test_one_choice_fixes_the_knob_for_the_study() -> None:
    space = _space(w_learn="scale", a_learn=["scale+zero_point"])
    assert not any(n.endswith("learn") for n in space.param_names(LAYERS))
    plan = _plan(space, {})
    assert all(_flags(lp.weight) == (True, False) for lp in plan.layers.values())
    assert all(_flags(lp.activation) == (True, True) for lp in plan.layers.values())
    assert _flags(plan.adds) == (True, True)  # the adds learn like the first a_learn choice


def test_legacy_learned_scale_switch_still_learns_every_scale() -> None:
    legacy = _space(learned_scale=True)
    assert (legacy.w_learn, legacy.a_learn) == (("scale",), ("scale",))
    plan = _plan(legacy, {})
    specs = [s for lp in plan.layers.values() for s in (lp.weight, lp.activation)]
    assert all(_flags(s) == (True, False) for s in [*specs, plan.adds])
    assert _plan(_space(), {}).layers["fc"].weight.learned_scale is False
    # An explicit knob wins over the switch, and the dict form round-trips.
    mixed = _space(learned_scale=True, w_learn=("none",))
    assert _plan(mixed, {}).layers["fc"].weight.learned_scale is False
    assert SearchSpace.from_dict(mixed.to_dict()) == mixed


def test_zero_point_is_learned_only_on_asymmetric_grids() -> None:
    space = _space(a_sym=(True, False), a_learn=("scale+zero_point",))
    sym = _plan(space, {f"{n}/a_sym": True for n in LAYERS})
    assert all(_flags(lp.activation) == (True, False) for lp in sym.layers.values())
    asym = _plan(space, {f"{n}/a_sym": False for n in LAYERS})
    assert all(_flags(lp.activation) == (True, True) for lp in asym.layers.values())


def test_zero_point_learning_with_only_symmetric_activations_is_an_error() -> None:
    space = _space(a_sym=(True,), a_learn=("none", "scale+zero_point"))
    with pytest.raises(PlanError, match="a_learn has 'scale\\+zero_point'.*'conv1'") as info:
        space.select(LAYERS)
    assert "allowed" in str(info.value)
    # An override that makes one layer asymmetric is fine for that layer only.
    ok = _space(
        a_sym=(True,),
        a_learn=("none",),
        overrides={"fc": {"a_sym": False, "a_learn": ["none", "scale+zero_point"]}},
    )
    assert ok.param_names(LAYERS) == ["fc/a_learn"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"w_learn": ("scale+zero_point",)}, "space.w_learn has 'scale\\+zero_point'; allowed"),
        ({"a_learn": ("zero_point",)}, "space.a_learn has 'zero_point'; allowed values: 'none'"),
        ({"learned_scale": "yes"}, "space.learned_scale='yes'"),
        ({"distill": (1,)}, "space.distill=\\(1,\\)"),
        ({"quant_lr": (1.0, 0.1)}, "space.quant_lr=.*0 < low <= high"),
    ],
)
def test_bad_learn_and_qat_knobs_name_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        _space(**kwargs)


def test_baselines_take_the_first_learn_choice() -> None:
    space = SearchSpace(w_bits=(4, 8), a_learn=("scale", "none"))
    params = baseline_params(space, LAYERS, 8, 8)
    assert params is not None and params["fc/a_learn"] == "scale"
    plan = _plan(space, params)
    assert {lp.short() for lp in plan.layers.values()} == {"w8ca8a"}


def test_distill_and_quant_lr_can_be_searched_or_fixed() -> None:
    space = _space(distill=(True, False), quant_lr=(1e-4, 1e-2))
    trial = optuna.trial.FixedTrial({"qat/distill": False, "qat/quant_lr": 3e-3})
    assert qat_params_from_trial(trial, space, 0.1, 5) == {
        "lr": 0.1,
        "steps": 5,
        "quant_lr": 3e-3,
        "distill": False,
    }
    fixed = qat_params_from_trial(optuna.trial.FixedTrial({}), _space(distill=True), 0.1, 5)
    assert fixed["distill"] is True
    assert "distill" not in qat_params_from_trial(optuna.trial.FixedTrial({}), _space(), 1, 1)


def test_existing_study_files_and_new_knobs_load_from_toml_data() -> None:
    for path in sorted((Path(__file__).parents[2] / "studies").glob("*.toml")):
        space = load_study_spec(path).space
        assert (space.w_learn, space.a_learn) == (("none",), ("none",)), path
    old = {"task": {"name": "digits-cnn"}, "space": {"w_bits": [4, 8], "learned_scale": True}}
    spec = study_spec_from_dict(old, "old.toml")
    assert spec.space.w_learn == ("scale",) and spec.space.a_learn == ("scale",)
    new = {
        "task": {"name": "digits-cnn"},
        "space": {"w_learn": ["none", "scale"], "a_learn": ["scale+zero_point"], "distill": [True]},
    }
    spec = study_spec_from_dict(new, "new.toml")
    assert spec.space.w_learn == ("none", "scale") and spec.space.distill == (True,)
