"""Where a study lives: the storage URL, opening it (driver, retries, masked errors), the study.

Opening an RDB storage turns heartbeats on (see :mod:`autoquant.search._liveness`), so the
trials of killed workers are failed and retried. No error message, log line or stored
attribute ever contains the storage's password.
"""

from __future__ import annotations

import importlib.util
import os
import time
import warnings
from pathlib import Path
from urllib.parse import unquote, urlsplit

import optuna
from optuna.storages import RDBStorage

from ._liveness import MAX_RETRY, grace_s, heartbeat_s, retry_lost_trial
from ._objectives import OBJECTIVES
from ._samplers import make_sampler
from ._spec import StudySpec, mask_password, study_name_problem


class StorageError(RuntimeError):
    """The study storage cannot be opened; the message masks any password."""


def runs_dir() -> Path:
    """Where default SQLite studies live: ``AUTOQUANT_RUNS`` or ``./autoquant-runs``."""
    return Path(os.environ.get("AUTOQUANT_RUNS", "autoquant-runs"))


def storage_url(spec: StudySpec, override: str | None = None, *, create: bool = True) -> str:
    """The storage URL: the override, the study file's ``storage``, or a SQLite file.

    With ``create`` (the default) the default SQLite file's folder is created.
    """
    url = override or spec.storage
    if url:
        return url
    path = runs_dir() / spec.name / "study.db"
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path.resolve()}"


def _scrub(text: str, url: str) -> str:
    """``text`` with every form of ``url``'s password replaced by ``***``."""
    text = text.replace(url, mask_password(url))
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    for secret in {password, unquote(password)} if password else ():
        if secret:
            text = text.replace(secret, "***")
    return text


def _with_driver(url: str) -> str:
    """``postgresql://`` with the PostgreSQL driver that is installed (SQLAlchemy's default
    driver differs between versions: psycopg2 in 2.0, psycopg 3 in 2.1)."""
    scheme, sep, rest = url.partition("://")
    if scheme not in ("postgresql", "postgres"):
        return url
    for module, driver in (("psycopg", "psycopg"), ("psycopg2", "psycopg2")):
        if importlib.util.find_spec(module) is not None:
            return f"postgresql+{driver}{sep}{rest}"
    raise StorageError(
        f"storage {mask_password(url)} needs a PostgreSQL driver: "
        "pip install 'autoquant[postgres]' (psycopg)"
    )


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """Open an Optuna storage with heartbeats, so killed workers' trials are retried.

    Raises:
        StorageError: not a URL, no driver, or the database cannot be reached; the message
            never contains the password.

    Example:
        >>> open_storage("postgresql://u:secret@127.0.0.1:1/db")  # doctest: +SKIP
        StorageError: cannot open storage postgresql://u:***@127.0.0.1:1/db: ...
    """
    if "://" not in url:
        raise StorageError(
            f"storage {mask_password(url)!r} is not a URL; use e.g. sqlite:///study.db or "
            "postgresql://user:password@host/db"
        )
    if not url.startswith(("sqlite", "postgres", "mysql")):
        return optuna.storages.get_storage(url)  # e.g. journal or in-memory storages
    import sqlalchemy.exc

    driver_url = _with_driver(url)
    for attempt in range(4):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.8
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(
                    driver_url,
                    heartbeat_interval=heartbeat_s(),  # type: ignore[arg-type]  # float is fine
                    grace_period=grace_s(),  # type: ignore[arg-type]
                    heartbeat_stale_trial_callback=retry_lost_trial(MAX_RETRY),
                    engine_kwargs=(None if url.startswith("sqlite") else {"pool_pre_ping": True}),
                )
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as e:
            # Workers started together race to create the schema; the loser retries.
            if attempt == 3:
                raise StorageError(_storage_message(url, e)) from None
            time.sleep(0.5 + attempt)
        except Exception as e:  # sqlalchemy errors carry the URL: never echo it unmasked
            raise StorageError(_storage_message(url, e)) from None
    raise AssertionError("unreachable")


