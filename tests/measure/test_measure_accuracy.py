"""The deployed artifact reproduces the simulated (fake-quant) accuracy on real tasks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from autoquant.measure import get_backend
from autoquant.tasks import Task, get_task
from autoquant.train import evaluate
from autoquant.transform import apply_plan, calibration, quantizable_layers
from autoquant.types import LayerPlan, QuantPlan, QuantSpec

BACKENDS = ["onnxruntime", "torch-x86"]
RequireData = Callable[[str], Path]
TOLERANCE = 0.005  # 0.5 accuracy points


def _w8a8(names: list[str]) -> QuantPlan:
    return QuantPlan.uniform(
        names, QuantSpec(bits=8, granularity="per_channel"), QuantSpec(bits=8, symmetric=False)
    )


def _mixed(names: list[str]) -> QuantPlan:
    """Cycle through 8/4/6-bit weights, sym/asym and sub-8-bit inputs; last layer w8a8."""
    cycle = [
        LayerPlan(QuantSpec(bits=8, granularity="per_channel"), QuantSpec(bits=8)),
        LayerPlan(QuantSpec(bits=4, granularity="per_channel"), QuantSpec(bits=8, symmetric=False)),
        LayerPlan(
            QuantSpec(bits=6, granularity="per_channel", symmetric=False),
            QuantSpec(bits=7, symmetric=False),
        ),
    ]
    layers = {n: cycle[i % len(cycle)] for i, n in enumerate(names)}
    layers[names[-1]] = cycle[0]
    return QuantPlan(layers)


def _deployed_accuracy(
    task: Task,
    model: nn.Module,
    plan: QuantPlan,
    backend: str,
    calib: list[torch.Tensor],
    batches: list,
) -> float:
    deployed = get_backend(backend).deploy(
        model, plan, task.example_input(1), threads=2, calib_inputs=calib
    )
    correct = total = 0
    for x, y in batches:
        correct += int((deployed.run(x).argmax(1) == y).sum())
        total += len(y)
    return correct / total


def _check(task: Task, plan_fn: object, eval_batches: list) -> None:
    model = task.model_factory()
    names = [i.name for i in quantizable_layers(model, task.example_input(1))]
    plan = plan_fn(names)  # type: ignore[operator]
    q = apply_plan(model, plan)
    calib = [x for x, _ in task.calib_batches()]
    with calibration(q):
        for x in calib:
            q(x)
    simulated = evaluate(q, eval_batches)
    for backend in BACKENDS:
        deployed = _deployed_accuracy(task, q, plan, backend, calib, eval_batches)
        assert abs(deployed - simulated) <= TOLERANCE, (backend, deployed, simulated)
    assert simulated > (task.float_accuracy or 0) - 0.05  # the plan itself is sane


@pytest.fixture(scope="module")
def digits() -> Task:
    return get_task("digits-cnn")


@pytest.mark.parametrize("plan_fn", [_w8a8, _mixed], ids=["w8a8", "mixed"])
def test_digits_deployed_matches_simulated(digits: Task, plan_fn: object) -> None:
    _check(digits, plan_fn, digits.eval_batches())


@pytest.mark.slow
@pytest.mark.parametrize("plan_fn", [_w8a8, _mixed], ids=["w8a8", "mixed"])
def test_lenet5_deployed_matches_simulated(plan_fn: object, require_data: RequireData) -> None:
    require_data("mnist.npz")
    require_data("weights/lenet5_mnist.pt")
    task = get_task("mnist-lenet5")
    _check(task, plan_fn, task.eval_batches())


def _with_int8_adds(plan_fn: object) -> object:
    def make(names: list[str]) -> QuantPlan:
        plan = plan_fn(names)  # type: ignore[operator]
        return QuantPlan(plan.layers, adds=QuantSpec(bits=8, symmetric=False))

    return make


@pytest.mark.slow
@pytest.mark.parametrize(
    "plan_fn",
    [_w8a8, _mixed, _with_int8_adds(_w8a8), _with_int8_adds(_mixed)],
    ids=["w8a8", "mixed", "w8a8-int8-adds", "mixed-int8-adds"],
)
def test_resnet20_deployed_matches_simulated(plan_fn: object, require_data: RequireData) -> None:
    require_data("cifar10_jpeg.tar.gz")
    require_data("weights/resnet20-12fca82f.th")
    task = get_task("cifar10-resnet20", eval_size=2000, finetune_epochs=0)
    _check(task, plan_fn, task.eval_batches())
