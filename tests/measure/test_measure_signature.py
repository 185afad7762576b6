from __future__ import annotations

import pytest
from measure_models import LAYERS, tiny_model, w8a8
from torch import nn

from autoquant.measure import architecture_hash, graph_signature, tensor_format
from autoquant.transform import apply_plan, fold_batchnorm
from autoquant.types import LayerPlan, QuantPlan, QuantSpec


def _plan(weight: QuantSpec, act: QuantSpec, layer: str = "conv1") -> QuantPlan:
    return QuantPlan({layer: LayerPlan(weight, act)})


def test_fake_quant_model_hashes_like_its_folded_float_model() -> None:
    model = tiny_model()
    q = apply_plan(model, w8a8())
    assert architecture_hash(q) == architecture_hash(fold_batchnorm(model))
    assert architecture_hash(model) != architecture_hash(fold_batchnorm(model))  # BN -> Identity
    other = tiny_model()
    other.fc = nn.Linear(64, 11)
    assert architecture_hash(other) != architecture_hash(model)


@pytest.mark.parametrize(
    "a, b",
    [
        # weight bits below 8 run in the same int8 kernel
        ((QuantSpec(bits=4), QuantSpec(bits=8)), (QuantSpec(bits=8), QuantSpec(bits=8))),
        # calibration method, percentile and LSQ do not change the kernel
        (
            (QuantSpec(bits=8, calibration="mse"), QuantSpec(bits=8, calibration="kl")),
            (QuantSpec(bits=8, learned_scale=True), QuantSpec(bits=8, calibration="percentile")),
        ),
        # sub-8-bit inputs all run as a clamped 8-bit input
        ((QuantSpec(bits=8), QuantSpec(bits=4)), (QuantSpec(bits=8), QuantSpec(bits=6))),
        # fp32/fp32 in a plan is the same graph as the layer left out
        ((QuantSpec(bits="fp32"), QuantSpec(bits="fp32")), None),
    ],
)
def test_same_kernel_same_signature(a: tuple, b: tuple | None, vnni: None) -> None:
    model = fold_batchnorm(tiny_model())
    pa = _plan(*a)
    pb = _plan(*b) if b else QuantPlan()
    assert graph_signature(model, pa) == graph_signature(model, pb)


@pytest.mark.parametrize(
    "a, b",
    [
        ((QuantSpec(bits=8), QuantSpec(bits=8)), (QuantSpec(bits="fp32"), QuantSpec(bits="fp32"))),
        ((QuantSpec(bits=8), QuantSpec(bits=8)), (QuantSpec(bits=8), QuantSpec(bits="fp32"))),
        (
            (QuantSpec(bits=8), QuantSpec(bits=8)),
            (QuantSpec(bits=8), QuantSpec(bits=8, symmetric=False)),
        ),
        (
            (QuantSpec(bits=8), QuantSpec(bits=8)),
            (QuantSpec(bits=8, granularity="per_channel"), QuantSpec(bits=8)),
        ),
        ((QuantSpec(bits=8), QuantSpec(bits=8)), (QuantSpec(bits=8), QuantSpec(bits=6))),
        ((QuantSpec(bits="fp16"), QuantSpec(bits=8)), (QuantSpec(bits="fp32"), QuantSpec(bits=8))),
    ],
)
def test_different_kernel_different_signature(a: tuple, b: tuple) -> None:
    model = fold_batchnorm(tiny_model())
    assert graph_signature(model, _plan(*a)) != graph_signature(model, _plan(*b))


def test_signature_depends_on_layer_and_architecture() -> None:
    model = fold_batchnorm(tiny_model())
    spec = (QuantSpec(bits=8), QuantSpec(bits=8))
    sigs = {graph_signature(model, _plan(*spec, layer=n)) for n in LAYERS}
    assert len(sigs) == len(LAYERS)
    other = tiny_model()
    other.conv1 = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
    assert graph_signature(fold_batchnorm(other), _plan(*spec)) != graph_signature(
        model, _plan(*spec)
    )


def test_tensor_formats() -> None:
    assert tensor_format(QuantSpec(bits=3, symmetric=False), activation=False).key() == "uint8"
    assert tensor_format(QuantSpec(bits=7), activation=True).key() == "int8+clip"
    assert (
        tensor_format(QuantSpec(bits=8, granularity="per_channel", axis=1), activation=True).key()
        == "int8/c"
    )
    assert tensor_format(QuantSpec(bits="fp16"), activation=True).key() == "fp16"


def test_a_new_export_revision_invalidates_cached_onnx_latencies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from autoquant.measure import onnx as onnx_export
    from autoquant.measure._latency import latency_key

    def key(backend: str) -> str:
        return latency_key("sig", backend, 1, 1, (3, 8, 8))

    before = {b: key(b) for b in ("onnxruntime", "torch-x86")}
    assert key("onnxruntime") == before["onnxruntime"]  # deterministic
    monkeypatch.setattr(onnx_export, "EXPORT_REVISION", onnx_export.EXPORT_REVISION + 1)
    assert key("onnxruntime") != before["onnxruntime"]
    assert key("torch-x86") == before["torch-x86"]
