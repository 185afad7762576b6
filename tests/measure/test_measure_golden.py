"""Exports of fixed models and plans are the graphs recorded in ``golden_exports.json``.

The digests were recorded with the single-module exporter (``measure/_onnx.py``, before the
pass package): the pass split must not change any exported graph. A digest covers the complete
model that :func:`~autoquant.measure.load_onnx` returns (every node with its inputs, outputs
and attributes, every initializer's bytes, graph inputs and outputs, opsets, metadata), with
nodes and initializers sorted by name (their order in the protobuf is not part of the graph),
plus the bytes of ONNX Runtime's output on a fixed input and the export's size figures; and the
digest of the ``.onnx`` file's bytes.

The graph digests depend on the exporter (torch) and onnx versions, the output digests also on
ONNX Runtime and the CPU (its kernels); each is checked only where they match the recording.
The torch-x86 backend's per-layer notes (its output grids) are recorded too. Re-record (after a
deliberate change of the exported graph, with a new ``EXPORT_REVISION``) with
``AUTOQUANT_WRITE_GOLDEN=1``.

Re-recorded on purpose since: the torch-x86 notes of ``tokens-mixed`` (x86 reads its output
grids from the ``torch.fx`` graph, which sees a 3-D Linear's whole output: exact, not
calibrated), and the file digests of the exports with sub-8-bit weights (``model.onnx`` now holds
their int8 codes too, so that it loads in a plain ONNX Runtime session; the graph digests, which
cover the complete model, did not change); and the torch-x86 notes of every final Linear
(``out→quint8 (calibrated range)`` became ``out→float``: x86 Linears now keep a float output
straight from fbgemm's int8 kernel where no exact grid follows, as ONNX Runtime's QGemm does),
and, in ``resnet8-mixed-saturating``, the x86 notes of the two layers with asymmetric 6-bit
weights and 7-bit symmetric inputs: float kernels now, since the codes x86 stores for them
(weights down to -128, inputs up to 191) saturate u8×s8 kernels without VNNI
(:func:`~autoquant.measure.x86_saturates`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torch.nn.functional as F
from measure_models import calib_inputs, mixed_plan, quantized, resnet8, tiny_model, w8a8
from torch import nn

from autoquant.measure import (
    SATURATION_ENV,
    export_onnx,
    load_onnx,
    lower_to_torch_x86,
    ort_session,
)
from autoquant.tasks import DigitsCNN, LeNet5
from autoquant.transform import quantizable_names
from autoquant.types import LayerPlan, QuantPlan, QuantSpec

GOLDEN = Path(__file__).with_name("golden_exports.json")
WRITE_ENV = "AUTOQUANT_WRITE_GOLDEN"
A8 = QuantSpec(bits=8, symmetric=False)
W8 = QuantSpec(bits=8, granularity="per_channel")


def _versions() -> dict[str, str]:
    from autoquant.measure import machine_info

    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "cpu": machine_info()["cpu"],
    }


_GRAPH_KEYS = ("torch", "onnx")


def canonical_digest(proto: onnx.ModelProto) -> str:
    """SHA-256 of the model with nodes and initializers in name order."""
    from onnx import numpy_helper

    g = proto.graph
    nodes = sorted(
        (
            n.name,
            n.op_type,
            n.domain,
            list(n.input),
            list(n.output),
            sorted(a.SerializeToString().hex() for a in n.attribute),
        )
        for n in g.node
    )
    inits = sorted(
        (
            i.name,
            int(i.data_type),
            list(i.dims),
            hashlib.sha256(numpy_helper.to_array(i).tobytes()).hexdigest(),
        )
        for i in g.initializer
    )
    payload = {
        "ir": proto.ir_version,
        "opsets": sorted((o.domain, o.version) for o in proto.opset_import),
        "inputs": [i.SerializeToString().hex() for i in g.input],
        "outputs": [o.SerializeToString().hex() for o in g.output],
        "value_info": sorted(v.SerializeToString().hex() for v in g.value_info),
        "props": sorted((p.key, p.value) for p in proto.metadata_props),
        "nodes": nodes,
        "initializers": inits,
    }
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


# Models --------------------------------------------------------------------------------------
class _PaddedShortcut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x) + x
        return self.conv2(h) + F.pad(h, (0, 0, 0, 0, 0, 4))


class _Transformer(nn.Module):
    """A post-norm encoder layer on float tokens, pooled: attention, LayerNorms, residual adds."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(6, 2, 12, dropout=0.0, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(1))


