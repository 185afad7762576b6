"""ONNX Runtime sessions of an exported model, and what ONNX Runtime runs."""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from autoquant.measure.onnx._files import load_onnx
from autoquant.transform import Inputs, as_tuple


def ort_session(
    proto_or_path: onnx.ModelProto | str | Path,
    threads: int = 1,
    optimized_path: str | Path | None = None,
) -> Any:
    """An ONNX Runtime CPU session with ``threads`` intra-op threads (sequential execution)."""
    import onnxruntime as ort

    if isinstance(proto_or_path, (str, Path)):
        proto_or_path = load_onnx(proto_or_path)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(
        proto_or_path.SerializeToString(), so, providers=["CPUExecutionProvider"]
    )


def fused_op_types(proto_or_path: onnx.ModelProto | str | Path) -> Counter[str]:
    """Op types of the graph ONNX Runtime actually runs (after its QDQ fusions).

    Example:
        >>> fused_op_types(path)["QLinearConv"]  # doctest: +SKIP
        19
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "optimized.onnx"
        ort_session(proto_or_path, 1, out)
        return Counter(n.op_type for n in onnx.load(str(out)).graph.node)


# ONNX Runtime's input type names -> numpy dtypes.
_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def ort_feed(session: Any, x: Inputs) -> dict[str, np.ndarray]:
    """The feed for ``x`` (a tensor, or a tuple in the model's input order), each input as
    the type the model declares (e.g. int64 token ids, a float mask).

    Raises:
        ValueError: the number of inputs differs from the model's.
    """
    inputs = as_tuple(x)
    declared = session.get_inputs()
    if len(inputs) != len(declared):
        raise ValueError(
            f"the model takes {len(declared)} input(s) ({', '.join(i.name for i in declared)}), "
            f"got {len(inputs)}"
        )
    return {
        d.name: np.ascontiguousarray(t.detach().cpu().numpy(), dtype=_ORT_TYPES.get(d.type))
        for d, t in zip(declared, inputs, strict=True)
    }


def run_onnx(session: Any, x: Inputs) -> np.ndarray:
    """First output of ``session`` for one input batch (see :func:`ort_feed`)."""
    return session.run(None, ort_feed(session, x))[0]
