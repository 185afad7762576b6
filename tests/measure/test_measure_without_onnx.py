"""``autoquant.measure`` and the torch-x86 backend work with ``onnx`` and ``onnxruntime``
missing (their imports blocked in a fresh interpreter)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = r"""
import json, sys
sys.modules["onnx"] = None  # any import of onnx / onnxruntime now raises ImportError
sys.modules["onnxruntime"] = None
sys.path.insert(0, sys.argv[1])
import torch
from measure_models import calib_inputs, quantized, tiny_model, w8a8

from autoquant.measure import LatencyCache, get_backend, measure_latency
from autoquant.types import QuantPlan, QuantSpec

plan = QuantPlan(w8a8().layers, adds=QuantSpec(bits=8, symmetric=False))
q = quantized(tiny_model(), plan, calib_inputs())
x = calib_inputs(1, 8)[0]
deployed = get_backend("torch-x86").deploy(q, plan, x[:1], threads=1, calib_inputs=calib_inputs())
with torch.no_grad():
    err = float((deployed.run(x) - q(x)).abs().max() / q(x).abs().max())
r = measure_latency(q, plan, x[:1], backend="torch-x86", warmup=0, repeats=3, cache=LatencyCache())
try:
    from autoquant.measure import export_onnx
    message = ""
except ImportError as e:
    message = str(e)
print(json.dumps({
    "err": err, "kernels": deployed.kernels, "median": r.median_ms, "export_error": message,
    "loaded": sorted(m for m in ("onnx", "onnxruntime") if sys.modules.get(m) is not None),
}))
"""


def test_torch_x86_deploys_and_measures_without_onnx() -> None:
    here = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(here)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["loaded"] == []
    assert out["err"] < 0.05 and out["median"] > 0
    assert out["kernels"].get("int8:add") == 1
    assert "pip install 'autoquant[export]'" in out["export_error"]
