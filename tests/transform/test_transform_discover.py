"""Layer discovery: one forward pass finds layers never called, called twice, whose output is
unused, or that cannot be wrapped; the simulation of the others matches a reference."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autoquant.transform import (
    LayerInfo,
    LayerStatus,
    apply_plan,
    calibration,
    excluded_layers_message,
    quantizable_layers,
    trace_dataflow,
    uniform_plan,
)
from autoquant.types import QuantSpec

W8C = QuantSpec(bits=8, granularity="per_channel")
A8 = QuantSpec(bits=8, symmetric=False)


def statuses(model: nn.Module, x) -> dict[str, tuple[LayerStatus, int]]:
    return {i.name: (i.status, i.calls) for i in quantizable_layers(model, x)}


class ReusedLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(torch.relu(self.fc(x))))


class ReusedConv(nn.Module):
    def __init__(self, bn: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3) if bn else nn.Identity()
        self.out = nn.Conv2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.conv(torch.relu(self.bn(self.conv(x)))))


class Pooler(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(8, 8)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class Encoder(nn.Module):
    """HF-style: returns (sequence output, pooled output)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 8)
        self.layer = nn.Linear(8, 8)
        self.pooler = Pooler()
        self.unused = nn.Linear(8, 8)  # never called

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.layer(self.emb(ids)) * mask.unsqueeze(-1)
        return hidden, self.pooler(hidden)


