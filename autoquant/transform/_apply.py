"""Find quantizable layers, apply a plan, calibrate."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from autoquant.quant import FakeQuantize
from autoquant.transform._adds import quantize_adds
from autoquant.transform._fold import _replace, fold_batchnorm_
from autoquant.transform._inputs import call_model
from autoquant.transform._registry import _REGISTRY, QuantizedLayer
from autoquant.types import PlanError, QuantPlan


@dataclass(frozen=True)
class LayerInfo:
    """One quantizable layer: FQN, float type name, own parameter count, MACs for the example
    input (whole batch; 0 if the forward pass never called it)."""

    name: str
    type_name: str
    params: int
    macs: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _is_quantizable(module: nn.Module) -> bool:
    # Exact type: a user subclass of nn.Conv2d may override forward, which a wrapper would drop.
    return type(module) in _REGISTRY or isinstance(module, QuantizedLayer)


def _float_type(module: nn.Module) -> type[nn.Module]:
    return module.float_type if isinstance(module, QuantizedLayer) else type(module)


def quantizable_names(model: nn.Module) -> list[str]:
    """FQNs of the quantizable layers of ``model``, in module order."""
    return [n for n, m in model.named_modules() if _is_quantizable(m)]


def quantizable_layers(model: nn.Module, example_input: Any) -> list[LayerInfo]:
    """Every registered layer (Conv1d, Conv2d, Linear, ...) with its size and MACs.

    Runs one eval-mode, no-grad forward pass with forward hooks; the model's train/eval flags
    are restored afterwards.

    Args:
        model: float (or already quantized) model.
        example_input: a tensor, or a tuple of positional inputs.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
        >>> [(i.name, i.type_name, i.params, i.macs)
        ...  for i in quantizable_layers(net, torch.zeros(1, 1, 8, 8))]
        [('0', 'Conv2d', 40, 1296), ('2', 'Linear', 1450, 1440)]
    """
    layers = [(n, m) for n, m in model.named_modules() if _is_quantizable(m)]
    macs = dict.fromkeys((n for n, _ in layers), 0)

    def hook_for(name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Tensor) -> None:
            macs[name] += _REGISTRY[_float_type(module)].macs(module, output)

        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in layers]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            call_model(model, example_input)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return [
        LayerInfo(
            n, _float_type(m).__name__, sum(p.numel() for p in m.parameters(recurse=False)), macs[n]
        )
        for n, m in layers
    ]


def check_plan(model: nn.Module, plan: QuantPlan) -> None:
    """Raise :class:`~autoquant.types.PlanError` if ``plan`` names a layer ``model`` lacks."""
    if not isinstance(plan, QuantPlan):
        raise PlanError(f"plan must be a QuantPlan, got {type(plan).__name__}")
    valid = quantizable_names(model)
    unknown = sorted(set(plan.layers) - set(valid))
    if unknown:
        raise PlanError(f"unknown layer name(s) {unknown} in the plan; valid names: {valid}")


def apply_plan(model: nn.Module, plan: QuantPlan) -> nn.Module:
    """A fake-quant copy of ``model`` that simulates ``plan``; ``model`` is not modified.

    The copy has BatchNorm folded into the preceding convs (BN replaced by ``nn.Identity``) and
    every layer of the plan that is not fp32/fp32 replaced by its wrapper (``QConv2d``, ...),
    with weight and input-activation :class:`~autoquant.quant.FakeQuantize` modules, not yet
    calibrated (they pass values through until :func:`calibration`). Layers missing from the
    plan, or fp32 for both tensors, stay float. When ``plan.adds`` is 8-bit, the residual adds
    are quantized too and the copy is a ``torch.fx.GraphModule`` with the same submodule
    names (see :func:`quantize_adds`). Deterministic: same model and plan give the same module
    structure.

    Raises:
        PlanError: a plan layer name is not a quantizable layer of ``model`` (the message lists
            the valid names), or a layer is already quantized.

    Example:
        >>> from autoquant.types import QuantSpec
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        >>> q = apply_plan(net, QuantPlan.uniform(["0"], QuantSpec(bits=4), QuantSpec(bits=8)))
        >>> [type(m).__name__ for m in q]
        ['QConv2d', 'Identity', 'ReLU']
    """
    check_plan(model, plan)
    out = copy.deepcopy(model)
    fold_batchnorm_(out)
    for name, module in list(out.named_modules()):
        layer_plan = plan.layers.get(name)
        if layer_plan is None or (
            layer_plan.weight.bits == "fp32" and layer_plan.activation.bits == "fp32"
        ):
            continue
        if isinstance(module, QuantizedLayer):
            raise PlanError(
                f"layer {name!r} is already quantized; apply the plan to the float model"
            )
        _replace(out, name, _REGISTRY[type(module)].from_float(module, layer_plan))
    if not plan.adds.is_float:
        out, _ = quantize_adds(out, plan.adds)
    return out


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLayer]:
    """FQN -> wrapper for every fake-quant layer of an :func:`apply_plan` result."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLayer)}


@contextmanager
def calibration(model: nn.Module) -> Iterator[nn.Module]:
    """Calibrate every :class:`~autoquant.quant.FakeQuantize` of ``model`` on the batches run
    inside the block; freeze the ranges on exit.

    Inside the block observers are reset and on, fake-quant is off, the model is in eval mode
    (dropout off) and gradients are disabled. On normal exit each quantizer computes its scale
    and zero-point and starts quantizing; the model's train/eval flags are restored, so a normal
    optimizer loop can then fine-tune it (weights and LSQ scales get gradients). On an exception
    the quantizers stop observing, keep their previous state (un-frozen for a fresh model) and
    the exception propagates.

    Raises:
        RuntimeError: on exit, an integer-quantized activation saw no data (lists the layers).

    Example:
        >>> from autoquant.types import QuantSpec
        >>> net = apply_plan(nn.Sequential(nn.Linear(4, 2)),
        ...                  QuantPlan.uniform(["0"], QuantSpec(bits=8), QuantSpec(bits=8)))
        >>> with calibration(net):
        ...     _ = net(torch.randn(16, 4))
        >>> net[0].act_fq.calibrated
        True
    """
    fqs = {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantize)}
    modes = {m: m.training for m in model.modules()}

    def restore() -> None:
        for fq in fqs.values():
            fq.observing = False
        for m, training in modes.items():
            m.training = training

    for fq in fqs.values():
        fq.reset_observer()
        fq.observing = True
    model.eval()
    try:
        with torch.no_grad():
            yield model
            # A layer the batches never reached still has a known weight.
            for layer in quantized_layers(model).values():
                if layer.weight_fq.observer is not None and not layer.weight_fq.has_observed:
                    layer.weight_fq(layer.weight)
    except BaseException:
        restore()
        raise
    restore()
    missing = [n for n, fq in fqs.items() if fq.observer is not None and not fq.has_observed]
    if missing:
        raise RuntimeError(
            f"no calibration data reached {missing}; run at least one batch "
            "through the model inside `with calibration(model):`"
        )
    for fq in fqs.values():
        fq.freeze()
