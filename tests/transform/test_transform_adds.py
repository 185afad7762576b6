"""Quantized residual adds: quantize_adds, add_quantizers, strip_add_quantizers and apply_plan
with ``QuantPlan.adds``, checked against hand-computed references built on
``torch.fake_quantize_per_tensor_affine``."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from autoquant.quant import FakeQuantize
from autoquant.tasks import CifarResNet
from autoquant.transform import (
    GRID_RULES,
    QuantizedLayer,
    add_quantizers,
    apply_plan,
    calibration,
    fold_batchnorm,
    fx_rule,
    quantizable_names,
    quantize_adds,
    strip_add_quantizers,
)
from autoquant.types import FP32, LayerPlan, QuantPlan, QuantSpec

A8 = QuantSpec(bits=8, symmetric=False)
W8 = QuantSpec(bits=8, granularity="per_channel")
A4 = QuantSpec(bits=4, symmetric=False)
A8C = QuantSpec(bits=8, symmetric=False, granularity="per_channel", axis=1)

RESNET20_ADDS = [f"layer{s}.{b}.add" for s in (1, 2, 3) for b in range(3)]


# Helpers -----------------------------------------------------------------------------------
def _fq(x: torch.Tensor, fq: FakeQuantize) -> torch.Tensor:
    """Independent per-tensor fake-quant reference with ``fq``'s frozen qparams."""
    assert fq.calibrated and fq.scale.dim() == 0
    return torch.fake_quantize_per_tensor_affine(
        x, float(fq.scale), int(fq.zero_point), fq.qmin, fq.qmax
    )


def _fq_weight(w: torch.Tensor, fq: FakeQuantize) -> torch.Tensor:
    """Independent per-channel (axis 0) weight fake-quant reference."""
    assert fq.calibrated and fq.scale.dim() == 1
    return torch.fake_quantize_per_channel_affine(
        w, fq.scale, fq.zero_point.int(), 0, fq.qmin, fq.qmax
    )


def _calibrate(model: nn.Module, x: torch.Tensor) -> nn.Module:
    with calibration(model):
        model(x)
    return model


def _resnet_plan(model: nn.Module, adds: QuantSpec = A8) -> QuantPlan:
    return QuantPlan.uniform(quantizable_names(model), W8, A8, adds=adds)


def _graph_fqs(model: nn.Module) -> set[str]:
    """Targets of the quantizer calls in the graph (outside the layer wrappers)."""
    if not isinstance(model, fx.GraphModule):
        return set()
    return {
        str(n.target)
        for n in model.graph.nodes
        if n.op == "call_module" and isinstance(model.get_submodule(str(n.target)), FakeQuantize)
    }


def _loose_fqs(model: nn.Module) -> list[str]:
    """FakeQuantize modules that do not belong to a quantized layer."""
    inside = {
        f"{n}.{c}"
        for n, m in model.named_modules()
        if isinstance(m, QuantizedLayer)
        for c in ("act_fq", "weight_fq")
    }
    return sorted(
        n for n, m in model.named_modules() if isinstance(m, FakeQuantize) and n not in inside
    )


