"""BatchNorm folding: eval-mode equivalence, which pairs fold (fx graph, or the forward pass for
untraceable models), and never a wrong fold of a reused conv."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autoquant.transform import apply_plan, conv_bn_pairs, fold_batchnorm
from autoquant.types import LayerPlan, QuantPlan


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


class UntraceableBlock(Block):
    """Block's graph behind data-dependent control flow: pairs come from the forward pass."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x if x.sum() > 0 else -x)


@pytest.mark.parametrize(
    "factory, pairs",
    [
        (Block, [("conv1", "bn1"), ("conv2", "bn2")]),
        (UntraceableBlock, [("conv1", "bn1"), ("conv2", "bn2")]),
        (Untraceable, [("body.0", "body.1")]),
        (lambda: nn.Sequential(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4)), [("0", "1")]),
    ],
)
def test_fold_preserves_eval_outputs(factory, pairs: list[tuple[str, str]]) -> None:
    model = _randomize_bn(factory())
    x = torch.randn(4, 3, 10, 10) if not isinstance(model, nn.Sequential) else torch.randn(4, 3, 9)
    assert conv_bn_pairs(model, x[:1]) == pairs
    folded = fold_batchnorm(model, x[:1])
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


def test_untraceable_without_example_input_keeps_bn_with_a_warning() -> None:
    model = _randomize_bn(Untraceable())
    with pytest.warns(UserWarning, match="example_input"):
        assert conv_bn_pairs(model) == []
    x = torch.randn(2, 3, 10, 10)
    with pytest.warns(UserWarning), torch.no_grad():
        torch.testing.assert_close(fold_batchnorm(model)(x), model(x), atol=0, rtol=0)


class ReusedConv(nn.Module):
    """One conv called twice, a BatchNorm after its first call only."""

    def __init__(self, traceable: bool = True, bn: bool = True) -> None:
        super().__init__()
        self.traceable = traceable
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3) if bn else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.traceable and x.sum() > 1e9:  # data-dependent: torch.fx cannot trace it
            x = -x
        return self.conv(torch.relu(self.bn(self.conv(x))))


class SharedConv(nn.Module):
    """The same conv object at two paths, in a Sequential with a BN and on its own: adjacent
    children of a Sequential, yet folding the BN into it would change the second use."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
        self.head = self.body[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 1e9:
            x = -x
        return self.head(self.body(x))


class ConvFeedsTwo(nn.Module):
    """Untraceable; the conv output feeds the BN and, through an in-place ReLU, the output."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.conv, self.bn, self.inplace = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 1e9:
            x = -x
        y = self.conv(x)
        if self.inplace:  # modified in place before the BN reads it
            return self.bn(y.relu_())
        return self.bn(y) + y


@pytest.mark.parametrize(
    "factory",
    [
        lambda: ReusedConv(traceable=True),
        lambda: ReusedConv(traceable=False),
        SharedConv,
        lambda: ConvFeedsTwo(inplace=False),
        lambda: ConvFeedsTwo(inplace=True),
    ],
    ids=["reused-traceable", "reused-untraceable", "shared-path", "two-users", "inplace"],
)
def test_conv_used_elsewhere_is_never_folded(factory) -> None:
    model = _randomize_bn(factory())
    x = torch.randn(2, 3, 8, 8)
    assert conv_bn_pairs(model, x) == []
    fp32 = QuantPlan({"conv" if hasattr(model, "conv") else "body.0": LayerPlan()})
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(fold_batchnorm(model, x)(x), ref, atol=0, rtol=0)
        q = apply_plan(model, fp32, example_input=x)
        torch.testing.assert_close(q(x), ref, atol=0, rtol=0)
        # float_clone-style: folding the apply_plan result again changes nothing either.
        torch.testing.assert_close(fold_batchnorm(q, x)(x), ref, atol=0, rtol=0)


class ConvThenBN(ConvFeedsTwo):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x if x.sum() < 1e9 else -x))


def test_untraceable_conv_then_bn_is_folded() -> None:
    # Counterpart of the test above: the forward-pass analysis does fold a real pair.
    model = _randomize_bn(ConvThenBN(inplace=False))
    x = torch.randn(2, 3, 8, 8)
    assert conv_bn_pairs(model, x) == [("conv", "bn")]
    folded = fold_batchnorm(model, x)
    assert type(folded.bn) is nn.Identity
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)
