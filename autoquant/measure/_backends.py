"""Latency backends: deploy a calibrated fake-quant model on real kernels, ready to time.

Each backend takes the model's inputs in any form the task gives them (one tensor, or a tuple
of tensors of any dtype: token ids, attention masks, ...; see
:func:`autoquant.transform.call_model`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from autoquant.measure._formats import plan_formats
from autoquant.measure._layers import deployment_of, deployments
from autoquant.measure._optional import onnx_export
from autoquant.train import torch_threads
from autoquant.transform import Inputs, as_tuple, call_model
from autoquant.types import QuantPlan


class Deployed(Protocol):
    """A model deployed on a backend, ready to time."""

    formats: dict[str, str]
    notes: dict[str, str]
    kernels: dict[str, int]

    def runner(self, x: Inputs) -> Callable[[], object]:
        """A zero-argument call that runs one inference on ``x`` (input prepared up front)."""
        ...

    def run(self, x: Inputs) -> Tensor:
        """Outputs for ``x`` as a float tensor (first output)."""
        ...


class LatencyBackend(Protocol):
    """Deploys a calibrated fake-quant model on real kernels."""

    name: str

    def deploy(
        self,
        model: nn.Module,
        plan: QuantPlan | None,
        example_input: Inputs,
        *,
        threads: int,
        calib_inputs: Iterable[Inputs] | None = None,
    ) -> Deployed: ...

    def threads_context(self, threads: int) -> Any:
        """Context manager entered around timing (e.g. torch's thread count)."""
        ...

    def version(self) -> str: ...


class _OrtDeployed:
    def __init__(
        self, session: Any, formats: dict[str, str], notes: dict[str, str], kernels: dict[str, int]
    ) -> None:
        self.session = session
        self.formats = formats
        self.notes = notes
        self.kernels = kernels

    def runner(self, x: Inputs) -> Callable[[], object]:
        feed = onnx_export().ort_feed(self.session, x)
        session = self.session
        return lambda: session.run(None, feed)

    def run(self, x: Inputs) -> Tensor:
        return torch.from_numpy(onnx_export().run_onnx(self.session, x))


class OnnxRuntimeBackend:
    """ONNX Runtime (CPU): the QDQ export of :func:`export_onnx`, fused into integer kernels."""

    name = "onnxruntime"

    def deploy(
        self,
        model: nn.Module,
        plan: QuantPlan | None,
        example_input: Inputs,
        *,
        threads: int,
        calib_inputs: Iterable[Inputs] | None = None,
    ) -> Deployed:
        import tempfile
        from pathlib import Path

        export = onnx_export()
        import onnx

        qdq = export.build_qdq(model, plan, example_input, calib_inputs)
        with tempfile.TemporaryDirectory() as tmp:
            optimized = Path(tmp) / "optimized.onnx"
            session = export.ort_session(qdq.proto, threads, optimized)
            ops = [n.op_type for n in onnx.load(str(optimized)).graph.node]
        layer_ops = {o.op_type for d in deployments().values() for o in d.onnx}
        kernels = {op: ops.count(op) for op in sorted(set(ops)) if op in _KERNEL_OPS | layer_ops}
        return _OrtDeployed(session, qdq.formats, qdq.tails, kernels)

    def threads_context(self, threads: int) -> Any:
        return contextlib.nullcontext()  # threads are a session option

    def version(self) -> str:
        import onnxruntime

        return f"onnxruntime-{onnxruntime.__version__}+export{onnx_export().EXPORT_REVISION}"


# Ops that do a layer's arithmetic: the integer fused ones and their float fallbacks (and the
# ops the registered layer types export to, see register_deployment).
_KERNEL_OPS = frozenset(
    {
        "QLinearConv",
        "QLinearMatMul",
        "QGemm",
        "MatMulInteger",
        "MatMulIntegerToFloat",
        "QLinearAdd",
        "QLinearGlobalAveragePool",
        "ConvInteger",
        "DynamicQuantizeMatMul",
        "Conv",
        "FusedConv",
        "Gemm",
        "FusedGemm",
        "MatMul",
        "FusedMatMul",
        "NhwcFusedConv",
    }
)


class _TorchDeployed:
    def __init__(
        self,
        module: nn.Module,
        formats: dict[str, str],
        notes: dict[str, str],
        kernels: dict[str, int],
    ) -> None:
        self.module = module
        self.formats = formats
        self.notes = notes
        self.kernels = kernels

    def runner(self, x: Inputs) -> Callable[[], object]:
        module, args = self.module, as_tuple(x)
        return lambda: module(*args)  # timed inside threads_context (inference mode)

    def run(self, x: Inputs) -> Tensor:
        with torch.inference_mode():
            out = call_model(self.module, x)
        return (out[0] if isinstance(out, (tuple, list)) else out).float()


class TorchX86Backend:
    """PyTorch's x86 int8 engine (``torch.ao.nn.quantized`` Conv/Linear, quint8 inputs)."""

    name = "torch-x86"

    def deploy(
        self,
        model: nn.Module,
        plan: QuantPlan | None,
        example_input: Inputs,
        *,
        threads: int,
        calib_inputs: Iterable[Inputs] | None = None,
    ) -> Deployed:
        from autoquant.measure._deploy import float_clone
        from autoquant.measure._torch_x86 import kernel_counts, lower_with_notes

        if plan is None or not plan.layers:
            module = float_clone(model)
            counts: dict[str, int] = {}
            for m in module.modules():
                if deployment_of(m) is not None:
                    key = "float:" + type(m).__name__
                    counts[key] = counts.get(key, 0) + 1
            return _TorchDeployed(module, {}, {}, counts)
        module, notes = lower_with_notes(model, plan, example_input, calib_inputs=calib_inputs)
        formats = plan_formats(plan, self.name, notes)
        return _TorchDeployed(module, formats, notes, kernel_counts(module))

    @contextlib.contextmanager
    def threads_context(self, threads: int) -> Iterator[None]:
        with torch_threads(threads), torch.inference_mode():
            yield

    def version(self) -> str:
        return f"torch-{torch.__version__}-{torch.backends.quantized.engine}+lowering{LOWERING}"


#: Bumped when torch-x86 lowers a plan to other kernels (part of its version, so cached latencies
#: of the old lowering are not reused). 2: float-output Linears, rowwise embeddings, x86
#: saturation per stored code range.
LOWERING = 2

BACKENDS: dict[str, LatencyBackend] = {
    "onnxruntime": OnnxRuntimeBackend(),
    "torch-x86": TorchX86Backend(),
}


def register_backend(backend: LatencyBackend) -> None:
    """Make a backend available to :func:`measure_latency` by its ``name``."""
    BACKENDS[backend.name] = backend


def get_backend(name: str) -> LatencyBackend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"backend={name!r} is not allowed; allowed values: "
            f"{', '.join(repr(b) for b in BACKENDS)}"
        ) from None
