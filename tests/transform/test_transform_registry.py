"""The registry matches subclasses (most specific wins) and a subclass's own forward keeps
running around the quantized primitive; checked against torch's fake-quant ops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autoquant.transform import (
    LayerStatus,
    QConv2d,
    QLinear,
    QuantizedLayer,
    apply_plan,
    calibration,
    quantizable_layers,
    quantizable_names,
    register_quantizable,
    registered_base,
    wrapper_type,
)
from autoquant.transform._registry import _DERIVED, _REGISTRY
from autoquant.types import LayerPlan, PlanError, QuantPlan, QuantSpec

W8C = QuantSpec(bits=8, granularity="per_channel")
A8 = QuantSpec(bits=8, symmetric=False)
W4 = QuantSpec(bits=4)


def fq_weight(w: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Symmetric per-output-channel fake-quant, qparams from the closed form."""
    qmax = 2 ** (bits - 1) - 1
    flat = w.detach().reshape(w.shape[0], -1).double()
    scale = (flat.abs().amax(1) / qmax).float()
    zp = torch.zeros(w.shape[0], dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(w.detach(), scale, zp, 0, -qmax, qmax)


def fq_act(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Asymmetric 8-bit per-tensor fake-quant of the range [lo, hi] (extended to 0)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255
    zp = int(round(255 - hi / scale))
    return torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, 255)


class ScaledLinear(nn.Linear):
    """Own forward around super().forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * super().forward(x) + 1.0


class PlainLinear(nn.Linear):
    """No own forward (like MultiheadAttention's out_proj)."""


class BypassLinear(nn.Linear):
    """Own forward that never reaches Linear.forward: cannot be wrapped exactly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class TwiceLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + super().forward(x)


class ShiftedConv(nn.Conv2d):
    """Own forward that calls the conv primitive with its weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x + 0.5, self.weight, self.bias).relu()


class DoubledWeightConv(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, 2 * self.weight, self.bias)


class Net(nn.Module):
    def __init__(self, fc: nn.Module, conv: nn.Module | None = None) -> None:
        super().__init__()
        self.conv = conv if conv is not None else ShiftedConv(2, 3, 3)
        self.fc = fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).flatten(1))


def test_lookup_walks_the_mro() -> None:
    assert registered_base(PlainLinear) is nn.Linear and registered_base(ShiftedConv) is nn.Conv2d
    assert registered_base(nn.ReLU) is None and wrapper_type(nn.ReLU) is None
    wrapper = wrapper_type(ScaledLinear)
    assert wrapper is wrapper_type(ScaledLinear)  # generated once, cached
    assert issubclass(wrapper, ScaledLinear) and issubclass(wrapper, QLinear)
    assert wrapper.float_type is ScaledLinear and wrapper.__name__ == "QScaledLinear"
    # The subclass's forward comes first, the intercept after it, the float op last.
    mro = wrapper.__mro__
    assert mro.index(ScaledLinear) < mro.index(QLinear) < mro.index(nn.Linear)
    assert wrapper_type(nn.Linear) is QLinear and wrapper_type(QLinear) is None


def test_most_specific_registration_wins() -> None:
    @register_quantizable(ScaledLinear)
    class QScaled(QLinear, ScaledLinear):
        pass

    try:
        assert wrapper_type(ScaledLinear) is QScaled
        sub = type("SubScaled", (ScaledLinear,), {})
        assert registered_base(sub) is ScaledLinear and issubclass(wrapper_type(sub), QScaled)
        assert wrapper_type(PlainLinear).__mro__[2] is QLinear  # other subclasses unchanged
    finally:
        del _REGISTRY[ScaledLinear]
        _DERIVED.clear()


def test_from_float_accepts_subclasses_only_of_its_type() -> None:
    fc = ScaledLinear(4, 3)
    q = QLinear.from_float(fc, LayerPlan(W8C, A8))
    assert isinstance(q, ScaledLinear) and isinstance(q, QuantizedLayer)
    assert q.weight is fc.weight and type(fc) is ScaledLinear  # shared weight, source intact
    with pytest.raises(TypeError, match="QConv2d.from_float expects Conv2d"):
        QConv2d.from_float(fc, LayerPlan(W8C, A8))


