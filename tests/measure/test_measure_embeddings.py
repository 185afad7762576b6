"""Embeddings deploy weight-only: on ONNX Runtime as a gather of integer rows dequantized after
the lookup (never the whole table), on torch-x86 as torch.ao's 8-bit rowwise table; fixed-size
embedding bags as a gather and a reduction. Sizes are the packed sizes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from measure_models import A8, BACKENDS, W4C, deployed_output, quantized_inputs
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor, nn

from autoquant.measure import (
    artifact_weight_bytes,
    export_onnx,
    fused_op_types,
    get_backend,
    graph_signature,
    read_sidecar,
)
from autoquant.measure.onnx import build_qdq
from autoquant.transform import packed_size_bytes
from autoquant.types import FP32, LayerPlan, PlanError, QuantPlan, QuantSpec

V, D = 40, 8


class Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D, padding_idx=0)
        self.fc = nn.Linear(D, 3)

    def forward(self, ids: Tensor) -> Tensor:
        return self.fc(self.emb(ids).mean(1))


def _ids(seed: int, n: int = 16) -> Tensor:
    return torch.randint(0, V, (n, 6), generator=torch.Generator().manual_seed(seed))


def _plan(emb: QuantSpec) -> QuantPlan:
    return QuantPlan({"emb": LayerPlan(emb, FP32), "fc": LayerPlan(W4C, A8)})


def _quantized(emb: QuantSpec) -> tuple[nn.Module, QuantPlan, list[Tensor]]:
    torch.manual_seed(0)
    plan = _plan(emb)
    batches = [_ids(s) for s in range(3)]
    return quantized_inputs(Tokens().eval(), plan, batches), plan, batches


ROWS4 = QuantSpec(bits=4, granularity="per_channel")
ROWS3_ASYM = QuantSpec(bits=3, symmetric=False, granularity="per_channel")
TENSOR8 = QuantSpec(bits=8)
COLUMNS6 = QuantSpec(bits=6, granularity="per_channel", axis=1)


def test_rows_are_gathered_as_integers_and_only_those_dequantized() -> None:
    q, plan, batches = _quantized(ROWS4)
    qdq = build_qdq(q, plan, batches[0][:1], batches)
    inits = {i.name: numpy_helper.to_array(i) for i in qdq.proto.graph.initializer}
    codes = inits["emb.weight_quantized"]
    assert codes.dtype == np.int8 and codes.shape == (V, D) and np.abs(codes).max() <= 7
    np.testing.assert_array_equal(codes, qdq.layers["emb"].weight_codes)
    assert inits["emb.weight_scale"].shape == (V, 1) and inits["emb.weight_zero_point"].shape == (
        V,
        1,
    )
    readers = [n for n in qdq.proto.graph.node if "emb.weight_quantized" in n.input]
    assert [n.op_type for n in readers] == ["Gather"]  # the table itself is never dequantized
    # What ONNX Runtime runs: gathers of codes, scales and zero-points; no table dequantized.
    ops = fused_op_types(qdq.proto)
    assert ops["Gather"] >= 3 and ops["QGemm"] == 1
    x = _ids(7)
    out = ort.InferenceSession(qdq.proto.SerializeToString()).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = q(x).numpy()
    np.testing.assert_allclose(out, ref, atol=1e-6 * np.abs(ref).max(), rtol=0)
    assert qdq.formats["emb"].endswith(
        "lookup: integer rows gathered, then dequantized (only the rows read)"
    )


@pytest.mark.parametrize("spec", [ROWS4, ROWS3_ASYM, TENSOR8, COLUMNS6], ids=str)
def test_gathered_rows_are_the_simulated_rows_bit_for_bit(spec: QuantSpec) -> None:
    q, plan, batches = _quantized(spec)
    qdq = build_qdq(q, plan, batches[0][:1], batches)
    rows = qdq.nodes["emb"].node.output[0]  # the lookup's output keeps the export's name
    qdq.proto.graph.output.append(helper.make_tensor_value_info(rows, TensorProto.FLOAT, None))
    x = _ids(9)
    out = ort.InferenceSession(qdq.proto.SerializeToString()).run([rows], {"input": x.numpy()})
    with torch.no_grad():
        ref = q.emb(x).numpy()
    # (q - zp) * scale in float, as the fake-quantizer computes it: the same float operations.
    np.testing.assert_array_equal(out[0], ref)


@pytest.mark.parametrize(
    "spec", [ROWS4, ROWS3_ASYM, TENSOR8, COLUMNS6, QuantSpec(bits="fp16")], ids=str
)
def test_sizes_are_the_packed_size_and_the_model_loads_plainly(
    spec: QuantSpec, tmp_path: Path
) -> None:
    q, plan, batches = _quantized(spec)
    info = export_onnx(q, plan, tmp_path / "m.onnx", batches[0][:1], calib_inputs=batches)
    assert info.weight_bytes == artifact_weight_bytes(info.path) == packed_size_bytes(q, plan)
    bits = spec.bits
    if isinstance(bits, int) and bits < 8:
        packed = read_sidecar(info.sidecar)["emb.weight_quantized"]
        assert packed.bits == bits and packed.data.nbytes == -(-V * D * bits // 8)
    x = _ids(5)
    session = ort.InferenceSession(str(info.path))  # plain load
    with torch.no_grad():
        ref = q(x).numpy()
    out = session.run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(out, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)


@pytest.mark.parametrize("spec", [ROWS4, ROWS3_ASYM, TENSOR8], ids=str)
def test_x86_runs_torch_ao_rowwise_tables_with_the_simulated_codes(spec: QuantSpec) -> None:
    import torch.ao.nn.quantized as nnq

    from autoquant.measure import lower_to_torch_x86
    from autoquant.measure._x86_modules import LookupLayer

    q, plan, batches = _quantized(spec)
    low, formats = lower_to_torch_x86(q, plan, batches[0][:1], calib_inputs=batches)
    assert isinstance(low.emb, LookupLayer) and isinstance(low.emb.qlayer, nnq.Embedding)
    table = low.emb.qlayer.weight()
    with torch.no_grad():
        simulated = q.emb.weight_fq(q.emb.weight)
    # Exactly the simulated codes (sub-8-bit ones as 8-bit codes on their own grid).
    torch.testing.assert_close(table.dequantize(), simulated, atol=1e-6, rtol=0)
    assert "8-bit rowwise" in formats["emb"]
    x = _ids(3)
    with torch.no_grad():
        ref = q.emb(x)
        out = low.emb(x)
    # q * scale + bias per row, with bias = -zp * scale: within one float rounding of
    # (q - zp) * scale (equal for symmetric rows, whose bias is -128 * scale).
    torch.testing.assert_close(out, ref, atol=2e-7 * float(ref.abs().max()), rtol=0)
    assert torch.equal(low.emb.weight, simulated)  # float weight kept for code that reads it


def test_latency_signatures_tell_the_embedding_kernels_apart() -> None:
    model = Tokens().eval()
    sig = {
        k: graph_signature(model, _plan(s))
        for k, s in {
            "w4": ROWS4,
            "w8": QuantSpec(bits=8, granularity="per_channel"),
            "per_tensor": QuantSpec(bits=4),
            "fp32": FP32,
        }.items()
    }
    assert sig["w4"] == sig["w8"]  # same kernels (8-bit codes), other packed size
    assert len({sig["w4"], sig["per_tensor"], sig["fp32"]}) == 3


# Embedding bags -------------------------------------------------------------------------------
class Bags(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(V, D, mode=mode)
        self.fc = nn.Linear(D, 3)

    def forward(self, ids: Tensor, weights: Tensor | None = None) -> Tensor:
        return self.fc(self.bag(ids, per_sample_weights=weights))


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fixed_size_bags_deploy_like_the_simulation(backend: str, mode: str) -> None:
    torch.manual_seed(0)
    plan = QuantPlan({"bag": LayerPlan(ROWS4, FP32), "fc": LayerPlan(W4C, A8)})
    batches = [_ids(s) for s in range(3)]
    q = quantized_inputs(Bags(mode).eval(), plan, batches)
    out = deployed_output(backend, q, plan, batches, batches[1])
    with torch.no_grad():
        ref = q(batches[1])
    torch.testing.assert_close(out, ref, atol=1e-5 * float(ref.abs().max()), rtol=0)
    if backend == "onnxruntime":
        return
    kernels = get_backend(backend).deploy(q, plan, batches[0][:1], threads=1).kernels
    # torch.ao's rowwise bag is exact for sums only; mean and max use a float table.
    assert kernels[f"{'int8' if mode == 'sum' else 'float'}:EmbeddingBag"] == 1


def test_per_sample_weights_of_a_sum_bag_deploy() -> None:
    torch.manual_seed(0)
    plan = QuantPlan({"bag": LayerPlan(ROWS4, FP32)})
    ids = [_ids(s) for s in range(2)]
    batches = [(i, torch.rand(i.shape, generator=torch.Generator().manual_seed(9))) for i in ids]
    q = quantized_inputs(Bags("sum").eval(), plan, batches)
    with torch.no_grad():
        ref = q(*batches[1])
    for backend in BACKENDS:
        out = deployed_output(backend, q, plan, batches, batches[1])
        torch.testing.assert_close(out, ref, atol=1e-5 * float(ref.abs().max()), rtol=0)


class Offsets(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(V, D, mode="sum")

    def forward(self, ids: Tensor) -> Tensor:
        flat = ids.flatten()
        offsets = torch.arange(0, flat.numel(), ids.shape[1])
        return self.bag(flat, offsets)


def test_bags_with_offsets_are_refused_on_onnx_runtime_and_run_on_x86() -> None:
    torch.manual_seed(0)
    plan = QuantPlan({"bag": LayerPlan(ROWS4, FP32)})
    batches = [_ids(s) for s in range(2)]
    q = quantized_inputs(Offsets().eval(), plan, batches)
    with pytest.raises(PlanError, match=r"layer 'bag' \(EmbeddingBag\).*fixed-size bags only"):
        build_qdq(q, plan, batches[0][:2], batches)
    with torch.no_grad():
        ref = q(batches[1])
    out = deployed_output("torch-x86", q, plan, batches, batches[1])
    torch.testing.assert_close(out, ref, atol=1e-5 * float(ref.abs().max()), rtol=0)
