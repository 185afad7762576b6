"""The graph editor the passes share: new nodes and initializers, then a sorted graph."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from autoquant.measure._deploy import IntQ


class Editor:
    """Collects new nodes and initializers (with their size roles); rebuilds a topologically
    sorted graph with only the initializers still used.

    Attributes:
        nodes: the graph's nodes, edited in place by the passes.
        inits: initializers by name (insertion order is the file's order).
        roles: size role of each initializer the passes wrote (see
            :data:`~autoquant.measure.SIZE_ROLES`; ``extra`` for deployment-only tensors).
    """

    def __init__(self, proto: onnx.ModelProto) -> None:
        self.proto = proto
        self.graph = proto.graph
        self.inits: dict[str, onnx.TensorProto] = {i.name: i for i in self.graph.initializer}
        self.roles: dict[str, str] = {}
        self.nodes: list[onnx.NodeProto] = list(self.graph.node)

    def init(self, name: str, array: np.ndarray, role: str, *, before: str | None = None) -> str:
        """Add (or replace) initializer ``name``, last or ``before`` another; returns the name.

        The order of initializers (and of nodes, see :meth:`add`) is the file's: a pass may
        place what it adds where an equivalent single rewrite would have, keeping exports
        byte-identical across refactors.
        """
        tensor = numpy_helper.from_array(np.asarray(array), name)
        if before is None or name in self.inits:
            self.inits[name] = tensor
        else:
            items = list(self.inits.items())
            at = [k for k, _ in items].index(before)
            self.inits = dict([*items[:at], (name, tensor), *items[at:]])
        self.roles[name] = role
        return name

    def add(
        self,
        op: str,
        inputs: list[str],
        outputs: list[str],
        *,
        at: int | None = None,
        **attrs: Any,
    ) -> onnx.NodeProto:
        """Append a node named ``<first output>/<op>`` (or insert it at index ``at`` of
        :attr:`nodes`); returns it."""
        node = helper.make_node(op, inputs, outputs, name=outputs[0] + "/" + op, **attrs)
        if at is None:
            self.nodes.append(node)
        else:
            self.nodes.insert(at, node)
        return node

    def qparams(self, prefix: str, q: IntQ, role: str | None = None) -> tuple[str, str]:
        """Names of ``<prefix>_scale`` / ``<prefix>_zero_point``, added once."""
        s, z = f"{prefix}_scale", f"{prefix}_zero_point"
        if s not in self.inits:
            self.init(s, q.scale.astype(np.float32), f"{role}_scale" if role else "extra")
            self.init(z, q.zero_point_array(), f"{role}_zero_point" if role else "extra")
        return s, z

    def qdq(
        self, x: str, out: str, scale: str, zp: str, axis: int | None, *, at: int | None = None
    ) -> None:
        """``x -> QuantizeLinear -> DequantizeLinear -> out`` (appended, or at index ``at``)."""
        kw = {} if axis is None else {"axis": axis}
        self.add("QuantizeLinear", [x, scale, zp], [out + "_quantized"], at=at, **kw)
        self.add(
            "DequantizeLinear",
            [out + "_quantized", scale, zp],
            [out],
            at=None if at is None else at + 1,
            **kw,
        )

    def requantize_output(self, node: onnx.NodeProto, scale: str, zp: str) -> None:
        """Quantize ``node``'s output onto a per-tensor grid, keeping the tensor's name."""
        t = node.output[0]
        node.output[0] = f"{t}_before_qdq"
        self.qdq(node.output[0], t, scale, zp, None)

    def finish(self) -> onnx.ModelProto:
        """Write the nodes (sorted) and the used initializers back into the model."""
        used = {t for n in self.nodes for t in n.input}
        produced = {t for n in self.nodes for t in n.output}
        available = {i.name for i in self.graph.input} | set(self.inits)
        order = toposort(self.nodes, available)
        del self.graph.node[:]
        self.graph.node.extend(order)
        del self.graph.initializer[:]
        self.graph.initializer.extend(
            v for k, v in self.inits.items() if k in used and k not in produced
        )
        return self.proto


def toposort(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """Kahn's algorithm, keeping the given order among ready nodes."""
    ready = set(available) | {""}
    pending = list(nodes)
    out: list[onnx.NodeProto] = []
    while pending:
        rest = []
        for node in pending:
            if all(t in ready for t in node.input):
                out.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            missing = sorted({t for n in rest for t in n.input if t not in ready})
            raise RuntimeError(f"ONNX graph has unresolved inputs {missing[:5]}")
        pending = rest
    return out
