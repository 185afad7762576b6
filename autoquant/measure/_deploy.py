"""A calibrated fake-quant model as integer tensors: weight codes, input grids, float clone.

Both backends lower the same description (:func:`deployed_layers`): for every quantized layer
the integer weight codes (exactly those the fake-quant model uses), the input quantizer, and
the kernel format (see :mod:`autoquant.measure._formats`). A layer without a weight (the
attention matmuls, ``quantizes_weight = False``) quantizes operands inside its own forward: it
is described by its input quantizers only, and deploys where they are called.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from autoquant.measure._formats import LayerFormat
from autoquant.measure._layers import deployment_of
from autoquant.quant import FakeQuantize, quantize
from autoquant.transform import (
    Inputs,
    QuantizedLayer,
    call_model,
    fold_batchnorm,
    has_own_forward,
    quantized_layers,
    registered_base,
    strip_add_quantizers,
)
from autoquant.types import LayerPlan, PlanError, QuantPlan


@dataclass(frozen=True)
class IntQ:
    """Integer quantization parameters of one tensor as deployed."""

    scale: np.ndarray  # float32, shape [] or [C]
    zero_point: np.ndarray  # int64, same shape
    qmin: int
    qmax: int
    axis: int | None
    storage: str  # "int8" or "uint8"

    @property
    def clip(self) -> bool:
        """The grid is narrower than the storage type and needs a clamp (beyond the lone
        ``-128`` code a narrow symmetric 8-bit grid excludes)."""
        return self.qmax - self.qmin < 254

    def clip_range(self) -> tuple[float, float]:
        """Float bounds of the grid (per-tensor only)."""
        s, z = float(self.scale), int(self.zero_point)
        return s * (self.qmin - z), s * (self.qmax - z)

    def zero_point_array(self) -> np.ndarray:
        return self.zero_point.astype(self.storage)


def _intq(fq: FakeQuantize, storage: str, name: str) -> IntQ:
    if not fq.calibrated:
        raise PlanError(
            f"layer {name!r} is not calibrated; run its batches inside "
            "`with autoquant.transform.calibration(model):` before deploying"
        )
    scale = np.asarray(fq.scale.detach().float().cpu().numpy(), dtype=np.float32)
    zp = np.asarray(fq.zero_point.detach().cpu().numpy().round(), dtype=np.int64)
    return IntQ(scale, zp, int(fq.qmin), int(fq.qmax), fq.axis, storage)


def activation_intq(fq: FakeQuantize, name: str) -> IntQ:
    """The integer grid of a calibrated 8-bit-or-narrower activation quantizer (uint8 when
    its codes start at 0, else int8)."""
    return _intq(fq, "uint8" if fq.qmin >= 0 else "int8", name)


@dataclass
class DeployedLayer:
    """One quantized layer, ready to lower: integer codes and qparams, float leftovers."""

    name: str
    plan: LayerPlan
    format: LayerFormat
    float_module: nn.Module  # float clone sharing the folded weight and bias
    weight_q: IntQ | None  # integer weight qparams (None for float weights)
    weight_codes: np.ndarray | None  # integer codes in the storage dtype
    weight_value: Tensor | None  # what the simulation multiplies with (None: no weight)
    act_q: IntQ | None  # integer input qparams (None for float inputs)
    act_fq: FakeQuantize  # the simulated input quantizer (for float-kernel fallbacks)
    weight_only: bool = False  # its type has no integer kernel (an embedding: a lookup)
    operands: tuple[str, ...] = ()  # a weightless layer's input quantizers (``act_fq``, ...)

    @property
    def has_weight(self) -> bool:
        return self.weight_value is not None


def float_clone(model: nn.Module, mark: Callable[[str], nn.Module] | None = None) -> nn.Module:
    """A deep copy of ``model`` with every fake-quant wrapper back to its float module (same
    folded weight and bias, no quantizers); BatchNorm left in the model is folded.

    The quantizers of quantized adds are dropped, or replaced by ``mark(target)`` modules (see
    :func:`autoquant.transform.strip_add_quantizers`); so are those of a layer without a weight
    (the attention matmuls: with ``mark``, the layer keeps its class and calls the marks).
    """
    out = copy.deepcopy(model)
    strip_add_quantizers(out, mark)
    for name, layer in quantized_layers(out).items():
        if mark is not None and not layer.quantizes_weight:
            for key, m in list(layer._modules.items()):
                if isinstance(m, FakeQuantize):
                    layer._modules[key] = mark(f"{name}.{key}")
            continue
        f = copy.copy(layer)
        f._parameters = dict(layer._parameters)
        f._buffers = dict(layer._buffers)
        f._modules = {k: m for k, m in layer._modules.items() if not isinstance(m, FakeQuantize)}
        f.__dict__.pop("layer_plan", None)
        f.__class__ = layer.float_type
        parent, _, child = name.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, child, f)
    return fold_batchnorm(out).eval()


def deployed_layers(model: nn.Module, plan: QuantPlan) -> dict[str, DeployedLayer]:
    """Integer weights and qparams of every non-float plan layer of a calibrated
    :func:`~autoquant.transform.apply_plan` model.

    A layer without a weight (``quantizes_weight = False``) needs no deployment declaration:
    its input quantizers deploy where its forward calls them.

    Raises:
        PlanError: a plan layer is not a fake-quant wrapper in ``model``, is not calibrated, or
            its type has no deployment.
    """
    wrappers = quantized_layers(model)
    floats = dict(float_clone(model).named_modules())
    out: dict[str, DeployedLayer] = {}
    for name, lp in plan.layers.items():
        fmt = LayerFormat.of(lp)
        if fmt.is_float:
            continue
        layer = wrappers.get(name)
        if layer is None:
            raise PlanError(
                f"plan layer {name!r} is not a fake-quant layer of the model; pass "
                "the calibrated result of autoquant.transform.apply_plan(model, "
                f"plan) (quantized layers: {sorted(wrappers)})"
            )
        if layer.layer_plan != lp:
            raise PlanError(
                f"layer {name!r} was built for {layer.layer_plan.short()}, the plan "
                f"says {lp.short()}; apply this plan to the float model"
            )
        if not layer.quantizes_weight:
            out[name] = _weightless(name, layer, fmt, floats[name])
            continue
        dep = deployment_of(layer)
        if dep is None:
            kind = layer.float_type.__name__
            raise PlanError(
                f"layer {name!r} ({kind}) has no deployment; declare one with "
                f"autoquant.measure.register_deployment({kind}, onnx=[...], x86=...)"
            )
        if not dep.integer_kernel and lp.activation.bits != "fp32":
            raise PlanError(
                f"layer {name!r} ({layer.float_type.__name__}) deploys weight-only: "
                f"activation bits={lp.activation.bits!r} is not allowed; allowed values: 'fp32'"
            )
        weight = layer.weight.detach().float()
        weight_q = codes = None
        with torch.no_grad():
            value = layer.weight_fq(layer.weight).detach().float()
        if fmt.weight.is_int:
            weight_q = _intq(layer.weight_fq, fmt.weight.storage, name)
            axis = weight_q.axis
            codes_t = quantize(
                weight,
                torch.from_numpy(weight_q.scale),
                torch.from_numpy(weight_q.zero_point).float(),
                weight_q.qmin,
                weight_q.qmax,
                axis,
            )
            codes = codes_t.numpy().astype(fmt.weight.storage)
        act_q = None
        if fmt.activation.is_int:
            act_q = _intq(layer.act_fq, fmt.activation.storage, name)
        out[name] = DeployedLayer(
            name,
            lp,
            fmt,
            floats[name],
            weight_q,
            codes,
            value,
            act_q,
            copy.deepcopy(layer.act_fq),
            weight_only=not dep.integer_kernel,
        )
    return out


def _weightless(name: str, layer: QuantizedLayer, fmt: LayerFormat, f: nn.Module) -> DeployedLayer:
    """A layer that quantizes operands of its own (no weight): its input quantizers."""
    operands = tuple(getattr(type(layer), "input_quantizers", ("act_fq",)))
    act_q = _intq(layer.act_fq, fmt.activation.storage, name) if fmt.activation.is_int else None
    return DeployedLayer(
        name, layer.layer_plan, fmt, f, None, None, None, act_q, layer.act_fq, operands=operands
    )


# ---------------------------------------------------------------------------------------
# Output ranges for requantization
# ---------------------------------------------------------------------------------------


def _observe(
    model: nn.Module, names: Iterable[str], inputs: Iterable[Inputs], see: Callable[..., None]
) -> None:
    """Run ``inputs`` through ``model`` (eval, no grad) calling ``see(name, output)`` after
    each call of a named module; train/eval flags are restored."""
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(lambda m, a, out, n=n: see(n, out)) for n in names]
    training = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            for x in inputs:
                call_model(model, x)
    finally:
        for h in handles:
            h.remove()
        for m, t in training.items():
            m.training = t


def _primitive(layer: QuantizedLayer) -> Callable[[Tensor], Tensor]:
    """The float op a wrapper's primitive computes on its (quantized) input: its registered
    base type's forward, with the simulated weight."""
    base = copy.copy(layer)
    base._modules = {k: m for k, m in layer._modules.items() if not isinstance(m, FakeQuantize)}
    base.__class__ = registered_base(type(layer))  # type: ignore[assignment]
    with torch.no_grad():
        base.weight = nn.Parameter(layer.weight_fq(layer.weight).detach(), requires_grad=False)
    return base.forward


