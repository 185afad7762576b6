"""Optuna studies over per-layer quantization plans: spec, objective, runner, Pareto front."""

from __future__ import annotations

from autoquant.search._export import bench_trial_latency, deployed_accuracy, export_trial
from autoquant.search._objective import SearchContext, TrialResult, replay
from autoquant.search._pareto import (
    feasible,
    hypervolume_2d,
    hypervolume_history,
    nondominated,
    pareto_front,
)
from autoquant.search._spec import (
    LatencySettings,
    QATSettings,
    StudyFileError,
    StudySpec,
    load_study_spec,
    mask_password,
    study_spec_from_dict,
)
from autoquant.search._study import (
    BASELINES,
    OptunaAttrStore,
    StorageError,
    enqueue_baselines,
    load_study,
    open_storage,
    run_search,
    runs_dir,
    storage_url,
)

__all__ = [
    "BASELINES",
    "LatencySettings",
    "OptunaAttrStore",
    "QATSettings",
    "SearchContext",
    "StorageError",
    "StudyFileError",
    "StudySpec",
    "bench_trial_latency",
    "deployed_accuracy",
    "export_trial",
    "TrialResult",
    "enqueue_baselines",
    "feasible",
    "hypervolume_2d",
    "hypervolume_history",
    "load_study",
    "load_study_spec",
    "mask_password",
    "nondominated",
    "open_storage",
    "pareto_front",
    "replay",
    "run_search",
    "runs_dir",
    "storage_url",
    "study_spec_from_dict",
]
