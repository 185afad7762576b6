from __future__ import annotations

import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autoquant.train import NonFiniteLossError, evaluate, qat_finetune


def _blobs(n: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two well-separated Gaussian blobs in 4-D: a tiny problem a linear model can learn."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, 4, generator=g) + (2.0 * y[:, None] - 1.0) * 2.0
    return x, y


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_loss_decreases_on_tiny_problem(optimizer: str, device: str) -> None:
    x, y = _blobs()
    batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, len(x), 32)]
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    history = qat_finetune(
        model,
        batches,
        F.cross_entropy,
        steps=60,
        lr=0.05,
        optimizer=optimizer,
        schedule="cosine",
        device=device,
    )
    assert len(history) == 60
    assert sum(history[-5:]) / 5 < 0.3 * sum(history[:5]) / 5
    assert evaluate(model, batches, device=device) > 0.95


def test_nan_loss_raises_with_step_and_leaves_weights() -> None:
    x, y = _blobs(32)
    model = nn.Linear(4, 2)
    calls = {"n": 0}

    def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        loss = F.cross_entropy(out, target)
        return loss * float("nan") if calls["n"] == 4 else loss  # step index 3 goes bad

    snapshots: list[torch.Tensor] = []
    with pytest.raises(NonFiniteLossError, match="step 3") as info:
        qat_finetune(
            model,
            [(x, y)],
            loss_fn,
            steps=10,
            lr=0.1,
            callback=lambda step, loss: snapshots.append(model.weight.detach().clone()),
        )
    assert info.value.step == 3 and math.isnan(info.value.value)
    assert isinstance(info.value, FloatingPointError)
    # The bad step was not applied: weights are those after step 2.
    assert torch.equal(model.weight, snapshots[-1]) and len(snapshots) == 3


def test_divergence_raises_non_finite() -> None:
    x, y = _blobs(32)
    model = nn.Linear(4, 2)

    def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ((out - F.one_hot(target, 2).float()) ** 2).mean()

    # Gradient descent on a quadratic with a far too large step grows geometrically to inf.
    with pytest.raises(NonFiniteLossError) as info:
        qat_finetune(model, [(x, y)], mse, steps=200, lr=1e3, momentum=0.0)
    assert info.value.step >= 1 and not math.isfinite(info.value.value)


def test_non_finite_error_pickles() -> None:
    err = pickle.loads(pickle.dumps(NonFiniteLossError(7, float("inf"))))
    assert (err.step, err.value) == (7, float("inf")) and "step 7" in str(err)


def test_learnable_scale_is_trained_and_frozen_params_are_not() -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 2)
            self.scale = nn.Parameter(torch.tensor(0.1))  # like an LSQ quantizer scale

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) * self.scale

    x, y = _blobs(64)
    model = Scaled()
    model.lin.bias.requires_grad_(False)
    bias = model.lin.bias.detach().clone()
    qat_finetune(model, [(x, y)], F.cross_entropy, steps=20, lr=0.1)
    assert model.scale.item() != pytest.approx(0.1)
    assert torch.equal(model.lin.bias, bias)


def test_log_every_and_list_cycling() -> None:
    x, y = _blobs(16)
    history = qat_finetune(
        nn.Linear(4, 2), [(x, y)], F.cross_entropy, steps=10, lr=0.01, log_every=3
    )
    assert len(history) == 4  # steps 0, 3, 6, 9


def test_one_shot_iterator_running_out_is_an_error() -> None:
    x, y = _blobs(16)
    with pytest.raises(ValueError, match="steps=5"):
        qat_finetune(nn.Linear(4, 2), iter([(x, y), (x, y)]), F.cross_entropy, steps=5, lr=0.01)


def test_restores_training_flag() -> None:
    x, y = _blobs(16)
    model = nn.Sequential(nn.Linear(4, 2), nn.Dropout(0.1)).eval()
    seen: list[bool] = []
    model.register_forward_hook(lambda m, i, o: seen.append(m.training))
    qat_finetune(model, [(x, y)], F.cross_entropy, steps=2, lr=0.01)
    assert seen == [True, True] and not model.training


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"optimizer": "rmsprop"}, "optimizer"),
        ({"schedule": "step"}, "schedule"),
        ({"steps": -1}, "steps"),
        ({"lr": 0.0}, "lr"),
        ({"log_every": 0}, "log_every"),
        ({"momentum": 1.5}, "momentum"),
    ],
)
def test_bad_arguments_name_the_field(kwargs: dict, field: str) -> None:
    x, y = _blobs(8)
    args = {"steps": 1, "lr": 0.1, **kwargs}
    with pytest.raises(ValueError, match=field):
        qat_finetune(nn.Linear(4, 2), [(x, y)], F.cross_entropy, **args)


def test_evaluate_is_count_weighted_top1(device: str) -> None:
    # Batch 1: 3 samples, 2 correct; batch 2: 1 sample, wrong. 2/4, not mean(2/3, 0).
    s1 = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 5.0]])
    y1 = torch.tensor([0, 1, 0])
    s2 = torch.tensor([[0.0, 1.0, 0.5]])
    y2 = torch.tensor([2])
    acc = evaluate(nn.Identity(), [(s1, y1), (s2, y2)], device=device)
    assert acc == 0.5
    assert evaluate(nn.Identity(), [(s1, y1), (s2, y2)], metric="top5", device=device) == 1.0


def test_evaluate_matches_reference_and_uses_eval_mode() -> None:
    x, y = _blobs(50)
    model = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.9)).train()
    batches = [(x[:20], y[:20]), (x[20:], y[20:])]
    with torch.no_grad():
        ref = (model[0](x).argmax(1) == y).float().mean().item()  # dropout off in eval mode
    assert evaluate(model, batches) == pytest.approx(ref)
    assert model.training  # restored


def test_evaluate_rejects_empty_and_bad_metric() -> None:
    with pytest.raises(ValueError, match="no samples"):
        evaluate(nn.Identity(), [])
    with pytest.raises(ValueError, match="metric"):
        evaluate(nn.Identity(), [], metric="top3")