def output_ranges(
    model: nn.Module, names: Iterable[str], inputs: Iterable[Inputs]
) -> dict[str, tuple[float, float]]:
    """Min and max of each named layer's output over ``inputs`` (fake-quant forward): of its
    primitive's output (what an integer kernel outputs) for a subclass with a forward of its
    own, computed from the primitive's quantized input."""
    ranges = {n: [float("inf"), float("-inf")] for n in names}
    modules = dict(model.named_modules())
    # A subclass's own forward may change the primitive's output (+ 0.25): watch its input.
    watched = {(f"{n}.act_fq" if has_own_forward(modules[n]) else n): n for n in ranges}
    primitives = {
        n: _primitive(modules[n])
        for w, n in watched.items()
        if w != n  # type: ignore[arg-type]
    }

    def see(watch: str, output: Tensor) -> None:
        name = watched[watch]
        if name in primitives:
            output = primitives[name](output)
        r = ranges[name]
        r[0] = min(r[0], float(output.min()))
        r[1] = max(r[1], float(output.max()))

    _observe(model, list(watched), inputs, see)
    return {n: (r[0], r[1]) for n, r in ranges.items()}


def check_calls(model: nn.Module, names: Iterable[str], example_input: Inputs) -> None:
    """Raise :class:`~autoquant.types.PlanError` unless each named layer runs exactly once in
    a forward pass: deployment gives each quantized layer one output grid."""
    calls = dict.fromkeys(names, 0)
    _observe(model, list(calls), [example_input], lambda n, out: calls.__setitem__(n, calls[n] + 1))
    missing = sorted(n for n, c in calls.items() if c == 0)
    if missing:
        raise PlanError(f"plan layer(s) {missing} are never called in forward")
    repeated = sorted(n for n, c in calls.items() if c > 1)
    if repeated:
        raise PlanError(
            f"plan layer(s) {repeated} are called more than once in forward; "
            "deployment supports one call per quantized layer"
        )


def uint8_qparams(lo: float, hi: float) -> IntQ:
    """8-bit asymmetric qparams for ``[lo, hi]`` (extended to include 0), as the contract's
    formula gives them."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if not np.isfinite(lo) or not np.isfinite(hi):
        lo, hi = 0.0, 1.0  # a layer the inputs never reached: any valid grid
    scale = max((hi - lo) / 255.0, float(np.finfo(np.float32).eps))
    zp = int(np.clip(round(255 - hi / scale), 0, 255))
    return IntQ(
        np.array(scale, dtype=np.float32), np.array(zp, dtype=np.int64), 0, 255, None, "uint8"
    )
