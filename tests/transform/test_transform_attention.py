"""nn.MultiheadAttention made explicit (float equivalence, masks included), transformer layers
that never take the fused fast path once quantized, and a w8a8 token classifier checked
against a hand-written attention with torch's fake-quant ops."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autoquant.quant import FakeQuantize
from autoquant.transform import (
    AttentionMatmul,
    ExplicitMultiheadAttention,
    LayerStatus,
    QAttentionMatmul,
    QEmbedding,
    QLinear,
    apply_plan,
    calibration,
    explicit_attention_,
    packed_size_bytes,
    quantizable_layers,
    quantizable_names,
    quantized_layers,
    uniform_plan,
)
from autoquant.types import LayerPlan, PlanError, QuantPlan, QuantSpec

E, H = 8, 2
W8C = QuantSpec(bits=8, granularity="per_channel")
A8 = QuantSpec(bits=8, symmetric=False)
PAD = 0


def _explicit(mha: nn.MultiheadAttention) -> ExplicitMultiheadAttention:
    holder = explicit_attention_(copy.deepcopy(nn.ModuleList([mha])))
    return holder[0]  # type: ignore[return-value]


def _mha(batch_first: bool, **kwargs) -> nn.MultiheadAttention:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first, **kwargs)
    with torch.no_grad():  # non-zero biases, so a bias mix-up shows
        for name, p in mha.named_parameters():
            if "bias" in name:
                p.uniform_(-0.5, 0.5)
    return mha.eval()


CASES = {
    "plain": {},
    "need_weights": {"need_weights": True},
    "per_head_weights": {"need_weights": True, "average_attn_weights": False},
    "key_padding_bool": {"key_padding_mask": "bool"},
    "key_padding_float": {"key_padding_mask": "float"},
    "attn_mask_bool_2d": {"attn_mask": "bool2d"},
    "attn_mask_float_3d": {"attn_mask": "float3d"},
    "both_masks": {"key_padding_mask": "bool", "attn_mask": "bool2d", "need_weights": True},
    "causal": {"attn_mask": "causal", "is_causal": True},
}


def _kwargs(case: dict, n: int, length: int) -> dict:
    g = torch.Generator().manual_seed(1)
    out: dict = {"need_weights": case.get("need_weights", False)}
    if "average_attn_weights" in case:
        out["average_attn_weights"] = case["average_attn_weights"]
    if "is_causal" in case:
        out["is_causal"] = case["is_causal"]
    pad = torch.zeros(n, length, dtype=torch.bool)
    pad[0, -2:] = True  # padded keys, never a fully masked row
    kind = case.get("key_padding_mask")
    if kind == "bool":
        out["key_padding_mask"] = pad
    elif kind == "float":
        out["key_padding_mask"] = torch.randn(n, length, generator=g)
    kind = case.get("attn_mask")
    if kind == "bool2d":
        mask = torch.rand(length, length, generator=g) > 0.7
        out["attn_mask"] = mask & ~torch.eye(length, dtype=torch.bool)
    elif kind == "float3d":
        out["attn_mask"] = torch.randn(n * H, length, length, generator=g)
    elif kind == "causal":
        out["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(length)
    return out


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_explicit_attention_equals_torch(batch_first: bool, case: str) -> None:
    mha = _mha(batch_first)
    explicit = _explicit(mha)
    n, length = 3, 6
    x = torch.randn(n, length, E) if batch_first else torch.randn(length, n, E)
    kwargs = _kwargs(CASES[case], n, length)
    with torch.no_grad():
        ref_out, ref_w = mha(x, x, x, **kwargs)
        out, w = explicit(x, x, x, **kwargs)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    if ref_w is None:
        assert w is None
    else:
        torch.testing.assert_close(w, ref_w, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "kind", ["cross", "kdim_vdim", "unbatched", "train_mode", "no_bias", "kv_shared"]
)
def test_explicit_attention_equals_torch_other_forms(kind: str) -> None:
    kwargs = {"kdim": 5, "vdim": 3} if kind == "kdim_vdim" else {}
    if kind == "no_bias":
        kwargs["bias"] = False
    mha = _mha(True, **kwargs)
    explicit = _explicit(mha)
    q = torch.randn(2, 4, E)
    k, v = torch.randn(2, 7, kwargs.get("kdim", E)), torch.randn(2, 7, kwargs.get("vdim", E))
    if kind in ("unbatched",):
        q = k = v = q[0]
    elif kind in ("train_mode", "no_bias"):
        k = v = q
        mha.train(), explicit.train()  # dropout 0: same function, no fast path for torch
    elif kind == "kv_shared":
        v = k
    with torch.no_grad():
        ref = mha(q, k, v)
        out = explicit(q, k, v)
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    if kind == "kdim_vdim":
        assert [n for n, _ in explicit.named_children()] == [
            "q_proj",
            "k_proj",
            "v_proj",
            "matmul",
            "out_proj",
        ]
        assert explicit.k_proj.weight.shape == (E, 5) and explicit.in_proj_weight is None


def test_explicit_attention_shares_parameters_and_keeps_attributes() -> None:
    model = nn.ModuleList([_mha(True)])
    w, b, out_w = model[0].in_proj_weight, model[0].in_proj_bias, model[0].out_proj.weight
    explicit_attention_(model)
    mha = model[0]
    assert isinstance(mha, ExplicitMultiheadAttention) and isinstance(mha, nn.MultiheadAttention)
    assert mha.in_proj.weight is w and mha.in_proj_weight is w and mha.in_proj_bias is b
    assert type(mha.out_proj) is nn.Linear and mha.out_proj.weight is out_w
    assert isinstance(mha.matmul, AttentionMatmul)
    assert sorted(dict(mha.named_parameters())) == [
        "in_proj.bias",
        "in_proj.weight",
        "out_proj.bias",
        "out_proj.weight",
    ]


class TokenClassifier(nn.Module):
    """Embedding + TransformerEncoder(Layer) + masked mean pooling + linear head."""

    def __init__(self, vocab: int = 20, encoder: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, E, padding_idx=PAD)
        layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.encoder = (
            nn.TransformerEncoder(layer, 2, enable_nested_tensor=True) if encoder else layer
        )
        self.head = nn.Linear(E, 3)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pad = mask == 0
        x = self.encoder(self.emb(ids), src_key_padding_mask=pad)
        keep = mask.unsqueeze(-1).to(x.dtype)
        return self.head((x * keep).sum(1) / keep.sum(1))


def _tokens(n: int = 6, length: int = 7, vocab: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, vocab, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    for i in range(n):
        cut = length - (i % 3)  # left-aligned padding, as tokenizers give
        ids[i, cut:], mask[i, cut:] = PAD, 0
    return ids, mask


def _fq_w(w: torch.Tensor) -> torch.Tensor:
    flat = w.detach().double()
    scale = (flat.abs().amax(1) / 127).float()
    return torch.fake_quantize_per_channel_affine(
        w.detach(), scale, torch.zeros(w.shape[0], dtype=torch.int32, device=w.device), 0, -127, 127
    )


def _fq_a(x: torch.Tensor, fq: FakeQuantize) -> torch.Tensor:
    assert fq.calibrated and fq.spec == A8
    return torch.fake_quantize_per_tensor_affine(x, float(fq.scale), int(fq.zero_point), 0, 255)


def _reference(model: TokenClassifier, q: nn.Module, ids: torch.Tensor, mask: torch.Tensor):
    """The quantized classifier written out by hand: torch's fake-quant ops on every weight
    (qparams from the closed form) and on every linear's input (the calibrated grids)."""
    layer = model.encoder
    ql = q.encoder
    x = F.embedding(ids, _fq_w(model.emb.weight), PAD)
    n, length, _ = x.shape
    qkv = F.linear(
        _fq_a(x, ql.self_attn.in_proj.act_fq),
        _fq_w(layer.self_attn.in_proj_weight),
        layer.self_attn.in_proj_bias,
    )
    qh, kh, vh = (t.reshape(n, length, H, E // H).transpose(1, 2) for t in qkv.split(E, -1))
    qh = qh / math.sqrt(E // H)
    mm = ql.self_attn.matmul
    quant_mm = hasattr(mm, "key_fq")  # the plan quantizes the matmul operands
    if quant_mm:
        qh, kh, vh = _fq_a(qh, mm.act_fq), _fq_a(kh, mm.key_fq), _fq_a(vh, mm.value_fq)
    scores = qh @ kh.transpose(-2, -1)
    scores = scores.masked_fill((mask == 0)[:, None, None, :], float("-inf"))
    probs = scores.softmax(-1)
    if quant_mm:
        probs = _fq_a(probs, mm.prob_fq)
    attn = (probs @ vh).transpose(1, 2).reshape(n, length, E)
    attn = F.linear(
        _fq_a(attn, ql.self_attn.out_proj.act_fq),
        _fq_w(layer.self_attn.out_proj.weight),
        layer.self_attn.out_proj.bias,
    )
    x = layer.norm1(x + attn)
    hidden = F.relu(
        F.linear(_fq_a(x, ql.linear1.act_fq), _fq_w(layer.linear1.weight), layer.linear1.bias)
    )
    x = layer.norm2(
        x
        + F.linear(
            _fq_a(hidden, ql.linear2.act_fq), _fq_w(layer.linear2.weight), layer.linear2.bias
        )
    )
    keep = mask.unsqueeze(-1).to(x.dtype)
    pooled = (x * keep).sum(1) / keep.sum(1)
    return F.linear(_fq_a(pooled, q.head.act_fq), _fq_w(model.head.weight), model.head.bias)


def test_token_classifier_discovery_and_names() -> None:
    model = TokenClassifier().eval()
    infos = quantizable_layers(model, _tokens(2))
    assert [(i.name, i.type_name, i.status, i.quantizes_input) for i in infos] == [
        ("emb", "Embedding", LayerStatus.OK, False),
        ("encoder.self_attn.in_proj", "Linear", LayerStatus.OK, True),
        ("encoder.self_attn.out_proj", "Linear", LayerStatus.OK, True),
        ("encoder.linear1", "Linear", LayerStatus.OK, True),
        ("encoder.linear2", "Linear", LayerStatus.OK, True),
        ("head", "Linear", LayerStatus.OK, True),
    ]
    in_proj = infos[1]
    assert in_proj.params == 3 * E * E + 3 * E and in_proj.macs == 2 * 7 * 3 * E * E
    # The attention matmuls only on request (off by default), weightless.
    full = quantizable_layers(model, _tokens(2), attention_matmuls=True)
    assert [i.name for i in full] == quantizable_names(model)
    matmul = full[2]
    assert (matmul.name, matmul.type_name, matmul.params) == (
        "encoder.self_attn.matmul",
        "AttentionMatmul",
        0,
    )
    assert matmul.ok and not matmul.quantizes_weight and matmul.quantizes_input
    assert matmul.macs == 2 * (2 * H * 7 * (E // H)) * 7  # q k^T and probs v, L = S = 7
    assert type(model.encoder.self_attn) is nn.MultiheadAttention  # model untouched


@pytest.mark.parametrize("matmuls", [False, True])
def test_eval_mode_w8a8_token_classifier_matches_hand_written_reference(
    matmuls: bool, device: str
) -> None:
    torch.manual_seed(0)
    model = TokenClassifier().eval().to(device)
    ids, mask = (t.to(device) for t in _tokens())
    infos = quantizable_layers(model, (ids, mask), attention_matmuls=matmuls)
    plan = uniform_plan(infos, W8C, A8)
    q = apply_plan(model, plan).eval()
    layers = quantized_layers(q)
    assert list(layers) == list(plan.layers)
    assert isinstance(layers["emb"], QEmbedding) and isinstance(layers["encoder.linear1"], QLinear)
    assert isinstance(q.encoder.self_attn.matmul, QAttentionMatmul) is matmuls
    # Eval mode and no grad: exactly where PyTorch's fused fast path would skip every wrapper.
    with calibration(q), torch.no_grad():
        q(ids, mask)
    acts = [m for m in q.modules() if isinstance(m, FakeQuantize) and m.spec == A8]
    assert len(acts) == 5 + 4 * matmuls
    assert all(fq.calibrated and fq.has_observed for fq in acts)
    with torch.no_grad():
        out = q(ids, mask)
        ref = _reference(model, q, ids, mask)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(out, model(ids, mask), atol=1e-4)  # quantization is on


def test_fp32_plan_keeps_float_outputs() -> None:
    model = TokenClassifier().eval()
    ids, mask = _tokens()
    names = quantizable_names(model)
    fp16 = QuantPlan({n: LayerPlan(QuantSpec(bits="fp32"), QuantSpec(bits="fp32")) for n in names})
    with torch.no_grad():
        ref = model(ids, mask)
        torch.testing.assert_close(apply_plan(model, fp16)(ids, mask), ref, atol=0, rtol=0)
        # Only the out_proj quantized at fp16 input: the attention is made explicit, the rest
        # is float, the output stays within fp16 rounding.
        one = QuantPlan(
            {"encoder.self_attn.out_proj": LayerPlan(activation=QuantSpec(bits="fp16"))}
        )
        q = apply_plan(model, one)
        assert isinstance(q.encoder.self_attn, ExplicitMultiheadAttention)
        torch.testing.assert_close(q(ids, mask), ref, atol=2e-3, rtol=2e-3)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_nested_tensor_encoder_never_bypasses_the_simulation() -> None:
    model = TokenClassifier(encoder=True).eval()
    assert model.encoder.use_nested_tensor  # PyTorch would take the nested fast path
    ids, mask = _tokens()
    infos = quantizable_layers(model, (ids, mask))
    assert len(infos) == 2 + 2 * 4 and all(i.ok and i.calls == 1 for i in infos)
    q = apply_plan(model, uniform_plan(infos, W8C, A8)).eval()
    assert not q.encoder.use_nested_tensor and model.encoder.use_nested_tensor
    with calibration(q), torch.no_grad():
        q(ids, mask)  # raises if any quantizer saw no data
    fp16 = QuantPlan(
        {i.name: LayerPlan(activation=QuantSpec(bits="fp16")) for i in infos if i.quantizes_input}
    )
    with torch.no_grad():
        torch.testing.assert_close(
            apply_plan(model, fp16)(ids, mask), model(ids, mask), atol=5e-3, rtol=5e-3
        )


def test_transformer_layer_with_only_a_feed_forward_layer_quantized() -> None:
    model = TokenClassifier().eval()
    ids, mask = _tokens()
    q = apply_plan(model, QuantPlan({"encoder.linear1": LayerPlan(W8C, A8)})).eval()
    assert type(q.encoder.self_attn) is nn.MultiheadAttention  # attention not in the plan
    with calibration(q), torch.no_grad():
        q(ids, mask)
    assert q.encoder.linear1.act_fq.calibrated


def test_embedding_input_quantization_is_refused_with_the_layer_name() -> None:
    model = TokenClassifier()
    with pytest.raises(PlanError, match=r"layer 'emb'.*activation bits=8.*allowed values: 'fp32'"):
        apply_plan(model, QuantPlan({"emb": LayerPlan(W8C, A8)}))


def test_matmul_plan_errors_name_the_layer() -> None:
    model, name = TokenClassifier(), "encoder.self_attn.matmul"
    with pytest.raises(PlanError, match=rf"layer '{name}': weight bits=8 .*'fp32'"):
        apply_plan(model, QuantPlan({name: LayerPlan(W8C, A8)}))
    per_channel = QuantSpec(bits=8, granularity="per_channel", axis=1)
    with pytest.raises(PlanError, match=rf"layer '{name}'.*'per_tensor'"):
        apply_plan(model, QuantPlan({name: LayerPlan(activation=per_channel)}))


def test_sizes_count_in_projection_and_embedding_rows() -> None:
    model = TokenClassifier()
    w4 = QuantSpec(bits=4, granularity="per_channel")
    plan = QuantPlan(
        {
            "emb": LayerPlan(w4, QuantSpec(bits="fp32")),
            "encoder.self_attn.in_proj": LayerPlan(w4, A8),
        }
    )
    float_bytes = 4 * sum(p.numel() for p in model.parameters())
    saved_emb = 20 * E * 4 - (20 * E // 2 + 20 * 5)  # 4-bit rows + a scale/zero-point per row
    saved_in = 3 * E * E * 4 - (3 * E * E // 2 + 3 * E * 5) - 5  # + the input's scale/zp
    assert packed_size_bytes(model, plan) == float_bytes - saved_emb - saved_in
    # The attention matmuls add one input grid per operand (q, k, probabilities, v).
    with_mm = QuantPlan({**plan.layers, "encoder.self_attn.matmul": LayerPlan(activation=A8)})
    assert packed_size_bytes(model, with_mm) == packed_size_bytes(model, plan) + 4 * (4 + 1)


class CrossAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(E, H, batch_first=True)

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return self.attn(q, kv, kv, need_weights=False)[0]


class OwnForwardMHA(nn.MultiheadAttention):
    def forward(self, *args, **kwargs):  # type: ignore[override]
        return super().forward(*args, **kwargs)


class BiasKV(nn.Module):
    def __init__(self, own_forward: bool = False) -> None:
        super().__init__()
        if own_forward:
            self.attn: nn.MultiheadAttention = OwnForwardMHA(E, H)
        else:
            self.attn = nn.MultiheadAttention(E, H, add_bias_kv=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x)[0]


def test_discovery_of_attention_it_cannot_quantize_exactly() -> None:
    cross = {
        i.name: i
        for i in quantizable_layers(CrossAttention(), (torch.randn(1, 3, E), torch.randn(1, 5, E)))
    }
    assert cross["attn.in_proj"].status is LayerStatus.REUSED and cross["attn.in_proj"].calls == 2
    assert cross["attn.out_proj"].ok
    bias_kv = quantizable_layers(BiasKV(), torch.randn(3, 1, E))
    assert [(i.name, i.status) for i in bias_kv] == [("attn.out_proj", LayerStatus.NOT_WRAPPABLE)]
    assert "add_bias_kv" in bias_kv[0].reason
    own = quantizable_layers(BiasKV(own_forward=True), torch.randn(3, 1, E))
    assert [(i.name, i.status) for i in own] == [("attn.out_proj", LayerStatus.NOT_WRAPPABLE)]
    assert "OwnForwardMHA overrides MultiheadAttention.forward" in own[0].reason
    with pytest.raises(PlanError, match="unknown layer"):
        apply_plan(BiasKV(), QuantPlan({"attn.in_proj": LayerPlan(W8C, A8)}))
