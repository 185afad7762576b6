"""Lower a plan to PyTorch's x86 int8 kernels (``torch.ao.nn.quantized``).

Each integer layer becomes ``clamp (sub-8-bit inputs) -> quantize_per_tensor (quint8) ->
quantized Conv/Linear (qint8 weights, x86 engine) -> dequantize``; the rest of the model runs
unchanged in float, except quantized adds (``plan.adds``), which run as ``quantized::add`` /
``add_relu`` on quint8 operands. Output grids follow the same rules as the ONNX export: exact
onto the next layer's (or add's) input grid where possible; else a Linear (any input rank) keeps
a float output straight from its int8 kernel (``fbgemm``'s linear with an fp32 output, as ONNX
Runtime's QGemm / MatMulIntegerToFloat), and a convolution gets a calibrated 8-bit grid. x86
kernels take quint8 inputs only: a symmetric int8 input grid runs as quint8 with its zero-point
shifted by 128 (same values), and asymmetric uint8 weights as qint8 with zero-point
``Z - 128``; where those codes would saturate this CPU's u8×s8 kernels
(:func:`~autoquant.measure.x86_saturates`) the layer runs in float.
Layers without an integer kernel (float weight or input, per-channel input) run float with their
quantization simulated. An embedding (weight-only) becomes torch.ao's 8-bit rowwise
``Embedding`` (quint8 codes, one fp32 scale and bias per row; sub-8-bit rows as 8-bit codes on
their grid: same values); the attention matmuls (``<mha>.matmul``) stay simulated (their
operands quantize-dequantized, float matmuls: torch.ao has no int8 matmul with a float output).
A replaced layer keeps float ``weight`` and ``bias`` attributes, for code that reads them
(``nn.TransformerEncoderLayer`` checks ``self_attn.in_proj_bias``). The modules themselves are in
:mod:`autoquant.measure._x86_modules`; this module decides which runs where.

``torch.ao.quantization`` is deprecated in torch 2.x; its warnings are silenced here.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from autoquant.measure._deploy import (
    DeployedLayer,
    activation_intq,
    check_calls,
    deployed_layers,
)
from autoquant.measure._formats import plan_formats, x86_saturates
from autoquant.measure._layers import deployment_of
from autoquant.measure._requant import Requant, choose_requant, fx_chains
from autoquant.measure._x86_modules import (
    IntKernelLayer,
    LookupLayer,
    QuantizedAdd,
    QuantizeTo,
    SimulatedLayer,
    floats_for_float_readers,
    graph_modules,
    lower_adds,
    quint8,
)
from autoquant.transform import (
    Inputs,
    add_quantizers,
    call_model,
    has_own_forward,
    strip_add_quantizers,
)
from autoquant.types import QuantPlan


@contextlib.contextmanager
def quiet_ao() -> Iterator[None]:
    """Silence torch.ao's deprecation warnings inside the block."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.ao")
        warnings.filterwarnings("ignore", message=r".*quantiz.*deprecated", category=UserWarning)
        yield


def use_x86_engine() -> None:
    """Select PyTorch's x86 quantized engine (a process-wide setting)."""
    if "x86" not in torch.backends.quantized.supported_engines:
        raise RuntimeError(
            "the torch-x86 backend needs PyTorch's x86 quantized engine; "
            f"this build supports {torch.backends.quantized.supported_engines}"
        )
    torch.backends.quantized.engine = "x86"


def _qweight(dl: DeployedLayer) -> Tensor:
    q = dl.weight_q
    shift = 128 if q.storage == "uint8" else 0
    scale = torch.from_numpy(q.scale).double()
    zp = torch.from_numpy(q.zero_point).long() - shift
    # The simulated weight (Z-relative codes times S) quantizes back to exactly its codes.
    w = dl.weight_value
    if q.axis is None:
        return torch.quantize_per_tensor(w, float(scale), int(zp), torch.qint8)
    return torch.quantize_per_channel(w, scale.reshape(-1), zp.reshape(-1), q.axis, torch.qint8)


