"""The marked float export: which ONNX node computes which layer, and where the adds quantize.

The fake-quant model is turned back into its float, BN-folded clone
(:func:`~autoquant.measure.float_clone`) and exported with the TorchScript exporter
(``torch.onnx.export(..., dynamo=False)``; in torch 2.13 the default ``dynamo=True`` exporter
needs ``onnxscript``, which the project does not depend on). Identity marks export as
``autoquant::*`` nodes:

* ``Mark(name=<quantizer>)`` where the fake-quant model calls a quantized add's quantizer
  (replaced later by the convert-marks pass);
* ``LayerInput(name=<layer>)`` on the input of every call of a quantizable layer (a forward
  pre-hook), in a second export of the same model. The first node after it that does a layer's
  arithmetic (a ``Conv``, ``Gemm`` or ``MatMul`` reading a weight initializer) is that layer's
  node. Layers are thus found by structure, whatever the exporter names their weights (a
  constant-folded ``W^T`` of a MatMul has a generated name), and matched into the unmarked
  export by node name (the exporter's names are unique, and marks change no other name). The
  deployed graph is the unmarked export: a mark would hide shapes from the exporter's shape
  inference and change the names it gives a graph output's unknown dims.

Layer weights and biases get unique placeholder values before export, so that the exporter,
which merges equal constants, keeps one initializer per parameter under its FQN; the real values
are written by the passes.
"""

from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import onnx
import torch
from torch import Tensor, nn

from autoquant.measure.onnx._graph import MARK_DOMAIN, attr, consumer_nodes, is_mark, mark_target
from autoquant.transform import quantizable_names

OPSET = 17
LAYER_INPUT = "LayerInput"
_LAYER_OPS = ("Conv", "Gemm", "MatMul")


class _MarkFunction(torch.autograd.Function):
    """Identity that exports as ``autoquant::<op>(name=...)``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, op: str, name: str) -> Tensor:
        return x.clone()

    @staticmethod
    def symbolic(g: Any, x: Any, op: str, name: str) -> Any:
        out = g.op(f"{MARK_DOMAIN}::{op}", x, name_s=name)
        out.setType(x.type())
        return out


class AddMark(nn.Module):
    """Stands where a quantized add's quantizer ``name`` was called."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, x: Tensor) -> Tensor:
        return _MarkFunction.apply(x, "Mark", self.name)


@dataclass
class LayerNode:
    """The ONNX node of one layer in the float export."""

    node: onnx.NodeProto
    weight_init: str
    transposed: bool  # the initializer holds W^T (MatMul, Gemm transB=0)
    calls: int = 1  # calls of the layer in forward


def _as_inputs(example_input: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
    return tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)


def export_float(model: nn.Module, example_input: Tensor | Sequence[Tensor]) -> onnx.ModelProto:
    """ONNX ``ModelProto`` of a float module (TorchScript exporter, dynamic batch axis)."""
    inputs = _as_inputs(example_input)
    with torch.no_grad():
        out = model(*inputs)
    n_out = len(out) if isinstance(out, (tuple, list)) else 1
    in_names = ["input"] if len(inputs) == 1 else [f"input{i}" for i in range(len(inputs))]
    out_names = ["output"] if n_out == 1 else [f"output{i}" for i in range(n_out)]
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated in torch 2.x
        torch.onnx.export(
            model,
            inputs,
            buf,
            dynamo=False,
            opset_version=OPSET,
            input_names=in_names,
            output_names=out_names,
            dynamic_axes={n: {0: "batch"} for n in in_names + out_names},
            do_constant_folding=True,
        )
    return onnx.load_from_string(buf.getvalue())


def _placeholder_clone(fm: nn.Module, names: Iterable[str]) -> nn.Module:
    """A copy whose layer weights and biases hold unique random values (see module doc)."""
    marked = copy.deepcopy(fm)
    gen = torch.Generator().manual_seed(12345)
    with torch.no_grad():
        for name in names:
            layer = marked.get_submodule(name)
            for p in (layer.weight, getattr(layer, "bias", None)):
                if p is not None:
                    p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
    return marked


def _mark_layers(model: nn.Module, names: Iterable[str]) -> None:
    """Forward pre-hooks that mark the input of each call of the named layers."""
    for name in names:

        def before(module: nn.Module, args: tuple[Any, ...], name: str = name) -> Any:
            if not args or not isinstance(args[0], Tensor):
                return None
            return (_MarkFunction.apply(args[0], LAYER_INPUT, name), *args[1:])

        model.get_submodule(name).register_forward_pre_hook(before)


def export_marked(
    fm: nn.Module, example_input: Tensor | Sequence[Tensor]
) -> tuple[onnx.ModelProto, dict[str, LayerNode]]:
    """The float export of ``fm`` (a :func:`~autoquant.measure.float_clone`, with add marks)
    and every quantizable layer's node in it, found from its layer mark in a marked export."""
    names = quantizable_names(fm)
    clone = _placeholder_clone(fm, names)
    proto = export_float(clone, example_input)
    _mark_layers(clone, names)
    located = _locate(export_float(clone, example_input), names)
    by_name = {n.name: n for n in proto.graph.node}
    nodes = {}
    for name, ln in located.items():
        node = by_name.get(ln.node.name)
        if node is None or node.op_type != ln.node.op_type:
            raise RuntimeError(
                f"layer {name!r}: node {ln.node.name!r} of the marked export is not in the "
                "unmarked one"
            )
        nodes[name] = LayerNode(node, node.input[1], ln.transposed, ln.calls)
    return proto, nodes


def _locate(proto: onnx.ModelProto, names: Iterable[str]) -> dict[str, LayerNode]:
    graph = proto.graph
    inits = {i.name for i in graph.initializer}
    readers = consumer_nodes(graph.node)
    marks: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        if is_mark(n, LAYER_INPUT):
            marks.setdefault(mark_target(n), []).append(n)
    found: dict[str, LayerNode] = {}
    for name in names:
        if name not in marks:
            continue  # never called, or its output unused
        # Breadth first from the mark, not past another mark: the nearest layer op is this
        # layer's (its direct consumer, as exported today).
        queue, seen, node = list(readers.get(marks[name][0].output[0], [])), set(), None
        while queue:
            n = queue.pop(0)
            if id(n) in seen or n.domain == MARK_DOMAIN:
                continue
            seen.add(id(n))
            if n.op_type in _LAYER_OPS and len(n.input) > 1 and n.input[1] in inits:
                node = n
                break
            for t in n.output:
                queue.extend(readers.get(t, []))
        if node is None:
            continue
        transposed = node.op_type == "MatMul" or (
            node.op_type == "Gemm" and not attr(node, "transB", 0)
        )
        found[name] = LayerNode(node, node.input[1], transposed, len(marks[name]))
    return found