class Res(nn.Module):
    """conv + identity shortcut + ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x) + x)


# Hand references on a tiny residual block ----------------------------------------------------
def test_adds_only_block_matches_hand_reference() -> None:
    model = Res().eval()
    x = torch.randn(4, 3, 6, 6)
    q = apply_plan(model, QuantPlan(adds=A8))
    fqs = add_quantizers(q)
    assert sorted(fqs) == ["add.in0", "add.in1", "add.out"]
    assert all(f is q.get_submodule(n) for n, f in fqs.items())
    _calibrate(q, x)

    x2 = torch.randn(4, 3, 6, 6) * 1.5  # some values outside the calibrated range: clipping
    with torch.no_grad():
        y = model.conv(x2)
        ref = _fq(torch.relu(_fq(y, fqs["add.in0"]) + _fq(x2, fqs["add.in1"])), fqs["add.out"])
        out = q(x2)
    assert torch.equal(out, ref)
    assert not torch.equal(out, model(x2))  # the adds did change something


def test_adds_quantizers_calibrate_on_operands_and_relu_output() -> None:
    model = Res().eval()
    x = torch.randn(8, 3, 6, 6)
    q = _calibrate(apply_plan(model, QuantPlan(adds=A8)), x)
    fqs = add_quantizers(q)
    with torch.no_grad():
        y = model.conv(x)
        r = torch.relu(y + x)

    def expected(t: torch.Tensor) -> tuple[float, float]:
        lo, hi = min(float(t.min()), 0.0), max(float(t.max()), 0.0)
        scale = (hi - lo) / 255
        return scale, float(round(255 - hi / scale))

    for name, t in [("add.in0", y), ("add.in1", x), ("add.out", r)]:
        scale, zp = expected(t)
        assert float(fqs[name].scale) == pytest.approx(scale, rel=1e-5), name
        assert float(fqs[name].zero_point) == zp, name
    # The output is quantized after the ReLU: its grid starts at 0.
    assert float(fqs["add.out"].zero_point) == 0.0


def test_quantized_conv_block_shares_input_quantizer_and_matches_hand_reference() -> None:
    model = Res().eval()
    x = torch.randn(4, 3, 6, 6)
    q = apply_plan(model, QuantPlan.uniform(["conv"], W8, A8, adds=A8))
    conv = q.get_submodule("conv")
    fqs = add_quantizers(q)
    # The shortcut operand is the conv's input: one grid, the conv's own quantizer.
    assert sorted(fqs) == ["add.in0", "add.out", "conv.act_fq"]
    assert fqs["conv.act_fq"] is conv.act_fq
    _calibrate(q, x)

    x2 = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        xq = _fq(x2, conv.act_fq)
        y = F.conv2d(xq, _fq_weight(conv.weight, conv.weight_fq), conv.bias, padding=1)
        ref = _fq(torch.relu(_fq(y, fqs["add.in0"]) + xq), fqs["add.out"])
        out = q(x2)
    assert torch.equal(out, ref)


# CifarResNet structure --------------------------------------------------------------------
def test_resnet20_add_names_and_shared_quantizers() -> None:
    model = CifarResNet(20).eval()
    plan = _resnet_plan(model)
    _, names = quantize_adds(apply_plan(model, QuantPlan(plan.layers)), A8)
    assert names == RESNET20_ADDS

    q = apply_plan(model, plan)
    assert isinstance(q, fx.GraphModule)
    fqs = add_quantizers(q)
    blocks = [n.removesuffix(".add") for n in RESNET20_ADDS]
    shared = [f"{b}.conv1.act_fq" for b in blocks]  # block input = previous block output
    expected = {f"{b}.add.in0" for b in blocks} | set(shared) | {"layer3.2.add.out"}
    assert set(fqs) == expected
    for name in shared:
        assert fqs[name] is q.get_submodule(name.removesuffix(".act_fq")).act_fq
    # Only the last block's output (followed by the pool) gets its own quantizer.
    assert [n for n in fqs if n.endswith(".out")] == ["layer3.2.add.out"]
    # Shortcuts reading a quantized tensor (identity, or option-A zero padding) get nothing.
    assert not [n for n in fqs if n.endswith(".in1")]
    for name in fqs:
        if name.endswith(".add.in0"):
            assert fqs[name].spec == A8

    # Where each call sits: block outputs after relu2, the stem's output on layer1.0's shortcut.
    args = {
        str(n.target): n.args[0]
        for n in q.graph.nodes
        if n.op == "call_module" and str(n.target) in fqs
    }
    for prev, nxt in zip(blocks, blocks[1:], strict=False):
        assert args[f"{nxt}.conv1.act_fq"].target == f"{prev}.relu2"
    assert args["layer3.2.add.out"].target == "layer3.2.relu2"
    assert args["layer1.0.conv1.act_fq"].target == "layer1.0.shortcut"
    assert args["layer1.0.add.in0"].target == "layer1.0.bn2"  # folded BN: Identity


@pytest.mark.parametrize("act", [A4, A8C], ids=["4bit", "per_channel"])
def test_no_sharing_with_4bit_or_per_channel_inputs(act: QuantSpec) -> None:
    model = CifarResNet(20).eval()
    layers = {
        n: LayerPlan(W8, act if n.startswith("layer") and n.endswith("conv1") else A8)
        for n in quantizable_names(model)
    }
    q = apply_plan(model, QuantPlan(layers, adds=A8))
    fqs = add_quantizers(q)
    blocks = [n.removesuffix(".add") for n in RESNET20_ADDS]
    expected = (
        {f"{b}.add.in0" for b in blocks}
        | {f"{b}.add.out" for b in blocks}
        | {"layer1.0.add.in1"}  # the stem output is no longer quantized by layer1.0.conv1
    )
    assert set(fqs) == expected
    convs = {id(q.get_submodule(f"{b}.conv1").act_fq) for b in blocks}
    for name, fq in fqs.items():
        assert id(fq) not in convs, name
        assert fq.spec == A8 and q.get_submodule(name) is fq


def test_zero_padding_keeps_the_grid_other_padding_does_not() -> None:
    class PadRes(nn.Module):
        def __init__(self, value: float) -> None:
            super().__init__()
            self.value = value
            self.conv0 = nn.Conv2d(3, 3, 3, padding=1)
            self.conv = nn.Conv2d(3, 3, 3, padding=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.conv0(x) + x)
            return self.conv(h) + F.pad(h, (1, 1, 1, 1), value=self.value)

    zero = add_quantizers(apply_plan(PadRes(0.0), QuantPlan(adds=A8)))
    assert sorted(zero) == ["add.in0", "add.in1", "add.out", "add_1.in0", "add_1.out"]
    half = add_quantizers(apply_plan(PadRes(0.5), QuantPlan(adds=A8)))
    assert sorted(half) == sorted([*zero, "add_1.in1"])


def test_add_forms_and_non_tensor_adds() -> None:
    class Forms(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = self.conv(x)
            b = torch.add(a, x)  # quantized
            c = b.add(a)  # quantized
            d = torch.add(c, x, alpha=2.0)  # scaled add: not a plain add, stays float
            e = d + 1.0  # tensor + constant: stays float
            f = e.view(e.size(0) + 0, -1)  # shape arithmetic: stays float
            g = f.reshape(f.size(0), x.size(1) + 1, -1)
            return g + g.shape[1]  # tensor + int from a shape: stays float

    q, names = quantize_adds(Forms().eval(), A8)
    assert names == ["add", "add_1"]
    assert sorted(add_quantizers(q)) == ["add.in0", "add.in1", "add.out", "add_1.in1", "add_1.out"]
    x = torch.randn(2, 3, 4, 4)
    _calibrate(q, x)
    fqs = add_quantizers(q)
    model = Forms().eval()
    model.load_state_dict({k: v for k, v in q.state_dict().items() if k.startswith("conv.")})
    with torch.no_grad():
        a = model.conv(x)
        b = _fq(_fq(a, fqs["add.in0"]) + _fq(x, fqs["add.in1"]), fqs["add.out"])
        c = _fq(b + _fq(a, fqs["add_1.in1"]), fqs["add_1.out"])
        d = torch.add(c, x, alpha=2.0) + 1.0
        ref = d.reshape(2, 4, -1) + 4
        assert torch.equal(q(x), ref)


# Numerical properties on a calibrated ResNet --------------------------------------------------
@pytest.fixture(scope="module")
def resnet8() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = CifarResNet(8).eval()
    x = torch.randn(8, 3, 8, 8)
    q = _calibrate(apply_plan(model, _resnet_plan(model)), x)
    return model, q, x


def test_add_quantizer_outputs_lie_on_their_grid_and_are_idempotent(resnet8) -> None:
    _, q, x = resnet8
    fqs = add_quantizers(q)
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in fqs}
    handles = [
        fq.register_forward_hook(lambda m, i, o, n=n: seen[n].append(o)) for n, fq in fqs.items()
    ]
    try:
        with torch.no_grad():
            q(torch.randn(4, 3, 8, 8) * 2)
    finally:
        for h in handles:
            h.remove()
    for name, fq in fqs.items():
        assert seen[name], name
        for out in seen[name]:
            codes = out / fq.scale + fq.zero_point
            assert torch.allclose(codes, codes.round(), atol=1e-3), name
            assert int(codes.round().min()) >= fq.qmin and int(codes.round().max()) <= fq.qmax
            with torch.no_grad():
                assert torch.equal(fq(out), out), name  # fake-quant is idempotent
                assert torch.equal(_fq(out, fq), out), name


def test_state_dict_round_trip(resnet8) -> None:
    model, q, x = resnet8
    fresh = apply_plan(model, _resnet_plan(model))
    assert set(add_quantizers(fresh)) == set(add_quantizers(q))
    assert not any(fq.calibrated for fq in add_quantizers(fresh).values())
    fresh.load_state_dict(q.state_dict(), strict=True)
    assert all(fq.calibrated for fq in add_quantizers(fresh).values())
    with torch.no_grad():
        assert torch.equal(fresh(x), q(x))


def _float_adds_reference(model: nn.Module, q: nn.Module) -> nn.Module:
    """``model`` with BN folded and every quantized layer of ``q`` simulated by hooks using
    torch's own fake-quant ops: the model with float adds, built independently of apply_plan."""
    ref = fold_batchnorm(model)
    layers = {n: m for n, m in q.named_modules() if isinstance(m, QuantizedLayer)}
    for name, layer in layers.items():
        module = ref.get_submodule(name)
        with torch.no_grad():
            module.weight.copy_(_fq_weight(module.weight, layer.weight_fq))
        module.register_forward_pre_hook(lambda m, a, fq=layer.act_fq: (_fq(a[0], fq),))
    return ref