def _int_module(dl: DeployedLayer, rq: Requant) -> IntKernelLayer | None:
    """The integer layer on its type's declared x86 module (see
    :func:`~autoquant.measure.register_deployment`), or None if x86 has no such kernel."""
    dep = deployment_of(dl.float_module)
    if dl.weight_q.axis not in (None, 0) or dep is None or dep.x86 is None:
        return None
    if rq.mode == "float" and dep.x86_float_output is None:
        return None
    q = dep.x86(dl.float_module)
    if q is None:
        return None
    bias = getattr(dl.float_module, "bias", None)
    q.set_weight_bias(_qweight(dl), None if bias is None else bias.detach().float())
    float_output = None
    if rq.mode == "float":
        float_output = dep.x86_float_output(q)  # type: ignore[misc]
    else:
        q.scale, q.zero_point = quint8(rq.q)
    out = IntKernelLayer(q, dl.act_q, float_output)
    out._keep_params(dl)
    return out


def _rowwise_weight(dl: DeployedLayer) -> Tensor:
    """The weight's codes as torch.ao's 8-bit rowwise format: quint8 per row, float qparams
    (a per-tensor grid repeated per row; symmetric codes +128). The values are the simulated
    ones: ``(q - Z) * S`` requantizes to exactly ``q``."""
    q = dl.weight_q
    rows = dl.weight_value.shape[0]
    shift = 128 if q.storage == "int8" else 0
    scale = torch.from_numpy(q.scale).double().reshape(-1).expand(rows).contiguous()
    zp = (torch.from_numpy(q.zero_point).double().reshape(-1) + shift).expand(rows).contiguous()
    return torch.quantize_per_channel(dl.weight_value, scale, zp, 0, torch.quint8)


def _lookup_module(dl: DeployedLayer) -> LookupLayer | None:
    """A weight-only layer on its type's declared x86 module (8-bit rowwise), or None."""
    dep = deployment_of(dl.float_module)
    if dl.weight_q is None or dl.weight_q.axis not in (None, 0) or dep is None or dep.x86 is None:
        return None
    q = dep.x86(dl.float_module)
    if q is None:
        return None
    q.set_weight(_rowwise_weight(dl))
    out = LookupLayer(q)
    out._keep_params(dl)
    return out


def _simulated(dl: DeployedLayer) -> nn.Module:
    f = _as_class(dl.float_module, deployment_of(dl.float_module).float_type)  # type: ignore[union-attr]
    with torch.no_grad():
        f.weight = nn.Parameter(dl.weight_value.clone(), requires_grad=False)
    out = SimulatedLayer(f, dl.act_fq)
    out._keep_params(dl)
    return out