class MeanPooled(nn.Module):
    """Mean pooling over the mask: the encoder's pooler output is dropped."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = Encoder()
        self.classifier = nn.Linear(8, 2)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.encoder(ids, mask)
        keep = mask.unsqueeze(-1).float()
        return self.classifier((hidden * keep).sum(1) / keep.sum(1))


IDS = torch.tensor([[1, 5, 7, 0], [2, 9, 0, 0]])
MASK = (IDS != 0).long()


def test_reused_linear() -> None:
    assert statuses(ReusedLinear(), torch.randn(2, 4)) == {
        "fc": (LayerStatus.REUSED, 2),
        "head": (LayerStatus.OK, 1),
    }


@pytest.mark.parametrize("bn", [True, False])
def test_reused_conv_with_and_without_bn(bn: bool) -> None:
    model = ReusedConv(bn).eval()
    x = torch.randn(2, 3, 6, 6)
    info = {i.name: i for i in quantizable_layers(model, x)}
    assert (info["conv"].status, info["conv"].calls) == (LayerStatus.REUSED, 2)
    assert "called 2 times" in info["conv"].reason and "deepcopy" in info["conv"].reason
    assert info["out"].ok and info["out"].macs == 2 * 2 * 36 * 3
    # The search keeps the ok layers: the reused conv stays float, its BN unfolded.
    q = apply_plan(model, uniform_plan([i for i in info.values() if i.ok], W8C, A8))
    assert isinstance(q.bn, type(model.bn))
    with calibration(q), torch.no_grad():
        q(x)
    with torch.no_grad():  # reference: the float model up to the last conv, quantized by hand
        hidden = model.conv(torch.relu(model.bn(model.conv(x))))
        lo, hi = min(hidden.min().item(), 0.0), max(hidden.max().item(), 0.0)
        scale = (hi - lo) / 255
        hq = torch.fake_quantize_per_tensor_affine(hidden, scale, round(255 - hi / scale), 0, 255)
        w = model.out.weight
        ws = w.abs().amax((1, 2, 3)) / 127
        wq = torch.fake_quantize_per_channel_affine(
            w, ws, torch.zeros(2, dtype=torch.int32), 0, -127, 127
        )
        torch.testing.assert_close(q(x), F.conv2d(hq, wq, model.out.bias), atol=1e-5, rtol=1e-5)


def test_unused_output_never_called_and_multi_input() -> None:
    model = MeanPooled()
    infos = quantizable_layers(model, (IDS, MASK))
    assert {i.name: (i.status, i.calls) for i in infos} == {
        "encoder.emb": (LayerStatus.OK, 1),
        "encoder.layer": (LayerStatus.OK, 1),
        "encoder.pooler.dense": (LayerStatus.OUTPUT_UNUSED, 1),
        "encoder.unused": (LayerStatus.NEVER_CALLED, 0),
        "classifier": (LayerStatus.OK, 1),
    }
    by_name = {i.name: i for i in infos}
    assert by_name["encoder.unused"].macs == 0
    assert "never reaches the model output" in by_name["encoder.pooler.dense"].reason
    # The bare encoder returns the pooled output: there the pooler is used.
    enc = statuses(model.encoder, (IDS, MASK))
    assert enc["pooler.dense"] == (LayerStatus.OK, 1)


def _fq_rows(w: torch.Tensor) -> torch.Tensor:
    scale = (w.detach().abs().amax(1) / 127).float()
    zp = torch.zeros(w.shape[0], dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(w.detach(), scale, zp, 0, -127, 127)


def _fq_range(x: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    lo, hi = min(observed.min().item(), 0.0), max(observed.max().item(), 0.0)
    scale = (hi - lo) / 255
    return torch.fake_quantize_per_tensor_affine(x, scale, round(255 - hi / scale), 0, 255)


def test_multi_input_model_quantized_on_its_ok_layers_matches_a_reference() -> None:
    torch.manual_seed(0)
    model = MeanPooled().eval()
    ok = [i for i in quantizable_layers(model, (IDS, MASK)) if i.ok]
    q = apply_plan(model, uniform_plan(ok, W8C, A8))
    assert type(q.encoder.pooler.dense) is nn.Linear and type(q.encoder.unused) is nn.Linear
    with calibration(q), torch.no_grad():
        q(IDS, MASK)
    enc, keep = model.encoder, MASK.unsqueeze(-1).float()
    with torch.no_grad():  # ranges as calibration saw them: on the float model
        emb_float = enc.emb(IDS)
        pooled_float = ((enc.layer(emb_float) * keep).sum(1)) / keep.sum(1)
        emb = F.embedding(IDS, _fq_rows(enc.emb.weight))
        hidden = F.linear(_fq_range(emb, emb_float), _fq_rows(enc.layer.weight), enc.layer.bias)
        pooled = (hidden * MASK.unsqueeze(-1) * keep).sum(1) / keep.sum(1)
        ref = F.linear(
            _fq_range(pooled, pooled_float),
            _fq_rows(model.classifier.weight),
            model.classifier.bias,
        )
        torch.testing.assert_close(q(IDS, MASK), ref, atol=1e-5, rtol=1e-5)


def test_excluded_layers_message_lists_each_layer_and_how_to_include_it() -> None:
    message = excluded_layers_message(quantizable_layers(MeanPooled(), (IDS, MASK)))
    assert message is not None and message.startswith("autoquant: 2 layers excluded")
    lines = message.splitlines()[1:]
    assert [line.split()[0] for line in lines] == ["encoder.pooler.dense", "encoder.unused"]
    assert "use its output, or remove it" in lines[0]
    assert "make the example input reach it" in lines[1]
    assert excluded_layers_message([LayerInfo("a", "Linear", 1, 1)]) is None


def test_discovery_leaves_the_model_alone() -> None:
    model = ReusedConv(bn=True).train()
    before = copy.deepcopy(model.state_dict())
    quantizable_layers(model, torch.randn(4, 3, 6, 6))
    assert all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # BN statistics untouched
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


class ArgmaxOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).argmax(-1)


def test_output_without_a_graph_is_not_guessed() -> None:
    # Integer outputs carry no autograd graph: usage is unknown, so nothing is excluded.
    assert statuses(ArgmaxOutput(), torch.randn(2, 4)) == {"fc": (LayerStatus.OK, 1)}


def test_dataflow_consumers_and_reachability() -> None:
    net = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    flow = trace_dataflow(net, torch.randn(1, 3), {"0": net[0], "2": net[2]})
    assert flow.has_graph and flow.output_used("0") and flow.output_used("2")
    # Linear 0's (marked) output has exactly one consumer, the ReLU.
    (consumer,) = flow.consumers[flow.modules["0"].nodes[0]]
    assert type(consumer).__name__.startswith("Relu")
    assert flow.modules["2"].input_nodes[0] is consumer
