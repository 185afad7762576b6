"""Deploy a plan on real integer kernels: QDQ ONNX export, x86 int8 lowering, measured latency.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from autoquant.measure import LatencyCache, measure_latency
    >>> from autoquant.transform import apply_plan, calibration
    >>> from autoquant.types import QuantPlan, QuantSpec
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14 * 14, 10))
    >>> plan = QuantPlan.uniform(["0", "3"], QuantSpec(bits=8), QuantSpec(bits=8))
    >>> q = apply_plan(net.eval(), plan)
    >>> with calibration(q):
    ...     _ = q(torch.randn(8, 3, 16, 16))
    >>> cache = LatencyCache()
    >>> r = measure_latency(q, plan, torch.randn(1, 3, 16, 16), repeats=5, cache=cache)
    >>> r.median_ms > 0, measure_latency(q, plan, torch.randn(1, 3, 16, 16), cache=cache).cached
    (True, True)
"""

from __future__ import annotations

from typing import Any

from autoquant.measure._backends import (
    BACKENDS,
    LatencyBackend,
    OnnxRuntimeBackend,
    TorchX86Backend,
    get_backend,
    register_backend,
)
from autoquant.measure._cache import JsonFileStore, KeyValueStore, LatencyCache, MemoryStore
from autoquant.measure._deploy import float_clone
from autoquant.measure._formats import (
    OWN_KERNEL_NOTES,
    SATURATION_ENV,
    LayerFormat,
    TensorFormat,
    architecture_hash,
    describe_layer,
    graph_signature,
    int8_saturates,
    layer_formats,
    plan_formats,
    tensor_format,
    x86_saturates,
)
from autoquant.measure._latency import (
    LatencyResult,
    latency_key,
    machine_info,
    measure_float_latency,
    measure_latencies,
    measure_latency,
)
from autoquant.measure._layers import (
    LayerDeployment,
    OnnxOp,
    deployment_of,
    deployments,
    register_deployment,
    unregister_deployment,
)
from autoquant.measure._optional import onnx_export
from autoquant.measure._pack import SIDECAR_NAME, pack_bits, read_sidecar, unpack_bits
from autoquant.measure._remeasure import Remeasurement, remeasure
from autoquant.measure._timing import MAX_SPREAD
from autoquant.measure._torch_x86 import lower_to_torch_x86

# The ONNX export needs the optional ``onnx`` package: its names load on first use, so that
# ``import autoquant.measure`` and the torch-x86 backend work without it.
_ONNX_NAMES = frozenset(
    {
        "SIZE_ROLES",
        "ExportInfo",
        "artifact_size_rows",
        "artifact_weight_bytes",
        "export_onnx",
        "fused_op_types",
        "load_onnx",
        "ort_session",
        "run_onnx",
    }
)


def __getattr__(name: str) -> Any:
    if name in _ONNX_NAMES:
        return getattr(onnx_export(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BACKENDS",
    "MAX_SPREAD",
    "OWN_KERNEL_NOTES",
    "SATURATION_ENV",
    "SIDECAR_NAME",
    "SIZE_ROLES",
    "ExportInfo",
    "JsonFileStore",
    "KeyValueStore",
    "LatencyBackend",
    "LatencyCache",
    "LatencyResult",
    "LayerDeployment",
    "LayerFormat",
    "MemoryStore",
    "OnnxOp",
    "OnnxRuntimeBackend",
    "Remeasurement",
    "TensorFormat",
    "TorchX86Backend",
    "architecture_hash",
    "artifact_size_rows",
    "artifact_weight_bytes",
    "deployment_of",
    "deployments",
    "describe_layer",
    "export_onnx",
    "float_clone",
    "fused_op_types",
    "get_backend",
    "graph_signature",
    "int8_saturates",
    "latency_key",
    "machine_info",
    "layer_formats",
    "load_onnx",
    "lower_to_torch_x86",
    "measure_float_latency",
    "measure_latencies",
    "measure_latency",
    "ort_session",
    "pack_bits",
    "plan_formats",
    "read_sidecar",
    "register_backend",
    "run_onnx",
    "register_deployment",
    "remeasure",
    "tensor_format",
    "unpack_bits",
    "unregister_deployment",
    "x86_saturates",
]