class _Tokens(nn.Module):
    """A Linear on a 3-D input (MatMul + Add), a bias-free Linear (Gemm), a pooled head."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.proj(x)).transpose(1, 2)  # [N, 8, T]
        h = F.adaptive_avg_pool1d(torch.relu(self.conv(h)), 1).flatten(1)
        return self.head(h)


def _batches(shape: tuple[int, ...], n: int = 3, seed: int = 5) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(16, *shape, generator=gen) for _ in range(n)]


def _seeded(factory: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return factory().eval()


def _case(
    factory: Callable[[], nn.Module],
    plan: Callable[[nn.Module], QuantPlan | None],
    shape: tuple[int, ...],
    saturates: bool = False,
) -> dict[str, object]:
    return {"factory": factory, "plan": plan, "shape": shape, "saturates": saturates}


def _all(spec: LayerPlan, adds: QuantSpec | None = None) -> Callable[[nn.Module], QuantPlan]:
    def make(model: nn.Module) -> QuantPlan:
        layers = {n: spec for n in quantizable_names(model)}
        return QuantPlan(layers, adds=adds) if adds else QuantPlan(layers)

    return make


W8A8 = LayerPlan(W8, A8)


def _all_with_matmuls(adds: QuantSpec) -> Callable[[nn.Module], QuantPlan]:
    """w4a8 on every layer, the attention matmuls' operands on 8-bit grids, 8-bit adds."""

    def make(model: nn.Module) -> QuantPlan:
        layers = {
            n: LayerPlan(QuantSpec(bits="fp32"), A8)
            if n.endswith(".matmul")
            else LayerPlan(QuantSpec(bits=4, granularity="per_channel"), A8)
            for n in quantizable_names(model)
        }
        return QuantPlan(layers, adds=adds)

    return make


ODD = QuantPlan(
    {
        "conv1": LayerPlan(
            QuantSpec(bits=3, symmetric=False),
            QuantSpec(bits=8, granularity="per_channel", axis=1),
        ),
        "fc": LayerPlan(QuantSpec(bits="fp16"), QuantSpec(bits=8)),
        "stem": LayerPlan(QuantSpec(bits=2), QuantSpec(bits="fp32")),
    }
)
MIXED_CYCLE = [
    LayerPlan(W8, QuantSpec(bits=8)),
    LayerPlan(QuantSpec(bits=4, granularity="per_channel"), A8),
    LayerPlan(QuantSpec(bits=6, granularity="per_channel", symmetric=False), QuantSpec(bits=7)),
]


def _cycled(adds: QuantSpec | None = None) -> Callable[[nn.Module], QuantPlan]:
    def make(model: nn.Module) -> QuantPlan:
        names = quantizable_names(model)
        layers = {n: MIXED_CYCLE[i % 3] for i, n in enumerate(names)}
        return QuantPlan(layers, adds=adds) if adds else QuantPlan(layers)

    return make


