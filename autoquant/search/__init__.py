"""Optuna studies over per-layer quantization plans: spec, objective, runner, Pareto front.

The code lives in private modules, one job each (the map is in the README's "Development:
code structure"); every use of Optuna's internals is in ``_optuna_compat``.

Example:
    >>> from autoquant.search import load_study_spec, read_record, run_search
    >>> study = run_search(load_study_spec("studies/digits.toml"), trials=4)  # doctest: +SKIP
    >>> [read_record(t).accuracy for t in study.trials]  # doctest: +SKIP
"""

from __future__ import annotations

from autoquant.search._baselines import BASELINES, enqueue_baselines
from autoquant.search._budget import judged
from autoquant.search._context import SearchContext, TrialResult, replay
from autoquant.search._export import (
    MISMATCH_TOLERANCE,
    DeploymentCheck,
    bench_trial_latency,
    deployed_accuracy,
    deployed_check_text,
    export_trial,
    verify_deployment,
)
from autoquant.search._folders import (
    EXPORT_FILES,
    OutputFolderError,
    check_output_folder,
    output_folder,
)
from autoquant.search._locks import OptunaAttrStore
from autoquant.search._objectives import OBJECTIVES, Objective
from autoquant.search._pareto import (
    feasible,
    hypervolume_2d,
    hypervolume_history,
    nondominated,
    pareto_front,
)
from autoquant.search._prepass import ensure_sensitivity, stored_sensitivity
from autoquant.search._pruning import Curve, Decision, Recovery, decide, learn_recovery
from autoquant.search._record import (
    RECORD_VERSION,
    FloatBaseline,
    RecordVersionError,
    StudyRecord,
    TrialRecord,
    read_deployed_checks,
    read_float_baseline,
    read_record,
    read_remeasurement,
    read_study_record,
    record_attrs,
    write_deployed_check,
    write_record,
    write_study_record,
)
from autoquant.search._remeasure import remeasure_front
from autoquant.search._resume import (
    ForkResult,
    SpaceChangedError,
    check_space_unchanged,
    fork_study,
    param_distributions,
)
from autoquant.search._runs import RunOutcome, new_run_id, run_outcome
from autoquant.search._samplers import SAMPLERS, make_sampler
from autoquant.search._signals import InfrastructureError
from autoquant.search._spec import (
    MAX_SEED,
    LatencySettings,
    QATSettings,
    StudyFileError,
    StudySpec,
    load_study_spec,
    mask_password,
    max_threads,
    study_name_problem,
    study_spec_from_dict,
    threads_problem,
)
from autoquant.search._storages import (
    StorageError,
    StudyNotFoundError,
    load_existing_study,
    load_study,
    open_storage,
    runs_dir,
    storage_url,
)
from autoquant.search._strategy import StrategySettings, parse_duration
from autoquant.search._worker import run_search

__all__ = [
    "BASELINES",
    "EXPORT_FILES",
    "MAX_SEED",
    "MISMATCH_TOLERANCE",
    "Curve",
    "Decision",
    "Recovery",
    "StrategySettings",
    "decide",
    "ensure_sensitivity",
    "judged",
    "learn_recovery",
    "parse_duration",
    "stored_sensitivity",
    "OBJECTIVES",
    "RECORD_VERSION",
    "SAMPLERS",
    "DeploymentCheck",
    "FloatBaseline",
    "ForkResult",
    "InfrastructureError",
    "LatencySettings",
    "Objective",
    "OptunaAttrStore",
    "OutputFolderError",
    "QATSettings",
    "RecordVersionError",
    "RunOutcome",
    "SearchContext",
    "SpaceChangedError",
    "StorageError",
    "StudyFileError",
    "StudyNotFoundError",
    "StudyRecord",
    "StudySpec",
    "TrialRecord",
    "TrialResult",
    "bench_trial_latency",
    "check_output_folder",
    "check_space_unchanged",
    "deployed_accuracy",
    "deployed_check_text",
    "enqueue_baselines",
    "export_trial",
    "feasible",
    "fork_study",
    "hypervolume_2d",
    "hypervolume_history",
    "load_existing_study",
    "load_study",
    "load_study_spec",
    "make_sampler",
    "mask_password",
    "max_threads",
    "new_run_id",
    "nondominated",
    "open_storage",
    "output_folder",
    "param_distributions",
    "pareto_front",
    "read_deployed_checks",
    "read_remeasurement",
    "remeasure_front",
    "read_float_baseline",
    "read_record",
    "read_study_record",
    "record_attrs",
    "replay",
    "run_outcome",
    "run_search",
    "runs_dir",
    "storage_url",
    "study_name_problem",
    "study_spec_from_dict",
    "threads_problem",
    "verify_deployment",
    "write_deployed_check",
    "write_record",
    "write_study_record",
]
