"""Study definitions: a TOML file (or Python) naming the task, space, budget and settings."""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from autoquant.measure import BACKENDS
from autoquant.space import SearchSpace
from autoquant.train import AUTOCAST, DEFAULT_QUANT_LR, OPTIMIZERS, Distillation
from autoquant.train._compile import check_compile
from autoquant.types import PlanError

from ._objectives import OBJECTIVES, REQUIRED_OBJECTIVE, directions
from ._samplers import SAMPLERS
from ._strategy import StrategyError, StrategySettings, parse_duration, strategy_from_dict

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class StudyFileError(PlanError):
    """A study file is invalid; the message names the file, the key and the allowed values."""


MAX_SEED = 2**32 - 1  # numpy's and Optuna's samplers take seeds in 0..2**32-1
# A study name is a folder under AUTOQUANT_RUNS: no path separators, and no leading dot
# (".", ".." and hidden names would write beside or above the runs folder).
_STUDY_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
STUDY_NAME_RULE = "letters, digits and '_.-', not starting with '.'"


def study_name_problem(name: object) -> str | None:
    """Why ``name`` cannot name a study, or None when it can.

    Example:
        >>> study_name_problem("digits-v2") is None, study_name_problem("..")
        (True, "'..' is not allowed; allowed: letters, digits and '_.-', not starting with '.'")
    """
    if isinstance(name, str) and _STUDY_NAME.fullmatch(name):
        return None
    return f"{name!r} is not allowed; allowed: {STUDY_NAME_RULE}"


def max_threads() -> int:
    """The largest thread count a study may ask for: 4 × this machine's CPUs.

    More threads than that only oversubscribe the cores (ONNX Runtime with 100000 threads
    allocates gigabytes and stops answering signals).
    """
    return 4 * (os.cpu_count() or 1)


def threads_problem(threads: int) -> str | None:
    """Why ``threads`` is not a usable thread count, or None."""
    top = max_threads()
    if 1 <= threads <= top:
        return None
    return (
        f"{threads!r} is not allowed; allowed values: 1..{top} "
        f"(4 × the {os.cpu_count() or 1} CPUs of this machine)"
    )


@dataclass(frozen=True)
class QATSettings:
    """Calibration and quantization-aware fine-tuning settings of every trial.

    ``quant_lr`` is the relative learning rate of learned scales and zero-points (see
    :func:`autoquant.train.qat_finetune`); ``distill`` distils from the float model (None:
    not, unless the space searches ``distill``); ``compile`` is ``"auto"`` (compile on CUDA
    only), True or False; ``autocast`` is None or ``"bf16"``.
    """

    steps: int = 50
    lr: float = 1e-3
    optimizer: str = "adam"
    batch_size: int = 64
    calib_batches: int = 4
    calib_batch_size: int = 64
    eval_batch_size: int = 256
    quant_lr: float = DEFAULT_QUANT_LR
    distill: Distillation | None = None
    compile: bool | str = "auto"
    autocast: str | None = None


@dataclass(frozen=True)
class LatencySettings:
    """How latency is measured (see :mod:`autoquant.measure`)."""

    backend: str = "onnxruntime"
    threads: int = 1
    batch_sizes: tuple[int, ...] = (1,)
    warmup: int = 10
    repeats: int = 50
    budget_s: float = 2.0
    remeasure_front: bool = True  # re-time the front interleaved with float at the end


