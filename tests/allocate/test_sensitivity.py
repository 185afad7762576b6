"""The sensitivity pass equals quantizing each unit alone with apply_plan + calibration."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autoquant.allocate import (
    PartialRunner,
    SensitivityTable,
    UnitDamage,
    UnitSpace,
    estimate_sensitivity_cost,
    measure_sensitivity,
    sample_batches,
)
from autoquant.space import SearchSpace
from autoquant.transform import apply_plan, calibration, fold_batchnorm, quantizable_names
from autoquant.types import PlanError, QuantPlan

Batches = list[tuple[Tensor, Tensor]]
SPACE = SearchSpace(
    w_bits=(2, 4, 8),
    a_bits=(3, 8),
    w_gran=("per_channel", "per_tensor"),
    a_calib=("minmax", "percentile", "mse"),
    tie={"convs": ["conv*"]},
)


def _reference(model: nn.Module, plan: QuantPlan, calib: Batches, held_out: Batches) -> dict:
    """Damage of one plan the plain way: a fresh apply_plan copy, calibrate, score."""
    q = apply_plan(model, plan)
    with calibration(q):
        for x, _ in calib:
            q(x)
    base = fold_batchnorm(model).eval()
    out = {}
    with torch.no_grad():
        for split, batches in (("calib", calib), ("eval", held_out)):
            loss = kl = lost = n = 0.0
            for x, y in batches:
                f, g = base(x), q(x)
                loss += (F.cross_entropy(g, y) - F.cross_entropy(f, y)).item() * len(y)
                kl += F.kl_div(
                    F.log_softmax(g, 1), F.log_softmax(f, 1), log_target=True, reduction="sum"
                ).item()
                lost += ((f.argmax(1) == y).sum() - (g.argmax(1) == y).sum()).item()
                n += len(y)
            out.update({f"{split}_loss": loss / n, f"{split}_kl": kl / n, f"{split}_acc": lost / n})
    return out


@pytest.mark.parametrize("which", ["tiny", "untraceable"])
def test_every_entry_equals_the_plain_apply_plan_path(
    which: str, request: pytest.FixtureRequest, data: tuple[Batches, Batches]
) -> None:
    model = request.getfixturevalue(which)
    calib, held_out = data
    units = UnitSpace(SPACE, quantizable_names(model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the untraceable model keeps float adds, with a warning
        table = measure_sensitivity(model, units, calib, held_out, F.cross_entropy)
    runner = PartialRunner(fold_batchnorm(model).eval(), [u.layers for u in units.units])
    assert table.settings["partial_reruns"] is runner.traced is (which == "tiny")
    with_adds = int(which == "tiny")  # the untraceable model's adds stay float: no entry
    per_pass = sum(u.n_weight + u.n_activation for u in units.units)
    assert table.settings["evaluations"] == per_pass + with_adds
    for i, (u, row) in enumerate(zip(units.units, table.units, strict=True)):
        assert (row.name, row.layers) == (u.name, u.layers)
        for kind, n, plan_of in (
            ("weight", u.n_weight, units.weight_plan),
            ("activation", u.n_activation, units.activation_plan),
        ):
            for k in range(n):
                ref = _reference(model, units.single_plan(i, plan_of(i, k)), calib, held_out)
                got = {m: getattr(row, kind)[m][k] for m in ref}
                assert got == pytest.approx(ref, rel=1e-4, abs=1e-6), (u.name, kind, k)
    # the float figures are the folded model's own
    base = fold_batchnorm(model).eval()
    with torch.no_grad():
        xs, ys = torch.cat([x for x, _ in held_out]), torch.cat([y for _, y in held_out])
        loss, acc = (
            F.cross_entropy(base(xs), ys).item(),
            (base(xs).argmax(1) == ys).float().mean().item(),
        )
    assert table.reference["eval"] == pytest.approx({"loss": loss, "accuracy": acc, "samples": 64})
    # a 2-bit per-tensor conv hurts more than an 8-bit per-channel one
    convs = table.units[0]
    w2 = next(k for k, o in enumerate(convs.weight_options) if o["w_bits"] == 2)
    w8 = next(k for k, o in enumerate(convs.weight_options) if o["w_bits"] == 8)
    assert convs.weight["eval_kl"][w2] > 10 * convs.weight["eval_kl"][w8]


def test_quantized_adds_alone_are_scored(tiny: nn.Module, data: tuple[Batches, Batches]) -> None:
    calib, held_out = data
    units = UnitSpace(SearchSpace(w_bits=(4, 8)), quantizable_names(tiny))
    table = measure_sensitivity(tiny, units, calib, held_out, F.cross_entropy)
    plan = QuantPlan({}, adds=units.space.adds_spec("int8"))
    ref = _reference(tiny, plan, calib, held_out)
    assert dict(table.adds["int8"]) == pytest.approx(ref, rel=1e-4, abs=1e-6)
    assert ref["eval_kl"] > 0
    no_adds = measure_sensitivity(tiny, units, calib, held_out, F.cross_entropy, adds=False)
    assert dict(no_adds.adds) == {}


def test_table_round_trips_json_and_checks_its_space(
    tiny: nn.Module, data: tuple[Batches, Batches]
) -> None:
    calib, held_out = data
    units = UnitSpace(SPACE, quantizable_names(tiny))
    table = measure_sensitivity(tiny, units, calib, held_out[:1], F.cross_entropy)
    again = SensitivityTable.from_json(table.to_json())
    assert again == table and again.to_dict() == table.to_dict()
    assert again.metrics == (
        "calib_loss",
        "calib_kl",
        "calib_acc",
        "eval_loss",
        "eval_kl",
        "eval_acc",
    )
    again.check(units)
    with pytest.raises(PlanError, match="does not match the search space"):
        again.check(UnitSpace(SearchSpace(w_bits=(2, 4)), quantizable_names(tiny)))
    rows = table.rows()
    assert len(rows) == sum(u.n_weight + u.n_activation for u in units.units)
    assert {"unit", "kind", "option", "w_bits", "eval_kl"} <= set(rows[0])


def test_table_validation_names_the_field() -> None:
    row = {"name": "fc", "layers": ["fc"], "weight_options": [{"w_bits": 4}],
           "activation_options": [{"a_bits": 8}], "weight": {"eval_kl": [0.1]},
           "activation": {"eval_kl": [0.0]}}  # fmt: skip
    SensitivityTable.from_dict({"_version": 1, "units": [row]})
    with pytest.raises(PlanError, match="unknown metric 'eval_mse'"):
        UnitDamage.from_dict({**row, "weight": {"eval_mse": [0.1]}})
    with pytest.raises(PlanError, match="one per option \\(1\\)"):
        UnitDamage.from_dict({**row, "weight": {"eval_kl": [0.1, 0.2]}})
    with pytest.raises(PlanError, match="non-finite"):
        UnitDamage.from_dict({**row, "weight": {"eval_kl": [float("nan")]}})
    with pytest.raises(PlanError, match="version=2"):
        SensitivityTable.from_dict({"_version": 2, "units": [row]})
    with pytest.raises(PlanError, match="unknown sensitivity table field"):
        SensitivityTable.from_dict({"_version": 1, "units": [row], "extra": 1})


def test_cost_estimate_counts_evaluations_and_partial_work(
    tiny: nn.Module, untraceable: nn.Module, data: tuple[Batches, Batches]
) -> None:
    calib, held_out = data
    units = UnitSpace(SPACE, quantizable_names(tiny))
    cost = estimate_sensitivity_cost(tiny, units, calib, held_out)
    per_pass = sum(u.n_weight + u.n_activation for u in units.units)
    assert cost.evaluations == per_pass + 1  # + the quantized adds
    assert cost.traced and cost.seconds > 0
    # partial re-runs cost less than whole passes; the untraceable model pays whole passes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = estimate_sensitivity_cost(untraceable, units, calib, held_out, adds=False)
    assert whole.evaluations == per_pass and not whole.traced
    batches = len(calib) + len(held_out)
    assert whole.forward_passes == pytest.approx(len(calib) + batches * (1 + per_pass))
    assert cost.forward_passes < whole.forward_passes + len(calib) + 2 * batches


def test_partial_runner_re_runs_only_downstream_nodes(tiny: nn.Module) -> None:
    folded = fold_batchnorm(tiny).eval()
    runner = PartialRunner(folded, [("conv1",), ("conv2",), ("fc",)])
    macs = {"conv1": 1.0, "conv2": 1.0, "fc": 1.0}
    assert runner.fractions(macs) == pytest.approx([1.0, 2 / 3, 1 / 3])
    x = torch.randn(4, 1, 8, 8)
    state = runner.float_pass(x)
    assert torch.equal(state.output, folded(x))
    swap = nn.Linear(4 * 8 * 8, 5)
    expected = swap(
        torch.relu(folded.conv2(torch.relu(folded.conv1(x))) + torch.relu(folded.conv1(x))).flatten(
            1
        )
    )
    assert torch.allclose(runner.run(state, 2, {"fc": swap}), expected)
    assert folded.fc is not swap


def test_sample_batches_is_a_seeded_random_subset() -> None:
    x = torch.arange(100.0)[:, None]
    batches = [(x[i : i + 10], torch.arange(i, i + 10)) for i in range(0, 100, 10)]
    a = sample_batches(batches, 30, batch_size=8, seed=1)
    ys = torch.cat([y for _, y in a])
    assert [len(y) for _, y in a] == [8, 8, 8, 6]
    assert len(set(ys.tolist())) == 30 and ys.max() > 50  # not a prefix
    assert torch.equal(torch.cat([x for x, _ in a])[:, 0], ys.float())  # pairs kept together
    assert torch.equal(ys, torch.cat([y for _, y in sample_batches(batches, 30, 8, seed=1)]))
    pairs = [((x[:10], x[:10] * 2), torch.arange(10))]
    ((inputs, _),) = sample_batches(pairs, 4)
    assert isinstance(inputs, tuple) and torch.equal(inputs[1], inputs[0] * 2)
    with pytest.raises(ValueError, match="samples=0"):
        sample_batches(batches, 0)
