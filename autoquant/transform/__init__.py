"""Apply a :class:`~autoquant.types.QuantPlan` to a real model.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from autoquant.transform import apply_plan, calibration, quantizable_layers
    >>> from autoquant.types import QuantPlan, QuantSpec
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    >>> names = [i.name for i in quantizable_layers(net, torch.zeros(1, 1, 8, 8))]
    >>> q = apply_plan(net, QuantPlan.uniform(names, QuantSpec(bits=8), QuantSpec(bits=8)))
    >>> with calibration(q):
    ...     _ = q(torch.randn(4, 1, 8, 8))
    >>> q(torch.randn(2, 1, 8, 8)).shape
    torch.Size([2, 4, 6, 6])
"""

from __future__ import annotations

from autoquant.transform._adds import (
    add_outputs,
    add_quantizers,
    quantize_adds,
    strip_add_quantizers,
    trace_quantized,
)
from autoquant.transform._apply import apply_plan, calibration, check_plan, quantized_layers
from autoquant.transform._attention import (
    AttentionMatmul,
    ExplicitMultiheadAttention,
    QAttentionMatmul,
    explicit_attention_,
    keep_slow_path_,
)
from autoquant.transform._dataflow import Dataflow, ModuleTrace, trace_dataflow
from autoquant.transform._discover import (
    LayerInfo,
    LayerStatus,
    excluded_layers_message,
    quantizable_layers,
    quantizable_names,
    uniform_plan,
)
from autoquant.transform._fold import conv_bn_pairs, fold_batchnorm, fold_batchnorm_
from autoquant.transform._grid_rules import (
    GRID_RULES,
    IDENTITY_RULE,
    ONNX_GRID_RULES,
    RELU_RULE,
    SHAPE_ONLY_ONNX_OPS,
    GridRule,
    GridUse,
    fx_reads_shape_only,
    fx_rule,
    has_own_forward,
    reached_grid,
)
from autoquant.transform._inputs import (
    Inputs,
    as_tuple,
    batch_len,
    call_model,
    inputs_to,
    map_inputs,
)
from autoquant.transform._registry import (
    QConv1d,
    QConv2d,
    QConv3d,
    QEmbedding,
    QEmbeddingBag,
    QLinear,
    QuantizedLayer,
    is_quantizable,
    quantizable_types,
    register_quantizable,
    registered_base,
    wrap_,
    wrapper_type,
)
from autoquant.transform._size import SizeRow, float_size_bytes, packed_size_bytes, size_breakdown

__all__ = [
    "GRID_RULES",
    "IDENTITY_RULE",
    "ONNX_GRID_RULES",
    "RELU_RULE",
    "SHAPE_ONLY_ONNX_OPS",
    "AttentionMatmul",
    "Dataflow",
    "ExplicitMultiheadAttention",
    "GridRule",
    "GridUse",
    "Inputs",
    "LayerInfo",
    "LayerStatus",
    "ModuleTrace",
    "QAttentionMatmul",
    "QConv1d",
    "QConv2d",
    "QConv3d",
    "QEmbedding",
    "QEmbeddingBag",
    "QLinear",
    "QuantizedLayer",
    "SizeRow",
    "add_outputs",
    "add_quantizers",
    "apply_plan",
    "as_tuple",
    "batch_len",
    "calibration",
    "call_model",
    "check_plan",
    "conv_bn_pairs",
    "excluded_layers_message",
    "explicit_attention_",
    "float_size_bytes",
    "fold_batchnorm",
    "fold_batchnorm_",
    "fx_reads_shape_only",
    "fx_rule",
    "has_own_forward",
    "inputs_to",
    "is_quantizable",
    "keep_slow_path_",
    "map_inputs",
    "packed_size_bytes",
    "quantizable_layers",
    "quantizable_names",
    "quantizable_types",
    "quantize_adds",
    "quantized_layers",
    "reached_grid",
    "register_quantizable",
    "registered_base",
    "size_breakdown",
    "strip_add_quantizers",
    "trace_dataflow",
    "trace_quantized",
    "uniform_plan",
    "wrap_",
    "wrapper_type",
]
