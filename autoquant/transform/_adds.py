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

Transformers: ``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder`` are traced along
their Python path (the one a quantized layer always takes, see
:func:`~autoquant.transform.keep_slow_path_`), with every ``MultiheadAttention`` a leaf, so their
residual adds are quantized too (each add feeds a LayerNorm, which stays float). A model that
``torch.fx`` cannot trace as a whole (a Hugging Face ``BertModel``: its mask preparation branches
on values) gets quantized adds in the largest submodules it can trace whose ``forward`` takes
required arguments only (a graph traced with a placeholder for an optional argument would be
wrong when that argument is left out): for BERT, the ``BertSelfOutput`` and ``BertOutput`` of
each layer, which hold the two residual adds. Each such submodule becomes a
``torch.fx.GraphModule`` in place, with its quantizers named below it
(``bert.encoder.layer.0.output.add.in0``); any other add stays float, with a warning.
"""

from __future__ import annotations

import functools
import inspect
import operator
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import fx, nn

from autoquant.quant import FakeQuantize
from autoquant.transform._attention import ExplicitMultiheadAttention
from autoquant.transform._grid_rules import RELU_RULE, fx_module, fx_rule, has_own_forward
from autoquant.transform._registry import QuantizedLayer
from autoquant.types import QuantSpec

_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_NON_TENSOR_METHODS = {"size", "dim", "numel", "item", "tolist"}


def _encoder_layer_forward(
    layer: nn.TransformerEncoderLayer,
    src: Any,
    src_mask: Any = None,
    src_key_padding_mask: Any = None,
    is_causal: Any = False,
) -> Any:
    """``nn.TransformerEncoderLayer.forward`` along its Python path, for tracing.

    The masks go to the attention as they are: ``ExplicitMultiheadAttention`` and
    ``nn.MultiheadAttention`` turn a boolean mask into the same additive one the layer would
    have made (``F._canonical_mask``, which branches on the mask's dtype and so cannot be
    traced).
    """
    x = src
    if layer.norm_first:
        x = x + layer._sa_block(layer.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
        return x + layer._ff_block(layer.norm2(x))
    x = layer.norm1(x + layer._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
    return layer.norm2(x + layer._ff_block(x))


def _encoder_forward(
    encoder: nn.TransformerEncoder,
    src: Any,
    mask: Any = None,
    src_key_padding_mask: Any = None,
    is_causal: Any = None,
) -> Any:
    """``nn.TransformerEncoder.forward`` without nested tensors, for tracing. ``is_causal``
    (a hint PyTorch may derive from the mask's values) is passed on as given: with a mask, the
    attention applies the mask whatever the hint."""
    out = src
    causal = False if is_causal is None else is_causal
    for layer in encoder.layers:
        out = layer(out, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=causal)
    return out if encoder.norm is None else encoder.norm(out)


#: Modules traced through a forward of our own (their own has fast paths and value checks).
_TRACED_FORWARDS: dict[type[nn.Module], Callable[..., Any]] = {
    nn.TransformerEncoderLayer: _encoder_layer_forward,
    nn.TransformerEncoder: _encoder_forward,
}


def _traced_forward(m: nn.Module) -> Callable[..., Any] | None:
    """Our forward for ``m``, unless its class overrides the one we replace."""
    for cls, forward in _TRACED_FORWARDS.items():
        if isinstance(m, cls) and type(m).forward is cls.forward:
            return functools.partial(forward, m)
    return None


class _Tracer(fx.Tracer):
    """Keeps fake-quant wrappers, quantizers and attentions as leaves; traces transformer
    encoder layers along their Python path (see the module doc)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if _traced_forward(m) is not None:
            return False
        leaf = (QuantizedLayer, FakeQuantize, ExplicitMultiheadAttention)
        return isinstance(m, leaf) or super().is_leaf_module(m, qualname)

    def call_module(
        self,
        m: nn.Module,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        return super().call_module(m, _traced_forward(m) or forward, args, kwargs)


def _trace(model: nn.Module) -> fx.Graph:
    """The model's graph; raises when it depends on train/eval mode (``self.training`` is
    frozen into a traced graph, so dropout would stay on, or off, for good)."""
    modes = {m: m.training for m in model.modules()}
    cls, forward = type(model), _traced_forward(model)
    if forward is not None:  # a root is traced from its class's forward: swap it for ours
        model.__class__ = type(cls.__name__, (cls,), {"forward": forward.func})
    try:
        graphs = []
        for training in (True, False):
            model.train(training)
            graph = _Tracer().trace(model)
            graphs.append((graph, graph.python_code("self").src))
    finally:
        model.__class__ = cls
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


def _reached(gm: fx.GraphModule, node: fx.Node) -> Iterator[tuple[fx.Node, fx.Node]]:
    """``(reader, value read)`` of the nodes that read ``node`` directly or through
    grid-keeping ops."""
    for user in node.users:
        yield user, node
        if _keeps_grid(gm, user):
            yield from _reached(gm, user)


def _input_quantizer(gm: fx.GraphModule, user: fx.Node, value: fx.Node) -> str | None:
    """The 8-bit per-tensor input quantizer (its target) with which ``user`` reads ``value``:
    a quantized layer's, or the packed in-projection's of a self-attention called on it."""
    module = fx_module(gm, user)
    if isinstance(module, ExplicitMultiheadAttention):
        if not (len(user.args) >= 3 and all(a is value for a in user.args[:3])):
            return None
        module, target = getattr(module, "in_proj", None), f"{user.target}.in_proj"
    else:
        target = str(user.target)
    if not isinstance(module, QuantizedLayer) or not module.quantizes_input:
        return None
    if has_own_forward(module):  # its quantizer may see another tensor than ``value``
        return None
    spec = module.layer_plan.activation
    return f"{target}.act_fq" if spec.bits == 8 and not spec.per_channel else None


def _shared_quantizer(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The input quantizer of an 8-bit per-tensor quantized layer that reads ``node``."""
    for user, value in _reached(gm, node):
        target = _input_quantizer(gm, user, value)
        if target is not None:
            return target
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
    ``F.dropout(x, training=self.training)``), keeps float adds, with a warning, except in the
    submodules that can be traced (see the module doc): ``module`` is then ``model``, with
    those submodules replaced in place.

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
    except Exception as e:  # noqa: BLE001 - any tracing failure means "no adds found" here
        names = _quantize_subtrees(model, spec)
        where = (
            f"; adds quantized in the submodules it can trace: {sorted({_owner(n) for n in names})}"
            ", any other add stays float"
            if names
            else "; its adds stay float"
        )
        warnings.warn(
            f"autoquant: {type(model).__name__} cannot be traced by torch.fx ({e}){where}",
            stacklevel=2,
        )
        return model, names
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    names = _quantize_graph(gm, spec)
    return (gm, names) if names else (model, [])


def _owner(add_name: str) -> str:
    return add_name.rpartition(".")[0] or "<model>"


def _quantize_graph(gm: fx.GraphModule, spec: QuantSpec) -> list[str]:
    """Fake-quantize the adds of ``gm``'s graph in place; returns their names."""
    adds = add_outputs(gm)
    if not adds:
        return []
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
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
    return names


def _required_args_only(module: nn.Module) -> bool:
    """``forward`` takes required positional-or-keyword arguments only (a graph traced with a
    placeholder for an optional argument could be wrong when a caller leaves it out)."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return all(
        p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
        for p in params
    )


def _quantize_subtrees(module: nn.Module, spec: QuantSpec, prefix: str = "") -> list[str]:
    """Quantize the adds of the largest traceable submodules of ``module`` (see the module
    doc), each replaced in place by its ``GraphModule``; returns the adds' full names."""
    names: list[str] = []
    for child_name, child in list(module.named_children()):
        path = f"{prefix}{child_name}"
        if isinstance(child, (QuantizedLayer, FakeQuantize, ExplicitMultiheadAttention)):
            continue
        if _traced_forward(child) is not None or _required_args_only(child):
            try:
                graph = _trace(child)
            except Exception:  # noqa: BLE001 - not traceable: look inside it
                graph = None
            if graph is not None:
                gm = fx.GraphModule(child, graph, class_name=type(child).__name__)
                found = _quantize_graph(gm, spec)
                if found:
                    setattr(module, child_name, gm)
                    names += [f"{path}.{n}" for n in found]
                continue
        names += _quantize_subtrees(child, spec, f"{path}.")
    return names


def _graph_modules(model: nn.Module) -> list[tuple[str, fx.GraphModule]]:
    """``(prefix, module)`` of ``model`` and its submodules that are ``GraphModule``s (where
    :func:`quantize_adds` puts its quantizer calls); the prefix ends with a dot."""
    return [
        (f"{name}." if name else "", m)
        for name, m in model.named_modules()
        if isinstance(m, fx.GraphModule)
    ]


def add_quantizers(model: nn.Module) -> dict[str, FakeQuantize]:
    """Quantizer calls that :func:`quantize_adds` inserted in ``model``'s graphs, by full
    target (shared ones under their layer's name, e.g. ``layer1.1.conv1.act_fq``); empty for a
    model without quantized adds."""
    out = {}
    for prefix, gm in _graph_modules(model):
        for node in gm.graph.nodes:
            mod = fx_module(gm, node)
            if isinstance(mod, FakeQuantize):
                out[prefix + str(node.target)] = mod
    return out


def strip_add_quantizers(model: nn.Module, mark: Callable[[str], nn.Module] | None = None) -> None:
    """Remove the quantizer calls of :func:`quantize_adds` from ``model``'s graphs, in place,
    or with ``mark``, call ``mark(target)`` modules in their place (``target`` is the full
    name; registered as ``_aq_mark<i>`` in the graph's module). Used to build the float or
    deployed twin of a quantized model."""
    for prefix, gm in _graph_modules(model):
        for i, node in enumerate(list(gm.graph.nodes)):
            if not _is_quantizer(gm, node):
                continue
            if mark is None:
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
            else:
                new = f"_aq_mark{i}"
                gm.add_submodule(new, mark(prefix + str(node.target)))
                node.target = new
        gm.graph.lint()
        gm.recompile()
        gm.delete_all_unused_submodules()