def test_subclass_forward_runs_around_the_quantized_primitive() -> None:
    torch.manual_seed(0)
    model = Net(ScaledLinear(3 * 4 * 4, 5), ShiftedConv(2, 3, 3)).eval()
    plan = QuantPlan.uniform(["conv", "fc"], W8C, A8)
    q = apply_plan(model, plan)
    assert type(q.conv).__name__ == "QShiftedConv" and type(q.fc).__name__ == "QScaledLinear"
    x = torch.randn(16, 2, 6, 6)
    with calibration(q):
        q(x)
    # Independent reference: the subclasses' forwards written out, torch's fake-quant ops,
    # input ranges observed on the float model (calibration runs with fake-quant off).
    with torch.no_grad():
        conv_in = x + 0.5
        fc_range = model.conv(x).flatten(1).aminmax()
        y = F.conv2d(
            fq_act(conv_in, conv_in.min().item(), conv_in.max().item()),
            fq_weight(model.conv.weight),
            model.conv.bias,
        ).relu()
        fc_in = fq_act(y.flatten(1), fc_range.min.item(), fc_range.max.item())
        ref = 2.0 * F.linear(fc_in, fq_weight(model.fc.weight), model.fc.bias) + 1.0
        out = q(x)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out, model(x), atol=1e-4)  # really quantized


@pytest.mark.parametrize(
    "fc, status, reason",
    [
        (PlainLinear(3 * 4 * 4, 5), LayerStatus.OK, ""),
        (ScaledLinear(3 * 4 * 4, 5), LayerStatus.OK, ""),
        (BypassLinear(3 * 4 * 4, 5), LayerStatus.NOT_WRAPPABLE, "0 time"),
        (TwiceLinear(3 * 4 * 4, 5), LayerStatus.NOT_WRAPPABLE, "2 time"),
    ],
)
def test_discovery_checks_that_a_subclass_reaches_the_primitive(fc, status, reason) -> None:
    infos = {i.name: i for i in quantizable_layers(Net(fc), torch.zeros(1, 2, 6, 6))}
    assert infos["conv"].status is LayerStatus.OK and infos["conv"].type_name == "Conv2d"
    info = infos["fc"]
    assert info.status is status and info.type_name == "Linear" and info.calls == 1
    assert reason in info.reason
    if status is LayerStatus.NOT_WRAPPABLE:
        assert type(fc).__qualname__ in info.reason and "register_quantizable" in info.reason


def test_discovery_flags_a_subclass_that_quantizes_another_tensor() -> None:
    infos = quantizable_layers(
        Net(PlainLinear(48, 5), DoubledWeightConv(2, 3, 3)), torch.zeros(1, 2, 6, 6)
    )
    assert infos[0].status is LayerStatus.NOT_WRAPPABLE and "another tensor" in infos[0].reason


def test_reference_subclass_quantized_with_fp32_plan_is_unchanged() -> None:
    model = Net(ScaledLinear(48, 5)).eval()
    x = torch.randn(4, 2, 6, 6)
    q = apply_plan(
        model, QuantPlan({"fc": LayerPlan(QuantSpec(bits="fp32"), QuantSpec(bits="fp16"))})
    )
    assert isinstance(q.fc, QuantizedLayer)
    with calibration(q):
        q(x)
    with torch.no_grad():
        torch.testing.assert_close(q(x), model(x), atol=1e-2, rtol=1e-2)
    assert quantizable_names(model) == ["conv", "fc"]


def test_parametrized_weight_is_reported_with_the_fix() -> None:
    fc = nn.utils.parametrizations.weight_norm(nn.Linear(48, 5))
    info = quantizable_layers(Net(fc), torch.zeros(1, 2, 6, 6))[1]
    assert info.status is LayerStatus.NOT_WRAPPABLE and "remove_parametrizations" in info.reason
    with pytest.raises(PlanError, match="layer 'fc'.*parametrization"):
        apply_plan(Net(fc), QuantPlan({"fc": LayerPlan(W8C, A8)}))
