"""Weight-only embeddings: per-row or per-tensor, 2..8 bits, against torch's fake-quant ops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autoquant.transform import (
    LayerStatus,
    QEmbedding,
    QEmbeddingBag,
    apply_plan,
    calibration,
    packed_size_bytes,
    quantizable_layers,
    size_breakdown,
)
from autoquant.types import LayerPlan, PlanError, QuantPlan, QuantSpec

V, D = 11, 6
FP32 = QuantSpec(bits="fp32")


def reference_rows(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Fake-quant of the table with qparams from the closed form (per row on axis 0, or one
    for the whole table), computed by torch's own kernels."""
    w = w.detach()
    qmin, qmax = spec.qrange
    flat = w.double() if spec.per_channel else w.double().reshape(1, -1)
    lo, hi = flat.amin(1).clamp(max=0), flat.amax(1).clamp(min=0)
    eps = torch.finfo(torch.float32).eps  # an all-zero row (padding_idx): the smallest step
    if spec.symmetric:
        scale = (torch.maximum(-lo, hi) / qmax).clamp(min=eps)
        zp = torch.zeros_like(scale)
    else:
        scale = ((hi - lo) / (qmax - qmin)).clamp(min=eps)
        zp = torch.round(qmax - hi / scale).clamp(qmin, qmax)
    scale, zp = scale.float(), zp.int()
    if spec.per_channel:
        return torch.fake_quantize_per_channel_affine(w, scale, zp, 0, qmin, qmax)
    return torch.fake_quantize_per_tensor_affine(w, float(scale), int(zp), qmin, qmax)


class Bag(nn.Module):
    def __init__(self, bag: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.EmbeddingBag(V, D, mode="mean") if bag else nn.Embedding(V, D, padding_idx=0)
        self.fc = nn.Linear(D, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        return self.fc(x if x.ndim == 2 else x.mean(1))


IDS = torch.tensor([[0, 3, 5, 10], [1, 1, 2, 0]])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
@pytest.mark.parametrize("bag", [False, True])
def test_embedding_rows_match_torch_fake_quant(bits, symmetric, granularity, bag) -> None:
    model = Bag(bag).eval()
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity=granularity)
    q = apply_plan(model, QuantPlan({"emb": LayerPlan(spec, FP32)}))
    assert isinstance(q.emb, QEmbeddingBag if bag else QEmbedding)
    with calibration(q):  # weight-only: no batch needed
        pass
    table = reference_rows(model.emb.weight, spec)
    with torch.no_grad():
        ref = F.embedding_bag(IDS, table, mode="mean") if bag else F.embedding(IDS, table)
        torch.testing.assert_close(q.emb(IDS), ref, atol=0, rtol=0)
        assert not torch.equal(q.emb(IDS), model.emb(IDS))
        if not bag:  # the padding row stays exactly zero
            assert torch.equal(q.emb(torch.tensor([0])), torch.zeros(1, D))
    if granularity == "per_channel":
        assert q.emb.weight_fq.scale.shape == (V,)  # one scale per row


def test_qat_reaches_the_embedding_weights() -> None:
    q = apply_plan(Bag(False), QuantPlan({"emb": LayerPlan(QuantSpec(bits=4), FP32)}))
    with calibration(q):
        q(IDS)
    q(IDS).sum().backward()
    grad = q.emb.weight.grad
    assert grad is not None and grad[[3, 5, 10, 1, 2]].abs().sum() > 0
    assert grad[[4, 6, 7, 8, 9]].abs().sum() == 0  # rows never looked up: no gradient


@pytest.mark.parametrize("act", [QuantSpec(bits=8), QuantSpec(bits="fp16")])
def test_input_quantization_of_an_embedding_is_a_plan_error(act: QuantSpec) -> None:
    with pytest.raises(PlanError, match=r"layer 'emb'.*do not quantize their input"):
        apply_plan(Bag(False), QuantPlan({"emb": LayerPlan(QuantSpec(bits=4), act)}))


def test_packed_size_of_rows_and_their_qparams() -> None:
    model = Bag(False)
    spec = QuantSpec(bits=3, granularity="per_channel", symmetric=False)
    plan = QuantPlan({"emb": LayerPlan(spec, FP32)})
    rows = {r.role: r for r in size_breakdown(model, plan) if r.layer == "emb"}
    assert set(rows) == {"weight", "weight_scale", "weight_zero_point"}  # no input qparams
    assert rows["weight"].bytes == math.ceil(V * D * 3 / 8) and rows["weight_scale"].numel == V
    fc_bytes = 4 * (D * 2 + 2)
    assert packed_size_bytes(model, plan) == math.ceil(V * D * 3 / 8) + V * (4 + 1) + fc_bytes


def test_discovery_of_embeddings() -> None:
    infos = quantizable_layers(Bag(False), IDS)
    assert [(i.name, i.type_name, i.macs, i.quantizes_input, i.status) for i in infos] == [
        ("emb", "Embedding", 0, False, LayerStatus.OK),
        ("fc", "Linear", 2 * 2 * D, True, LayerStatus.OK),
    ]
    bag = quantizable_layers(Bag(True), IDS)[0]
    assert (bag.type_name, bag.macs, bag.quantizes_input) == (
        "EmbeddingBag",
        IDS.numel() * D,
        False,
    )


def test_max_norm_embedding_is_reported_and_refused() -> None:
    model = Bag(False)
    model.emb.max_norm = 1.0
    info = quantizable_layers(model, IDS)[0]
    assert info.status is LayerStatus.NOT_WRAPPABLE and "max_norm" in info.reason
    with pytest.raises(PlanError, match="layer 'emb'.*max_norm"):
        apply_plan(model, QuantPlan({"emb": LayerPlan(QuantSpec(bits=4), FP32)}))
