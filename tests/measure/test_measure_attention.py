"""Attention deploys as simulated: the matmul operands (``<mha>.matmul``) on their four grids in
the ONNX graph, sized as the plan says; the projections (3-D inputs) on integer kernels with
float outputs (x86: fbgemm's fp32-output linear); the x86 deployment keeps what
``nn.TransformerEncoderLayer`` reads (``in_proj_bias``) and hands the LayerNorm after a quantized
residual add a float tensor; layers whose codes x86 stores too wide for its kernels run float."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from measure_models import (
    A8,
    W4C,
    TokenClassifier,
    deployed_output,
    first,
    quantized_inputs,
    seeded_layer_norms,
    token_batches,
)
from onnx import numpy_helper
from torch import nn

from autoquant.measure import (
    SATURATION_ENV,
    export_onnx,
    get_backend,
    lower_to_torch_x86,
    x86_saturates,
)
from autoquant.measure._deploy import deployed_layers
from autoquant.measure._x86_modules import IntKernelLayer, QuantizeTo
from autoquant.measure.onnx import build_qdq
from autoquant.transform import (
    ExplicitMultiheadAttention,
    packed_size_bytes,
    quantizable_layers,
    uniform_plan,
)
from autoquant.types import LayerPlan, QuantPlan, QuantSpec

MATMUL = "encoder.self_attn.matmul"
OPERANDS = ("act", "key", "prob", "value")


def _model(plan_act: QuantSpec = A8, adds: QuantSpec | None = None, weight: QuantSpec = W4C):
    torch.manual_seed(0)
    model = seeded_layer_norms(TokenClassifier("bool").eval())
    batches = token_batches("bool")
    infos = quantizable_layers(model, first(batches[0]), attention_matmuls=True)
    kwargs = {"adds": adds} if adds is not None else {}
    plan = uniform_plan([i for i in infos if i.ok], weight, plan_act, **kwargs)
    return quantized_inputs(model, plan, batches), plan, batches


def test_a_weightless_layer_deploys_by_its_operand_quantizers() -> None:
    q, plan, _ = _model()
    dl = deployed_layers(q, plan)[MATMUL]
    assert not dl.has_weight and dl.weight_q is None and dl.weight_codes is None
    assert dl.operands == ("act_fq", "key_fq", "prob_fq", "value_fq")
    assert float(dl.act_q.scale) == pytest.approx(float(q.encoder.self_attn.matmul.act_fq.scale))


@pytest.mark.parametrize("bits", [8, 5])
def test_matmul_operands_get_their_grids_in_the_graph_and_their_size(
    bits: int, tmp_path: Path
) -> None:
    q, plan, batches = _model(QuantSpec(bits=bits, symmetric=False))
    qdq = build_qdq(q, plan, first(batches[0]), batches)
    mm = q.encoder.self_attn.matmul
    inits = {i.name: numpy_helper.to_array(i) for i in qdq.proto.graph.initializer}
    quantizes = [n for n in qdq.proto.graph.node if n.op_type == "QuantizeLinear"]
    for op in OPERANDS:
        fq = getattr(mm, f"{op}_fq")
        assert float(inits[f"{MATMUL}.{op}_scale"]) == pytest.approx(float(fq.scale), rel=1e-7)
        assert int(inits[f"{MATMUL}.{op}_zero_point"]) == int(fq.zero_point)
        assert sum(n.input[1] == f"{MATMUL}.{op}_scale" for n in quantizes) == 1
    clips = [n for n in qdq.proto.graph.node if n.op_type == "Clip" and MATMUL in n.output[0]]
    assert len(clips) == (4 if bits < 8 else 0)  # a narrower grid is clamped first
    info = export_onnx(q, plan, tmp_path / "m.onnx", first(batches[0]), calib_inputs=batches)
    assert info.weight_bytes == packed_size_bytes(q, plan)  # 4 x (scale + zero point) counted
    assert "operands QuantizeLinear" in info.formats[MATMUL]


def test_projections_keep_float_outputs_from_integer_kernels_on_x86() -> None:
    q, plan, batches = _model(weight=W4C)
    low, formats = lower_to_torch_x86(q, plan, first(batches[0]), calib_inputs=batches)
    attn = low.encoder.self_attn
    assert isinstance(attn, ExplicitMultiheadAttention)
    for proj in (attn.in_proj, attn.out_proj):
        assert isinstance(proj, IntKernelLayer) and proj.float_output is not None
    # What nn.TransformerEncoderLayer reads before choosing its path is still there.
    torch.testing.assert_close(attn.in_proj_bias, q.encoder.self_attn.in_proj.bias)
    assert formats["encoder.self_attn.out_proj"].endswith("int8 kernel, out→float")
    x = torch.randn(5, 7, 16)
    with torch.no_grad():
        ref = q.encoder.self_attn.out_proj(x)
        out = low.encoder.self_attn.out_proj(x)
    torch.testing.assert_close(out, ref, atol=1e-5 * float(ref.abs().max()), rtol=0)


def test_x86_hands_floats_to_the_layer_norms_after_integer_adds() -> None:
    q, plan, batches = _model(adds=A8)
    low, _ = lower_to_torch_x86(q, plan, first(batches[0]), calib_inputs=batches)
    handed = []
    for node in low.graph.nodes:
        module = low.get_submodule(str(node.target)) if node.op == "call_module" else None
        if isinstance(module, QuantizeTo):
            (reader,) = node.users
            handed.append((str(reader.target), module.integer))
    # Each add's operands stay quint8 for quantized::add; its output goes to a LayerNorm.
    assert sorted(handed) == [
        ("_aq_add0", True),
        ("_aq_add0", True),
        ("_aq_add1", True),
        ("_aq_add1", True),
        ("encoder.norm1", False),
        ("encoder.norm2", False),
    ]
    out = deployed_output("torch-x86", q, plan, batches, batches[1])
    with torch.no_grad():
        ref = q(*batches[1])
    torch.testing.assert_close(out, ref, atol=1e-5 * float(ref.abs().max()), rtol=0)


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


@pytest.mark.parametrize(
    ("weight", "act", "saturates"),
    [
        (QuantSpec(bits=4), A8, False),  # |w| <= 7
        (QuantSpec(bits=4, symmetric=False), A8, True),  # stored -128..-113, inputs up to 255
        (QuantSpec(bits=8), QuantSpec(bits=7, symmetric=False), False),  # 2*127*127 < 2^15
        (QuantSpec(bits=8), QuantSpec(bits=7), True),  # symmetric inputs stored up to 191
        (QuantSpec(bits=8), A8, True),
    ],
    ids=["w4-a8a", "w4a-a8a", "w8-a7a", "w8-a7", "w8-a8a"],
)
def test_x86_runs_float_where_its_stored_codes_would_saturate(
    weight: QuantSpec, act: QuantSpec, saturates: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    lp = LayerPlan(weight, act)
    monkeypatch.setenv(SATURATION_ENV, "0")
    assert not x86_saturates(lp)
    monkeypatch.setenv(SATURATION_ENV, "1")
    assert x86_saturates(lp) is saturates
    torch.manual_seed(0)
    plan = QuantPlan({"fc": lp})
    batches = [torch.randn(32, 16, generator=torch.Generator().manual_seed(s)) * 3 for s in (1, 2)]
    q = quantized_inputs(Head().eval(), plan, batches)
    deployed = get_backend("torch-x86").deploy(q, plan, batches[0][:1], threads=1)
    kind = "float" if saturates else "int8"
    assert deployed.kernels == {f"{kind}:Linear": 1}
    with torch.no_grad():
        ref = q(batches[1])
    out = deployed.run(batches[1])
    torch.testing.assert_close(out, ref, atol=1e-5 * float(ref.abs().max()), rtol=0)