@dataclass(frozen=True)
class StudySpec:
    """Everything a study needs; loaded from ``studies/*.toml`` by :func:`load_study_spec`.

    Example:
        >>> spec = StudySpec(name="demo", task="digits-cnn", trials=4)
        >>> spec.directions
        ['maximize', 'minimize', 'minimize']
    """

    name: str
    task: str
    trials: int | None = 20  # None: no count limit (a timeout ends the search)
    sampler: str = "tpe"
    seed: int = 0
    storage: str | None = None
    device: str = "cpu"
    objectives: tuple[str, ...] = tuple(OBJECTIVES)
    max_accuracy_drop: float | None = None
    task_options: Mapping[str, Any] = field(default_factory=dict)
    space: SearchSpace = field(default_factory=SearchSpace)
    qat: QATSettings = field(default_factory=QATSettings)
    latency: LatencySettings = field(default_factory=LatencySettings)
    source: str | None = None
    timeout: float | None = None  # seconds of wall time after which no trial starts
    strategy: StrategySettings = field(default_factory=StrategySettings)

    def __post_init__(self) -> None:
        # Checked here too, not only in the file loader: the CLI's --seed and --fork replace()
        # these fields, and the name becomes a folder path.
        where = f"{self.source or '<study>'}: "
        problem = study_name_problem(self.name)
        if problem:
            raise StudyFileError(f"{where}study.name = {problem}")
        trials = self.trials
        if trials is None and self.timeout is None:
            raise StudyFileError(
                f"{where}study.trials is missing and there is no study.timeout; give either "
                "(a trial count, a wall-clock budget, or both)"
            )
        if trials is not None and (
            isinstance(trials, bool) or not isinstance(trials, int) or trials < 1
        ):
            raise StudyFileError(
                f"{where}study.trials = {trials!r} must be >= 1 (allowed values: an integer "
                ">= 1, or none with a study.timeout)"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise StudyFileError(f"{where}study.seed = {self.seed!r}; expected an integer")
        if not 0 <= self.seed <= MAX_SEED:
            raise StudyFileError(
                f"{where}study.seed = {self.seed!r} is not allowed; allowed values: an integer "
                f"0..{MAX_SEED}"
            )

    @property
    def directions(self) -> list[str]:
        return directions(self.objectives)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form, stored on the study so reports can show the settings."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, SearchSpace):
                v = v.to_dict()
            elif isinstance(v, StrategySettings):
                v = v.to_dict()
            elif isinstance(v, (QATSettings, LatencySettings)):
                v = {g.name: _plain(getattr(v, g.name)) for g in fields(v)}
            elif isinstance(v, tuple):
                v = list(v)
            elif isinstance(v, Mapping):
                v = dict(v)
            out[f.name] = v
        out["storage"] = mask_password(out["storage"]) if out["storage"] else None
        return out


# Where libpq and SQLAlchemy read a password (keys in any case):
#   URL userinfo   postgresql+psycopg://user:pw@host/db; pw may be percent-encoded. It runs
#                  to the last '@' before a host, so a raw '@' or '/' in it is hidden too (an
#                  '@' in the query may hide more than the password: never less).
#   URL query      ...?password=pw&sslpassword=pw
#   key/value DSN  host=h password=pw, password = 'p w \\' q'
_USERINFO = re.compile(r"://[^:/?#@\s]*:(?P<pw>\S*)@(?=[^@\s/?#]*(?:[/?#\s]|$))")
_QUERY = re.compile(r"(?i)[?&](?:ssl)?password=(?P<pw>[^&#\s]*)")
_KEYWORD = re.compile(r"(?i)(?:^|(?<=\s))(?:ssl)?password\s*=\s*(?P<pw>'(?:[^'\\]|\\.)*'|\S*)")


def password_spans(text: str) -> list[tuple[int, int]]:
    """Where ``text`` (a storage URL or libpq DSN) holds a password: sorted, non-empty spans."""
    spans = {m.span("pw") for rx in (_USERINFO, _QUERY, _KEYWORD) for m in rx.finditer(text)}
    return sorted((a, b) for a, b in spans if b > a)


def mask_password(url: str) -> str:
    """Hide every password of a storage URL or libpq connection string behind ``***``.

    Covers URL userinfo (any ``+driver`` scheme, percent-encoded or not), ``password=`` and
    ``sslpassword=`` query parameters (any case) and keyword/value strings (quoted or not).

    Example:
        >>> mask_password("postgresql+psycopg://u:s%40cret@db/x?sslmode=require")
        'postgresql+psycopg://u:***@db/x?sslmode=require'
        >>> mask_password("postgresql://u@db/x?PASSWORD=secret&port=5432")
        'postgresql://u@db/x?PASSWORD=***&port=5432'
        >>> mask_password("host=db password='se cret' dbname=x")
        'host=db password=*** dbname=x'
    """
    out, end = [], 0
    for a, b in password_spans(url):
        if b <= end:  # inside a span already hidden (two forms overlap)
            continue
        if a >= end:
            out += [url[end:a], "***"]
        end = b
    return "".join(out) + url[end:]


# -- TOML loading with errors that name the file, the key and the allowed values ---------

_TYPES: dict[type, str] = {
    int: "an integer",
    float: "a number",
    str: "a string",
    bool: "true or false",
    list: "a list",
    dict: "a table",
}


def _check(path: str, key: str, value: Any, kind: type, allowed: tuple[Any, ...] = ()) -> Any:
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise StudyFileError(
            f"{path}: {key} = {value!r} is {type(value).__name__}; expected {_TYPES[kind]}"
        )
    if allowed and value not in allowed:
        raise StudyFileError(
            f"{path}: {key} = {value!r} is not allowed; allowed values: "
            f"{', '.join(repr(a) for a in allowed)}"
        )
    return value


def _no_unknown(path: str, table: str, data: Mapping[str, Any], known: set[str]) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        where = f"[{table}]" if table else "the top level"
        raise StudyFileError(
            f"{path}: unknown key(s) {unknown} in {where}; allowed keys: {', '.join(sorted(known))}"
        )


def _dataclass_from(path: str, table: str, cls: type, data: Any) -> Any:
    _check(path, f"[{table}]", data, dict)
    known = {f.name: f for f in fields(cls)}
    _no_unknown(path, table, data, set(known))
    defaults = cls()
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        default = getattr(defaults, key)
        kind = list if isinstance(default, tuple) else type(default)
        value = _check(path, f"{table}.{key}", value, kind)
        if isinstance(default, tuple):
            if not value:
                raise StudyFileError(
                    f"{path}: {table}.{key} is empty; allowed values: a list of one or more "
                    f"numbers > 0, e.g. {list(default)}"
                )
            value = tuple(_check(path, f"{table}.{key}[]", v, type(default[0])) for v in value)
            for v in value:
                _positive(path, f"{table}.{key}[]", v)
        if kind in (int, float):
            _positive(path, f"{table}.{key}", value)
        kwargs[key] = value
    return cls(**kwargs)


def _plain(value: Any) -> Any:
    """A settings value as JSON: tuples as lists, :class:`Distillation` as its table."""
    if isinstance(value, tuple):
        return list(value)
    return value.to_dict() if isinstance(value, Distillation) else value


def _qat_settings(path: str, data: Any) -> QATSettings:
    """``[qat]``: numbers as every table, then ``distill``, ``compile`` and ``autocast``."""
    _check(path, "[qat]", data, dict)
    plain = {k: v for k, v in data.items() if k not in ("distill", "compile", "autocast")}
    qat = _dataclass_from(path, "qat", QATSettings, plain)
    _check(path, "qat.optimizer", qat.optimizer, str, OPTIMIZERS)
    extra: dict[str, Any] = {}
    if "distill" in data:
        try:
            extra["distill"] = Distillation.from_dict(data["distill"])
        except (TypeError, ValueError) as e:
            raise StudyFileError(
                f"{path}: [qat] {e} (e.g. distill = {{ alpha = 0.5, temperature = 4.0 }})"
            ) from None
    if "compile" in data:
        try:
            extra["compile"] = check_compile(data["compile"])
        except ValueError:
            raise StudyFileError(
                f"{path}: qat.compile = {data['compile']!r} is not allowed; allowed values: "
                "'auto', true, false"
            ) from None
    if "autocast" in data:
        value = None if data["autocast"] in ("none", False) else data["autocast"]
        if value not in AUTOCAST:
            raise StudyFileError(
                f"{path}: qat.autocast = {data['autocast']!r} is not allowed; allowed values: "
                "'bf16', 'none'"
            )
        extra["autocast"] = value
    return replace(qat, **extra)


def _positive(path: str, key: str, value: float) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise StudyFileError(
            f"{path}: {key} = {value!r} is not allowed; allowed values: a finite number > 0"
        )
    if value <= 0:
        raise StudyFileError(f"{path}: {key} = {value!r} must be > 0")


def _finite_space_numbers(path: str, space: Mapping[str, Any]) -> None:
    """NaN and inf in [space] (``lr``, ``percentile``) are errors, not silent choices."""
    for key, value in space.items():
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                raise StudyFileError(
                    f"{path}: space.{key} = {value!r} is not allowed; allowed values: finite "
                    "numbers"
                )


_TOP = {"study", "task", "space", "qat", "latency", "objectives", "constraint", "strategy"}
_STUDY = {"name", "trials", "sampler", "seed", "storage", "device", "timeout"}


def study_spec_from_dict(data: Mapping[str, Any], path: str = "<study>") -> StudySpec:
    """Validate a parsed study file; see :func:`load_study_spec` for the format."""
    _no_unknown(path, "", data, _TOP)
    study = data.get("study", {})
    _check(path, "[study]", study, dict)
    _no_unknown(path, "study", study, _STUDY)
    task = data.get("task")
    if task is None:
        raise StudyFileError(
            f"{path}: missing [task] with name = '<built-in name or package.module:function>'"
        )
    _check(path, "[task]", task, dict)
    task = dict(task)
    task_name = _check(path, "task.name", task.pop("name", None) or "", str)
    if not task_name:
        raise StudyFileError(
            f"{path}: task.name is missing; give a built-in task name or 'package.module:function'"
        )
    task_options = task.pop("options", {})
    _check(path, "task.options", task_options, dict)
    _no_unknown(path, "task", {**task, "name": 0, "options": 0}, {"name", "options"})

    name = _check(path, "study.name", study.get("name", Path(path).stem), str)
    try:  # [strategy] and the timeout
        timeout = parse_duration(study["timeout"], "study.timeout") if "timeout" in study else None
        strategy = strategy_from_dict(path, data.get("strategy", {}))
    except StrategyError as e:
        raise StudyFileError(f"{path}: {e}") from None
    # Without a trial count, a timeout alone bounds the search (range: StudySpec).
    trials = study.get("trials", None if timeout is not None else 20)
    if trials is not None:
        trials = _check(path, "study.trials", trials, int)
    sampler = _check(path, "study.sampler", study.get("sampler", "tpe"), str, tuple(SAMPLERS))
    seed = _check(path, "study.seed", study.get("seed", 0), int)
    storage = study.get("storage")
    if storage is not None:
        _check(path, "study.storage", storage, str)
    device = _check(path, "study.device", study.get("device", "cpu"), str, ("cpu", "cuda"))

    objectives = data.get("objectives", {"use": list(OBJECTIVES)})
    _check(path, "[objectives]", objectives, dict)
    _no_unknown(path, "objectives", objectives, {"use"})
    use = _check(path, "objectives.use", objectives.get("use", list(OBJECTIVES)), list)
    for o in use:
        _check(path, "objectives.use[]", o, str, tuple(OBJECTIVES))
    if REQUIRED_OBJECTIVE not in use or len(set(use)) != len(use) or len(use) < 2:
        others = ", ".join(repr(o) for o in OBJECTIVES if o != REQUIRED_OBJECTIVE)
        raise StudyFileError(
            f"{path}: objectives.use = {use!r} must list {REQUIRED_OBJECTIVE!r} and at "
            f"least one of {others}, each once"
        )

    constraint = data.get("constraint", {})
    _check(path, "[constraint]", constraint, dict)
    _no_unknown(path, "constraint", constraint, {"max_accuracy_drop"})
    max_drop = constraint.get("max_accuracy_drop")
    if max_drop is not None:
        max_drop = _check(path, "constraint.max_accuracy_drop", max_drop, float)
        if not 0.0 <= max_drop <= 1.0:
            raise StudyFileError(
                f"{path}: constraint.max_accuracy_drop = {max_drop!r} is "
                "outside [0, 1]; it is a fraction (0.01 = one point)"
            )

    space_data = data.get("space", {})
    _check(path, "[space]", space_data, dict)
    _finite_space_numbers(path, space_data)
    try:
        space = SearchSpace.from_dict(
            {k: tuple(v) if isinstance(v, list) else v for k, v in space_data.items()}
        )
    except (PlanError, TypeError) as e:
        raise StudyFileError(f"{path}: [space]: {e}") from None

    qat = _qat_settings(path, data.get("qat", {}))
    latency = _dataclass_from(path, "latency", LatencySettings, data.get("latency", {}))
    # Any backend registered with autoquant.measure.register_backend (before loading).
    _check(path, "latency.backend", latency.backend, str, tuple(BACKENDS))
    problem = threads_problem(latency.threads)
    if problem:
        raise StudyFileError(f"{path}: latency.threads = {problem}")

    return StudySpec(
        name=name,
        task=task_name,
        trials=trials,
        sampler=sampler,
        seed=seed,
        storage=storage,
        device=device,
        objectives=tuple(use),
        max_accuracy_drop=max_drop,
        task_options=task_options,
        space=space,
        qat=qat,
        latency=latency,
        source=str(path),
        timeout=timeout,
        strategy=strategy,
    )


def load_study_spec(path: str | os.PathLike[str]) -> StudySpec:
    """Load and validate a study file.

    The file has the tables ``[study]`` (name, trials, sampler, seed, storage, device,
    timeout),
    ``[task]`` (name, options), ``[space]`` (see :class:`~autoquant.space.SearchSpace`),
    ``[qat]``, ``[latency]``, ``[objectives]`` (use), ``[constraint]`` (max_accuracy_drop)
    and ``[strategy]`` (:class:`~autoquant.search.StrategySettings`). Every error names the
    file and the key.

    Example:
        >>> spec = load_study_spec("studies/digits.toml")  # doctest: +SKIP
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StudyFileError(f"{p}: study file not found") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise StudyFileError(f"{p}: not valid TOML: {e}") from None
    return study_spec_from_dict(data, str(p))
