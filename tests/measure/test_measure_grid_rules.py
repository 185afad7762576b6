"""The grid rules are one table: its ONNX column is what its torch column exports to, and the
ONNX export's decisions follow the table."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from measure_models import quantized
from torch import nn

from autoquant.measure.onnx import analyse, export_float
from autoquant.transform import GRID_RULES, ONNX_GRID_RULES
from autoquant.types import LayerPlan, QuantPlan, QuantSpec

# One torch form per fx target of each rule (functions, methods, modules).
FORMS: dict[str, list[Callable[[torch.Tensor], torch.Tensor]]] = {
    "identity": [nn.Identity(), nn.Dropout(0.5).eval()],
    "view": [
        lambda x: torch.flatten(x, 1),
        lambda x: x.view(x.shape[0], -1),
        lambda x: x.permute(0, 2, 3, 1),
        lambda x: x.transpose(1, 2),
        lambda x: x.unsqueeze(1),
        lambda x: torch.squeeze(x.unsqueeze(0), 0),
        nn.Flatten(),
    ],
    "slice": [lambda x: x[:, :, ::2, 1:]],
    "zero_pad": [lambda x: F.pad(x, (1, 1, 0, 0))],
    "relu": [torch.relu, F.relu, lambda x: x.relu(), nn.ReLU()],
    "max_pool": [lambda x: F.max_pool2d(x, 2), nn.MaxPool2d(2)],
}


class _Op(nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) * 2  # a Mul after the op: the graph is never empty


def test_every_rule_has_forms() -> None:
    assert set(FORMS) == {r.name for r in GRID_RULES}


@pytest.mark.parametrize(
    ("rule", "form"),
    [(r, f) for r, forms in FORMS.items() for f in forms],
)
def test_the_onnx_column_is_what_the_torch_column_exports_to(rule: str, form: Callable) -> None:
    proto = export_float(_Op(form).eval(), torch.randn(2, 3, 4, 4))
    data = {"input"}  # follow the data path (shape plumbing reads Shape of it)
    ops = []
    for node in proto.graph.node:
        if node.input and node.input[0] in data and node.op_type != "Shape":
            data.update(node.output)
            ops.append(node.op_type)
    assert ops[-1] == "Mul"
    assert all(ONNX_GRID_RULES[op].name == rule for op in ops[:-1]), ops


def test_the_onnx_export_follows_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1)).eval()
    spec = LayerPlan(QuantSpec(bits=8), QuantSpec(bits=8, symmetric=False))
    plan = QuantPlan({"0": spec, "2": spec})
    x = torch.randn(4, 2, 6, 6)
    q = quantized(model, plan, [x])
    assert analyse(q, plan, x).requant["0"].mode == "exact"  # onto conv 2's grid, through ReLU
    monkeypatch.delitem(ONNX_GRID_RULES, "Relu")  # the one table, not a copy of it
    assert analyse(q, plan, x).requant["0"].mode == "calibrated"


def _int8_adds(model: nn.Module) -> QuantPlan:
    from autoquant.transform import quantizable_names

    spec = LayerPlan(QuantSpec(bits=8), QuantSpec(bits=8, symmetric=False))
    return QuantPlan(
        {n: spec for n in quantizable_names(model)}, adds=QuantSpec(bits=8, symmetric=False)
    )


@pytest.mark.parametrize("adds", [False, True], ids=["float-adds", "int8-adds"])
@pytest.mark.parametrize("name", ["tiny", "resnet8", "digits"])
def test_fx_and_onnx_find_the_same_output_grids(name: str, adds: bool) -> None:
    # torch-x86 reads the chains off the torch.fx graph, ONNX Runtime off the export: one walk
    # over one table, so both see the same grid and the same ReLU after each layer.
    from measure_models import resnet8, tiny_model

    from autoquant.measure._requant import fx_chains
    from autoquant.measure.onnx._graph import add_marks, layer_chains
    from autoquant.tasks import DigitsCNN

    torch.manual_seed(0)
    model, shape = {
        "tiny": (tiny_model, (3, 8, 8)),
        "resnet8": (resnet8, (3, 32, 32)),
        "digits": (lambda: DigitsCNN().eval(), (1, 8, 8)),
    }[name]
    model = model()
    plan = _int8_adds(model)
    if not adds:
        plan = QuantPlan(plan.layers)
    x = torch.randn(8, *shape)
    q = quantized(model, plan, [x])
    an = analyse(q, plan, x[:1])
    onnx_chains = layer_chains(an.proto, {n: an.nodes[n] for n in an.layers}, add_marks(an.proto))
    assert fx_chains(q, an.layers) == onnx_chains
    assert any(relu for _, relu in onnx_chains.values())
