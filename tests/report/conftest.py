"""A synthetic study with the stored schema of autoquant.search, built without the pipeline.

The trial and study records go through autoquant.search's writers (``record_attrs``,
``write_study_record``), so the fixture stores exactly what a search stores.

The trials are plausible (accuracy falls with fewer bits, more on sensitive layers; size is
the packed size; latency grows with sub-8-bit layers) but fully deterministic, so the report
tests do not depend on quant/transform/measure/train.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

from autoquant.search import (
    FloatBaseline,
    StudyRecord,
    TrialRecord,
    record_attrs,
    write_study_record,
)
from autoquant.types import LayerPlan, QuantPlan, QuantSpec

# (name, type, params, macs, sensitivity): the first and last layers are the sensitive ones.
LAYERS: list[tuple[str, str, int, int, float]] = [
    ("conv1", "Conv2d", 448, 458752, 3.0),
    ("layer1.0.conv1", "Conv2d", 2320, 2375680, 0.6),
    ("layer1.0.conv2", "Conv2d", 2320, 2375680, 0.5),
    ("layer2.0.conv1", "Conv2d", 4640, 1187840, 0.7),
    ("layer2.0.conv2", "Conv2d", 9248, 2367488, 0.6),
    ("layer2.0.shortcut.0", "Conv2d", 544, 139264, 1.2),
    ("layer3.0.conv1", "Conv2d", 18496, 1183744, 0.8),
    ("layer3.0.conv2", "Conv2d", 36928, 2363392, 0.7),
    ("linear", "Linear", 650, 640, 2.5),
]
FLOAT_ACC = 0.92
MAX_DROP = 0.01
W_PENALTY = {8: 0.0001, 6: 0.0005, 4: 0.0015, 3: 0.005, 2: 0.03, "fp16": 0.0, "fp32": 0.0}
A_PENALTY = {8: 0.0001, 6: 0.0008, 4: 0.006, "fp16": 0.0, "fp32": 0.0}
START = dt.datetime(2026, 1, 5, 9, 0, 0)


def float_size() -> int:
    return 4 * sum(p for _, _, p, _, _ in LAYERS)


def make_plan(
    w_bits: list[Any],
    a_bits: list[Any],
    *,
    per_channel: list[bool] | None = None,
    sym: list[bool] | None = None,
    drop_layers: tuple[str, ...] = (),
) -> QuantPlan:
    layers = {}
    for i, (name, *_rest) in enumerate(LAYERS):
        if name in drop_layers:
            continue  # absent from the plan: the layer stays float
        pc = True if per_channel is None else per_channel[i]
        s = True if sym is None else sym[i]
        layers[name] = LayerPlan(
            weight=QuantSpec(
                bits=w_bits[i],
                symmetric=s,
                granularity="per_channel" if pc else "per_tensor",
                axis=0,
            ),
            activation=QuantSpec(bits=a_bits[i], symmetric=False, axis=1),
        )
    return QuantPlan(layers)


def score(plan: QuantPlan, noise: float) -> tuple[float, int, float]:
    """(accuracy, packed size, latency ms) of a plan under the toy model."""
    acc, size, lat = FLOAT_ACC + noise, 0, 0.40
    for name, _t, params, _m, sens in LAYERS:
        lp = plan.layers.get(name)
        if lp is None:
            size += 4 * params
            lat += 0.03
            continue
        w, a = lp.weight, lp.activation
        acc -= sens * W_PENALTY[w.bits] * (1.0 if w.per_channel or w.is_float else 1.6)
        acc -= sens * A_PENALTY[a.bits]
        size += (params * w.storage_bits + 7) // 8 + (0 if w.is_float else 5 * 16)
        lat += 0.02 if w.bits == 8 else 0.045
    return round(acc, 4), int(size), round(lat, 4)


def _latency_list(median: float, iqr: float) -> list[dict[str, Any]]:
    return [
        {
            "median_ms": median,
            "iqr_ms": iqr,
            "backend": "onnxruntime",
            "threads": 1,
            "batch_size": 1,
            "n": 50,
            "formats": ["int8"],
            "cached": False,
            "measure_s": 0.4,
        }
    ]


def _spec_dict(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "task": "toy-resnet",
        "trials": 14,
        "sampler": "tpe",
        "seed": 0,
        "storage": None,
        "device": "cpu",
        "objectives": ["accuracy", "size", "latency"],
        "max_accuracy_drop": MAX_DROP,
        "task_options": {},
        "space": {
            "w_bits": [2, 3, 4, 6, 8],
            "a_bits": [4, 6, 8],
            "w_sym": [True, False],
            "a_sym": [False],
            "w_gran": ["per_channel", "per_tensor"],
            "a_gran": ["per_tensor"],
            "w_calib": ["minmax"],
            "a_calib": ["minmax"],
            "include": ["*"],
            "exclude": [],
            "tie": {},
            "overrides": {},
            "lr": None,
            "qat_steps": None,
            "percentile": 99.99,
            "learned_scale": False,
        },
        "qat": {
            "steps": 60,
            "lr": 0.001,
            "optimizer": "adam",
            "batch_size": 64,
            "calib_batches": 4,
            "calib_batch_size": 64,
            "eval_batch_size": 256,
        },
        "latency": {
            "backend": "onnxruntime",
            "threads": 1,
            "batch_sizes": [1],
            "warmup": 10,
            "repeats": 50,
            "budget_s": 2.0,
        },
        "source": f"studies/{name}.toml",
    }


def plans(n_random: int, seed: int) -> list[tuple[QuantPlan, str | None]]:
    """Baselines, hand-picked plans (float layers, an infeasible 2-bit plan) and random ones."""
    n = len(LAYERS)
    out: list[tuple[QuantPlan, str | None]] = [
        (make_plan([8] * n, [8] * n), "w8a8"),
        (make_plan([4] * n, [8] * n), "w4a8"),
        (make_plan([2] * n, [4] * n), None),  # collapses: infeasible
        (make_plan([8, 4, 4, 4, 4, 8, 4, 4, "fp16"], [8] * n), None),
        (make_plan([8, 4, 3, 4, 3, 8, 3, 3, 8], [8] * n, drop_layers=("linear",)), None),
        (
            make_plan(
                [8, 6, 4, 4, 4, 6, 4, 2, 8],
                [8, 8, 8, 6, 6, 8, 8, 8, 8],
                sym=[True, False] * 4 + [True],
            ),
            None,
        ),
    ]
    rng = np.random.default_rng(seed)
    for _ in range(n_random):
        w = [int(rng.choice([2, 3, 4, 6, 8], p=[0.04, 0.1, 0.36, 0.2, 0.3])) for _ in range(n)]
        a = [int(rng.choice([4, 6, 8], p=[0.05, 0.3, 0.65])) for _ in range(n)]
        pc = [bool(rng.random() < 0.7) for _ in range(n)]
        sym = [bool(rng.random() < 0.8) for _ in range(n)]
        out.append((make_plan(w, a, per_channel=pc, sym=sym), None))
    return out


def build_study(
    storage: str | None = None, *, name: str = "toy", n_random: int = 6, seed: int = 0
) -> optuna.Study:
    """A study with baselines, feasible/infeasible trials, one FAIL and one PRUNED trial."""
    study = optuna.create_study(
        study_name=name, storage=storage, directions=["maximize", "minimize", "minimize"]
    )
    fsize = float_size()
    write_study_record(
        study,
        StudyRecord(
            spec=_spec_dict(name),
            layers=[
                {"name": n, "type_name": t, "params": p, "macs": m} for n, t, p, m, _ in LAYERS
            ],
            task_info={"float_accuracy": FLOAT_ACC},
            created="2026-01-05 09:00:00",
            float_baseline=FloatBaseline(
                accuracy=FLOAT_ACC,
                size_bytes=fsize,
                latency_ms=0.62,
                latency=_latency_list(0.62, 0.03),
            ),
        ),
    )
    study.set_user_attr("latency:abc", {"median_ms": 1.0})  # a cache entry: must be ignored

    rng = np.random.default_rng(seed + 1)
    items: list[tuple[TrialState, QuantPlan | None, str | None]] = [
        (TrialState.COMPLETE, p, b) for p, b in plans(n_random, seed)
    ]
    items.insert(4, (TrialState.FAIL, None, None))
    items.insert(7, (TrialState.PRUNED, None, None))
    for number, (state, plan, baseline) in enumerate(items):
        start = START + dt.timedelta(seconds=40 * number)
        values = None
        if state == TrialState.FAIL:
            record = TrialRecord(
                baseline=baseline,
                fail_reason="NonFiniteLossError: non-finite QAT loss nan at step 3",
            )
        elif state == TrialState.PRUNED:
            record = TrialRecord(
                baseline=baseline, fail_reason="budget already reached by other workers"
            )
        else:
            assert plan is not None
            acc, size, lat = score(plan, float(rng.normal(0, 0.002)))
            record = TrialRecord(
                baseline=baseline,
                plan=plan.to_dict(),
                plan_summary=plan.summary(),
                qat={"lr": 0.001, "steps": 60, "optimizer": "adam"},
                accuracy=acc,
                accuracy_drop=FLOAT_ACC - acc,
                size_bytes=size,
                size_ratio=size / fsize,
                latency_ms=lat,
                latency=_latency_list(lat, round(0.02 + 0.01 * rng.random(), 4)),
                loss_history=[1.0, 0.5, 0.3],
                seed=0,
                timing_s={
                    "calibrate": 0.5,
                    "qat": 20.0,
                    "eval": 2.0,
                    "measure": 3.0,
                    "total": 25.5,
                },
            )
            values = [acc, float(size), lat]
        study.add_trial(
            FrozenTrial(
                number=number,
                state=state,
                value=None,
                values=values,
                datetime_start=start,
                datetime_complete=start + dt.timedelta(seconds=30),
                params={},
                distributions={},
                user_attrs=record_attrs(record),
                system_attrs={},
                intermediate_values={},
                trial_id=number,
            )
        )
    return study


@pytest.fixture(scope="module")
def toy_study(tmp_path_factory: pytest.TempPathFactory) -> Iterator[optuna.Study]:
    """The synthetic study in a temporary SQLite file (as the CLI stores it)."""
    path: Path = tmp_path_factory.mktemp("study") / "study.db"
    yield build_study(f"sqlite:///{path}")


@pytest.fixture(scope="session")
def make_toy_study() -> Callable[..., optuna.Study]:
    """The builder, for tests that need another (e.g. larger or in-memory) toy study."""
    return build_study
