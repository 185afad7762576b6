"""The sensitivity pre-pass: measured once per study (however many workers), on the study's
own batches, stored on the study, shown by ``autoquant sensitivity`` and the report."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest

from autoquant.allocate import SensitivityTable, UnitSpace, measure_sensitivity, sample_batches
from autoquant.cli import main
from autoquant.report import sensitivity_table_frame, write_report
from autoquant.search import (
    SearchContext,
    StrategySettings,
    _prepass,
    ensure_sensitivity,
    read_study_record,
    stored_sensitivity,
    study_spec_from_dict,
)
from autoquant.search._locks import Beater, Claims
from autoquant.search._optuna_compat import storage_of
from autoquant.space import SearchSpace

SPEC = {
    "study": {"name": "prepass", "trials": 4, "seed": 0},
    "task": {"name": "digits-cnn"},
    "space": {"w_bits": [2, 4, 8], "a_bits": [4, 8], "a_calib": ["minmax", "mse"]},
    "qat": {"steps": 5, "calib_batches": 2},
    "latency": {"warmup": 1, "repeats": 3, "budget_s": 0.05},
    "strategy": {"held_out": 256},
}


@pytest.fixture(scope="module")
def ctx() -> SearchContext:
    return SearchContext(study_spec_from_dict(SPEC, "prepass.toml"))


def _study(url: str, name: str = "prepass") -> optuna.Study:
    return optuna.create_study(
        study_name=name, storage=url, directions=["maximize"] * 3, load_if_exists=True
    )


def test_two_workers_on_one_storage_run_the_pass_once_and_get_the_same_table(
    ctx: SearchContext, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    _study(url)
    calls: list[float] = []
    real = _prepass.compute_sensitivity

    def counted(*args: object, **kwargs: object) -> SensitivityTable:
        calls.append(time.monotonic())
        time.sleep(0.5)  # both workers are surely waiting or measuring meanwhile
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(_prepass, "compute_sensitivity", counted)
    barrier = threading.Barrier(2)
    tables: dict[int, SensitivityTable] = {}
    claims: dict[int, Claims] = {}

    def worker(i: int) -> None:
        study = optuna.load_study(study_name="prepass", storage=url)
        claims[i] = Claims(storage_of(study), "prepass", beater=Beater(0.2), poll_s=0.05)
        barrier.wait()
        table = ensure_sensitivity(study, ctx, claims[i])
        assert table is not None
        tables[i] = table
        claims[i].release_all()
        claims[i].beater.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(calls) == 1, "the pass ran more than once"
    assert tables[0].to_dict() == tables[1].to_dict()
    assert sorted((c.claimed, c.waited) for c in claims.values()) == [(0, 1), (1, 0)]
    stored = read_study_record(_study(url)).sensitivity
    assert stored is not None and stored["wall_s"] >= 0.5 and stored["mode"] == "kl"
    assert SensitivityTable.from_dict(stored["table"]) == tables[0]
    assert optuna.get_all_study_names(url) == ["prepass"]  # the claim marker is gone


def test_the_table_is_measured_on_the_studys_batches(ctx: SearchContext) -> None:
    study = _study("sqlite:///:memory:")
    table = ensure_sensitivity(study, ctx)
    # The same measurement done by hand: the calibration batches of the study and a seeded
    # sample of its held-out batches.
    units = UnitSpace(ctx.spec.space, ctx.layer_names)
    held = sample_batches(ctx.eval, 256, batch_size=ctx.spec.qat.eval_batch_size, seed=0)
    expected = measure_sensitivity(ctx.float_model, units, ctx.calib, held, ctx.task.loss_fn)
    assert table is not None and [u.name for u in table.units] == [u.name for u in units.units]
    for got, want in zip(table.units, expected.units, strict=True):
        for kind in ("weight", "activation"):
            np.testing.assert_allclose(
                getattr(got, kind)["eval_kl"], getattr(want, kind)["eval_kl"], rtol=1e-6
            )
    assert table.settings["eval_samples"] == 256
    assert stored_sensitivity(study, units, "eval_kl") == table


def test_off_measures_nothing_and_a_table_of_another_space_is_measured_again(
    ctx: SearchContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    study = _study("sqlite:///:memory:")
    off = replace(ctx.spec, strategy=StrategySettings(sensitivity="off"))
    monkeypatch.setattr(ctx, "spec", off)
    assert ensure_sensitivity(study, ctx) is None
    assert read_study_record(study).sensitivity is None
    monkeypatch.undo()

    first = ensure_sensitivity(study, ctx)
    assert first is not None
    narrower = SearchSpace(w_bits=(4, 8), a_bits=(8,))
    other = UnitSpace(narrower, ctx.layer_names)
    assert stored_sensitivity(study, other) is None  # measured for another space
    assert stored_sensitivity(study, metric="hessian") is None  # lacks the metric
    monkeypatch.setattr(ctx, "spec", replace(ctx.spec, space=narrower))
    again = ensure_sensitivity(study, ctx)
    assert again is not None and stored_sensitivity(study, other) == again


@pytest.mark.slow
def test_hessian_mode_adds_the_estimate_and_stores_its_metric(
    ctx: SearchContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    study = _study("sqlite:///:memory:")
    monkeypatch.setattr(
        ctx, "spec", replace(ctx.spec, strategy=StrategySettings(sensitivity="hessian"))
    )
    table = ensure_sensitivity(study, ctx)
    assert table is not None and {"hessian", "eval_kl"} <= set(table.metrics)
    stored = read_study_record(study).sensitivity
    assert stored["metric"] == "hessian" and stored["mode"] == "hessian"
    # every weight option costs more Hessian damage at 2 bits than at 8, on every unit
    for u in table.units:
        bits = [o["w_bits"] for o in u.weight_options]
        h = u.weight["hessian"]
        assert h[bits.index(2)] > h[bits.index(8)] >= 0


STUDY_FILE = """
[study]
name = "sens-cli"
trials = 2
[task]
name = "digits-cnn"
[space]
w_bits = [2, 8]
a_bits = [4, 8]
[qat]
calib_batches = 1
[strategy]
sensitivity = "off"
held_out = 128
"""


@pytest.mark.slow
def test_the_sensitivity_command_measures_once_then_prints_the_stored_table(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("AUTOQUANT_RUNS", str(tmp_path))
    f = tmp_path / "s.toml"
    f.write_text(STUDY_FILE)
    calls = []
    real = _prepass.compute_sensitivity
    monkeypatch.setattr(
        _prepass, "compute_sensitivity", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    assert main(["sensitivity", str(f)]) == 0  # "off" in the file: the command measures kl
    out = capsys.readouterr().out
    assert out.startswith("sensitivity pre-pass of study 'sens-cli' (kl): ")
    assert "evaluations on 128 held-out samples" in out and "eval_kl" in out
    assert main(["sensitivity", str(f), "--format", "json"]) == 0
    stored = json.loads(capsys.readouterr().out)
    table = SensitivityTable.from_dict(stored["table"])
    assert main(["sensitivity", str(f), "--format", "csv"]) == 0
    rows = pd.read_csv(__import__("io").StringIO(capsys.readouterr().out))
    assert len(rows) == sum(len(u.weight_options) + len(u.activation_options) for u in table.units)
    assert set(rows["kind"]) == {"weight", "activation"}
    w = rows[rows["kind"] == "weight"]
    assert set(w["option"]) == {"w2", "w8"}
    assert calls == [1], "the stored table is printed, not measured again"


def report_study() -> optuna.Study:
    """A small stored study (float baseline, spec, three complete trials) for report tests."""
    from autoquant.search import (
        FloatBaseline,
        StudyRecord,
        TrialRecord,
        record_attrs,
        write_study_record,
    )
    from autoquant.types import LayerPlan, QuantPlan, QuantSpec

    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    spec = study_spec_from_dict(SPEC, "prepass.toml").to_dict()
    write_study_record(
        study,
        StudyRecord(
            spec={**spec, "max_accuracy_drop": 0.01},
            layers=[{"name": n, "type_name": "Conv2d", "params": 100} for n in ("conv1", "linear")],
            float_baseline=FloatBaseline(accuracy=0.95, size_bytes=800, latency_ms=1.0),
        ),
    )
    for i, bits in enumerate((8, 4, 2)):
        spec_w = QuantSpec(bits=bits, axis=0)
        plan = QuantPlan(
            {n: LayerPlan(spec_w, QuantSpec(bits=8, axis=1)) for n in ("conv1", "linear")}
        )
        acc, size = 0.95 - 0.01 * i, 200 // (1 + i)
        record = TrialRecord(
            plan=plan.to_dict(),
            plan_summary=plan.summary(),
            accuracy=acc,
            accuracy_drop=0.95 - acc,
            size_bytes=size,
            latency_ms=0.5,
            timing_s={"total": 4.0},
        )
        study.add_trial(
            optuna.trial.create_trial(values=[acc, size, 0.5], user_attrs=record_attrs(record))
        )
    return study


def test_the_report_shows_the_stored_table_instead_of_the_observed_one(tmp_path: Path) -> None:
    from autoquant.allocate import UnitDamage
    from autoquant.search import StudyRecord, write_study_record

    study = report_study()
    observed = write_report(study, tmp_path / "before")["html"].read_text(encoding="utf-8")
    assert "Layer sensitivity observed across trials" in observed  # old studies: the fallback
    assert "Layer sensitivity (pre-pass)" not in observed
    units = [
        UnitDamage(
            name,
            (name,),
            [{"w_bits": 4}, {"w_bits": 8}],
            [{"a_bits": 8}],
            weight={"eval_kl": [0.2 * (i + 1), 0.001], "eval_acc": [0.01, 0.0]},
            activation={"eval_kl": [0.003], "eval_acc": [0.0]},
        )
        for i, name in enumerate(["conv1", "linear"])
    ]
    table = SensitivityTable(tuple(units), settings={"evaluations": 6, "eval_samples": 512})
    write_study_record(
        study,
        StudyRecord(
            sensitivity={"table": table.to_dict(), "mode": "kl", "metric": "eval_kl", "wall_s": 2}
        ),
    )
    df = sensitivity_table_frame(study)
    assert df is not None and list(df["option"]) == ["w4", "w8", "fixed"] * 2
    assert df.set_index(["unit", "option"]).loc[("linear", "w4"), "eval_kl"] == 0.4
    paths = write_report(study, tmp_path / "after")
    page = paths["html"].read_text(encoding="utf-8")
    assert "Layer sensitivity (pre-pass)" in page and "observed across trials" not in page
    assert "6 post-training evaluations on 512 held-out samples in 2.0 s" in page
    assert "≈ 0.5 trials at the median trial time" in page  # 2 s over trials of 4 s
    assert 'id="plot-sensitivity"' in page and "<td>sensitivity pre-pass</td>" in page
    assert pd.read_csv(paths["sensitivity_csv"]).shape[0] == 6


def test_only_layers_discovery_marks_ok_are_searched_and_the_others_are_named_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import logging

    import torch
    from torch import nn

    from autoquant.tasks import Task

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.spare = nn.Linear(4, 3)  # never called: it cannot be calibrated

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    task = Task.from_tensors("toy", lambda: Net().eval(), train=(x, y), eval=(x, y))
    spec = study_spec_from_dict(
        {"task": {"name": "toy"}, "space": {"w_bits": [4, 8]}, "qat": {"steps": 2}}, "toy.toml"
    )
    caplog.set_level(logging.WARNING, logger="autoquant")
    ctx = SearchContext(spec, task=task)
    assert ctx.layer_names == ["fc"] and {i.name for i in ctx.layers} == {"fc", "spare"}
    warnings = [r.getMessage() for r in caplog.records if "excluded" in r.getMessage()]
    assert len(warnings) == 1 and "spare (Linear, never_called)" in warnings[0]
    plan, qat = ctx.plan_for(optuna.trial.FixedTrial({"fc/w_bits": 4}))
    assert set(plan.layers) == {"fc"}
    result = ctx.run_plan(plan, lr=qat["lr"], steps=qat["steps"], measure=False)
    assert result.record.size_bytes == result.values["size"] > 0
    assert [u.name for u in _prepass.unit_space(ctx).units] == ["fc"]
