"""What the passes work from: the marked float export, the deployed layers located in it, and
how each integer layer's output is quantized."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import onnx
from torch import Tensor, nn

from autoquant.measure._deploy import (
    DeployedLayer,
    IntQ,
    activation_intq,
    deployed_layers,
    float_clone,
    output_ranges,
)
from autoquant.measure._requant import Requant, plan_requant
from autoquant.measure.onnx._export import AddMark, LayerNode, export_marked
from autoquant.measure.onnx._graph import add_marks, layer_chains
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
    example_input: Tensor,
    calib_inputs: Iterable[Tensor] | None = None,
    *,
    float_outputs: bool = True,
) -> Analysis:
    """Locate every layer of a calibrated fake-quant ``model`` in its float ONNX export and
    choose how each integer layer's output is quantized.

    Args:
        float_outputs: a layer whose ONNX op declares ``float_output`` may keep a float output.
    """
    plan = plan or QuantPlan()
    layers = deployed_layers(model, plan)
    fm = float_clone(model, AddMark)
    proto, nodes = export_marked(fm, example_input)
    missing = sorted(set(layers) - set(nodes))
    if missing:
        raise PlanError(
            f"plan layer(s) {missing} were not found in the exported graph (never "
            "called in forward?)"
        )
    repeated = sorted(n for n in layers if nodes[n].calls > 1)
    if repeated:
        raise PlanError(
            f"plan layer(s) {repeated} are called more than once in forward; "
            "deployment supports one call per quantized layer"
        )
    marks = add_marks(proto)
    grids = {}
    for _, target in marks.values():
        grids[target] = activation_intq(model.get_submodule(target), target)
    chains = layer_chains(proto, {n: nodes[n] for n in layers}, marks)
    float_ok = {n for n in layers if float_outputs and nodes[n].op.float_output}
    need = [n for n, dl in layers.items() if dl.format.int_kernel]
    inputs = [example_input] if calib_inputs is None else list(calib_inputs)
    ranges = output_ranges(model, need, inputs) if need else {}
    requant = plan_requant(layers, chains, ranges, float_output_ok=float_ok, grids=grids)
    return Analysis(plan, layers, fm, proto, nodes, requant, grids)
