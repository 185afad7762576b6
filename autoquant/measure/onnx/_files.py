"""Files of an export: the ONNX model, the packed sub-8-bit weights, and their size rows.

``model.onnx`` is complete whatever the bit widths: it loads in a plain
``onnxruntime.InferenceSession``. A weight below 8 bits is stored there as int8/uint8 codes
(its values on the narrow grid: ONNX Runtime's integer kernels take 8-bit weights), and, when
there is one, also bit-packed in the sidecar ``weights.packed.npz`` next to it: the size-true
artifact. :func:`artifact_weight_bytes` (the size objective) counts the packed bytes; the
8-bit copies in ``model.onnx`` are size rows of role ``unpacked``, counted in neither
:attr:`ExportInfo.weight_bytes` nor :attr:`ExportInfo.extra_bytes`.

Why not ONNX INT4/UINT4 initializers (measured with ONNX Runtime 1.32, see BENCHMARKS.md):
``DequantizeLinear`` reading INT4 runs, but ONNX Runtime then fuses
no integer kernel (float Conv/Gemm on dequantized weights); an INT4 initializer ``Cast`` to int8
keeps the fused kernels, but needs opset 21 for the whole graph (the TorchScript exporter stops
at 20, and ops such as ReduceMean changed since 17), stores 2- and 3-bit weights in 4 bits and
5- to 7-bit ones in 8, so it is not the packed size either.

Exports written before (sub-8-bit weights only in the sidecar) still load with
:func:`load_onnx`, which restores them.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper
from torch import nn

from autoquant.measure._pack import (
    SIDECAR_NAME,
    PackedTensor,
    pack_bits,
    read_sidecar,
    write_sidecar,
)
from autoquant.measure.onnx._manager import ROLES_KEY, QDQModel, build_qdq
from autoquant.measure.onnx.passes.requantize_outputs import requant_text
from autoquant.transform import Inputs
from autoquant.types import QuantPlan

#: Tensor roles counted by :func:`artifact_weight_bytes` (the roles of
#: :func:`autoquant.transform.size_breakdown`).
SIZE_ROLES = (
    "weight",
    "weight_scale",
    "weight_zero_point",
    "act_scale",
    "act_zero_point",
    "bias",
    "param",
)
SIDECAR_KEY = "autoquant.sidecar"


@dataclass
class ExportInfo:
    """What :func:`export_onnx` wrote.

    Attributes:
        path: the ONNX file (complete: it loads in a plain ``onnxruntime.InferenceSession``).
        sidecar: the packed sub-8-bit weights, or None when every weight is 8-bit or float.
        formats: per plan layer, how it runs (see :func:`describe_layer`).
        requant: per integer layer, how its output is quantized (``exact``, ``calibrated``,
            ``float``).
        weight_bytes: :func:`artifact_weight_bytes` of the written files.
        extra_bytes: bytes of deployment-only tensors not in the size objective (calibrated
            output qparams, clip bounds).
        packed: the initializers stored bit-packed in the sidecar.
    """

    path: Path
    sidecar: Path | None
    formats: dict[str, str]
    requant: dict[str, str]
    weight_bytes: int
    extra_bytes: int
    packed: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "sidecar": str(self.sidecar) if self.sidecar else None,
            "formats": self.formats,
            "requant": self.requant,
            "weight_bytes": self.weight_bytes,
            "extra_bytes": self.extra_bytes,
            "packed": self.packed,
        }


def packed_weights(qdq: QDQModel) -> dict[str, PackedTensor]:
    """The sub-8-bit weight initializers of ``qdq``, bit-packed, by initializer name."""
    packed = {}
    for name, dl in qdq.layers.items():
        q = dl.weight_q
        bits = dl.plan.weight.bits
        if q is not None and int(bits) < 8:
            key = f"{name}.weight_quantized"
            codes = dl.weight_codes
            arr = np.ascontiguousarray(codes.T if qdq.nodes[name].transposed else codes)
            packed[key] = PackedTensor(
                key,
                int(bits),
                q.qmin,
                tuple(arr.shape),
                dl.format.weight.storage,
                pack_bits(arr, int(bits), q.qmin),
            )
    return packed


def export_onnx(
    model: nn.Module,
    plan: QuantPlan | None,
    path: str | Path,
    example_input: Inputs,
    *,
    calib_inputs: Iterable[Inputs] | None = None,
) -> ExportInfo:
    """Write the deployable QDQ ONNX model of a calibrated fake-quant ``model``.

    Args:
        model: the calibrated (and possibly fine-tuned) result of
            :func:`autoquant.transform.apply_plan`; a float model with ``plan=None``.
        plan: the plan ``model`` was built from.
        path: the ``.onnx`` file to write (complete, whatever the bit widths); a sidecar
            ``weights.packed.npz`` with the bit-packed sub-8-bit weights is written next to it
            when some weight has fewer than 8 bits (see the module doc).
        example_input: an input batch (any batch size: the batch axis is dynamic).
        calib_inputs: inputs to observe output ranges on, for layers whose output needs its
            own 8-bit grid; default ``[example_input]``. Pass real calibration batches for an
            accurate artifact.

    Example:
        >>> import tempfile
        >>> import torch
        >>> from torch import nn
        >>> from autoquant.transform import apply_plan, calibration, packed_size_bytes
        >>> from autoquant.types import QuantSpec
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2))
        >>> plan = QuantPlan.uniform(["0", "3"], QuantSpec(bits=4), QuantSpec(bits=8))
        >>> q = apply_plan(net, plan)
        >>> with calibration(q):
        ...     _ = q(torch.randn(8, 1, 4, 4))
        >>> info = export_onnx(q, plan, tempfile.mkdtemp() + "/m.onnx", torch.randn(1, 1, 4, 4))
        >>> info.sidecar.name, info.weight_bytes == packed_size_bytes(q, plan)
        ('weights.packed.npz', True)
        >>> import onnxruntime  # model.onnx is complete: a plain session runs it
        >>> onnxruntime.InferenceSession(str(info.path)).run(None, {"input": np.ones((2, 1, 4, 4),
        ...     np.float32)})[0].shape
        (2, 2)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    qdq = build_qdq(model, plan, example_input, calib_inputs)
    proto = qdq.proto
    packed = packed_weights(qdq)
    sidecar = path.parent / SIDECAR_NAME
    if packed:
        write_sidecar(sidecar, packed)
        proto = copy.deepcopy(proto)
        onnx.helper.set_model_props(
            proto,
            {**{p.key: p.value for p in proto.metadata_props}, SIDECAR_KEY: SIDECAR_NAME},
        )
    else:
        sidecar.unlink(missing_ok=True)
    onnx.save(proto, str(path))
    rows = artifact_size_rows(path)
    return ExportInfo(
        path=path,
        sidecar=sidecar if packed else None,
        formats=qdq.formats,
        requant={n: requant_text(r) for n, r in qdq.requant.items()},
        weight_bytes=sum(r["bytes"] for r in rows if r["role"] in SIZE_ROLES),
        extra_bytes=sum(r["bytes"] for r in rows if r["role"] in ("extra", "constant")),
        packed=sorted(packed),
    )


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """Load an exported model; a sub-8-bit weight missing from the file (an export written
    before ``model.onnx`` held them) is restored from the sidecar.

    Returns a complete ``onnx.ModelProto`` (int8/uint8 initializers) ready for ONNX Runtime.

    Raises:
        FileNotFoundError: weights are missing and so is the sidecar holding them.
    """
    path = Path(path)
    proto = onnx.load(str(path))
    props = {p.key: p.value for p in proto.metadata_props}
    have = {i.name for i in proto.graph.initializer}
    needed = {t for n in proto.graph.node for t in n.input} - have
    needed -= {t for n in proto.graph.node for t in n.output} | {i.name for i in proto.graph.input}
    needed.discard("")
    if needed and SIDECAR_KEY in props:
        sidecar = path.parent / props[SIDECAR_KEY]
        if not sidecar.exists():
            raise FileNotFoundError(f"{path} needs its packed weights {sidecar}")
        proto.graph.initializer.extend(
            numpy_helper.from_array(t.unpack(), name)
            for name, t in read_sidecar(sidecar).items()
            if name in needed
        )
    return proto