def test_fp32_adds_keep_the_model_type_and_float_adds(resnet8) -> None:
    model, _, x = resnet8
    q = apply_plan(model, _resnet_plan(model, adds=FP32))
    assert type(q) is CifarResNet and not isinstance(q, fx.GraphModule)
    assert add_quantizers(q) == {} and _loose_fqs(q) == []
    _calibrate(q, x)
    ref = _float_adds_reference(model, q)
    x2 = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(q(x2), ref(x2), rtol=0, atol=1e-6)
        # The same as a plan written before adds existed.
        old = apply_plan(model, QuantPlan(dict(_resnet_plan(model).layers)))
        old.load_state_dict(q.state_dict(), strict=True)
        assert torch.equal(old(x2), q(x2))


def test_model_without_adds_keeps_its_type() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    q = apply_plan(net, QuantPlan.uniform(["0", "3"], W8, A8, adds=A8))
    assert type(q) is nn.Sequential
    assert add_quantizers(q) == {} and _loose_fqs(q) == []
    same, names = quantize_adds(net, A8)
    assert same is net and names == []


def test_untraceable_model_warns_and_keeps_float_adds() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                return torch.relu(self.conv(x) + x)
            return x

    model = Branchy().eval()
    with pytest.warns(UserWarning, match="cannot be traced"):
        q = apply_plan(model, QuantPlan.uniform(["conv"], W8, A8, adds=A8))
    assert type(q) is Branchy
    assert add_quantizers(q) == {} and _loose_fqs(q) == []
    x = torch.randn(4, 3, 5, 5).abs()
    _calibrate(q, x)
    conv = q.get_submodule("conv")
    with torch.no_grad():
        xq = _fq(x, conv.act_fq)
        y = F.conv2d(xq, _fq_weight(conv.weight, conv.weight_fq), conv.bias, padding=1)
        assert torch.equal(q(x), torch.relu(y + x))  # float add: x itself, not xq


