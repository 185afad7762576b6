"""Models, plans and helpers shared by the measure tests (imported by name)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autoquant.transform import apply_plan, calibration
from autoquant.types import LayerPlan, QuantPlan, QuantSpec


class TinyResNet(nn.Module):
    """Conv+BN stem, one residual block (float add), a Conv1d branch, a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.seq = nn.Conv1d(8, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 16, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn(self.stem(x)))
        y = F.relu(self.conv1(x))
        x = F.relu(self.conv2(y) + x)
        x = F.max_pool2d(x, 2).flatten(2)  # [N, 8, 16]: a sequence for the Conv1d
        x = F.relu(self.seq(x))
        return self.fc(x.flatten(1))


LAYERS = ["stem", "conv1", "conv2", "seq", "fc"]


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    model = TinyResNet().eval()
    with torch.no_grad():  # non-trivial BN statistics, so folding matters
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model


def resnet8() -> nn.Module:
    """CIFAR ResNet-8 (RGB stem, two zero-padding shortcuts) with non-trivial BN statistics."""
    from autoquant.tasks import CifarResNet

    torch.manual_seed(0)
    model = CifarResNet(8).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def calib_inputs(n: int = 4, batch: int = 16) -> list[Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(batch, 3, 8, 8, generator=gen) for _ in range(n)]


def w8a8(names: Iterable[str] = LAYERS, per_channel: bool = True) -> QuantPlan:
    return QuantPlan.uniform(
        names,
        QuantSpec(bits=8, granularity="per_channel" if per_channel else "per_tensor"),
        QuantSpec(bits=8, symmetric=False),
    )


def mixed_plan() -> QuantPlan:
    """4- and 8-bit weights, sym/asym and sub-8-bit inputs, one fp16 layer."""
    return QuantPlan(
        {
            "stem": LayerPlan(QuantSpec(bits=8, granularity="per_channel"), QuantSpec(bits=8)),
            "conv1": LayerPlan(
                QuantSpec(bits=4, granularity="per_channel"), QuantSpec(bits=6, symmetric=False)
            ),
            "conv2": LayerPlan(
                QuantSpec(bits=4, symmetric=False), QuantSpec(bits=8, symmetric=False)
            ),
            "seq": LayerPlan(QuantSpec(bits="fp16"), QuantSpec(bits="fp16")),
            "fc": LayerPlan(QuantSpec(bits=6, granularity="per_channel"), QuantSpec(bits=5)),
        }
    )


def quantized(model: nn.Module, plan: QuantPlan, batches: Iterable[Tensor]) -> nn.Module:
    """apply_plan + calibration on ``batches``."""
    q = apply_plan(model, plan)
    with calibration(q):
        for x in batches:
            q(x)
    return q.eval()


# Models users bring (tokens, transformers, subclasses) and the deployed-equals-simulated check
BACKENDS = ("onnxruntime", "torch-x86")
A8 = QuantSpec(bits=8, symmetric=False)
W8C = QuantSpec(bits=8, granularity="per_channel")
W4C = QuantSpec(bits=4, granularity="per_channel")
VOCAB, SEQ, EMBED, HEADS = 30, 7, 16, 2


class TokenClassifier(nn.Module):
    """``nn.Embedding`` + ``nn.TransformerEncoderLayer(batch_first=True)`` + mean pooling +
    ``nn.Linear``. ``mask``: ``None`` (ids only), ``"bool"`` or ``"float"`` (a second input,
    1/True for a real token: the padding mask and the pooling read it)."""

    def __init__(self, mask: str | None = None, layers: int = 1, norm_first: bool = False):
        super().__init__()
        self.mask = mask
        self.emb = nn.Embedding(VOCAB, EMBED, padding_idx=0)
        layer = nn.TransformerEncoderLayer(
            EMBED, HEADS, 32, dropout=0.0, batch_first=True, norm_first=norm_first
        )
        self.encoder = (
            layer
            if layers == 1
            else nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        )
        self.head = nn.Linear(EMBED, 3)

    def forward(self, ids: Tensor, keep: Tensor | None = None) -> Tensor:
        if keep is None:
            return self.head(self.encoder(self.emb(ids)).mean(1))
        # A float padding mask is additive (a large negative value on padded keys).
        pad = ~keep if self.mask == "bool" else (1.0 - keep) * -1e4
        x = self.encoder(self.emb(ids), src_key_padding_mask=pad)
        w = keep.to(x.dtype).unsqueeze(-1)
        return self.head((x * w).sum(1) / w.sum(1))


