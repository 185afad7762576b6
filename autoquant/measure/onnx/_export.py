"""The marked float export: which ONNX node computes which layer, and where the adds quantize.

The fake-quant model is turned back into its float, BN-folded clone
(:func:`~autoquant.measure.float_clone`) and exported with the TorchScript exporter
(``torch.onnx.export(..., dynamo=False)``; in torch 2.13 the default ``dynamo=True`` exporter
needs ``onnxscript``, which the project does not depend on). Identity marks export as
``autoquant::*`` nodes:

* ``Mark(name=<quantizer>)`` where the fake-quant model calls a quantizer outside a layer's node:
  a quantized add's, or an attention matmul's operand quantizer (replaced later by the
  convert-marks pass);
* ``LayerInput(name=<layer>)`` on the input of every call of a quantizable layer (a forward
  pre-hook), in a second export of the same model. The first node after it of an op type its
  layer type declares (:func:`~autoquant.measure.register_deployment`: ``Conv``, ``Gemm`` or
  ``MatMul``, ``Gather``, ...) reading a weight initializer at the declared input is that
  layer's node. Layers are thus found by structure, whatever the exporter names their weights (a
  constant-folded ``W^T`` of a MatMul has a generated name), and matched into the unmarked
  export by node name (the exporter's names are unique, and marks change no other name). The
  deployed graph is the unmarked export: a mark would hide shapes from the exporter's shape
  inference and change the names it gives a graph output's unknown dims.

Layer weights and biases get unique placeholder values before export, so that the exporter,
which merges equal constants, keeps one initializer per parameter under its FQN; the real values
are written by the passes. (Other parameters keep their values, which the exporter may compute
with; two equal ones, e.g. freshly initialised LayerNorms, are stored once.) The export never
fuses a Conv with a BatchNorm after it (``TrainingMode.PRESERVE`` on the eval-mode clone skips
the exporter's eval peephole): a BatchNorm left in the model is one that cannot be folded
exactly (a conv reused with a BatchNorm after one of its uses), and a fused weight computed from
placeholder values would be wrong.
"""

from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import onnx
import torch
from torch import Tensor, nn

from autoquant.measure._layers import OnnxOp, deployment_of
from autoquant.measure.onnx._graph import MARK_DOMAIN, attr, consumer_nodes, is_mark, mark_target
from autoquant.transform import Inputs, as_tuple, quantizable_names

OPSET = 17
LAYER_INPUT = "LayerInput"


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
    """Stands where the quantizer ``name`` was called outside a layer's node (a quantized add's,
    an attention matmul operand's)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, x: Tensor) -> Tensor:
        return _MarkFunction.apply(x, "Mark", self.name)


@dataclass
class LayerNode:
    """The ONNX node of one layer in the float export.

    Attributes:
        node: the node doing the layer's arithmetic.
        op: its declaration (which inputs are the weight, the data, the bias).
        transposed: the weight initializer holds ``W^T`` (a MatMul, a Gemm without transB).
        calls: calls of the layer in forward.
    """

    node: onnx.NodeProto
    op: OnnxOp
    transposed: bool
    calls: int = 1

    @property
    def data(self) -> str:
        """The layer's input tensor."""
        return self.node.input[self.op.data_input]


def export_float(model: nn.Module, example_input: Inputs) -> onnx.ModelProto:
    """ONNX ``ModelProto`` of a float module (TorchScript exporter): inputs named ``input``
    (or ``input0``, ``input1``, ... for a tuple) with the example's dtypes, outputs ``output``
    (or ``output0``, ...), a dynamic batch axis on each."""
    inputs = as_tuple(example_input)
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
            # The module is in eval mode already; PRESERVE skips the exporter's eval peephole,
            # which would fuse a Conv with the BatchNorm after it (see the module doc).
            training=torch.onnx.TrainingMode.PRESERVE,
        )
    return onnx.load_from_string(buf.getvalue())


def _placeholder_clone(fm: nn.Module, names: Iterable[str]) -> nn.Module:
    """A copy whose layer weights and biases hold unique random values (see module doc), each
    layer of a type declared with ``export_as`` turned into that class."""
    marked = copy.deepcopy(fm)
    gen = torch.Generator().manual_seed(12345)
    with torch.no_grad():
        for name in names:
            layer = marked.get_submodule(name)
            dep = deployment_of(layer)
            # A subclass with a forward of its own keeps it (it exports as it computes).
            if dep.export_as is not None and type(layer).forward is dep.float_type.forward:
                layer.__class__ = dep.export_as
                layer.deployed_name = name
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
    fm: nn.Module, example_input: Inputs
) -> tuple[onnx.ModelProto, dict[str, LayerNode]]:
    """The float export of ``fm`` (a :func:`~autoquant.measure.float_clone`, with add marks)
    and every quantizable layer's node in it, found from its layer mark in a marked export."""
    names = [n for n in quantizable_names(fm) if deployment_of(fm.get_submodule(n))]
    clone = _placeholder_clone(fm, names)
    proto = export_float(clone, example_input)
    _mark_layers(clone, names)
    located = _locate(export_float(clone, example_input), clone, names)
    by_name = {n.name: n for n in proto.graph.node}
    nodes = {}
    for name, ln in located.items():
        node = by_name.get(ln.node.name)
        if node is None or node.op_type != ln.node.op_type:
            raise RuntimeError(
                f"layer {name!r}: node {ln.node.name!r} of the marked export is not in the "
                "unmarked one"
            )
        nodes[name] = LayerNode(node, ln.op, ln.transposed, ln.calls)
    return proto, nodes


def _locate(proto: onnx.ModelProto, model: nn.Module, names: Iterable[str]) -> dict[str, LayerNode]:
    graph = proto.graph
    inits = {i.name for i in graph.initializer}
    readers = consumer_nodes(graph.node)
    marks: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        if is_mark(n, LAYER_INPUT):
            marks.setdefault(mark_target(n), []).append(n)
    found: dict[str, LayerNode] = {}
    for name in names:
        dep = deployment_of(model.get_submodule(name))
        if name not in marks or dep is None:
            continue  # never called, or its output unused
        # Breadth first from the mark, not past another mark: the nearest declared op reading
        # a weight initializer is this layer's (its direct reader, as exported today).
        queue, seen = list(readers.get(marks[name][0].output[0], [])), set()
        while queue:
            n = queue.pop(0)
            if id(n) in seen or n.domain == MARK_DOMAIN:
                continue
            seen.add(id(n))
            op = dep.onnx_op(n.op_type)
            if (
                op is not None
                and len(n.input) > op.weight_input
                and n.input[op.weight_input] in inits
            ):
                transposed = op.layout == "transposed" or (
                    op.layout == "transB" and not attr(n, "transB", 0)
                )
                found[name] = LayerNode(n, op, transposed, len(marks[name]))
                break
            for t in n.output:
                queue.extend(readers.get(t, []))
    return found
