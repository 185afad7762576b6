"""After LSQ+ QAT the exported artifact holds what was simulated: integer zero-points (the
learned ones rounded, as the forward uses them) and the learned scales."""

from __future__ import annotations

import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from autoquant.measure import export_onnx
from autoquant.quant import FakeQuantize, dequantize, quantize
from autoquant.train import qat_finetune
from autoquant.transform import apply_plan, calibration
from autoquant.types import LayerPlan, QuantPlan, QuantSpec


def test_exported_zero_points_and_scales_are_the_simulated_ones(tmp_path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 4),
    ).eval()
    w = QuantSpec(bits=4, granularity="per_channel", learned_scale=True)
    a = QuantSpec(bits=4, symmetric=False, learned_scale=True, learned_zero_point=True, axis=1)
    plan = QuantPlan({n: LayerPlan(w, a) for n in ("0", "2", "4")})
    q = apply_plan(net, plan)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 3, 6, 6, generator=g) + 0.7
    y = torch.arange(64) % 4
    with calibration(q):
        q(x)
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    qat_finetune(q, batches, F.cross_entropy, steps=20, lr=1e-3, optimizer="adam", quant_lr=0.05)
    export_onnx(q, plan, tmp_path / "m.onnx", x[:1], calib_inputs=[x])
    inits = {
        t.name: numpy_helper.to_array(t)
        for t in onnx.load(str(tmp_path / "m.onnx")).graph.initializer
    }
    fractional = 0
    for name in ("0", "2", "4"):
        fq: FakeQuantize = q.get_submodule(name).act_fq
        z = float(fq.zero_point.detach())
        fractional += abs(z - round(z)) > 0.05
        deployed = inits[f"{name}.act_zero_point"]
        assert deployed.dtype.kind in "iu" and int(deployed) == round(min(max(z, 0), 15))
        assert float(inits[f"{name}.act_scale"]) == float(fq.scale.detach())
        # The simulation is exactly quantize -> dequantize on the deployed integers.
        v = torch.randn(500) * 2
        codes = quantize(v, float(inits[f"{name}.act_scale"]), int(deployed), 0, 15)
        expected = dequantize(codes, float(inits[f"{name}.act_scale"]), int(deployed))
        with torch.no_grad():
            assert torch.equal(fq(v), expected)
    assert fractional >= 1  # the learned zero-points really moved off the integers