def token_batches(mask: str | None, n: int = 3, batch: int = 16) -> list[Tensor | tuple]:
    """Token ids (int64, padded at the end with id 0 as tokenizers do) and, with ``mask``, the
    keep mask as bool or float."""
    out: list[Tensor | tuple] = []
    for s in range(n):
        g = torch.Generator().manual_seed(100 + s)
        ids = torch.randint(1, VOCAB, (batch, SEQ), generator=g)
        keep = torch.ones(batch, SEQ, dtype=torch.bool)
        for i in range(batch):
            keep[i, SEQ - (i % 3) :] = False
        ids[~keep] = 0
        if mask is None:
            out.append(ids)
        else:
            out.append((ids, keep if mask == "bool" else keep.float()))
    return out


def seeded_layer_norms(model: nn.Module) -> nn.Module:
    """Give every LayerNorm non-trivial parameters (as a trained model has: equal parameters
    of freshly initialised LayerNorms would be stored once by the ONNX exporter)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
    return model


def quantized_inputs(model: nn.Module, plan: QuantPlan, batches: Iterable) -> nn.Module:
    """apply_plan + calibration on ``batches`` of any input form."""
    from autoquant.transform import call_model

    q = apply_plan(model, plan)
    with calibration(q):
        for x in batches:
            call_model(q, x)
    return q.eval()


def first(x: Tensor | tuple) -> Tensor | tuple:
    """The first sample of a batch, in the same form (the example input of a deployment)."""
    return tuple(t[:1] for t in x) if isinstance(x, tuple) else x[:1]


def deployed_output(
    backend: str, q: nn.Module, plan: QuantPlan | None, batches: list, x: Tensor | tuple
) -> Tensor:
    """``q`` (calibrated on ``batches``) deployed on ``backend``, run on ``x``."""
    from autoquant.measure import get_backend

    deployed = get_backend(backend).deploy(
        q, plan, first(batches[0]), threads=1, calib_inputs=batches
    )
    return deployed.run(x)


def assert_deploys_like(out: Tensor, ref: Tensor, *, rounded: bool = False) -> None:
    """The deployed outputs are the simulated ones.

    Where every integer layer's output is float or lands exactly on the grid the simulation
    quantizes it to next, both compute the same values in another order: float rounding
    (~1e-7 relative), and, rarely, a value that rounding moves across a quantization tie, so
    that one code of one activation differs by one step (an output then moves by one step
    times a weight: at most ~1 % of the range here). Hence: nearly all outputs equal (within
    1e-5 of the range), none off by more than 2 %. A systematic difference (a missing or extra
    quantizer, a wrong grid or scale) moves most outputs and fails the first check.

    ``rounded``: some integer layer's output is rounded onto an 8-bit grid by arithmetic the
    simulation does not share: a calibrated grid of the observed range (a convolution with no
    exact grid after it: up to half a step, 0.2 % of the range), or ONNX Runtime's QLinearConv,
    which adds the float bias as int32 steps of ``S_in * S_w`` (up to half such a step: with
    4-bit weights a few percent of an output step, so some next-layer codes move by one). Then
    many outputs move by a step or two: a mean error under 0.5 % of the range, none over 2 %.
    """
    assert out.shape == ref.shape and out.dtype == ref.dtype
    scale = float(ref.abs().max())
    err = (out - ref).abs()
    assert float(err.max()) <= 0.02 * scale, f"max error {float(err.max()):.3g} of {scale:.3g}"
    if rounded:
        assert float(err.mean()) <= 0.005 * scale, f"mean error {float(err.mean()):.3g}"
    else:
        equal = float((err <= 1e-5 * scale).float().mean())
        assert equal >= 0.9, f"only {equal:.0%} of the outputs equal the simulation"
