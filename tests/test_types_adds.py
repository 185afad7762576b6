"""QuantPlan.adds: validation, JSON round trip, old plans, equality, hash and summary."""

from __future__ import annotations

import json

import pytest

from autoquant.types import FP32, LayerPlan, PlanError, QuantPlan, QuantSpec

A8 = QuantSpec(bits=8, symmetric=False)
W8 = QuantSpec(bits=8, granularity="per_channel")
LAYERS = {"conv": LayerPlan(W8, A8), "fc": LayerPlan(W8, A8)}


@pytest.mark.parametrize(
    "adds",
    [
        QuantSpec(bits=4, symmetric=False),
        QuantSpec(bits=7),
        QuantSpec(bits=8, granularity="per_channel", axis=1),
        QuantSpec(bits="fp16"),
        "int8",
        8,
        None,
        {"bits": 4},
        {"bits": 8, "granularity": "per_channel"},
    ],
    ids=["4bit", "7bit", "8bit_per_channel", "fp16", "string", "int", "none", "dict4", "dict_pc"],
)
def test_bad_adds_raise_plan_error_naming_the_field(adds: object) -> None:
    with pytest.raises(PlanError) as info:
        QuantPlan(LAYERS, adds=adds)  # type: ignore[arg-type]
    msg = str(info.value)
    assert "adds" in msg and "allowed" in msg
    with pytest.raises(PlanError, match="adds"):
        QuantPlan.uniform(["conv"], W8, A8, adds=adds)  # type: ignore[arg-type]
    data = QuantPlan(LAYERS).to_dict()
    data["adds"] = adds.to_dict() if isinstance(adds, QuantSpec) else adds
    with pytest.raises(PlanError, match="adds"):
        QuantPlan.from_dict(data)


def test_invalid_adds_mapping_names_the_field() -> None:
    with pytest.raises(PlanError, match=r"QuantPlan.adds: bits=16 .*8-bit per-tensor"):
        QuantPlan.from_json(json.dumps({"_version": 1, "layers": {}, "adds": {"bits": 16}}))


@pytest.mark.parametrize(
    "adds",
    [FP32, QuantSpec(bits=8), A8, QuantSpec(bits=8, symmetric=False, calibration="percentile")],
    ids=["fp32", "8", "8a", "8a_percentile"],
)
def test_allowed_adds_round_trip_through_json(adds: QuantSpec) -> None:
    plan = QuantPlan(LAYERS, adds=adds)
    assert plan.adds == adds
    assert plan.to_dict()["adds"] == adds.to_dict()
    back = QuantPlan.from_json(plan.to_json())
    assert back == plan and back.adds == adds and isinstance(back.adds, QuantSpec)
    assert hash(back) == hash(plan)
    assert json.loads(plan.to_json(indent=2))["adds"]["bits"] == adds.bits


def test_adds_mapping_is_coerced_to_a_quant_spec() -> None:
    plan = QuantPlan(LAYERS, adds={"bits": 8, "symmetric": False})  # type: ignore[arg-type]
    assert plan.adds == A8 and isinstance(plan.adds, QuantSpec)
    assert plan == QuantPlan(LAYERS, adds=A8)


def test_default_adds_are_fp32() -> None:
    assert QuantPlan(LAYERS).adds == FP32
    assert QuantPlan.uniform(["conv"], W8, A8).adds == FP32
    assert QuantPlan.uniform(["conv"], W8, A8, adds=A8).adds == A8


def test_old_plan_without_adds_loads_with_float_adds() -> None:
    data = QuantPlan(LAYERS, adds=A8).to_dict()
    del data["adds"]
    plan = QuantPlan.from_dict(data)
    assert plan.adds == FP32 and plan.adds.is_float
    assert plan == QuantPlan(LAYERS)
    assert QuantPlan.from_json(json.dumps(data)) == QuantPlan(LAYERS)
    # Saving it again writes the field.
    assert QuantPlan.from_json(plan.to_json()).to_dict()["adds"] == FP32.to_dict()


def test_unknown_top_level_key_raises_naming_it() -> None:
    data = QuantPlan(LAYERS, adds=A8).to_dict()
    data["residual_adds"] = A8.to_dict()
    with pytest.raises(PlanError, match="residual_adds"):
        QuantPlan.from_dict(data)


def test_plans_differing_only_in_adds_differ() -> None:
    a = QuantPlan(LAYERS)
    b = QuantPlan(LAYERS, adds=A8)
    c = QuantPlan(LAYERS, adds=QuantSpec(bits=8))
    assert a != b and b != c and a != c
    assert len({hash(a), hash(b), hash(c)}) == 3
    assert len({a, b, c, QuantPlan(LAYERS, adds=A8)}) == 3
    assert b == QuantPlan(dict(LAYERS), adds=QuantSpec(bits="8", symmetric=False))


def test_summary_shows_quantized_adds() -> None:
    names = ["a", "b", "c"]
    assert QuantPlan.uniform(names, W8, A8).summary() == "w8ca8a×3"
    assert QuantPlan.uniform(names, W8, A8, adds=A8).summary() == "w8ca8a×3 add8a"
    assert QuantPlan.uniform(names, W8, A8, adds=QuantSpec(bits=8)).summary() == "w8ca8a×3 add8"
    assert QuantPlan(adds=A8).summary() == "add8a"
    assert QuantPlan().summary() == ""