def artifact_size_rows(path: str | Path) -> list[dict[str, Any]]:
    """Stored tensors of an exported model: name, role, where, bytes (as stored).

    A sub-8-bit weight has two rows: its packed bytes in the sidecar (role ``weight``) and its
    8-bit copy in ``model.onnx`` (role ``unpacked``).

    Raises:
        FileNotFoundError: the model has packed weights and their sidecar is missing.
    """
    path = Path(path)
    proto = onnx.load(str(path))
    props = {p.key: p.value for p in proto.metadata_props}
    roles = json.loads(props.get(ROLES_KEY, "{}"))
    packed = {}
    if SIDECAR_KEY in props:
        sidecar = path.parent / props[SIDECAR_KEY]
        if not sidecar.exists():
            raise FileNotFoundError(f"{path} needs its packed weights {sidecar}")
        packed = read_sidecar(sidecar)
    rows = [
        {
            "tensor": i.name,
            "role": "unpacked" if i.name in packed else roles.get(i.name, "constant"),
            "file": path.name,
            "bytes": int(numpy_helper.to_array(i).nbytes),
        }
        for i in proto.graph.initializer
    ]
    rows += [
        {
            "tensor": n,
            "role": roles.get(n, "weight"),
            "file": props[SIDECAR_KEY],
            "bytes": int(t.data.nbytes),
        }
        for n, t in packed.items()
    ]
    return rows


def artifact_weight_bytes(path: str | Path) -> int:
    """Bytes a user ships for the weights of an exported model: integer weights as stored
    (sub-8-bit ones bit-packed in the sidecar), their scales and zero-points, the input
    activations' scales and zero-points, biases and other float parameters.

    Equals :func:`autoquant.transform.packed_size_bytes` of the model and plan exported.
    Not counted: exporter constants (shapes), and the few deployment-only tensors of
    :attr:`ExportInfo.extra_bytes`. Container overhead (protobuf, zip headers) is not counted.
    """
    return sum(r["bytes"] for r in artifact_size_rows(path) if r["role"] in SIZE_ROLES)
