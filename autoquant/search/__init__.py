"""Optuna studies over per-layer quantization plans: spec, objective, runner, Pareto front.

The code lives in private modules, one job each (see ``notes/search-structure.md`` for the
map); every use of Optuna's internals is in ``_optuna_compat``.

Example:
    >>> from autoquant.search import load_study_spec, read_record, run_search
    >>> study = run_search(load_study_spec("studies/digits.toml"), trials=4)  # doctest: +SKIP
    >>> [read_record(t).accuracy for t in study.trials]  # doctest: +SKIP
"""

from __future__ import annotations

from autoquant.search._baselines import BASELINES, enqueue_baselines
from autoquant.search._context import SearchContext, TrialResult, replay
from autoquant.search._export import bench_trial_latency, deployed_accuracy, export_trial
from autoquant.search._locks import OptunaAttrStore
from autoquant.search._objectives import OBJECTIVES, Objective
from autoquant.search._pareto import (
    feasible,
    hypervolume_2d,
    hypervolume_history,
    nondominated,
    pareto_front,
)
from autoquant.search._record import (
    RECORD_VERSION,
    FloatBaseline,
    RecordVersionError,
    StudyRecord,
    TrialRecord,
    read_float_baseline,
    read_record,
    read_study_record,
    record_attrs,
    write_record,
    write_study_record,
)
from autoquant.search._samplers import SAMPLERS, make_sampler
from autoquant.search._signals import InfrastructureError
from autoquant.search._spec import (
    LatencySettings,
    QATSettings,
    StudyFileError,
    StudySpec,
    load_study_spec,
    mask_password,
    study_spec_from_dict,
)
from autoquant.search._storages import (
    StorageError,
    load_study,
    open_storage,
    runs_dir,
    storage_url,
)
from autoquant.search._worker import run_search

__all__ = [
    "BASELINES",
    "OBJECTIVES",
    "RECORD_VERSION",
    "SAMPLERS",
    "FloatBaseline",
    "InfrastructureError",
    "LatencySettings",
    "Objective",
    "OptunaAttrStore",
    "QATSettings",
    "RecordVersionError",
    "SearchContext",
    "StorageError",
    "StudyFileError",
    "StudyRecord",
    "StudySpec",
    "TrialRecord",
    "TrialResult",
    "bench_trial_latency",
    "deployed_accuracy",
    "enqueue_baselines",
    "export_trial",
    "feasible",
    "hypervolume_2d",
    "hypervolume_history",
    "load_study",
    "load_study_spec",
    "make_sampler",
    "mask_password",
    "nondominated",
    "open_storage",
    "pareto_front",
    "read_float_baseline",
    "read_record",
    "read_study_record",
    "record_attrs",
    "replay",
    "run_search",
    "runs_dir",
    "storage_url",
    "study_spec_from_dict",
    "write_record",
    "write_study_record",
]
