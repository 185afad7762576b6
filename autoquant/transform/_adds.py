"""Quantized residual adds: fake-quantize the operands and output of tensor + tensor adds.

An integer add (ONNX Runtime's QLinearAdd) needs both operands and its output on integer
grids. :func:`quantize_adds` traces the model with ``torch.fx`` and, for every add of two
activation tensors, inserts :class:`~autoquant.quant.FakeQuantize` calls so that the
simulation rounds exactly where the deployed graph will:

* an operand that is already on a grid (it reaches back to a quantizer through ops that keep
  the grid: slicing, zero padding, ReLU, max-pool, reshapes; the rules of
  :mod:`autoquant.transform._grid_rules`, which the ONNX export reads too) is left alone; any
  other operand gets a quantizer;
* the output is quantized after the ReLU that follows the add, when there is one (a
  ``[0, max]`` grid, and ONNX Runtime folds the ReLU into the integer add).

A tensor has one grid, as in the deployed graph: when a tensor that gets a quantizer also
feeds a quantized layer whose input is 8-bit per-tensor, the layer's own input quantizer is
reused (called at both places; fake-quant is idempotent). Otherwise a new quantizer with the
plan's ``adds`` spec is registered as ``<scope>.<add>.in<i>`` or ``<scope>.<add>.out``, e.g.
``layer1.0.add.out``.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import fx, nn

from autoquant.quant import FakeQuantize
from autoquant.transform._grid_rules import RELU_RULE, fx_module, fx_rule
from autoquant.transform._registry import QuantizedLayer
from autoquant.types import QuantSpec

_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_NON_TENSOR_METHODS = {"size", "dim", "numel", "item", "tolist"}


class _Tracer(fx.Tracer):
    """Keeps fake-quant wrappers and quantizers as leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (QuantizedLayer, FakeQuantize)) or super().is_leaf_module(m, qualname)


def _trace(model: nn.Module) -> fx.Graph:
    """The model's graph; raises when it depends on train/eval mode (``self.training`` is
    frozen into a traced graph, so dropout would stay on, or off, for good)."""
    modes = {m: m.training for m in model.modules()}
    try:
        graphs = []
        for training in (True, False):
            model.train(training)
            graph = _Tracer().trace(model)
            graphs.append((graph, graph.python_code("self").src))
    finally:
        for m, training in modes.items():
            m.training = training
    if graphs[0][1] != graphs[1][1]:
        raise RuntimeError("forward depends on train/eval mode")
    return graphs[1][0]


def trace_quantized(model: nn.Module) -> fx.GraphModule:
    """``model`` as a ``torch.fx.GraphModule`` with fake-quant layers and quantizers as leaves:
    ``model`` itself when it is one (quantized adds), else its eval-mode trace.

    Raises:
        Exception: whatever ``torch.fx`` raises for a model it cannot trace, or
            ``RuntimeError`` when the traced graph depends on train/eval mode.
    """
    if isinstance(model, fx.GraphModule):
        return model
    return fx.GraphModule(model, _trace(model), class_name=type(model).__name__)


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    return fx_rule(gm, node) is RELU_RULE


def _keeps_grid(gm: fx.GraphModule, node: fx.Node) -> bool:
    return fx_rule(gm, node) is not None


def _is_tensor(node: object) -> bool:
    """Whether an fx value is an activation tensor (not a shape, a constant or a parameter)."""
    if not isinstance(node, fx.Node):
        return False
    if node.op in ("placeholder", "call_module"):
        return True
    if node.op == "get_attr":
        return False
    if node.op == "call_method" and node.target in _NON_TENSOR_METHODS:
        return False
    if node.op == "call_function" and node.target is getattr:
        return False
    if node.op == "call_function" and node.target is operator.getitem:
        return _is_tensor(node.args[0])
    return any(_is_tensor(a) for a in node.all_input_nodes)


def _is_quantizer(gm: fx.GraphModule, node: fx.Node) -> bool:
    return isinstance(fx_module(gm, node), FakeQuantize)