def test_strip_add_quantizers_gives_the_float_adds_model(resnet8) -> None:
    model, q, x = resnet8
    stripped = copy.deepcopy(q)
    strip_add_quantizers(stripped)
    assert add_quantizers(stripped) == {} and _loose_fqs(stripped) == []
    # The layers' own quantizers (some of which were shared) stay.
    assert set(quantizable_names(stripped)) == set(quantizable_names(model))

    float_adds = apply_plan(model, _resnet_plan(model, adds=FP32))
    keys = float_adds.state_dict().keys()
    float_adds.load_state_dict({k: v for k, v in q.state_dict().items() if k in keys}, strict=True)
    x2 = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(stripped(x2), float_adds(x2))
        assert not torch.equal(stripped(x2), q(x2))
        torch.testing.assert_close(
            stripped(x2), _float_adds_reference(model, float_adds)(x2), rtol=0, atol=1e-6
        )


def test_strip_add_quantizers_with_mark(resnet8) -> None:
    _, q, x = resnet8
    order = [
        str(n.target)
        for n in q.graph.nodes
        if n.op == "call_module" and isinstance(q.get_submodule(str(n.target)), FakeQuantize)
    ]
    marked = copy.deepcopy(q)
    calls: list[str] = []

    def mark(target: str) -> nn.Module:
        calls.append(target)
        return nn.Identity()

    strip_add_quantizers(marked, mark)
    assert calls == order
    assert add_quantizers(marked) == {}
    marks = [str(n.target) for n in marked.graph.nodes if str(n.target).startswith("_aq_mark")]
    assert len(marks) == len(order)
    assert all(isinstance(marked.get_submodule(m), nn.Identity) for m in marks)
    stripped = copy.deepcopy(q)
    strip_add_quantizers(stripped)
    with torch.no_grad():
        assert torch.equal(marked(x), stripped(x))


