"""One instrumented forward pass: how often modules run and where their outputs go.

Forward hooks count the calls of the watched modules and add a zero-valued leaf that requires
grad to each floating-point output (``out + d``, numerically the same tensor). The autograd
graph of the model's outputs then tells, without any backward pass, which calls reach an output
(their marker's node is an ancestor of an output) and which nodes consume each output. A value
passed through non-differentiable ops (argmax, integer casts) or computed under ``no_grad``
inside the model is not followed; when no output carries a graph at all, reachability is
unknown (``None``), never guessed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from autoquant.transform._inputs import call_model

Node = Any  # torch.autograd.graph.Node (identity-hashable)
MacsFn = Callable[[nn.Module, tuple[Any, ...], Any], int]


@dataclass
class ModuleTrace:
    """What one watched module did during the pass (one list entry per call)."""

    calls: int = 0
    macs: int = 0
    input_nodes: list[Node | None] = field(default_factory=list)  # grad_fn of the 1st input
    raw_nodes: list[Node | None] = field(default_factory=list)  # grad_fn of each float output
    nodes: list[Node] = field(default_factory=list)  # node of each marked float output
    markers: list[Tensor] = field(default_factory=list)


@dataclass
class Dataflow:
    """Result of :func:`trace_dataflow`."""

    modules: dict[str, ModuleTrace]
    reached: set[Node]  # nodes that are ancestors of (or are) a model output's node
    consumers: dict[Node, set[Node]]  # node -> nodes that take its value as an input
    has_graph: bool  # at least one model output carries an autograd graph

    def output_used(self, name: str) -> bool | None:
        """Whether some call of ``name`` reaches the model output (``None``: unknown)."""
        if not self.has_graph or not self.modules[name].nodes:
            return None
        return any(node in self.reached for node in self.modules[name].nodes)


def _output_tensors(value: Any) -> Iterable[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _output_tensors(v)
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _output_tensors(v)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _output_tensors(getattr(value, f.name))


def _walk(roots: Iterable[Node], seen: set[Node], consumers: dict[Node, set[Node]]) -> None:
    stack = [r for r in roots if r is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for parent, _ in node.next_functions:
            if parent is not None:
                consumers.setdefault(parent, set()).add(node)
                stack.append(parent)


def _first_tensor(args: tuple[Any, ...]) -> Tensor | None:
    return next((a for a in args if isinstance(a, Tensor)), None)


def trace_dataflow(
    model: nn.Module,
    example_input: Any,
    watch: Mapping[str, nn.Module],
    macs: Mapping[str, MacsFn] | None = None,
) -> Dataflow:
    """Run ``model`` once in eval mode with gradients enabled and record ``watch``'s modules.

    The model's train/eval flags are restored and its hooks removed afterwards; parameters get
    no gradient (there is no backward pass). A module watched under several names is recorded
    under the first.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
        >>> flow = trace_dataflow(net, torch.randn(1, 3), dict(net.named_children()))
        >>> [flow.modules[n].calls for n in ("0", "1")], flow.output_used("0")
        ([1, 1], True)
    """
    traces: dict[str, ModuleTrace] = {}
    handles = []
    by_module: dict[nn.Module, str] = {}
    for name, module in watch.items():
        by_module.setdefault(module, name)
    for module, name in by_module.items():
        trace = traces[name] = ModuleTrace()
        macs_fn = (macs or {}).get(name)

        def pre_hook(mod: nn.Module, args: tuple[Any, ...], trace: ModuleTrace = trace) -> None:
            first = _first_tensor(args)
            trace.input_nodes.append(first.grad_fn if first is not None else None)

        def hook(
            mod: nn.Module,
            args: tuple[Any, ...],
            output: Any,
            trace: ModuleTrace = trace,
            macs_fn: MacsFn | None = macs_fn,
        ) -> Any:
            trace.calls += 1
            if macs_fn is not None:
                trace.macs += macs_fn(mod, args, output)

            def mark(t: Any) -> Any:
                if not (isinstance(t, Tensor) and t.is_floating_point()):
                    return t
                marker = torch.zeros((), dtype=t.dtype, device=t.device, requires_grad=True)
                marked = t + marker
                trace.raw_nodes.append(t.grad_fn)
                trace.nodes.append(marked.grad_fn)
                trace.markers.append(marker)
                return marked

            # Every float tensor of the output (a tuple for attention-like modules).
            return tuple(map(mark, output)) if type(output) is tuple else mark(output)

        handles.append(module.register_forward_pre_hook(pre_hook))
        handles.append(module.register_forward_hook(hook))
    names = {n: by_module[m] for n, m in watch.items()}
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.enable_grad():
            output = call_model(model, example_input)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    roots = [t.grad_fn for t in _output_tensors(output) if t.grad_fn is not None]
    reached: set[Node] = set()
    consumers: dict[Node, set[Node]] = {}
    _walk(roots, reached, consumers)
    # Consumers also along branches that do not reach an output (seen is a separate set).
    seen = set(reached)
    _walk((n for t in traces.values() for n in t.nodes), seen, consumers)
    return Dataflow(
        {n: traces[first] for n, first in names.items()}, reached, consumers, bool(roots)
    )
