"""Which ops keep a tensor on its quantization grid: one table, read over both graphs.

A tensor on a per-tensor grid (its values are ``S * (q - Z)`` for integer codes ``q``) is still
on that grid after pure data movement, after zero padding (0 is on every grid, as a grid's zero
point is an integer), and after monotone maps that keep 0 at 0 (ReLU, max-pool). Quantizing
before or after such an op gives the same values, so the op may run on integers and a producer
may quantize straight onto the grid of a consumer further on.

The rules are written once, here, as data: each :class:`GridRule` lists its ``torch.fx`` targets
(functions, methods, module types: what :func:`~autoquant.transform.quantize_adds` reads) and its
ONNX op types (what the ONNX export's passes read) side by side. :func:`reached_grid` is the one
walk over either graph: the single grid every reader of a value reads it on (readers of its
shape only, :data:`SHAPE_ONLY_ONNX_OPS` and :func:`fx_reads_shape_only`, do not count).

Example:
    >>> [r.name for r in GRID_RULES]
    ['identity', 'view', 'slice', 'zero_pad', 'relu', 'max_pool']
    >>> ONNX_GRID_RULES["Reshape"].name, ONNX_GRID_RULES["Pad"].zero_pad_only
    ('view', True)
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from autoquant.transform._registry import registered_base


@dataclass(frozen=True)
class GridRule:
    """One kind of op after which a per-tensor-quantized tensor is still on its grid.

    Attributes:
        name: the rule's id.
        why: why the grid is kept.
        onnx_ops: ONNX op types (the tensor is the op's first input).
        fx_functions: ``call_function`` targets (the tensor is the first argument).
        fx_methods: ``call_method`` names.
        fx_modules: ``call_module`` types.
        zero_pad_only: only a constant pad without a pad value (zeros) keeps the grid.
    """

    name: str
    why: str
    onnx_ops: frozenset[str] = frozenset()
    fx_functions: frozenset[Callable[..., Any]] = frozenset()
    fx_methods: frozenset[str] = frozenset()
    fx_modules: tuple[type[nn.Module], ...] = ()
    zero_pad_only: bool = False


GRID_RULES: tuple[GridRule, ...] = (
    GridRule(
        "identity",
        "the identity at inference (no node in an ONNX export)",
        onnx_ops=frozenset({"Identity", "Dropout"}),
        fx_methods=frozenset({"contiguous"}),
        fx_modules=(nn.Identity, nn.Dropout),
    ),
    GridRule(
        "view",
        "pure data movement",
        onnx_ops=frozenset({"Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose"}),
        fx_functions=frozenset(
            {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.transpose}
        ),
        fx_methods=frozenset(
            {"flatten", "view", "reshape", "permute", "transpose", "squeeze", "unsqueeze"}
        ),
        fx_modules=(nn.Flatten,),
    ),
    GridRule(
        "slice",
        "selects elements",
        onnx_ops=frozenset({"Slice"}),
        fx_functions=frozenset({operator.getitem}),
    ),
    GridRule(
        "zero_pad",
        "adds zeros, and 0 is on every grid",
        onnx_ops=frozenset({"Pad"}),
        fx_functions=frozenset({F.pad}),
        zero_pad_only=True,
    ),
    GridRule(
        "relu",
        "monotone, keeps 0 at 0",
        onnx_ops=frozenset({"Relu"}),
        fx_functions=frozenset({F.relu, torch.relu}),
        fx_methods=frozenset({"relu"}),
        fx_modules=(nn.ReLU,),
    ),
    GridRule(
        "max_pool",
        "monotone selection",
        onnx_ops=frozenset({"MaxPool"}),
        fx_functions=frozenset({F.max_pool1d, F.max_pool2d}),
        fx_modules=(nn.MaxPool1d, nn.MaxPool2d),
    ),
)
#: The rule of each ONNX op type.
ONNX_GRID_RULES: dict[str, GridRule] = {op: r for r in GRID_RULES for op in r.onnx_ops}
RELU_RULE = next(r for r in GRID_RULES if r.name == "relu")
IDENTITY_RULE = next(r for r in GRID_RULES if r.name == "identity")


#: Readers that use only a tensor's shape, never its values: they do not stop a grid.
SHAPE_ONLY_ONNX_OPS = frozenset({"Shape", "Size"})
SHAPE_ONLY_FX_METHODS = frozenset({"size", "dim", "numel"})
_SHAPE_ATTRS = frozenset({"shape", "ndim", "dtype", "device"})


def fx_reads_shape_only(node: fx.Node) -> bool:
    """``node`` reads only its input's shape (``x.size(0)``, ``x.shape``, ...)."""
    if node.op == "call_method":
        return node.target in SHAPE_ONLY_FX_METHODS
    return node.op == "call_function" and node.target is getattr and node.args[1] in _SHAPE_ATTRS


def has_own_forward(layer: nn.Module) -> bool:
    """Whether a quantizable layer's class (a user subclass) runs a ``forward`` of its own
    around the primitive the simulation quantizes: what the primitive reads, on the layer's
    input grid, may then differ from the layer's input (``super().forward(x - 0.5)``), so a
    producer must not quantize its output onto that grid.

    Example:
        >>> class Shifted(nn.Linear):
        ...     def forward(self, x):
        ...         return super().forward(x - 0.5)
        >>> has_own_forward(Shifted(2, 2)), has_own_forward(nn.Linear(2, 2))
        (True, False)
    """
    cls = getattr(type(layer), "float_type", type(layer))
    base = registered_base(cls)
    return base is not None and cls.forward is not base.forward


def fx_module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The module a ``call_module`` node calls, else None."""
    if node.op != "call_module":
        return None
    return gm.get_submodule(str(node.target))


def _zero_pad(node: fx.Node) -> bool:
    mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
    value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)
    return mode == "constant" and not value


def fx_rule(gm: fx.GraphModule, node: fx.Node) -> GridRule | None:
    """The rule by which ``node`` keeps its first input's grid, or None.

    Example:
        >>> gm = fx.symbolic_trace(nn.Sequential(nn.ReLU(), nn.Flatten()))
        >>> [getattr(fx_rule(gm, n), "name", None) for n in gm.graph.nodes]
        [None, 'relu', 'view', None]
    """
    for rule in GRID_RULES:
        if node.op == "call_function" and node.target in rule.fx_functions:
            return None if rule.zero_pad_only and not _zero_pad(node) else rule
        if node.op == "call_method" and node.target in rule.fx_methods:
            return rule
        module = fx_module(gm, node)
        if module is not None and isinstance(module, rule.fx_modules):
            return rule
    return None


@dataclass(frozen=True)
class GridUse:
    """How one reader uses a value (for :func:`reached_grid`).

    ``grid``: the reader quantizes the value onto this grid (a quantized layer's input, an add's
    quantizer). ``passes``: the reader keeps the grid, and its result (this value) is followed.
    Neither: the reader needs the value itself (a graph output, any other op).
    """

    grid: str | None = None
    passes: Hashable | None = None


def reached_grid(start: Hashable, uses: Callable[[Hashable], Sequence[GridUse]]) -> str | None:
    """The one grid every reader of ``start`` reads it on, through grid-keeping ops, or None.

    ``uses(value)`` describes each reader of ``value``; an empty list (an unused value, or a
    graph output: its readers need the exact value) means no grid.

    Example:
        >>> graph = {"conv": [GridUse(passes="relu")], "relu": [GridUse(grid="fc.act_fq")]}
        >>> reached_grid("conv", lambda v: graph.get(v, []))
        'fc.act_fq'
        >>> graph["relu"].append(GridUse())  # another reader needs the float value
        >>> reached_grid("conv", lambda v: graph.get(v, [])) is None
        True
    """
    grids: set[str] = set()
    pending = [start]
    while pending:
        readers = uses(pending.pop())
        if not readers:
            return None
        for use in readers:
            if use.grid is not None:
                grids.add(use.grid)
            elif use.passes is not None:
                pending.append(use.passes)
            else:
                return None
    return grids.pop() if len(grids) == 1 else None