class DropRes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(F.dropout(self.conv(x), 0.5, training=self.training) + x)


def test_mode_dependent_model_keeps_float_adds_and_its_dropout() -> None:
    # torch.fx would freeze `self.training` into the graph: such a model is not traced.
    with pytest.warns(UserWarning, match="train/eval mode"):
        q = apply_plan(DropRes().train(), QuantPlan(adds=A8))
    assert isinstance(q, DropRes)
    x = torch.randn(4, 3, 5, 5)
    _calibrate(q, x)
    q.eval()
    with torch.no_grad():
        assert torch.equal(q(x), q(x))


# The grid rules (one table for torch.fx and ONNX) -------------------------------------------
_RULE_OPS = {
    "identity": lambda x: x.contiguous(),
    "view": lambda x: x.reshape(x.shape[0], -1),
    "slice": lambda x: x[:, :, ::2, 1:],
    "zero_pad": lambda x: F.pad(x, (1, 0, 0, 2)),
    "relu": torch.relu,
    "max_pool": lambda x: F.max_pool2d(x, 2),
}


@pytest.mark.parametrize("rule", [r.name for r in GRID_RULES])
def test_every_grid_rule_commutes_with_per_tensor_fake_quant(rule: str) -> None:
    # The property every rule claims: quantizing before or after the op gives the same values.
    op = _RULE_OPS[rule]
    x = torch.randn(2, 3, 6, 6) * 3
    for scale, zp, qmin, qmax in [(0.05, 7, 0, 255), (0.1, 0, -127, 127), (0.3, 3, 0, 15)]:
        before = torch.fake_quantize_per_tensor_affine(op(x), scale, zp, qmin, qmax)
        after = op(torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax))
        assert torch.equal(before, after), (rule, scale, zp)


def test_a_padding_by_another_value_or_a_sum_breaks_the_grid() -> None:
    # The counter-cases: what the table leaves out does not commute.
    x = torch.randn(2, 3, 6, 6) * 3
    for op in (lambda t: F.pad(t, (1, 0, 0, 0), value=0.01), lambda t: t + 0.01):
        before = torch.fake_quantize_per_tensor_affine(op(x), 0.05, 7, 0, 255)
        after = op(torch.fake_quantize_per_tensor_affine(x, 0.05, 7, 0, 255))
        assert not torch.equal(before, after)


