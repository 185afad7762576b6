"""Fold BatchNorm into the preceding convolution, so the simulated model is the deployed one.

A BatchNorm is folded only when the actual forward proves it safe (see :func:`conv_bn_pairs`);
otherwise it stays a float op and the outputs are unchanged.
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from typing import Any

import torch
import torch.fx
from torch import nn

from autoquant.transform._dataflow import trace_dataflow

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (
        isinstance(conv, _CONV)
        and isinstance(bn, _BN)
        and bn.running_mean is not None
        and bn.running_var is not None
        and bn.num_features == conv.out_channels
    )


def _pairs_from_graph(model: nn.Module) -> list[tuple[str, str]]:
    graph = torch.fx.symbolic_trace(model).graph
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = []
    for node in graph.nodes:
        src = node.args[0] if node.op == "call_module" and node.args else None
        if not (isinstance(src, torch.fx.Node) and src.op == "call_module"):
            continue
        conv, bn = modules.get(src.target), modules.get(node.target)
        # Only a conv whose single output goes only to this BN, each called once: folding
        # must not change any other use of either module.
        if (
            _foldable(conv, bn)
            and len(src.users) == 1
            and calls[src.target] == 1
            and calls[node.target] == 1
        ):
            pairs.append((str(src.target), str(node.target)))
    return pairs


def _pairs_from_forward(model: nn.Module, example_input: Any) -> list[tuple[str, str]]:
    modules = [(n, m) for n, m in model.named_modules() if isinstance(m, _CONV + _BN)]
    flow = trace_dataflow(model, example_input, dict(modules))
    producers = {
        t.nodes[0]: n
        for n, m in modules
        if isinstance(m, _CONV) and (t := flow.modules[n]).calls == 1 and t.nodes
    }
    pairs = []
    for bn_name, bn in modules:
        t = flow.modules[bn_name]
        if not isinstance(bn, _BN) or t.calls != 1 or not t.raw_nodes:
            continue
        src = t.input_nodes[0]
        conv_name = producers.get(src)
        # The BN reads the conv's output itself (no op in between, not changed in place since:
        # an in-place op would give the tensor a new node), and nothing else reads it.
        if (
            conv_name is not None
            and _foldable(model.get_submodule(conv_name), bn)
            and flow.consumers.get(src) == {t.raw_nodes[0]}
        ):
            pairs.append((conv_name, bn_name))
    order = {n: i for i, (n, _) in enumerate(modules)}
    return sorted(pairs, key=lambda p: order[p[0]])


def conv_bn_pairs(model: nn.Module, example_input: Any = None) -> list[tuple[str, str]]:
    """``(conv_name, bn_name)`` pairs that :func:`fold_batchnorm` folds, in module order.

    A pair folds only when the conv is called once and its output goes only to the BN, itself
    called once, so folding cannot change any other use of either module. This is read from
    ``torch.fx.symbolic_trace``'s graph; for a model ``torch.fx`` cannot trace, from one
    forward pass on ``example_input`` (see :func:`~autoquant.transform.trace_dataflow`). When
    neither is possible nothing is folded (the BatchNorm stays a float op, with a warning), as
    a guess from the module tree could fold a conv that is also used elsewhere.

    Example:
        >>> class Reuse(nn.Module):  # one conv, called twice, a BN after one call
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.conv, self.bn = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)
        ...     def forward(self, x):
        ...         return self.conv(self.bn(self.conv(x)))
        >>> conv_bn_pairs(Reuse()), conv_bn_pairs(nn.Sequential(nn.Conv2d(2, 2, 1),
        ...                                                     nn.BatchNorm2d(2)))
        ([], [('0', '1')])
    """
    if not any(isinstance(m, _BN) for m in model.modules()):
        return []
    try:
        return _pairs_from_graph(model)
    except Exception:  # noqa: BLE001 - any tracing failure (data-dependent control flow...)
        pass
    if example_input is not None:
        return _pairs_from_forward(model, example_input)
    warnings.warn(
        f"autoquant: {type(model).__name__} cannot be traced by torch.fx and no example input "
        "was given: its BatchNorm layers stay float ops (pass example_input to fold them)",
        stacklevel=3,
    )
    return []


@torch.no_grad()
def _fold_into(conv: nn.Module, bn: nn.Module) -> None:
    w = conv.weight.double()
    gamma = (
        bn.weight.double()
        if bn.weight is not None
        else torch.ones_like(bn.running_var, dtype=torch.float64)
    )
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(gamma)
    factor = gamma / torch.sqrt(bn.running_var.double() + bn.eps)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(gamma)
    shape = (-1,) + (1,) * (w.ndim - 1)
    requires_grad = conv.weight.requires_grad
    dtype = conv.weight.dtype
    conv.weight = nn.Parameter((w * factor.reshape(shape)).to(dtype), requires_grad=requires_grad)
    conv.bias = nn.Parameter(
        ((bias - bn.running_mean.double()) * factor + beta).to(dtype), requires_grad=requires_grad
    )


def _replace_all(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Replace every reference to ``old`` in the module tree (a module may sit at two paths)."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if child is old:
                setattr(parent, child_name, new)


def fold_batchnorm_(model: nn.Module, example_input: Any = None) -> list[tuple[str, str]]:
    """In place: fold each foldable BatchNorm (see :func:`conv_bn_pairs`) into its conv and
    replace it by ``nn.Identity``.

    Returns the folded ``(conv_name, bn_name)`` pairs.
    """
    pairs = conv_bn_pairs(model, example_input)
    for conv_name, bn_name in pairs:
        bn = model.get_submodule(bn_name)
        _fold_into(model.get_submodule(conv_name), bn)
        _replace_all(model, bn, nn.Identity())
    return pairs


def fold_batchnorm(model: nn.Module, example_input: Any = None) -> nn.Module:
    """A copy of ``model`` with BatchNorm folded into the preceding convolutions.

    In eval mode the copy computes the same function (BN uses its running statistics):
    ``W' = W * g / sqrt(var + eps)``, ``b' = (b - mean) * g / sqrt(var + eps) + beta``.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)).eval()
        >>> folded = fold_batchnorm(net)
        >>> type(folded[1]).__name__
        'Identity'
    """
    model = copy.deepcopy(model)
    fold_batchnorm_(model, example_input)
    return model
