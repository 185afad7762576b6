"""Export a plan as a QDQ ONNX model that ONNX Runtime fuses into integer kernels.

The export is an ordered list of small passes (:data:`QDQ_PASSES`, the Brevitas export-manager
pattern) over one marked float export:

1. :func:`analyse`: the fake-quant model's float, BN-folded clone is exported with marks around
   every layer call and where the quantized adds quantize; each layer's node is the one between
   its marks (found by structure, not by weight name); each integer layer's output grid is
   chosen (exact onto the next grid reached through ops that keep grids, else calibrated,
   else float for a Gemm/MatMul).
2. The passes, in order (each one module of :mod:`autoquant.measure.onnx.passes`, testable
   alone): ``requantize_outputs``, ``convert_marks``, ``pooled_grids``, ``layer_qdq``,
   ``stem_channels``, ``add_operands``, ``integer_pads``, ``float_params``.
3. Files (:func:`export_onnx`): the model, the bit-packed sub-8-bit weights, size rows.

Example:
    >>> [p.name for p in QDQ_PASSES][:3]
    ['requantize_outputs', 'convert_marks', 'pooled_grids']
"""

from __future__ import annotations

from autoquant.measure.onnx._analysis import Analysis, analyse
from autoquant.measure.onnx._context import Pass, QDQContext
from autoquant.measure.onnx._editor import Editor
from autoquant.measure.onnx._export import OPSET, LayerNode, export_float, export_marked
from autoquant.measure.onnx._files import (
    SIZE_ROLES,
    ExportInfo,
    artifact_size_rows,
    artifact_weight_bytes,
    export_onnx,
    load_onnx,
    packed_weights,
)
from autoquant.measure.onnx._manager import (
    EXPORT_REVISION,
    QDQ_PASSES,
    QDQModel,
    build_qdq,
    without,
)
from autoquant.measure.onnx._session import fused_op_types, ort_feed, ort_session, run_onnx

__all__ = [
    "EXPORT_REVISION",
    "OPSET",
    "QDQ_PASSES",
    "SIZE_ROLES",
    "Analysis",
    "Editor",
    "ExportInfo",
    "LayerNode",
    "Pass",
    "QDQContext",
    "QDQModel",
    "analyse",
    "artifact_size_rows",
    "artifact_weight_bytes",
    "build_qdq",
    "export_float",
    "export_marked",
    "export_onnx",
    "fused_op_types",
    "load_onnx",
    "ort_feed",
    "ort_session",
    "packed_weights",
    "run_onnx",
    "without",
]