class _Rules(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(x).contiguous()[:, :, ::2].flatten(1)
        return F.pad(F.max_pool2d(x, 2), (1, 1)).sum() + y.view(-1).sum()


def test_fx_reads_the_table() -> None:
    gm = fx.symbolic_trace(_Rules())
    rules = [getattr(fx_rule(gm, n), "name", None) for n in gm.graph.nodes]
    assert rules == [
        None,  # x
        "relu",
        "identity",
        "slice",
        "view",
        "max_pool",
        "zero_pad",
        None,  # sum
        "view",
        None,  # sum
        None,  # add
        None,  # output
    ]


def test_quantize_adds_follows_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    from autoquant.transform import _grid_rules

    model = CifarResNet(8).eval()  # option-A shortcuts: a slice and a zero pad
    plan = _resnet_plan(model)
    assert not [n for n in add_quantizers(apply_plan(model, plan)) if n.endswith(".in1")]
    # Without the slice rule, the padded shortcuts are no longer on the block input's grid.
    kept = tuple(r for r in GRID_RULES if r.name != "slice")
    monkeypatch.setattr(_grid_rules, "GRID_RULES", kept)
    in1 = sorted(n for n in add_quantizers(apply_plan(model, plan)) if n.endswith(".in1"))
    assert in1 == ["layer2.0.add.in1", "layer3.0.add.in1"]


# Transformers: residual adds inside encoder layers, models traced in parts --------------------
class _Encoder(nn.Module):
    """Token embedding + encoder layer(s) (+ LayerNorm after each residual add) + head."""

    def __init__(self, layers: int = 1, norm_first: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        layer = nn.TransformerEncoderLayer(
            8, 2, 16, dropout=0.0, batch_first=True, norm_first=norm_first
        )
        self.encoder = (
            layer
            if layers == 1
            else nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        )
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.emb(ids), src_key_padding_mask=pad).mean(1))


def _tokens() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 20, (6, 5), generator=torch.Generator().manual_seed(4))
    pad = torch.zeros(6, 5, dtype=torch.bool)
    pad[::2, -2:] = True
    return ids, pad


def test_encoder_layer_residual_adds_match_a_hand_reference() -> None:
    torch.manual_seed(0)
    model = _Encoder().eval()
    ids, pad = _tokens()
    q = apply_plan(model, QuantPlan(adds=A8))  # adds only: the layers stay float
    assert sorted(add_quantizers(q)) == [
        "encoder.add.in0",
        "encoder.add.in1",
        "encoder.add.out",
        "encoder.add_1.in0",
        "encoder.add_1.in1",
        "encoder.add_1.out",
    ]
    _calibrate_tokens(q, ids, pad)
    fq = add_quantizers(q)
    layer = model.encoder
    with torch.no_grad():
        x = model.emb(ids)
        sa = layer.self_attn(x, x, x, key_padding_mask=pad, need_weights=False)[0]
        x = layer.norm1(
            _fq(
                _fq(x, fq["encoder.add.in0"]) + _fq(sa, fq["encoder.add.in1"]),
                fq["encoder.add.out"],
            )
        )
        ff = layer.linear2(torch.relu(layer.linear1(x)))
        x = layer.norm2(
            _fq(
                _fq(x, fq["encoder.add_1.in0"]) + _fq(ff, fq["encoder.add_1.in1"]),
                fq["encoder.add_1.out"],
            )
        )
        ref = model.head(x.mean(1))
        torch.testing.assert_close(q(ids, pad), ref, atol=1e-6, rtol=0)
        assert not torch.allclose(q(ids, pad), model(ids, pad), atol=1e-4)


def _calibrate_tokens(q: nn.Module, ids: torch.Tensor, pad: torch.Tensor) -> None:
    with calibration(q):
        q(ids, pad)


def test_encoder_adds_share_the_grids_of_the_layers_reading_their_operands() -> None:
    torch.manual_seed(0)
    model = _Encoder().eval()
    names = quantizable_names(model)
    plan = QuantPlan.uniform(
        [n for n in names if n != "emb" and "matmul" not in n], W8, A8, adds=A8
    )
    q = apply_plan(model, plan)
    # The residual input of the first add is the attention's input: the in-projection's grid;
    # that of the second add feeds linear1: its grid. Only the other operands get their own.
    assert sorted(add_quantizers(q)) == [
        "encoder.add.in1",
        "encoder.add.out",
        "encoder.add_1.in1",
        "encoder.add_1.out",
        "encoder.linear1.act_fq",
        "encoder.self_attn.in_proj.act_fq",
    ]
    _calibrate_tokens(q, *_tokens())


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_stacks_get_quantized_adds_in_every_layer(norm_first: bool) -> None:
    torch.manual_seed(0)
    model = _Encoder(layers=2, norm_first=norm_first).eval()
    q = apply_plan(model, QuantPlan(adds=A8))
    assert isinstance(q, fx.GraphModule)  # traced whole, no warning
    adds = {n.rsplit(".", 1)[0] for n in add_quantizers(q)}
    assert adds == {f"encoder.layers.{i}.{a}" for i in (0, 1) for a in ("add", "add_1")}
    ids, pad = _tokens()
    _calibrate_tokens(q, ids, pad)
    fp32 = apply_plan(model, QuantPlan(adds=A8))
    strip_add_quantizers(fp32)
    with torch.no_grad():  # without its quantizers, the traced graph is the model
        torch.testing.assert_close(fp32(ids, pad), model(ids, pad), atol=1e-5, rtol=1e-5)


