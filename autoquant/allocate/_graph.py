"""Re-run only the part of a model that one quantized unit changes.

The sensitivity pass evaluates the float model with one unit swapped for a fake-quant copy, for
every option of every unit. Everything upstream of the unit (and every branch that does not
read it) computes the same float values each time. :class:`PartialRunner` traces the
BN-folded float model with ``torch.fx`` once, runs it once per batch keeping only the tensors
some unit's re-run reads (its *frontier*), and then re-runs just the nodes downstream of the
unit with its modules swapped. A model ``torch.fx`` cannot trace (or whose units hide inside
traced-through leaves) falls back to whole forward passes with the modules swapped in place.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from autoquant.transform import as_tuple, call_model, quantizable_types


class _LeafTracer(fx.Tracer):
    """Keeps every quantizable layer (also user-registered types) a ``call_module`` leaf."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m) in quantizable_types() or super().is_leaf_module(m, qualname)


@dataclass
class FloatState:
    """What one float pass keeps: the frontier tensors (graph mode) or the inputs (fallback),
    and the float output."""

    values: dict[fx.Node, Any]
    inputs: Any
    output: Any


class PartialRunner:
    """Float passes and per-unit partial re-runs of a BN-folded float model.

    Args:
        model: the BN-folded float model in eval mode (not modified; the fallback swaps
            modules in place during :meth:`run` and restores them).
        units: the layer names of each unit.

    Example:
        >>> import torch
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
        >>> runner = PartialRunner(net, [("0",), ("2",)])
        >>> x = torch.randn(3, 4)
        >>> state = runner.float_pass(x)
        >>> out = runner.run(state, 1, {"2": nn.Linear(4, 2)})  # only the last layer re-runs
        >>> runner.traced, out.shape, runner.fractions({"0": 1.0, "2": 1.0})
        (True, torch.Size([3, 2]), [1.0, 0.5])
    """

    def __init__(self, model: nn.Module, units: Sequence[Sequence[str]]) -> None:
        self.model = model
        self.units = [tuple(u) for u in units]
        self.gm: fx.GraphModule | None = None
        try:
            graph = _LeafTracer().trace(model)
            gm = fx.GraphModule(model, graph)
        except Exception:  # noqa: BLE001 - any tracing failure: run whole forward passes
            return
        targets = {n.target for n in gm.graph.nodes if n.op == "call_module"}
        if any(layer not in targets for u in self.units for layer in u):
            return  # a unit layer is called inside a leaf: only whole passes see it
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.modules = dict(gm.named_modules())
        self.dirty: list[list[fx.Node]] = []
        keep: set[fx.Node] = set()
        for layers in self.units:
            dirty: set[fx.Node] = set()
            stack = [n for n in self.nodes if n.op == "call_module" and n.target in layers]
            while stack:
                node = stack.pop()
                if node not in dirty:
                    dirty.add(node)
                    stack.extend(node.users)
            self.dirty.append([n for n in self.nodes if n in dirty])
            keep.update(i for n in dirty for i in n.all_input_nodes if i not in dirty)
        self.keep = keep
        self.output_node = next(n for n in self.nodes if n.op == "output")

    @property
    def traced(self) -> bool:
        """Whether partial re-runs are used (else whole forward passes)."""
        return self.gm is not None

    def fractions(self, layer_cost: Mapping[str, float]) -> list[float]:
        """Per unit, the share of the total ``layer_cost`` (e.g. MACs per layer name) that one
        re-run of it costs: the layers downstream of the unit. 1.0 without a graph."""
        total = sum(layer_cost.values()) or 1.0
        if self.gm is None:
            return [1.0 for _ in self.units]
        return [
            sum(layer_cost.get(str(n.target), 0.0) for n in dirty if n.op == "call_module") / total
            for dirty in self.dirty
        ]

    # -- execution ---------------------------------------------------------------------

    def _attr(self, target: str) -> Any:
        obj: Any = self.gm
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    def _execute(
        self,
        nodes: Sequence[fx.Node],
        env: dict[fx.Node, Any],
        inputs: tuple[Any, ...],
        swap: Mapping[str, nn.Module],
    ) -> Any:
        placeholder = 0
        for node in nodes:
            if node.op == "placeholder":
                if placeholder < len(inputs):
                    env[node] = inputs[placeholder]
                elif node.args:
                    env[node] = node.args[0]  # the argument's default value
                else:
                    raise TypeError(f"the model needs input {node.target!r}; it was not given")
                placeholder += 1
                continue
            args = fx.node.map_arg(node.args, env.__getitem__)
            kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
            if node.op == "call_module":
                module = swap.get(str(node.target)) or self.modules[str(node.target)]
                env[node] = module(*args, **kwargs)
            elif node.op == "call_function":
                env[node] = node.target(*args, **kwargs)  # type: ignore[operator]
            elif node.op == "call_method":
                obj, *rest = args
                env[node] = getattr(obj, str(node.target))(*rest, **kwargs)
            elif node.op == "get_attr":
                env[node] = self._attr(str(node.target))
            elif node.op == "output":
                return args[0]
        raise RuntimeError("the traced graph has no output node")  # pragma: no cover

    def float_pass(self, inputs: Any) -> FloatState:
        """Run the float model on one batch; keep what the re-runs need."""
        if self.gm is None:
            return FloatState({}, inputs, call_model(self.model, inputs))
        env: dict[fx.Node, Any] = {}
        output = self._execute(self.nodes, env, as_tuple(inputs), {})
        return FloatState({n: env[n] for n in self.keep}, inputs, output)

    def run(self, state: FloatState, unit: int, swap: Mapping[str, nn.Module]) -> Any:
        """The output with ``unit``'s layers replaced by ``swap`` (layer name → module)."""
        if self.gm is None:
            originals = {name: self.model.get_submodule(name) for name in swap}
            try:
                for name, module in swap.items():
                    self.model.set_submodule(name, module)
                return call_model(self.model, state.inputs)
            finally:
                for name, module in originals.items():
                    self.model.set_submodule(name, module)
        dirty = self.dirty[unit]
        if self.output_node not in dirty:
            return state.output  # the unit does not reach the output
        env = dict(state.values)
        return self._execute(dirty, env, (), swap)
