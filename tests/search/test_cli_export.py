"""Exports that verify themselves and are written atomically, through ``autoquant export``."""

from __future__ import annotations

import errno
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from _studies import tiny_study

from autoquant.cli import main
from autoquant.measure import LatencyCache
from autoquant.search import (
    EXPORT_FILES,
    DeploymentCheck,
    OptunaAttrStore,
    SearchContext,
    load_existing_study,
    load_study_spec,
    read_deployed_checks,
    read_record,
    verify_deployment,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def study_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("cli-export")
    f = root / "tinyexp.toml"
    f.write_text(tiny_study("tinyexp"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AUTOQUANT_RUNS", str(root / "runs"))
        assert main(["search", str(f), "-q"]) == 0
        yield f


def _w4(f: Path) -> int:
    study = load_existing_study(load_study_spec(f))
    return next(t.number for t in study.get_trials() if read_record(t).baseline == "w4a8")


def _export(f: Path, out: Path, *extra: str) -> int:
    return main(["export", str(f), "--trial", str(_w4(f)), "--out", str(out), *extra])


def _siblings(out: Path) -> list[str]:
    """Temporary folders an export left beside its target."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def test_export_verifies_the_deployed_model_and_lists_only_its_files(
    study_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = study_file.parent / "ok"
    assert _export(study_file, out) == 0
    meta = json.loads((out / "metadata.json").read_text())
    check = meta["deployed_check"]
    assert check["ok"] and not check["mismatch"] and not check["over_limit"]
    assert check["accuracy"] == meta["deployed_accuracy_onnxruntime"]
    assert check["simulated_accuracy"] == meta["replayed"]["accuracy"]
    assert abs(check["accuracy"] - check["simulated_accuracy"]) <= 0.005
    assert set(meta["files"]) == {p.name for p in out.iterdir()} <= EXPORT_FILES
    assert meta["onnx"]["path"] == "model.onnx"  # not the temporary folder's path
    study = load_existing_study(load_study_spec(study_file))
    assert read_deployed_checks(study)[meta["trial"]] == check
    assert _siblings(out) == []


def test_a_non_empty_out_is_refused_and_force_replaces_only_a_previous_export(
    study_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = study_file.parent / "again"
    assert _export(study_file, out) == 0
    plan = (out / "plan.json").read_text()
    (out / "plan.json").write_text("edited")
    capsys.readouterr()
    assert _export(study_file, out) == 2
    err = capsys.readouterr().err
    assert f"--out {out} is not empty (metadata.json, model.onnx, plan.json" in err
    assert "--force" in err and (out / "plan.json").read_text() == "edited"

    assert _export(study_file, out, "--force") == 0
    assert (out / "plan.json").read_text() == plan

    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert _export(study_file, out, "--force") == 2
    err = capsys.readouterr().err
    assert "holds files that are not part of an autoquant export (notes.txt)" in err
    assert (out / "notes.txt").read_text() == "mine" and (out / "plan.json").read_text() == plan

    a_file = study_file.parent / "a-file"
    a_file.write_text("x")
    assert _export(study_file, a_file) == 2
    assert f"--out {a_file} is a file, not a folder" in capsys.readouterr().err
    assert _siblings(out) == [] and _siblings(a_file) == []


def test_a_full_disk_leaves_no_partial_export(
    study_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    out = study_file.parent / "full"
    assert _export(study_file, out) == 3
    assert "No space left on device" in capsys.readouterr().err
    assert not out.exists() and _siblings(out) == []


def test_a_deployed_model_that_disagrees_is_a_loud_warning_exit_4_and_flagged(
    study_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import autoquant.search._export as export

    real = export.deployed_accuracy
    monkeypatch.setattr(export, "deployed_accuracy", lambda ctx, p: real(ctx, p) - 0.0111)
    out = study_file.parent / "bad"
    number = _w4(study_file)
    assert _export(study_file, out) == 4
    captured = capsys.readouterr()
    assert "WARNING" in captured.err and f"trial {number}: deployed check FAILED" in captured.err
    assert "1.11 points apart" in captured.err and (out / "model.onnx").is_file()
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["deployed_check"]["mismatch"] and not meta["deployed_check"]["ok"]

    # front and best flag the trial (when it is on the front / chosen).
    assert main(["front", str(study_file), "--format", "json"]) == 0
    rows = {r["trial"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows[number]["deployed"] == "FAILED: mismatch"
    assert main(["best", str(study_file), "--minimize", "size", "--max-drop", "1"]) == 0
    text = capsys.readouterr().out  # the smallest trial: the w4a8 baseline
    assert f"trial {number} (baseline w4a8)" in text
    assert "WARNING: the deployed model failed its check: deployed" in text

    # verify_deployment (called at the end of a search by other code) records a new check.
    monkeypatch.setattr(export, "deployed_accuracy", real)
    spec = load_study_spec(study_file)
    study = load_existing_study(spec)
    ctx = SearchContext(spec, latency_cache=LatencyCache(OptunaAttrStore(study)))
    check = verify_deployment(study, ctx, number)
    assert isinstance(check, DeploymentCheck) and check.ok and check.trial == number
    assert read_deployed_checks(study)[number]["ok"]
    assert main(["front", str(study_file), "--format", "json"]) == 0
    rows = {r["trial"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows[number]["deployed"] == "ok"
