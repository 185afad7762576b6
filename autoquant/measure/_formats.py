"""Kernel formats: what each layer of a plan runs as on a real backend, and the graph signature.

Both backends lower the same description: for every quantized layer the integer weight codes
(exactly those the fake-quant model uses), the input quantizer, and the *kernel format*: the
storage type each tensor runs in. Formats a backend cannot run natively are mapped to the
nearest one it can, and the mapping is recorded, never hidden:

* weights of 2..8 bits run as int8 (symmetric) or uint8 (asymmetric) codes; the values stay on
  their own grid, the shipped size is counted packed;
* input activations of 2..8 bits run as int8 (symmetric, zero-point 0) or uint8 (asymmetric);
  below 8 bits the input is first clamped to its own narrower grid (``+clip``), so the
  deployed values equal the simulated ones;
* per-channel activations have no integer kernel: the layer runs float with the quantization
  simulated (quantize-dequantize), and so do layers with a float weight or a float input;
* fp16 tensors run as float32 after a round trip through float16 (CPU backends have no fp16
  convolution);
* on an x86 CPU without VNNI, 8-bit weights times 8-bit inputs are not run on the u8×s8 int8
  kernels: those (AVX2 ``vpmaddubsw``) add pairs of products into 16 bits with saturation, so
  their outputs differ from the simulation (see :func:`int8_saturates`). ONNX Runtime then
  stores the weight codes as uint8 (+128; its U8U8 kernels are exact); torch-x86, which has no
  such kernel, runs the layer in float with the quantization simulated.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from autoquant.quant import FakeQuantize
from autoquant.transform import QuantizedLayer
from autoquant.types import LayerPlan, QuantPlan, QuantSpec

_INT_STORAGES = frozenset({"int8", "uint8"})
SATURATION_ENV = "AUTOQUANT_INT8_SATURATES"
_VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def int8_saturates() -> bool:
    """Whether this CPU's int8 kernels saturate on full-range 8-bit × 8-bit products.

    x86 CPUs without VNNI (AVX2, AVX-512 before Cascade Lake, AMD before Zen 4) multiply
    uint8 by int8 with ``vpmaddubsw``, which adds each pair of products into a saturating
    16-bit integer: ``2 × 255 × 127`` overflows it, so ONNX Runtime's and PyTorch's u8×s8
    kernels return wrong sums for 8-bit weights with 8-bit inputs (up to ~15 % of the logit
    range on a small CNN, measured on an AMD EPYC). Narrower grids (weights or inputs of 7 bits
    or fewer) cannot overflow. An x86 CPU whose flags cannot be read counts as saturating
    (exact, maybe slower); other architectures do not saturate. ``AUTOQUANT_INT8_SATURATES``
    (``1``/``0``) overrides the detection.

    Example:
        >>> isinstance(int8_saturates(), bool)
        True
    """
    forced = os.environ.get(SATURATION_ENV, "").strip().lower()
    if forced in ("1", "true", "yes"):
        return True
    if forced in ("0", "false", "no"):
        return False
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    flags = _cpu_flags()
    return not flags or not (flags & _VNNI_FLAGS)


# ---------------------------------------------------------------------------------------
# Kernel formats (depend only on the plan): the unit of the latency signature
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorFormat:
    """How one tensor is stored at run time.

    ``storage`` is ``int8``/``uint8`` (integer codes), ``fp16`` (a float16 round trip, run
    in float32) or ``fp32``. ``clip`` marks an activation grid narrower than its storage
    type (bits < 8), clamped before quantizing.
    """

    storage: str
    per_channel: bool = False
    clip: bool = False

    @property
    def is_int(self) -> bool:
        return self.storage in _INT_STORAGES

    def key(self) -> str:
        return self.storage + ("/c" if self.per_channel else "") + ("+clip" if self.clip else "")


def tensor_format(spec: QuantSpec, *, activation: bool) -> TensorFormat:
    """The run-time format of a tensor quantized per ``spec``.

    Example:
        >>> tensor_format(QuantSpec(bits=6, symmetric=False), activation=True).key()
        'uint8+clip'
        >>> tensor_format(QuantSpec(bits=4, granularity="per_channel"), activation=False).key()
        'int8/c'
    """
    if spec.is_float:
        return TensorFormat(str(spec.bits))
    storage = "int8" if spec.symmetric else "uint8"
    # A weight's codes are stored exactly, whatever its bit width; an activation is quantized
    # at run time by an 8-bit quantizer, so a narrower grid needs an explicit clamp first.
    clip = activation and int(spec.bits) < 8
    return TensorFormat(storage, spec.per_channel, clip)


@dataclass(frozen=True)
class LayerFormat:
    """The kernel format of one layer: weight and input storage, and whether it runs an
    integer kernel (integer weight and per-tensor integer input).

    ``saturates``: an integer layer with 8-bit weights and 8-bit inputs on a CPU whose u8×s8
    kernels saturate (:func:`int8_saturates`); each backend then runs it exactly another way.
    """

    weight: TensorFormat
    activation: TensorFormat
    saturates: bool = False

    @classmethod
    def of(cls, lp: LayerPlan) -> LayerFormat:
        fmt = cls(
            tensor_format(lp.weight, activation=False),
            tensor_format(lp.activation, activation=True),
        )
        if fmt.int_kernel and lp.weight.bits == 8 and lp.activation.bits == 8 and int8_saturates():
            fmt = cls(fmt.weight, fmt.activation, saturates=True)
        return fmt

    @property
    def int_kernel(self) -> bool:
        return self.weight.is_int and self.activation.is_int and not self.activation.per_channel

    @property
    def is_float(self) -> bool:
        return self.weight.storage == "fp32" and self.activation.storage == "fp32"

    def key(self) -> str:
        return f"w:{self.weight.key()},a:{self.activation.key()}" + (
            ",sat" if self.saturates else ""
        )


def x86_saturates(lp: LayerPlan) -> bool:
    """Whether torch-x86's u8×s8 kernels would saturate on this layer's codes on this CPU (see
    :func:`int8_saturates`): they add pairs of products of the codes *as x86 stores them* into
    16 bits, exact only while ``2 × max|weight code| × max input code <= 32767``. x86 stores
    weights as qint8 (asymmetric ones shifted by -128: codes down to -128 whatever the bit
    width) and inputs as quint8 (symmetric ones shifted by +128), so more than the 8-bit ×
    8-bit layers of :attr:`LayerFormat.saturates` saturate there, e.g. any asymmetric weight
    with an 8-bit input; torch-x86 runs those in float (exact).

    Example:
        >>> x86_saturates(LayerPlan(QuantSpec(bits=4), QuantSpec(bits=8)))  # 2 x 7 x 255 fits
        False
    """
    w, a = lp.weight, lp.activation
    if not LayerFormat.of(lp).int_kernel or not int8_saturates():
        return False
    w_max = 2 ** (int(w.bits) - 1) - 1 if w.symmetric else 128
    a_max = 128 + 2 ** (int(a.bits) - 1) - 1 if a.symmetric else 2 ** int(a.bits) - 1
    return 2 * w_max * a_max > 32767


def act_storage(storage: str, backend: str) -> str:
    # x86 quantized kernels take quint8 inputs only: a symmetric int8 grid is shifted by 128.
    if backend == "torch-x86" and storage == "int8":
        return "quint8 (zero-point +128)"
    if backend == "torch-x86" and storage == "uint8":
        return "quint8"
    return storage


#: A backend note starting with one of these words describes the layer's kernel itself (an
#: embedding's lookup, the attention matmuls' operands): :func:`describe_layer` then leaves out
#: its generic kernel phrase, and gives the weight's integer storage as stored in the artifact.
OWN_KERNEL_NOTES = ("lookup", "operands")


def describe_layer(lp: LayerPlan, backend: str, tail: str | None = None) -> str:
    """Human-readable record of how a layer runs, e.g.
    ``"w4c→int8, a6a→uint8+clip[0,63], int8 kernel, out→calibrated uint8"``.

    ``tail`` is the backend's note on the deployed graph around the layer (how its output is
    quantized, ...): it depends only on the kernel formats, so cached measurements keep it.
    A note starting with a word of :data:`OWN_KERNEL_NOTES` replaces the kernel phrase.

    Example:
        >>> describe_layer(LayerPlan(QuantSpec(bits=4), QuantSpec(bits=6, symmetric=False)),
        ...                "onnxruntime")
        'w4→int8 (sub-8-bit grid, packed on disk), a6a→uint8+clip[0,63], int8 kernel'
    """
    fmt = LayerFormat.of(lp)
    parts = []
    w, a = lp.weight, lp.activation
    own_kernel = bool(tail) and tail.startswith(OWN_KERNEL_NOTES)
    if w.is_float:
        parts.append("w fp16→fp32 (fp16 values)" if w.bits == "fp16" else "w fp32")
    else:
        storage = fmt.weight.storage
        if own_kernel:
            pass  # the note says how the codes run
        elif backend == "torch-x86":  # x86 weights are qint8; uint8 codes shift by -128
            storage = "qint8" if storage == "int8" else "qint8 (zero-point -128)"
        elif fmt.saturates and storage == "int8":
            storage = "uint8 (codes +128: exact U8U8 kernel)"
        parts.append(
            f"w{w.short()}→{storage}"
            + (" (sub-8-bit grid, packed on disk)" if int(w.bits) < 8 else "")
        )
    if a.is_float:
        parts.append("a fp16→fp32 (fp16 round trip)" if a.bits == "fp16" else "a fp32")
    elif a.per_channel:
        parts.append(f"a{a.short()}→simulated quantize-dequantize (no per-channel int kernel)")
    else:
        lo, hi = a.qrange
        parts.append(
            f"a{a.short()}→{act_storage(fmt.activation.storage, backend)}"
            + (f"+clip[{lo},{hi}]" if fmt.activation.clip else "")
        )
    if own_kernel:
        pass
    elif backend == "torch-x86" and x86_saturates(lp):
        parts.append("float kernel (x86 u8×s8 int8 kernels saturate on this CPU: no VNNI)")
    elif fmt.int_kernel:
        parts.append("int8 kernel")
    elif fmt.weight.is_int:
        parts.append(
            "float kernel (weight dequantized at run time)"
            if backend == "onnxruntime"
            else "float kernel (dequantized weight)"
        )
    else:
        parts.append("float kernel")
    if tail:
        parts.append(tail)
    return ", ".join(parts)


def plan_formats(
    plan: QuantPlan | None, backend: str, tails: Mapping[str, str] | None = None
) -> dict[str, str]:
    """:func:`describe_layer` of every non-float layer of ``plan``."""
    if plan is None:
        return {}
    tails = tails or {}
    return {
        n: describe_layer(lp, backend, tails.get(n))
        for n, lp in plan.layers.items()
        if not LayerFormat.of(lp).is_float
    }


# ---------------------------------------------------------------------------------------
# Signature of the deployed graph
# ---------------------------------------------------------------------------------------


def _float_type(module: nn.Module) -> type[nn.Module]:
    return module.float_type if isinstance(module, QuantizedLayer) else type(module)


def architecture_hash(model: nn.Module) -> str:
    """Hash of the model's module structure (FQNs, float types, shapes of the leaf modules),
    not its values.

    Fake-quant wrappers count as their float module and quantizers are skipped, so a float
    model (BN-folded) and any fake-quant version of it (also the ``torch.fx`` one of quantized
    adds) hash the same.

    Example:
        >>> a = architecture_hash(nn.Sequential(nn.Linear(4, 2)))
        >>> a == architecture_hash(nn.Sequential(nn.Linear(4, 2))) != architecture_hash(
        ...     nn.Sequential(nn.Linear(4, 3)))
        True
    """
    rows = []
    skip: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, FakeQuantize) or any(name.startswith(p) for p in skip):
            skip.append(name + ".")
            continue
        if not isinstance(module, QuantizedLayer) and next(module.children(), None) is not None:
            continue  # containers: a traced copy has other container types
        ftype = _float_type(module)
        rows.append([name, f"{ftype.__module__}.{ftype.__qualname__}", ftype.extra_repr(module)])
    text = json.dumps(rows, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def layer_formats(model: nn.Module, plan: QuantPlan | None) -> dict[str, LayerFormat]:
    """Kernel format of every non-float layer of ``plan`` (plan order)."""
    if plan is None:
        return {}
    out = {}
    for name, lp in plan.layers.items():
        fmt = LayerFormat.of(lp)
        if not fmt.is_float:
            out[name] = fmt
    return out


def graph_signature(model: nn.Module, plan: QuantPlan | None) -> str:
    """Signature of the graph ``plan`` deploys for ``model``: equal signatures run the same
    kernels, so they share one latency measurement.

    It covers the architecture (:func:`architecture_hash`) and each layer's kernel format
    (int8 vs float, per-tensor vs per-channel weight, int8 vs uint8 input, clamp for sub-8-bit
    inputs) and whether the adds are integer. Calibration method, LSQ and weight bit widths
    below 8 do not change the kernel and are not part of it. Backend, batch size and threads
    are added by the cache key.

    Example:
        >>> from autoquant.types import QuantSpec
        >>> net = nn.Sequential(nn.Linear(4, 2))
        >>> w4 = QuantPlan.uniform(["0"], QuantSpec(bits=4), QuantSpec(bits=8))
        >>> w6 = QuantPlan.uniform(["0"], QuantSpec(bits=6), QuantSpec(bits=8))
        >>> graph_signature(net, w4) == graph_signature(net, w6) != graph_signature(net, None)
        True
    """
    formats = layer_formats(model, plan)
    payload = {
        "arch": architecture_hash(model),
        "layers": {n: f.key() for n, f in sorted(formats.items())},
    }
    if plan is not None and not plan.adds.is_float:
        payload["adds"] = tensor_format(plan.adds, activation=True).key()
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:24]