def _source(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """Walk back through grid-keeping ops."""
    while _keeps_grid(gm, node) and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _reached(gm: fx.GraphModule, node: fx.Node) -> Iterator[fx.Node]:
    """Nodes that read ``node`` directly or through grid-keeping ops."""
    for user in node.users:
        yield user
        if _keeps_grid(gm, user):
            yield from _reached(gm, user)


def _shared_quantizer(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The input quantizer of an 8-bit per-tensor quantized layer that reads ``node``."""
    for user in _reached(gm, node):
        layer = fx_module(gm, user)
        if isinstance(layer, QuantizedLayer):
            spec = layer.layer_plan.activation
            if spec.bits == 8 and not spec.per_channel:
                return f"{user.target}.act_fq"
    return None


def _add_name(node: fx.Node, counts: dict[str, int]) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    scope = next(reversed(stack)) if stack else ""
    scope = scope if isinstance(scope, str) else ""
    k = counts.get(scope, 0)
    counts[scope] = k + 1
    base = "add" if k == 0 else f"add_{k}"
    return f"{scope}.{base}" if scope else base


def _is_add(node: fx.Node) -> bool:
    """``a + b`` of two activation tensors (no ``alpha``, no ``out``)."""
    add = (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target == "add"
    )
    return add and len(node.args) == 2 and not node.kwargs and all(map(_is_tensor, node.args))


def add_outputs(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node]]:
    """Each tensor + tensor add of ``gm``'s graph, with the node whose output is the add's
    result: the add itself, or the ReLU that is its only user."""
    out = []
    for node in gm.graph.nodes:
        if _is_add(node):
            user = next(iter(node.users)) if len(node.users) == 1 else None
            out.append((node, user if user is not None and _is_relu(gm, user) else node))
    return out


def quantize_adds(model: nn.Module, spec: QuantSpec) -> tuple[nn.Module, list[str]]:
    """``model`` with its tensor + tensor adds fake-quantized per ``spec`` (see module doc).

    Returns ``(module, add names)``. ``module`` is a ``torch.fx.GraphModule`` keeping the
    submodule names of ``model`` when it has adds, else ``model`` itself. A model that
    ``torch.fx`` cannot trace, or whose traced graph depends on train/eval mode (e.g.
    ``F.dropout(x, training=self.training)``), keeps float adds, with a warning.

    Example:
        >>> class Res(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.conv = nn.Conv2d(2, 2, 1)
        ...     def forward(self, x):
        ...         return torch.relu(self.conv(x) + x)
        >>> q, names = quantize_adds(Res(), QuantSpec(bits=8, symmetric=False))
        >>> names, sorted(n for n, m in q.named_modules() if isinstance(m, FakeQuantize))
        (['add'], ['add.in0', 'add.in1', 'add.out'])
    """
    try:
        graph = _trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure means "no adds found"
        warnings.warn(
            f"autoquant: {type(model).__name__} cannot be traced by torch.fx ({e}); its adds "
            "stay float",
            stacklevel=2,
        )
        return model, []
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    adds = add_outputs(gm)
    if not adds:
        return model, []
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    counts: dict[str, int] = {}
    names = []

    def quantizer(target_node: fx.Node, new_name: str) -> str:
        shared = _shared_quantizer(gm, target_node)
        if shared is not None:
            return shared
        gm.add_submodule(new_name, FakeQuantize(spec).to(device))
        return new_name

    for add, out in adds:
        name = _add_name(add, counts)
        names.append(name)
        args = list(add.args)
        for i, arg in enumerate(args):
            src = _source(gm, arg)
            if _is_quantizer(gm, src):
                continue
            target = quantizer(src, f"{name}.in{i}")
            with gm.graph.inserting_before(add):
                args[i] = gm.graph.call_module(target, (arg,))
        add.args = tuple(args)
        target = quantizer(out, f"{name}.out")
        with gm.graph.inserting_after(out):
            q = gm.graph.call_module(target, (out,))
        out.replace_all_uses_with(q, delete_user_cb=lambda user, q=q: user is not q)
    gm.recompile()
    return gm, names


def add_quantizers(model: nn.Module) -> dict[str, FakeQuantize]:
    """Quantizer calls that :func:`quantize_adds` inserted in ``model``'s graph, by target
    (shared ones under their layer's name, e.g. ``layer1.1.conv1.act_fq``); empty for a model
    without quantized adds."""
    if not isinstance(model, fx.GraphModule):
        return {}
    out = {}
    for node in model.graph.nodes:
        mod = fx_module(model, node)
        if isinstance(mod, FakeQuantize):
            out[str(node.target)] = mod
    return out


def strip_add_quantizers(
    model: fx.GraphModule, mark: Callable[[str], nn.Module] | None = None
) -> None:
    """Remove the quantizer calls of :func:`quantize_adds` from ``model``'s graph, in place, or
    with ``mark``, call ``mark(target)`` modules in their place (registered as
    ``_aq_mark<i>``). Used to build the float or deployed twin of a quantized model."""
    for i, node in enumerate(list(model.graph.nodes)):
        if not _is_quantizer(model, node):
            continue
        if mark is None:
            node.replace_all_uses_with(node.args[0])
            model.graph.erase_node(node)
        else:
            new = f"_aq_mark{i}"
            model.add_submodule(new, mark(str(node.target)))
            node.target = new
    model.graph.lint()
    model.recompile()
    model.delete_all_unused_submodules()
