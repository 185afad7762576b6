"""Apply a plan to a model, calibrate."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from autoquant.quant import FakeQuantize
from autoquant.transform._adds import quantize_adds
from autoquant.transform._attention import explicit_attention_, keep_slow_path_
from autoquant.transform._discover import quantizable_names
from autoquant.transform._fold import fold_batchnorm_
from autoquant.transform._registry import QuantizedLayer, wrap_
from autoquant.types import PlanError, QuantPlan


def check_plan(model: nn.Module, plan: QuantPlan) -> None:
    """Raise :class:`~autoquant.types.PlanError` if ``plan`` names a layer ``model`` lacks."""
    if not isinstance(plan, QuantPlan):
        raise PlanError(f"plan must be a QuantPlan, got {type(plan).__name__}")
    valid = quantizable_names(model)
    unknown = sorted(set(plan.layers) - set(valid))
    if unknown:
        raise PlanError(f"unknown layer name(s) {unknown} in the plan; valid names: {valid}")


def apply_plan(model: nn.Module, plan: QuantPlan, *, example_input: Any = None) -> nn.Module:
    """A fake-quant copy of ``model`` that simulates ``plan``; ``model`` is not modified.

    The copy has BatchNorm folded into the preceding convs where that is provably exact (BN
    replaced by ``nn.Identity``; see :func:`~autoquant.transform.conv_bn_pairs`, which uses
    ``example_input`` for models ``torch.fx`` cannot trace), every ``nn.MultiheadAttention``
    holding a plan layer made explicit (:class:`ExplicitMultiheadAttention`), and every layer of
    the plan that is not fp32/fp32 turned into its wrapper (``QConv2d``, ``QLinear``,
    ``QEmbedding``, or the generated wrapper of a subclass), with weight and input-activation
    :class:`~autoquant.quant.FakeQuantize` modules, not yet calibrated (they pass values
    through until :func:`calibration`). A module referenced at several places is wrapped once,
    everywhere. Transformer layers holding a wrapper never take PyTorch's fused fast path.
    Layers missing from the plan, or fp32 for both tensors, stay float. When ``plan.adds`` is
    8-bit, the residual adds are quantized too and the copy is a ``torch.fx.GraphModule`` with
    the same submodule names (see :func:`quantize_adds`). Deterministic: same model and plan
    give the same module structure.

    Raises:
        PlanError: a plan layer name is not a quantizable layer of ``model`` (the message lists
            the valid names), a layer is already quantized, or a layer cannot run its plan (an
            embedding asked to quantize its input, an unsupported module); the message names
            the layer.

    Example:
        >>> from autoquant.types import QuantSpec
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        >>> q = apply_plan(net, QuantPlan.uniform(["0"], QuantSpec(bits=4), QuantSpec(bits=8)))
        >>> [type(m).__name__ for m in q]
        ['QConv2d', 'Identity', 'ReLU']
    """
    check_plan(model, plan)
    out = copy.deepcopy(model)
    fold_batchnorm_(out, example_input)
    active = {
        n
        for n, lp in plan.layers.items()
        if not (lp.weight.bits == "fp32" and lp.activation.bits == "fp32")
    }
    owners = {n.rpartition(".")[0] for n in active}
    explicit_attention_(out, names=owners)
    for name, module in list(out.named_modules()):
        if name not in active:
            continue
        if isinstance(module, QuantizedLayer):
            raise PlanError(
                f"layer {name!r} is already quantized; apply the plan to the float model"
            )
        try:
            wrap_(module, plan.layers[name])
        except PlanError as e:
            raise PlanError(f"layer {name!r}: {e}") from None
    keep_slow_path_(out)
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
                if not layer.quantizes_weight:
                    continue
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
            "through the model inside `with calibration(model):` (a layer the forward pass "
            "never calls cannot be calibrated: quantizable_layers(model, example_input) "
            "reports each layer's status)"
        )
    for fq in fqs.values():
        fq.freeze()
