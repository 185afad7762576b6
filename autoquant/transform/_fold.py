"""Fold BatchNorm into the preceding convolution, so the simulated model is the deployed one."""

from __future__ import annotations

import copy
from collections import Counter

import torch
import torch.fx
from torch import nn

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


def _pairs_from_sequentials(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Sequential):
            children = list(module.named_children())
            for (cn, conv), (bn_name, bn) in zip(children, children[1:], strict=False):
                if _foldable(conv, bn):
                    prefix = f"{name}." if name else ""
                    pairs.append((prefix + cn, prefix + bn_name))
    return pairs


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv_name, bn_name)`` pairs that :func:`fold_batchnorm` folds, in graph order.

    Found with ``torch.fx.symbolic_trace`` (a conv whose only user is a BatchNorm); if the model
    cannot be traced, adjacent ``(conv, bn)`` children of any ``nn.Sequential``.
    """
    try:
        return _pairs_from_graph(model)
    except Exception:  # any tracing failure (data-dependent control flow...): fall back
        return _pairs_from_sequentials(model)


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


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def fold_batchnorm_(model: nn.Module) -> list[tuple[str, str]]:
    """In place: fold each foldable BatchNorm into its conv and replace it by ``nn.Identity``.

    Returns the folded ``(conv_name, bn_name)`` pairs.
    """
    pairs = conv_bn_pairs(model)
    for conv_name, bn_name in pairs:
        _fold_into(model.get_submodule(conv_name), model.get_submodule(bn_name))
        _replace(model, bn_name, nn.Identity())
    return pairs


def fold_batchnorm(model: nn.Module) -> nn.Module:
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
    fold_batchnorm_(model)
    return model
