"""Models users bring, deployed on both backends exactly as simulated: a token-id transformer
classifier (ids only, or ids with a bool or float mask; w8a8, a mixed 4/8-bit plan with a
4-bit embedding, the attention matmuls, integer residual adds), Linear and Conv2d subclasses
with their own forward, a reused module with and without a BatchNorm after one use, a layer
whose output is dropped, a multi-input model, and a tiny Hugging Face BERT.

Plans are built as the search builds them: ``uniform_plan`` over the ``ok`` layers of
``quantizable_layers``. ``assert_deploys_like`` (``measure_models``) says what "equal" means.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from measure_models import (
    A8,
    BACKENDS,
    W4C,
    W8C,
    TokenClassifier,
    assert_deploys_like,
    deployed_output,
    first,
    quantized_inputs,
    seeded_layer_norms,
    token_batches,
)
from torch import Tensor, nn

from autoquant.measure import get_backend
from autoquant.transform import (
    LayerStatus,
    apply_plan,
    call_model,
    quantizable_layers,
    uniform_plan,
)
from autoquant.types import FP32, LayerPlan, QuantPlan, QuantSpec


def _ok_plan(
    model: nn.Module,
    example: Tensor | tuple,
    weight: QuantSpec = W8C,
    activation: QuantSpec = A8,
    **kwargs: object,
) -> QuantPlan:
    infos = quantizable_layers(model, example, attention_matmuls=bool(kwargs.pop("matmuls", 0)))
    return uniform_plan([i for i in infos if i.ok], weight, activation, **kwargs)  # type: ignore[arg-type]


def _mixed(plan: QuantPlan) -> QuantPlan:
    """4- and 8-bit weights, a 4-bit per-row embedding, a 6-bit and a symmetric input."""
    layers = dict(plan.layers)
    layers["emb"] = LayerPlan(W4C, FP32)
    layers["encoder.self_attn.in_proj"] = LayerPlan(W4C, A8)
    layers["encoder.self_attn.out_proj"] = LayerPlan(W8C, QuantSpec(bits=8))
    layers["encoder.linear1"] = LayerPlan(QuantSpec(bits=4), QuantSpec(bits=6, symmetric=False))
    layers["head"] = LayerPlan(QuantSpec(bits=4, symmetric=False), A8)
    return QuantPlan(layers, adds=plan.adds)


def _token_model(mask: str | None, **kwargs: object) -> tuple[nn.Module, list]:
    torch.manual_seed(0)
    model = seeded_layer_norms(TokenClassifier(mask, **kwargs).eval())  # type: ignore[arg-type]
    return model, token_batches(mask)


def _simulated(q: nn.Module, x: Tensor | tuple) -> Tensor:
    with torch.no_grad():
        return call_model(q, x)


@pytest.mark.parametrize("mixed", [False, True], ids=["w8a8", "mixed"])
@pytest.mark.parametrize("mask", [None, "bool", "float"], ids=["ids", "ids+bool", "ids+float"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_token_transformer_deploys_like_the_simulation(
    backend: str, mask: str | None, mixed: bool
) -> None:
    model, batches = _token_model(mask)
    plan = _ok_plan(model, first(batches[0]))
    assert list(plan.layers) == [
        "emb",
        "encoder.self_attn.in_proj",
        "encoder.self_attn.out_proj",
        "encoder.linear1",
        "encoder.linear2",
        "head",
    ]
    plan = _mixed(plan) if mixed else plan
    q = quantized_inputs(model, plan, batches)
    x = batches[1]
    ref = _simulated(q, x)
    assert not torch.allclose(ref, _simulated(model, x), atol=1e-3)  # quantization is on
    assert_deploys_like(deployed_output(backend, q, plan, batches, x), ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", [8, 6])
def test_attention_matmuls_and_integer_adds_deploy_like_the_simulation(
    backend: str, bits: int
) -> None:
    model, batches = _token_model("bool", layers=2)
    act = QuantSpec(bits=bits, symmetric=False)
    plan = _ok_plan(model, first(batches[0]), W4C, act, adds=A8, matmuls=True)
    assert "encoder.layers.1.self_attn.matmul" in plan.layers
    # Calibrated on two sequences: other inputs leave the ranges, so the grids clip.
    q = quantized_inputs(model, plan, [tuple(t[:2] for t in batches[0])])
    x = batches[2]
    ref = _simulated(q, x)
    deployed = get_backend(backend).deploy(
        q, plan, first(batches[0]), threads=1, calib_inputs=batches
    )
    assert_deploys_like(deployed.run(x), ref)
    if backend == "onnxruntime":  # the residual adds and the linears run on integers
        assert deployed.kernels["QLinearAdd"] == 4
        assert deployed.kernels["MatMulIntegerToFloat"] >= 8
    else:
        assert deployed.kernels["int8:add"] == 4 and deployed.kernels["int8:Linear"] == 9
    matmul = deployed.formats["encoder.layers.0.self_attn.matmul"]
    assert "operands" in matmul and ("clip" in matmul) == (bits < 8)


# Subclasses with their own forward ------------------------------------------------------------
class PreScaledConv(nn.Conv2d):
    """Scales its input before the primitive and shifts the output after it."""

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(2.0 * x, self.weight, self.bias) + 1.0


class ShiftedLinear(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x - 0.5) * 0.5 + 1.0


class Subclasses(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = PreScaledConv(3, 4, 3, padding=1)
        self.fc1 = nn.Linear(4 * 6 * 6, 16)
        self.fc2 = ShiftedLinear(16, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1)))
        return self.fc2(h)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("backend", BACKENDS)
def test_subclasses_with_their_own_forward_deploy_like_the_simulation(
    backend: str, bits: int
) -> None:
    torch.manual_seed(0)
    model = Subclasses().eval()
    batches = [torch.randn(16, 3, 6, 6, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    infos = quantizable_layers(model, batches[0])
    assert [(i.name, i.type_name, i.status) for i in infos] == [
        ("conv", "Conv2d", LayerStatus.OK),
        ("fc1", "Linear", LayerStatus.OK),
        ("fc2", "Linear", LayerStatus.OK),
    ]
    w = QuantSpec(bits=bits, granularity="per_channel")
    plan = uniform_plan(infos, w, A8)
    q = quantized_inputs(model, plan, batches)
    x = batches[1]
    ref = _simulated(q, x)
    # The conv's integer output goes on to its own forward (+ 1): a calibrated grid. fc1's
    # reaches fc2 only through fc2's own forward (x - 0.5): a float output, exact.
    assert_deploys_like(deployed_output(backend, q, plan, batches, x), ref, rounded=True)


def test_the_output_grid_of_a_subclass_is_calibrated_on_its_primitive() -> None:
    # An integer kernel outputs what the primitive computes, not what the subclass returns.
    from autoquant.measure._deploy import output_ranges

    torch.manual_seed(0)
    batches = [torch.randn(16, 3, 6, 6, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    plan = QuantPlan.uniform(["conv", "fc1", "fc2"], W4C, A8)
    q = quantized_inputs(Subclasses().eval(), plan, batches)
    conv = q.conv
    with torch.no_grad():
        prim = torch.cat(
            [
                F.conv2d(conv.act_fq(2.0 * x), conv.weight_fq(conv.weight), conv.bias, padding=1)
                for x in batches
            ]
        )
    lo, hi = output_ranges(q, ["conv"], batches)["conv"]
    assert (lo, hi) == pytest.approx((float(prim.min()), float(prim.max())), abs=1e-6)


# A reused module, with and without a BatchNorm after one of its uses -----------------------
class Reused(nn.Module):
    def __init__(self, bn: bool) -> None:
        super().__init__()
        self.shared = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3) if bn else nn.Identity()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.shared(x))
        h = torch.relu(self.bn(self.shared(h)))  # the BN follows the second use only
        return self.fc(torch.relu(self.conv(h)).flatten(1))


def _reused(bn: bool) -> tuple[nn.Module, list[Tensor]]:
    torch.manual_seed(0)
    model = Reused(bn).eval()
    if bn:
        with torch.no_grad():
            model.bn.running_mean.uniform_(-0.5, 0.5)
            model.bn.running_var.uniform_(0.5, 2.0)
            model.bn.weight.uniform_(0.5, 2.0)
            model.bn.bias.uniform_(-1.0, 1.0)
    return model, [
        torch.randn(16, 3, 6, 6, generator=torch.Generator().manual_seed(s)) for s in (1, 2)
    ]


@pytest.mark.parametrize("bn", [False, True], ids=["no-bn", "bn"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_reused_module_is_excluded_and_never_folded_wrongly(backend: str, bn: bool) -> None:
    model, batches = _reused(bn)
    infos = quantizable_layers(model, batches[0])
    assert {i.name: i.status for i in infos} == {
        "shared": LayerStatus.REUSED,
        "conv": LayerStatus.OK,
        "fc": LayerStatus.OK,
    }
    x = batches[1]
    # An fp32 plan: the deployed model is the eager float model (BN applied to one use only).
    fp32 = _ok_plan(model, x[:1], FP32, FP32)
    q32 = apply_plan(model, fp32, example_input=x[:1])
    with torch.no_grad():
        eager = model(x)
    out = deployed_output(backend, q32, fp32, [x], x)
    torch.testing.assert_close(out, eager, atol=1e-5 * float(eager.abs().max()), rtol=1e-5)
    # The other layers quantized: the remaining plan deploys exactly.
    plan = _ok_plan(model, x[:1], W4C, A8)
    q = quantized_inputs(model, plan, batches)
    assert isinstance(q.get_submodule("bn"), nn.BatchNorm2d if bn else nn.Identity)  # not folded
    # ONNX Runtime's QLinearConv adds the conv's bias in int32 steps (see assert_deploys_like).
    out = deployed_output(backend, q, plan, batches, x)
    assert_deploys_like(out, _simulated(q, x), rounded=backend == "onnxruntime")


# A layer whose output is dropped (a BERT pooler) ---------------------------------------------
class WithPooler(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.pooler = nn.Linear(16, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.fc1(x))
        torch.tanh(self.pooler(h[:, 0]))  # computed, then dropped
        return self.fc2(h.mean(1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_layer_whose_output_is_dropped_is_excluded_and_the_rest_deploys(backend: str) -> None:
    torch.manual_seed(0)
    model = WithPooler().eval()
    batches = [torch.randn(16, 5, 8, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    infos = quantizable_layers(model, batches[0])
    assert {i.name: i.status for i in infos}["pooler"] is LayerStatus.OUTPUT_UNUSED
    plan = uniform_plan([i for i in infos if i.ok], W4C, A8)
    assert set(plan.layers) == {"fc1", "fc2"}
    q = quantized_inputs(model, plan, batches)
    assert_deploys_like(
        deployed_output(backend, q, plan, batches, batches[1]), _simulated(q, batches[1])
    )


# Several inputs of several dtypes ------------------------------------------------------------
class MultiInput(nn.Module):
    """int64 ids in fixed-size bags (an EmbeddingBag), float features and a bool flag."""

    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(40, 8, mode="mean")
        self.dense = nn.Linear(6, 8)
        self.head = nn.Linear(16, 3)

    def forward(self, ids: Tensor, features: Tensor, flag: Tensor) -> Tensor:
        h = torch.cat([self.bag(ids), F.relu(self.dense(features))], dim=1)
        return self.head(h) * flag.to(h.dtype).unsqueeze(1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_multi_input_model_deploys_like_the_simulation(backend: str) -> None:
    torch.manual_seed(0)
    model = MultiInput().eval()

    def batch(seed: int) -> tuple[Tensor, Tensor, Tensor]:
        g = torch.Generator().manual_seed(seed)
        flag = torch.rand(16, generator=g) > 0.2
        return torch.randint(0, 40, (16, 4), generator=g), torch.randn(16, 6, generator=g), flag

    batches = [batch(s) for s in (1, 2, 3)]
    plan = _mixed_bag(_ok_plan(model, first(batches[0])))
    q = quantized_inputs(model, plan, batches)
    assert_deploys_like(
        deployed_output(backend, q, plan, batches, batches[1]), _simulated(q, batches[1])
    )


def _mixed_bag(plan: QuantPlan) -> QuantPlan:
    assert plan.layers["bag"] == LayerPlan(W8C, FP32)  # weight-only: the ids stay int64
    return QuantPlan({**plan.layers, "bag": LayerPlan(W4C, FP32)})


# Hugging Face BERT ---------------------------------------------------------------------------
class BertClassifier(nn.Module):
    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert
        self.head = nn.Linear(bert.config.hidden_size, 3)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        h = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        keep = mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(1) / keep.sum(1))


def _tiny_bert() -> nn.Module:
    transformers = pytest.importorskip(
        "transformers",
        reason="Hugging Face transformers is not installed (pip install 'autoquant[nlp]')",
    )
    config = transformers.BertConfig(
        vocab_size=VOCAB_BERT,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    return seeded_layer_norms(BertClassifier(transformers.BertModel(config)).eval())


VOCAB_BERT = 50


def _bert_batches() -> list[tuple[Tensor, Tensor]]:
    out = []
    for s in range(3):
        g = torch.Generator().manual_seed(s)
        ids = torch.randint(1, VOCAB_BERT, (8, 7), generator=g)
        mask = torch.ones(8, 7, dtype=torch.long)
        for i in range(8):
            mask[i, 7 - (i % 3) :] = 0
        out.append((ids * mask, mask))
    return out


@pytest.mark.filterwarnings("ignore:autoquant. BertClassifier cannot be traced")
@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_hugging_face_bert_deploys_like_the_simulation_with_integer_adds(
    backend: str,
) -> None:
    model = _tiny_bert()
    batches = _bert_batches()
    infos = quantizable_layers(model, first(batches[0]))
    statuses = {i.name: i.status for i in infos}
    assert statuses.pop("bert.pooler.dense") is LayerStatus.OUTPUT_UNUSED
    assert len(statuses) == 3 + 2 * 6 + 1 and all(s is LayerStatus.OK for s in statuses.values())
    plan = uniform_plan([i for i in infos if i.ok], W8C, A8, adds=A8)
    q = quantized_inputs(model, plan, batches)
    x = batches[1]
    deployed = get_backend(backend).deploy(
        q, plan, first(batches[0]), threads=1, calib_inputs=batches
    )
    assert_deploys_like(deployed.run(x), _simulated(q, x))
    # The two residual adds of each layer (BertSelfOutput, BertOutput) run on integers.
    adds = deployed.kernels.get("QLinearAdd" if backend == "onnxruntime" else "int8:add")
    assert adds == 4