class _Optional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc(x) + (x if bias is None else bias)


class _Required(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x) + x)


class _Branchy(nn.Module):
    """Untraceable as a whole; a traceable block and one whose forward takes an optional arg."""

    def __init__(self) -> None:
        super().__init__()
        self.block = _Required()
        self.opt = _Optional()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent: torch.fx cannot trace the model
            x = -x
        return self.opt(self.block(x))


def test_untraceable_models_get_quantized_adds_in_their_traceable_submodules() -> None:
    torch.manual_seed(0)
    model = _Branchy().eval()
    with pytest.warns(UserWarning, match=r"cannot be traced.*submodules it can trace: \['block'\]"):
        q = apply_plan(model, QuantPlan(adds=A8))
    assert type(q) is _Branchy and isinstance(q.block, fx.GraphModule)
    # The optional argument could be left out by a caller: that block keeps its float add.
    assert not isinstance(q.opt, fx.GraphModule)
    assert sorted(add_quantizers(q)) == ["block.add.in0", "block.add.in1", "block.add.out"]
    x = torch.randn(8, 4)
    _calibrate(q, x)
    fq = add_quantizers(q)
    with torch.no_grad():
        h = -x if x.sum() > 0 else x
        y = _fq(
            torch.relu(_fq(model.block.fc(h), fq["block.add.in0"]) + _fq(h, fq["block.add.in1"])),
            fq["block.add.out"],
        )
        torch.testing.assert_close(q(x), model.opt(y), atol=1e-6, rtol=0)
    stripped = copy.deepcopy(q)
    strip_add_quantizers(stripped)
    assert add_quantizers(stripped) == {}
    with torch.no_grad():
        torch.testing.assert_close(stripped(x), model(x), atol=1e-6, rtol=0)


class _OwnForward(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(2.0 * x)


class _ResOwn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = _OwnForward(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + x


def test_a_subclass_with_its_own_forward_does_not_share_its_input_grid() -> None:
    # Its quantizer sees 2 * x, not x: the add's operand gets a grid of its own.
    q = apply_plan(_ResOwn().eval(), QuantPlan.uniform(["fc"], W8, A8, adds=A8))
    assert sorted(add_quantizers(q)) == ["add.in0", "add.in1", "add.out"]


def test_hugging_face_bert_gets_integer_adds_in_its_output_blocks() -> None:
    transformers = pytest.importorskip(
        "transformers",
        reason="Hugging Face transformers is not installed (pip install 'autoquant[nlp]')",
    )
    config = transformers.BertConfig(
        vocab_size=30,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=8,
    )
    torch.manual_seed(0)
    bert = transformers.BertModel(config).eval()
    with pytest.warns(UserWarning, match="cannot be traced"):
        q, names = quantize_adds(copy.deepcopy(bert), A8)
    # BertSelfOutput and BertOutput: dense -> dropout -> LayerNorm(hidden + input).
    assert names == [
        f"encoder.layer.{i}.{block}.add" for i in (0, 1) for block in ("attention.output", "output")
    ]
    ids = torch.randint(1, 30, (4, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[0, 4:] = 0
    with calibration(q):
        q(input_ids=ids, attention_mask=mask)
    stripped = copy.deepcopy(q)
    strip_add_quantizers(stripped)
    with torch.no_grad():
        ref = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(
            stripped(input_ids=ids, attention_mask=mask).last_hidden_state, ref, atol=1e-5, rtol=0
        )
        assert not torch.allclose(
            q(input_ids=ids, attention_mask=mask).last_hidden_state, ref, atol=1e-4
        )
