"""Export any trial: plan, ONNX, metadata and state dict rebuild the same model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from autoquant import load_plan
from autoquant.cli import main
from autoquant.measure import artifact_weight_bytes
from autoquant.search import load_study, load_study_spec, read_record
from autoquant.tasks import get_task
from autoquant.transform import apply_plan

pytestmark = pytest.mark.slow

STUDY = """
[study]
name = "exp"
trials = 2
[task]
name = "digits-cnn"
[space]
w_bits = [4, 8]
[qat]
steps = 10
calib_batches = 2
[latency]
repeats = 10
budget_s = 0.3
"""


@pytest.fixture(scope="module")
def study_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("export")
    f = root / "exp.toml"
    f.write_text(STUDY)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AUTOQUANT_RUNS", str(root / "runs"))
        assert main(["search", str(f), "-q"]) == 0
    return f


def test_export_writes_a_deployable_trial(study_file: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("AUTOQUANT_RUNS", str(study_file.parent / "runs"))
    out = study_file.parent / "export-trial1"
    assert main(["export", str(study_file), "--trial", "1", "--out", str(out)]) == 0
    meta = json.loads((out / "metadata.json").read_text())
    # The w4a8 baseline: sub-8-bit weights go bit-packed into the sidecar.
    assert {"plan.json", "model.onnx", "state_dict.pt", "weights.packed.npz"} <= set(
        p.name for p in out.iterdir()
    )
    assert meta["replayed"]["accuracy"] == pytest.approx(meta["stored"]["accuracy"], abs=0.01)
    assert abs(meta["deployed_accuracy_onnxruntime"] - meta["replayed"]["accuracy"]) <= 0.005
    assert artifact_weight_bytes(out / "model.onnx") == meta["stored"]["size_bytes"]

    # load_plan + apply_plan + the state dict rebuild the exported fake-quant model.
    study = load_study(load_study_spec(study_file))
    assert load_plan(out).to_dict() == read_record(study.trials[1]).plan
    task = get_task("digits-cnn")
    model = apply_plan(task.model_factory(), load_plan(out / "plan.json"))
    model.load_state_dict(torch.load(out / "state_dict.pt", weights_only=True))
    x, _ = task.eval_batches()[0]
    again = apply_plan(task.model_factory(), load_plan(out))
    again.load_state_dict(torch.load(out / "state_dict.pt", weights_only=True))
    torch.testing.assert_close(model.eval()(x), again.eval()(x))
    fresh = apply_plan(task.model_factory(), load_plan(out))  # uncalibrated: passes floats
    assert not torch.allclose(fresh.eval()(x), model(x))


def test_export_rejects_unknown_trial(study_file: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("AUTOQUANT_RUNS", str(study_file.parent / "runs"))
    assert main(["export", str(study_file), "--trial", "99", "--out", "x"]) == 2
    assert "--trial 99 is not in study 'exp'; allowed: 0..1" in capsys.readouterr().err


def test_bench_latency_remeasures_a_trial(study_file: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("AUTOQUANT_RUNS", str(study_file.parent / "runs"))
    rc = main(
        [
            "bench-latency",
            str(study_file),
            "--trial",
            "0",
            "--repeats",
            "30",
            "--budget-s",
            "0.5",
            "--batch-size",
            "1",
            "--batch-size",
            "8",
        ]
    )
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split(" batch ")[1].split()[0] for ln in lines] == ["1", "8"]
    medians = [float(ln.split("median ")[1].split()[0]) for ln in lines]
    assert all(m > 0 for m in medians) and "(stored" in lines[0]
