"""BatchNorm folding: eval-mode equivalence, which pairs fold, tracing fallback."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autoquant.transform import conv_bn_pairs, fold_batchnorm


def _randomize_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.1)
                if m.affine:
                    m.weight.copy_(torch.randn(m.num_features, generator=g))
                    m.bias.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()


class Block(nn.Module):
    """Non-sequential: conv -> bn, plus a conv whose output also feeds a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6, affine=False)
        self.conv3 = nn.Conv2d(6, 6, 1)
        self.bn3 = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        z = self.conv3(y)
        return self.bn3(z) + z  # conv3 has two users: must not fold


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: symbolic tracing fails
            return self.body(x)
        return self.body(-x)


@pytest.mark.parametrize(
    "factory, pairs",
    [
        (Block, [("conv1", "bn1"), ("conv2", "bn2")]),
        (Untraceable, [("body.0", "body.1")]),
        (lambda: nn.Sequential(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4)), [("0", "1")]),
    ],
)
def test_fold_preserves_eval_outputs(factory, pairs: list[tuple[str, str]]) -> None:
    model = _randomize_bn(factory())
    assert conv_bn_pairs(model) == pairs
    folded = fold_batchnorm(model)
    x = torch.randn(4, 3, 10, 10) if not isinstance(model, nn.Sequential) else torch.randn(4, 3, 9)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)
    for _, bn in pairs:
        assert type(folded.get_submodule(bn)) is nn.Identity
        assert isinstance(model.get_submodule(bn), nn.modules.batchnorm._BatchNorm)  # untouched


def test_unfoldable_bn_is_kept() -> None:
    model = _randomize_bn(Block())
    folded = fold_batchnorm(model)
    assert isinstance(folded.bn3, nn.BatchNorm2d)
    assert torch.equal(folded.conv3.weight, model.conv3.weight)
