"""ONNX Runtime sessions of an exported model, and what ONNX Runtime runs."""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from torch import Tensor

from autoquant.measure.onnx._files import load_onnx


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


def run_onnx(session: Any, x: Tensor) -> np.ndarray:
    """First output of ``session`` for one input batch."""
    name = session.get_inputs()[0].name
    return session.run(None, {name: x.detach().float().numpy()})[0]
