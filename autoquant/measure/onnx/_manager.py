"""The QDQ export as a declared, ordered list of passes (as Brevitas's export managers).

:func:`build_qdq` analyses the model (:func:`~autoquant.measure.onnx.analyse`: marked float
export, layers located, output grids chosen), then runs :data:`QDQ_PASSES` in order on one
:class:`~autoquant.measure.onnx.Editor`. Order matters: output grids come first, so that an add
mark or a layer input already on its grid gets no second QuantizeLinear (one grid per tensor,
as ONNX Runtime fuses best); the integer pads come after every pass that adds QDQ around a Pad.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import onnx
from onnx import helper
from torch import nn

from autoquant.measure._deploy import DeployedLayer
from autoquant.measure._formats import plan_formats
from autoquant.measure._requant import Requant
from autoquant.measure.onnx._analysis import Analysis, analyse
from autoquant.measure.onnx._context import Pass, QDQContext
from autoquant.measure.onnx._editor import Editor
from autoquant.measure.onnx._export import LayerNode
from autoquant.measure.onnx.passes import (
    add_operands,
    convert_marks,
    float_params,
    integer_pads,
    layer_qdq,
    pooled_grids,
    requantize_outputs,
    stem_channels,
)
from autoquant.transform import Inputs
from autoquant.types import QuantPlan

#: Bumped when the graph exported for a given plan changes (e.g. a new pass), so that cached
#: latencies of the old graph are not reused: it is part of the ONNX Runtime backend's version.
#: 3: embeddings gather integer rows; attention matmuls and transformer adds deploy.
EXPORT_REVISION = 3
ROLES_KEY = "autoquant.tensor_roles"

#: The passes of the QDQ export, in order.
QDQ_PASSES: tuple[Pass, ...] = (
    requantize_outputs.PASS,
    convert_marks.PASS,
    pooled_grids.PASS,
    layer_qdq.PASS,
    stem_channels.PASS,
    add_operands.PASS,
    integer_pads.PASS,
    float_params.PASS,
)


def without(*names: str, passes: Sequence[Pass] = QDQ_PASSES) -> tuple[Pass, ...]:
    """``passes`` without the named ones (to see what a pass changes).

    Example:
        >>> [p.name for p in without("integer_pads", "stem_channels")][-3:]
        ['layer_qdq', 'add_operands', 'float_params']
    """
    known = {p.name for p in passes}
    unknown = sorted(set(names) - known)
    if unknown:
        raise ValueError(f"pass name(s) {unknown} are not allowed; allowed values: {sorted(known)}")
    return tuple(p for p in passes if p.name not in names)


@dataclass
class QDQModel:
    """An in-memory QDQ model and what was decided while building it."""

    proto: onnx.ModelProto  # complete (int8 initializers for every weight)
    layers: dict[str, DeployedLayer]
    requant: dict[str, Requant]
    formats: dict[str, str]
    tails: dict[str, str]  # per layer, the plan-independent part of ``formats``
    nodes: dict[str, LayerNode]


def _own_kernel_notes(an: Analysis) -> dict[str, str]:
    """Notes of the layers whose kernel is not a layer node's (see
    :data:`~autoquant.measure.OWN_KERNEL_NOTES`)."""
    notes = {}
    for name, dl in an.layers.items():
        if not dl.has_weight:
            notes[name] = (
                "operands QuantizeLinear → DequantizeLinear on their grids, matmuls on them "
                "(ONNX Runtime fuses MatMulIntegerToFloat / QLinearMatMul where it can)"
            )
        elif dl.weight_q is not None and an.nodes[name].op.lookup:
            notes[name] = "lookup: integer rows gathered, then dequantized (only the rows read)"
    return notes


def build_qdq(
    model: nn.Module,
    plan: QuantPlan | None,
    example_input: Inputs,
    calib_inputs: Iterable[Inputs] | None = None,
    *,
    passes: Sequence[Pass] = QDQ_PASSES,
) -> QDQModel:
    """The QDQ ONNX model of a calibrated fake-quant ``model`` under ``plan`` (in memory).

    Args:
        passes: the rewrites to run, in order (default :data:`QDQ_PASSES`).
    """
    an = analyse(model, plan, example_input, calib_inputs)
    ctx = QDQContext(an, Editor(an.proto))
    for p in passes:
        p.run(ctx)
    proto = ctx.editor.finish()
    tails = {n: "out→" + requantize_outputs.requant_text(r) for n, r in an.requant.items()}
    tails.update(_own_kernel_notes(an))
    formats = plan_formats(an.plan, "onnxruntime", tails)
    stored = {i.name for i in proto.graph.initializer}
    roles = {k: v for k, v in ctx.editor.roles.items() if k in stored}
    helper.set_model_props(
        proto,
        {
            ROLES_KEY: json.dumps(roles, sort_keys=True),
            "autoquant.plan": an.plan.to_json(),
            "autoquant.formats": json.dumps(formats),
        },
    )
    return QDQModel(proto, an.layers, an.requant, formats, tails, an.nodes)