def _as_class(module: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """A shallow copy of ``module`` (same tensors, own dicts) of class ``cls``."""
    out = copy.copy(module)
    for attr in ("_parameters", "_buffers", "_modules"):
        setattr(out, attr, dict(getattr(module, attr)))
    out.__class__ = cls
    return out


@functools.cache
def _primitive_mixin(base: type[nn.Module], primitive: str) -> type[nn.Module]:
    """``base`` with its ``primitive`` calling the ``x86_kernel`` submodule."""

    def call(self: nn.Module, input: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if primitive == "forward":  # e.g. an embedding bag's offsets
            return self.x86_kernel(input, *args, **kwargs)
        return self.x86_kernel(input)  # the weight and bias are the kernel's

    return type(f"X86{base.__name__}Primitive", (base,), {primitive: call})


def _in_own_forward(dl: DeployedLayer, kernel: nn.Module) -> nn.Module:
    """A subclass with a forward of its own keeps it: a copy of the float layer whose primitive
    (see :func:`~autoquant.measure.register_deployment`) runs ``kernel``."""
    dep = deployment_of(dl.float_module)
    cls = type(dl.float_module)
    mixin = _primitive_mixin(dep.float_type, dep.primitive)  # type: ignore[union-attr]
    out = _as_class(dl.float_module, type(f"X86{cls.__name__}", (cls, mixin), {}))
    out.x86_kernel = kernel
    if dl.weight_value is not None:
        out.weight = nn.Parameter(dl.weight_value.clone(), requires_grad=False)
    return out


def _lowered(dl: DeployedLayer, rq: Requant | None) -> tuple[nn.Module | None, str | None]:
    """The module replacing a plan layer (None: the fake-quant layer stays) and its note."""
    new, note = _kernel(dl, rq)
    if new is not None and has_own_forward(dl.float_module):
        new = _in_own_forward(dl, new)
    return new, note


def _kernel(dl: DeployedLayer, rq: Requant | None) -> tuple[nn.Module | None, str | None]:
    """What runs a plan layer's primitive (None: the fake-quant layer stays) and its note."""
    if not dl.has_weight:
        return None, (
            "operands quantize-dequantized on their grids, float matmuls (torch.ao has no int8 "
            "matmul with a float output)"
        )
    if dl.weight_only:
        lookup = _lookup_module(dl)
        if lookup is not None:
            return lookup, (
                "lookup in torch.ao's 8-bit rowwise table (quint8 codes on their grid, fp32 "
                "scale and bias per row)"
            )
        return _simulated(dl), "lookup in a float table of the dequantized rows"
    fmt = dl.format
    if fmt.int_kernel and not x86_saturates(dl.plan) and rq is not None:
        new = _int_module(dl, rq)
        if new is not None:
            return new, "out→" + rq.describe("torch-x86")
        return _simulated(dl), "no x86 kernel for this layer: simulated in float"
    return _simulated(dl), None


def lower_to_torch_x86(
    model: nn.Module,
    plan: QuantPlan | None,
    example_input: Inputs,
    *,
    calib_inputs: Iterable[Inputs] | None = None,
    keep_quantized: bool = True,
) -> tuple[nn.Module, dict[str, str]]:
    """An eval-mode module running ``plan``'s integer layers on PyTorch's x86 int8 kernels.

    Args:
        model: calibrated result of :func:`autoquant.transform.apply_plan` (or a float
            model with ``plan=None``).
        plan: the plan ``model`` was built from.
        example_input: an input batch (traced once to find each layer's consumers).
        calib_inputs: inputs to observe output ranges on (default ``[example_input]``).
        keep_quantized: hand quint8 tensors straight from one integer layer to the next where
            the values allow it (see :class:`IntKernelLayer`), skipping a dequantize and a
            quantize.

    Returns:
        ``(module, formats)``: formats records per plan layer how it runs.

    Example:
        >>> from autoquant.transform import apply_plan, calibration
        >>> from autoquant.types import QuantSpec
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2))
        >>> plan = QuantPlan.uniform(["0", "3"], QuantSpec(bits=4), QuantSpec(bits=8))
        >>> q = apply_plan(net, plan)
        >>> with calibration(q):
        ...     _ = q(torch.randn(8, 1, 4, 4))
        >>> low, formats = lower_to_torch_x86(q, plan, torch.randn(1, 1, 4, 4))
        >>> type(low[0]).__name__, low(torch.randn(2, 1, 4, 4)).shape
        ('IntKernelLayer', torch.Size([2, 2]))
    """
    out, tails = lower_with_notes(
        model, plan, example_input, calib_inputs=calib_inputs, keep_quantized=keep_quantized
    )
    return out, plan_formats(plan, "torch-x86", tails)


def _analyse(
    model: nn.Module, plan: QuantPlan, example_input: Inputs, calib_inputs: Iterable[Inputs] | None
) -> tuple[dict[str, DeployedLayer], dict[str, Requant]]:
    """The plan's integer layers and their output grids, over the model's ``torch.fx`` graph
    (the same rules and walk as the ONNX export: no ``onnx`` needed). Without an exact grid, a
    type with a float-output x86 kernel (a Linear) keeps a float output, any other (a
    convolution: its quantized module has an integer output) gets a calibrated grid."""
    layers = deployed_layers(model, plan)
    check_calls(model, layers, example_input)
    grids = {t: activation_intq(fq, t) for t, fq in add_quantizers(model).items()}
    chains = fx_chains(model, layers)
    inputs = [example_input] if calib_inputs is None else list(calib_inputs)
    float_ok = {
        n
        for n, dl in layers.items()
        if getattr(deployment_of(dl.float_module), "x86_float_output", None) is not None
    }
    return layers, choose_requant(model, layers, chains, grids, inputs, float_output_ok=float_ok)


def lower_with_notes(
    model: nn.Module,
    plan: QuantPlan | None,
    example_input: Inputs,
    *,
    calib_inputs: Iterable[Inputs] | None = None,
    keep_quantized: bool = True,
) -> tuple[nn.Module, dict[str, str]]:
    """:func:`lower_to_torch_x86` returning per-layer deployment notes (format tails)."""
    use_x86_engine()
    layers, requant = _analyse(model, plan or QuantPlan(), example_input, calib_inputs)
    out = copy.deepcopy(model).eval()
    # The adds' quantizers move out of the layers about to be replaced.
    strip_add_quantizers(out, out.get_submodule)
    for gm in graph_modules(out):
        lower_adds(gm)
    tails: dict[str, str] = {}
    with quiet_ao():
        for name, dl in layers.items():
            new, note = _lowered(dl, requant.get(name))
            if note is not None:
                tails[name] = note
            if new is not None:
                parent, _, child = name.rpartition(".")
                setattr(out.get_submodule(parent) if parent else out, child, new)
        out.eval()
        floats_for_float_readers(out)
        if keep_quantized:
            _keep_runs_quantized(out, requant)
        with torch.inference_mode():
            try:
                # Also spends torch's one-time deprecation warnings here.
                call_model(out, example_input)
            except (RuntimeError, NotImplementedError):
                # Some op between two layers does not take quantized tensors: hand floats over.
                for m in out.modules():
                    if isinstance(m, IntKernelLayer):
                        m.emit_quantized = False
                    if isinstance(m, QuantizeTo):
                        m.integer = False
                call_model(out, example_input)
    for name, m in out.named_modules():
        if isinstance(m, IntKernelLayer) and m.emit_quantized:
            tails[name] += " (handed over as quint8)"
    return out, tails


def _keep_runs_quantized(module: nn.Module, requant: dict[str, Requant]) -> None:
    layers = dict(module.named_modules())
    for name, rq in requant.items():
        producer, consumer = layers.get(name), layers.get(rq.consumer or "")
        if (
            rq.mode == "exact"
            and isinstance(producer, IntKernelLayer)
            and (rq.consumer is None or isinstance(consumer, IntKernelLayer))
            and getattr(consumer, "clip", None) is None
        ):
            producer.emit_quantized = True  # onto a layer's input grid or a quantized add's


def kernel_counts(module: nn.Module) -> dict[str, int]:
    """How many layers (and adds) run on x86 int8 kernels and how many are simulated in
    float."""
    counts: dict[str, int] = {}
    for m in module.modules():
        if isinstance(m, (IntKernelLayer, LookupLayer)):
            key = "int8:" + type(m.qlayer).__name__
        elif isinstance(m, SimulatedLayer):
            key = "float:" + type(m.layer).__name__
        elif isinstance(m, QuantizedAdd):
            key = "int8:add"
        else:
            continue
        counts[key] = counts.get(key, 0) + 1
    return counts


def run_torch(module: nn.Module, x: Tensor) -> Any:
    with torch.inference_mode():
        return module(x)
