"""What the passes work from: the marked float export, the deployed layers located in it, and
how each integer layer's output is quantized."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import onnx
from torch import nn

from autoquant.measure._deploy import (
    DeployedLayer,
    IntQ,
    activation_intq,
    check_calls,
    deployed_layers,
    float_clone,
)
from autoquant.measure._requant import Requant, choose_requant
from autoquant.measure.onnx._export import AddMark, LayerNode, export_marked
from autoquant.measure.onnx._graph import add_marks, layer_chains
from autoquant.transform import Inputs
from autoquant.types import PlanError, QuantPlan


@dataclass
class Analysis:
    """A plan's deployed layers located in the exported float graph, with output decisions.

    Attributes:
        plan: the plan (empty for a float model).
        layers: the plan's non-float layers as integer tensors.
        float_model: the float, BN-folded clone the graph was exported from (real values).
        proto: the float export (placeholder weights; add marks still in).
        nodes: every quantizable layer's node in ``proto``.
        requant: per integer layer, how its output is quantized.
        grids: the quantized adds' grids, by quantizer target.
    """

    plan: QuantPlan
    layers: dict[str, DeployedLayer]
    float_model: nn.Module
    proto: onnx.ModelProto
    nodes: dict[str, LayerNode]
    requant: dict[str, Requant]
    grids: dict[str, IntQ] = field(default_factory=dict)


def analyse(
    model: nn.Module,
    plan: QuantPlan | None,
    example_input: Inputs,
    calib_inputs: Iterable[Inputs] | None = None,
) -> Analysis:
    """Locate every layer of a calibrated fake-quant ``model`` in its float ONNX export and
    choose how each integer layer's output is quantized (a layer whose ONNX op declares
    ``float_output`` keeps a float output where no exact grid follows it).
    """
    plan = plan or QuantPlan()
    layers = deployed_layers(model, plan)
    check_calls(model, layers, example_input)
    fm = float_clone(model, AddMark)
    proto, nodes = export_marked(fm, example_input)
    missing = sorted(n for n, dl in layers.items() if dl.has_weight and n not in nodes)
    if missing:
        raise PlanError(f"plan layer(s) {missing} were not found in the exported graph")
    marks = add_marks(proto)
    # A weightless layer (attention matmuls) deploys where its quantizers are called: marks.
    marked = {t for _, t in marks.values()}
    for name, dl in layers.items():
        lost = [o for o in dl.operands if f"{name}.{o}" not in marked]
        if lost:
            raise PlanError(
                f"layer {name!r}: its operand quantizer(s) {lost} were not found in the "
                "exported graph"
            )
    grids = {t: activation_intq(model.get_submodule(t), t) for _, t in marks.values()}
    chains = layer_chains(proto, {n: nodes[n] for n in layers if n in nodes}, marks)
    float_ok = {n for n in layers if n in nodes and nodes[n].op.float_output}
    inputs = [example_input] if calib_inputs is None else list(calib_inputs)
    requant = choose_requant(model, layers, chains, grids, inputs, float_output_ok=float_ok)
    return Analysis(plan, layers, fm, proto, nodes, requant, grids)
