"""A new layer type plugs in with one wrapper (simulation) and one deployment declaration: a toy
embedding deploys weight-only as ``Gather`` on ONNX Runtime and in float on torch-x86."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from measure_models import quantized
from onnx import numpy_helper
from torch import Tensor, nn

from autoquant.measure import (
    OnnxOp,
    deployment_of,
    get_backend,
    register_deployment,
    unregister_deployment,
)
from autoquant.measure.onnx import build_qdq, fused_op_types, ort_session
from autoquant.transform import QuantizedLayer, apply_plan, register_quantizable
from autoquant.transform._registry import _REGISTRY
from autoquant.types import LayerPlan, PlanError, QuantPlan, QuantSpec

W4C = QuantSpec(bits=4, granularity="per_channel")
FP32 = QuantSpec(bits="fp32")
A8 = QuantSpec(bits=8, symmetric=False)


class ToyEmbedding(nn.Module):
    """A lookup table (a type the project does not know)."""

    def __init__(self, n: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, dim))

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.weight)


class QToyEmbedding(QuantizedLayer, ToyEmbedding):
    quantizes_input = False  # weight-only: the ids are never quantized

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.weight_fq(self.weight))


class TokenNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = ToyEmbedding(30, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, ids: Tensor) -> Tensor:
        return self.fc(self.emb(ids).mean(1))


@pytest.fixture
def toy_type() -> Iterator[None]:
    register_quantizable(ToyEmbedding)(QToyEmbedding)  # the simulation (transform)
    register_deployment(  # the deployment: the one declaration a new type needs
        ToyEmbedding,
        onnx=[OnnxOp("Gather", weight_input=0, data_input=1, bias_input=None)],
        integer_kernel=False,
    )
    yield
    _REGISTRY.pop(ToyEmbedding, None)
    unregister_deployment(ToyEmbedding)


PLAN = QuantPlan({"emb": LayerPlan(W4C, FP32), "fc": LayerPlan(QuantSpec(bits=4), A8)})


def _ids(n: int, seed: int) -> Tensor:
    return torch.randint(0, 30, (n, 5), generator=torch.Generator().manual_seed(seed))


def _toy() -> tuple[nn.Module, list[Tensor]]:
    torch.manual_seed(0)
    batches = [_ids(16, s) for s in range(2)]
    return quantized(TokenNet().eval(), PLAN, batches), batches


def test_a_registered_type_exports_as_gather_on_its_integer_codes(toy_type: None) -> None:
    q, batches = _toy()
    qdq = build_qdq(q, PLAN, batches[0][:1], batches)
    inits = {i.name: numpy_helper.to_array(i) for i in qdq.proto.graph.initializer}
    codes = inits["emb.weight_quantized"]
    assert codes.dtype == np.int8 and codes.shape == (30, 8) and np.abs(codes).max() <= 7
    np.testing.assert_array_equal(codes, qdq.layers["emb"].weight_codes)
    gather = next(n for n in qdq.proto.graph.node if n.op_type == "Gather")
    assert gather.input[0] == "emb.weight_dequantized"  # weight-only: ids stay int64
    ops = fused_op_types(qdq.proto)
    assert ops["Gather"] == 1 and ops["QGemm"] == 1
    x = _ids(32, 7)
    out = ort_session(qdq.proto).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = q(x).numpy()
    np.testing.assert_allclose(out, ref, atol=1e-5 * np.abs(ref).max())


def test_a_registered_type_runs_simulated_on_torch_x86(toy_type: None) -> None:
    q, batches = _toy()
    deployed = get_backend("torch-x86").deploy(
        q, PLAN, batches[0][:1], threads=1, calib_inputs=batches
    )
    assert deployed.kernels == {"float:ToyEmbedding": 1, "int8:Linear": 1}
    x = torch.cat(batches)  # within the calibrated output range
    with torch.no_grad():
        ref = q(x)
    out = deployed.run(x)
    # The Linear's output gets a calibrated 8-bit grid on x86 (its kernel's output is integer).
    assert (out - ref).abs().max() <= 0.02 * ref.abs().max()


def test_subclasses_deploy_like_their_registered_base() -> None:
    class Wide(nn.Linear):
        pass

    assert deployment_of(Wide(2, 2)) is deployment_of(nn.Linear)
    assert deployment_of(nn.Module()) is None


def test_a_type_without_deployment_is_a_clear_error(toy_type: None) -> None:
    q, batches = _toy()
    unregister_deployment(ToyEmbedding)
    with pytest.raises(PlanError, match=r"'emb' \(ToyEmbedding\) has no deployment.*register_"):
        build_qdq(q, PLAN, batches[0][:1])


def test_a_weight_only_type_rejects_a_quantized_input(toy_type: None) -> None:
    plan = QuantPlan({"emb": LayerPlan(W4C, A8)})
    with pytest.raises(PlanError, match="'emb'.*do not quantize their input.*'fp32'"):
        apply_plan(TokenNet().eval(), plan)  # before any calibration or deployment


def test_bad_declarations_name_the_field() -> None:
    with pytest.raises(ValueError, match="layout='flipped' is not allowed"):
        OnnxOp("Gemm", layout="flipped")
    with pytest.raises(ValueError, match="onnx=.*one or more OnnxOp"):
        register_deployment(ToyEmbedding, onnx=[])