CASES: dict[str, dict[str, object]] = {
    "tiny-float": _case(tiny_model, lambda m: None, (3, 8, 8)),
    "tiny-w8a8": _case(tiny_model, lambda m: w8a8(), (3, 8, 8)),
    "tiny-w8a8-saturating": _case(tiny_model, lambda m: w8a8(), (3, 8, 8), saturates=True),
    "tiny-w8a8-per-tensor": _case(tiny_model, lambda m: w8a8(per_channel=False), (3, 8, 8)),
    "tiny-mixed": _case(tiny_model, lambda m: mixed_plan(), (3, 8, 8)),
    "tiny-odd": _case(tiny_model, lambda m: ODD, (3, 8, 8)),
    "tiny-int8-adds": _case(tiny_model, lambda m: QuantPlan(w8a8().layers, adds=A8), (3, 8, 8)),
    "resnet8-int8-adds": _case(resnet8, _all(W8A8, A8), (3, 32, 32)),
    "resnet8-mixed-int8-adds": _case(resnet8, _cycled(A8), (3, 32, 32)),
    "resnet8-mixed-saturating": _case(resnet8, _cycled(), (3, 32, 32), saturates=True),
    "padded-shortcut": _case(lambda: _seeded(_PaddedShortcut), _all(W8A8, A8), (4, 6, 6)),
    "digits-mixed": _case(lambda: _seeded(DigitsCNN), _cycled(), (1, 8, 8)),
    "lenet5-w8a8-saturating": _case(
        lambda: _seeded(LeNet5), _all(W8A8), (1, 32, 32), saturates=True
    ),
    "tokens-mixed": _case(lambda: _seeded(_Tokens), _cycled(), (5, 6)),
    # Recorded when attention matmuls and transformer adds began to deploy (EXPORT_REVISION 3).
    "transformer-matmul-int8-adds": _case(
        lambda: _seeded(_Transformer), _all_with_matmuls(A8), (5, 6)
    ),
}


def _record(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    case = CASES[name]
    monkeypatch.setenv(SATURATION_ENV, "1" if case["saturates"] else "0")
    model = case["factory"]()  # type: ignore[operator]
    plan = case["plan"](model)  # type: ignore[operator]
    shape = case["shape"]
    batches = _batches(shape)  # type: ignore[arg-type]
    if plan is not None:
        model = quantized(model, plan, batches)
    path = tmp_path / "m.onnx"
    info = export_onnx(model, plan, path, batches[0][:1], calib_inputs=batches)
    proto = load_onnx(path)
    x = _batches(shape, 1, seed=11)[0]  # type: ignore[arg-type]
    out = ort_session(proto).run(None, {"input": x.numpy()})[0]
    x86 = lower_to_torch_x86(model, plan, batches[0][:1], calib_inputs=batches)[1] if plan else {}
    return {
        "x86_formats": x86,
        "file": hashlib.sha256(path.read_bytes()).hexdigest(),
        "graph": canonical_digest(proto),
        "ort_output": hashlib.sha256(np.ascontiguousarray(out).tobytes()).hexdigest(),
        "weight_bytes": info.weight_bytes,
        "extra_bytes": info.extra_bytes,
        "requant": info.requant,
        "packed": info.packed,
    }


def _golden() -> dict[str, object]:
    return json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}


@pytest.mark.parametrize("name", sorted(CASES))
def test_export_is_the_recorded_graph(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    got = _record(name, tmp_path, monkeypatch)
    golden = _golden()
    if os.environ.get(WRITE_ENV) == "1":
        golden.setdefault("versions", _versions())
        golden.setdefault("cases", {})[name] = got
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
        return
    recorded, now = golden.get("versions", {}), _versions()
    if any(recorded.get(k) != now[k] for k in _GRAPH_KEYS):
        pytest.skip(f"golden exports recorded with {recorded}, not {now}")
    want = dict(golden["cases"][name])
    if recorded != now:  # other kernels may round differently: compare the graphs only
        want.pop("ort_output")
        got.pop("ort_output")
    assert got == want


def test_canonical_digest_sees_a_changed_attribute_but_not_the_node_order() -> None:
    model = tiny_model()
    path_proto = _float_proto(model)
    base = canonical_digest(path_proto)
    reordered = onnx.ModelProto()
    reordered.CopyFrom(path_proto)
    nodes = list(reordered.graph.node)
    del reordered.graph.node[:]
    reordered.graph.node.extend(reversed(nodes))
    assert canonical_digest(reordered) == base
    changed = onnx.ModelProto()
    changed.CopyFrom(path_proto)
    conv = next(n for n in changed.graph.node if n.op_type == "Conv")
    next(a for a in conv.attribute if a.name == "pads").ints[0] = 2
    assert canonical_digest(changed) != base


def _float_proto(model: nn.Module) -> onnx.ModelProto:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(model, None, Path(tmp) / "f.onnx", calib_inputs(1, 1)[0])
        return load_onnx(Path(tmp) / "f.onnx")