def _storage_message(url: str, e: BaseException) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()] or [""]
    msg = _scrub(_scrub(lines[0], url), _with_driver_quiet(url))
    return f"cannot open storage {mask_password(url)}: {type(e).__name__}: {msg}"


def _with_driver_quiet(url: str) -> str:
    try:
        return _with_driver(url)
    except StorageError:
        return url


def load_study(spec: StudySpec, storage: str | None = None) -> optuna.Study:
    """Create or load the study named by ``spec`` (idempotent: reruns resume).

    The study's metric names (``accuracy``, ``size_bytes``, ``latency_ms``: the objectives'
    record fields) are set at creation, and on resume when missing, so optuna-dashboard
    names the axes.

    Raises:
        StorageError: the storage cannot be opened, or its study of that name has other
            objectives than ``spec``.

    Example:
        >>> study = load_study(load_study_spec("studies/digits.toml"))  # doctest: +SKIP
    """
    url = storage_url(spec, storage)
    study = optuna.create_study(
        study_name=spec.name,
        storage=open_storage(url),
        directions=spec.directions,
        sampler=make_sampler(spec, spec.seed),
        load_if_exists=True,
    )
    _check_directions(study, spec, url)
    if study.metric_names is None:
        with warnings.catch_warnings():  # set_metric_names is "experimental" since Optuna 3.2
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([OBJECTIVES[o].field for o in spec.objectives])
    return study


def _check_directions(study: optuna.Study, spec: StudySpec, url: str) -> None:
    if list(study.directions) != [optuna.study.StudyDirection[d.upper()] for d in spec.directions]:
        raise StorageError(
            f"study {spec.name!r} in {mask_password(url)} has other objectives "
            "than the study file; use another study name or storage"
        )


class StudyNotFoundError(LookupError):
    """A read-only command named a study that its storage does not hold."""


def study_names(storage: optuna.storages.BaseStorage) -> list[str]:
    """The studies a storage holds, sorted; autoquant's own marker studies left out."""
    names = optuna.get_all_study_names(storage)
    return sorted(n for n in names if study_name_problem(n) is None)


def _sqlite_file(url: str) -> Path | None:
    """The file of a ``sqlite:///`` URL (None: not SQLite, or in memory)."""
    scheme, _, rest = url.partition(":///")
    if not scheme.startswith("sqlite") or not rest:
        return None
    path = rest.split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


def load_existing_study(spec: StudySpec, storage: str | None = None) -> optuna.Study:
    """Open the study named by ``spec`` for reading; unlike :func:`load_study` it never
    creates one (nor a SQLite file or folder), so a typo leaves nothing behind.

    For the read-only commands (``front``, ``best``, ``report``, ``export``,
    ``bench-latency``).

    Raises:
        StudyNotFoundError: there is no such study: "study 'x' not found in <storage>;
            studies there: a, b" (the password masked).
        StorageError: the storage cannot be opened, or the study has other objectives.

    Example:
        >>> study = load_existing_study(load_study_spec("studies/digits.toml"))  # doctest: +SKIP
    """
    url = storage_url(spec, storage, create=False)
    where = mask_password(url)
    path = _sqlite_file(url)
    if path is not None and not path.is_file():
        raise StudyNotFoundError(
            f"study {spec.name!r} not found: {where} does not exist; run `autoquant search` "
            "first, or give the storage that holds it (--storage)"
        )
    opened = open_storage(url)
    names = study_names(opened)
    if spec.name not in names:
        raise StudyNotFoundError(
            f"study {spec.name!r} not found in {where}; studies there: "
            f"{', '.join(names) if names else 'none'}"
        )
    study = optuna.load_study(
        study_name=spec.name, storage=opened, sampler=make_sampler(spec, spec.seed)
    )
    _check_directions(study, spec, url)
    return study
