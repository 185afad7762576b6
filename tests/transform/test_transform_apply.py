"""apply_plan, calibration, quantizable_layers and the wrapper registry."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autoquant.quant import FakeQuantize
from autoquant.transform import (
    QConv2d,
    QLinear,
    QuantizedLayer,
    apply_plan,
    calibration,
    fold_batchnorm,
    quantizable_layers,
    quantized_layers,
)
from autoquant.types import LayerPlan, PlanError, QuantPlan, QuantSpec

W8 = QuantSpec(bits=8, granularity="per_channel")
A8 = QuantSpec(bits=8, symmetric=False)
NAMES = ["features.0", "features.3", "fc"]


def _calibrate(model: nn.Module, x: torch.Tensor) -> nn.Module:
    with calibration(model):
        for chunk in x.split(200):
            model(chunk)
    return model


def test_quantizable_layers_names_params_macs(digits) -> None:
    infos = quantizable_layers(digits.model, torch.zeros(2, 1, 8, 8))
    assert [(i.name, i.type_name, i.params) for i in infos] == [
        ("features.0", "Conv2d", 8 * 9),
        ("features.3", "Conv2d", 16 * 8 * 9 + 16),
        ("fc", "Linear", 256 * 10 + 10),
    ]
    # MACs for the whole example batch: outputs x (weights per output).
    assert [i.macs for i in infos] == [2 * 8 * 64 * 9, 2 * 16 * 16 * 72, 2 * 10 * 256]
    assert digits.model.training is False


def test_quantizable_layers_restores_train_mode_and_bn_stats(digits) -> None:
    model = copy.deepcopy(digits.model).train()
    before = model.features[1].running_mean.clone()
    quantizable_layers(model, torch.randn(4, 1, 8, 8))
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(model.features[1].running_mean, before)


def test_8bit_plan_keeps_accuracy(digits) -> None:
    float_acc = digits.accuracy(digits.model)
    assert float_acc > 0.9  # the fixture trained something worth quantizing
    q = apply_plan(digits.model, QuantPlan.uniform(NAMES, W8, A8))
    _calibrate(q, digits.x_train[:600])
    assert abs(digits.accuracy(q) - float_acc) <= 0.02
    # The fake-quant really is on: outputs differ from the folded float model.
    with torch.no_grad():
        assert not torch.allclose(q(digits.x_test), fold_batchnorm(digits.model)(digits.x_test))


def test_2bit_plan_hurts_accuracy(digits) -> None:
    # Counterpart of the test above: a destructive plan must show up in the accuracy.
    w2 = QuantSpec(bits=2)
    q = _calibrate(
        apply_plan(digits.model, QuantPlan.uniform(NAMES, w2, QuantSpec(bits=2))),
        digits.x_train[:400],
    )
    assert digits.accuracy(q) < digits.accuracy(digits.model) - 0.1


def test_wrappers_and_input_untouched(digits) -> None:
    model = digits.model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    q = apply_plan(model, QuantPlan.uniform(NAMES, W8, A8))
    layers = quantized_layers(q)
    assert list(layers) == NAMES
    conv, fc = layers["features.0"], layers["fc"]
    assert isinstance(conv, QConv2d) and isinstance(conv, nn.Conv2d)
    assert isinstance(fc, QLinear) and isinstance(fc, QuantizedLayer)
    assert type(conv).float_type is nn.Conv2d and type(fc).float_type is nn.Linear
    assert isinstance(conv.weight_fq, FakeQuantize) and conv.act_fq.spec == A8
    assert conv.layer_plan == LayerPlan(W8, A8)
    assert type(q.features[1]) is nn.Identity  # BN folded
    # The input model is unchanged: same types, same tensors, no shared parameters.
    assert type(model.features[0]) is nn.Conv2d and type(model.features[1]) is nn.BatchNorm2d
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    assert model.fc.weight is not fc.weight


def test_fp32_and_missing_layers_stay_float(digits) -> None:
    plan = QuantPlan({"features.0": LayerPlan(), "features.3": LayerPlan(W8, A8)})
    q = apply_plan(digits.model, plan)
    folded = fold_batchnorm(digits.model)
    assert type(q.features[0]) is nn.Conv2d and type(q.fc) is nn.Linear
    assert torch.equal(q.features[0].weight, folded.features[0].weight)
    all_fp32 = apply_plan(digits.model, QuantPlan({n: LayerPlan() for n in NAMES}))
    assert not quantized_layers(all_fp32)
    with torch.no_grad():
        assert torch.equal(all_fp32(digits.x_test), folded(digits.x_test))


def test_unknown_layer_name_lists_valid_names(digits) -> None:
    plan = QuantPlan({"features.9": LayerPlan(W8, A8), "fc": LayerPlan(W8, A8)})
    with pytest.raises(PlanError, match=r"features\.9") as err:
        apply_plan(digits.model, plan)
    assert all(name in str(err.value) for name in NAMES)


def test_bad_activation_axis_is_refused(digits) -> None:
    act = QuantSpec(bits=8, granularity="per_channel", axis=2)
    with pytest.raises(PlanError, match="axis=2"):
        apply_plan(digits.model, QuantPlan({"fc": LayerPlan(W8, act)}))


def test_apply_plan_is_deterministic(digits) -> None:
    plan = QuantPlan(
        {
            "features.0": LayerPlan(QuantSpec(bits=4), A8),
            "fc": LayerPlan(W8, QuantSpec(bits="fp16")),
        }
    )
    a, b = apply_plan(digits.model, plan), apply_plan(digits.model, plan)
    assert str(a) == str(b)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(v, sb[k]) if torch.is_tensor(v) else v == sb[k] for k, v in sa.items())
    # ... so a saved trial replays: calibrate one, load its state into a fresh copy.
    _calibrate(a, digits.x_train[:200])
    c = apply_plan(digits.model, plan)
    c.load_state_dict(a.state_dict())
    with torch.no_grad():
        assert torch.equal(c(digits.x_test), a(digits.x_test))


def test_calibration_freezes_and_qat_trains_weights_and_lsq_scales(digits) -> None:
    lsq = QuantSpec(bits=4, granularity="per_channel", learned_scale=True)
    q = apply_plan(digits.model, QuantPlan.uniform(NAMES, lsq, A8.replace(learned_scale=True)))
    fqs = [m for m in q.modules() if isinstance(m, FakeQuantize)]
    assert not any(fq.calibrated for fq in fqs)
    q.train()
    _calibrate(q, digits.x_train[:400])
    assert all(fq.calibrated and not fq.observing for fq in fqs)
    assert q.training  # train/eval flags restored after the block
    opt = torch.optim.SGD(q.parameters(), lr=0.01)
    before = {n: p.detach().clone() for n, p in q.named_parameters()}
    F.cross_entropy(q(digits.x_train[:64]), digits.y_train[:64]).backward()
    opt.step()
    for n, p in q.named_parameters():
        assert p.grad is not None, n
        assert not torch.equal(p.detach(), before[n]), n
    assert any(n.endswith("weight_fq.scale") for n in before)
    assert any(n.endswith("act_fq.scale") for n in before)


def test_calibration_exception_leaves_model_unfrozen(digits) -> None:
    q = apply_plan(digits.model, QuantPlan.uniform(NAMES, W8, A8))
    with pytest.raises(KeyError, match="boom"), calibration(q):
        q(digits.x_train[:50])
        raise KeyError("boom")
    fqs = [m for m in q.modules() if isinstance(m, FakeQuantize)]
    assert not any(fq.calibrated or fq.observing for fq in fqs)
    with torch.no_grad():  # still a pass-through, i.e. the folded float model
        torch.testing.assert_close(q(digits.x_test), fold_batchnorm(digits.model)(digits.x_test))


def test_calibration_without_data_names_the_layers(digits) -> None:
    q = apply_plan(digits.model, QuantPlan.uniform(NAMES, W8, A8))
    with pytest.raises(RuntimeError, match=r"features\.0\.act_fq"), calibration(q):
        pass
    # Weight-only plans need no batches: weights are observed on exit.
    w_only = apply_plan(digits.model, QuantPlan.uniform(NAMES, W8, QuantSpec(bits="fp32")))
    with calibration(w_only):
        pass
    assert all(layer.weight_fq.calibrated for layer in quantized_layers(w_only).values())


@pytest.mark.parametrize("method", ["minmax", "moving_average", "percentile", "mse", "kl"])
def test_every_calibration_method_runs_end_to_end(digits, method: str) -> None:
    w = QuantSpec(bits=8, granularity="per_channel", calibration=method)
    a = QuantSpec(bits=8, symmetric=False, calibration=method)
    q = _calibrate(apply_plan(digits.model, QuantPlan.uniform(NAMES, w, a)), digits.x_train[:400])
    assert abs(digits.accuracy(q) - digits.accuracy(digits.model)) <= 0.03


def test_conv1d_and_per_channel_activations() -> None:
    net = nn.Sequential(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4), nn.ReLU(), nn.Conv1d(4, 2, 1))
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    net.eval()
    act = QuantSpec(bits=8, granularity="per_channel", axis=1, symmetric=False)
    q = apply_plan(net, QuantPlan.uniform(["0", "3"], W8, act))
    x = torch.randn(16, 3, 20)
    _calibrate(q, x)
    assert q[0].act_fq.scale.shape == (3,) and q[3].act_fq.scale.shape == (4,)
    with torch.no_grad():
        torch.testing.assert_close(q(x), net(x), atol=0.05, rtol=0.05)
