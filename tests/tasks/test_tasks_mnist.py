from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from autoquant.tasks import LeNet5, get_task
from autoquant.train import evaluate


def test_pretrained_lenet5_accuracy_on_test_subset(
    tmp_cache: Path, require_data: Callable[[str], Path]
) -> None:
    require_data("mnist.npz")
    require_data("weights/lenet5_mnist.pt")
    task = get_task("mnist-lenet5", eval_size=2000)
    model = task.model_factory()
    assert isinstance(model, LeNet5) and sum(p.numel() for p in model.parameters()) == 61706
    batches = task.eval_batches()
    assert sum(len(y) for _, y in batches) == 2000
    assert batches[0][0].shape[1:] == (1, 32, 32)
    acc = evaluate(model, batches)
    assert acc >= 0.98
    assert acc == pytest.approx(task.float_accuracy)

    # The model outputs log-probabilities, so the task's loss must be NLL on them.
    x, y = batches[0]
    with torch.no_grad():
        out = model(x)
    assert torch.allclose(out.exp().sum(1), torch.ones(len(x)), atol=1e-5)
    expected = -out[torch.arange(len(y)), y].mean()
    assert task.loss_fn(out, y).item() == pytest.approx(expected.item(), rel=1e-6)


def test_inputs_are_normalised_and_calib_from_train(
    tmp_cache: Path, require_data: Callable[[str], Path]
) -> None:
    require_data("mnist.npz")
    require_data("weights/lenet5_mnist.pt")
    task = get_task("mnist-lenet5", eval_size=500, calib_size=300)
    x = torch.cat([b for b, _ in task.calib_batches(100)])
    assert x.shape == (300, 1, 32, 32)
    # Background pixels are 0 before normalisation: (0 - 0.1307) / 0.3081.
    assert x.min().item() == pytest.approx(-0.1307 / 0.3081, abs=1e-5)
    assert task.info["train_size"] == 60000 and task.info["eval_size"] == 500
