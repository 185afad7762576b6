"""Where a study lives: the storage URL, and opening it behind the guard.

Opening an RDB storage turns heartbeats on (see :mod:`autoquant.search._liveness`), so the
trials of killed workers are failed and retried, and puts every call behind a
:class:`~autoquant.search._guard.StorageGuard` (outages ridden out, write failures stopped
with a one-line :class:`~autoquant.search._signals.InfrastructureError`). No error message,
log line or stored attribute ever contains the storage's password.

PostgreSQL connections get a connect timeout, a statement timeout and TCP keepalives, so an
unreachable server is an error (and retried) rather than a hang; settings in the URL's query
win. Several workers may share a SQLite file: every SQLite transaction starts with ``BEGIN
IMMEDIATE``, so read-then-write steps (taking a queued trial, failing a lost one) cannot
interleave.
"""

from __future__ import annotations

import importlib.util
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage

from . import _optuna_compat as compat
from ._guard import (
    HUNG_CALL_S,
    WRITE,
    HungCallBreaker,
    StorageGuard,
    describe,
    scrub,
    storage_fault,
)
from ._liveness import MAX_RETRY, grace_s, heartbeat_s, retry_lost_trial
from ._objectives import OBJECTIVES
from ._samplers import make_sampler
from ._signals import InfrastructureError
from ._spec import StudySpec, mask_password, study_name_problem

# PostgreSQL connection settings (a URL's own query parameters win).
PG_CONNECT_TIMEOUT_S = 10
PG_STATEMENT_TIMEOUT_MS = 30_000
PG_KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
}
PG_TCP_USER_TIMEOUT_MS = 30_000
SQLITE_BUSY_TIMEOUT_S = 20.0  # how long SQLite waits for another worker's write lock


class StorageError(RuntimeError):
    """The study storage cannot be opened; the message masks any password."""


def runs_dir() -> Path:
    """Where default SQLite studies live: ``AUTOQUANT_RUNS`` or ``./autoquant-runs``."""
    return Path(os.environ.get("AUTOQUANT_RUNS", "autoquant-runs"))


def storage_url(spec: StudySpec, override: str | None = None, *, create: bool = True) -> str:
    """The storage URL: the override, the study file's ``storage``, or a SQLite file.

    With ``create`` (the default) the default SQLite file's folder is created.

    Raises:
        InfrastructureError: the default SQLite file's folder cannot be created.
    """
    url = override or spec.storage
    if url:
        return url
    path = runs_dir() / spec.name / "study.db"
    if create:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InfrastructureError(
                f"cannot create the study folder {path.parent}: {e.strerror or e}"
            ) from None
    return f"sqlite:///{path.resolve()}"


# -- opening -----------------------------------------------------------------------------------


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


def _url_query(url: str) -> dict[str, str]:
    """The URL's query parameters, keys lower-cased (repeated ones joined by spaces)."""
    from sqlalchemy.engine import make_url

    try:
        query = make_url(url).query
    except Exception:  # an unparsable URL fails in RDBStorage, with a masked message
        return {}
    return {k.lower(): v if isinstance(v, str) else " ".join(v) for k, v in query.items()}


def _engine_kwargs(url: str) -> dict[str, Any]:
    """Timeouts and keepalives for PostgreSQL, the lock wait for SQLite; the URL's own win."""
    query = _url_query(url)
    if url.startswith("sqlite"):
        return {} if "timeout" in query else {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
    if not url.startswith("postgres"):
        return {"pool_pre_ping": True}
    args: dict[str, Any] = {
        "connect_timeout": PG_CONNECT_TIMEOUT_S,
        "tcp_user_timeout": PG_TCP_USER_TIMEOUT_MS,
        **PG_KEEPALIVES,
    }
    args = {k: v for k, v in args.items() if k not in query}
    options = query.get("options", "")
    if "statement_timeout" not in options:
        args["options"] = f"{options} -c statement_timeout={PG_STATEMENT_TIMEOUT_MS}".strip()
    return {"pool_pre_ping": True, "connect_args": args}


_UNITS_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0}


def statement_timeout_s(url: str) -> float:
    """The PostgreSQL statement timeout the URL's ``options`` set, else ours (seconds).

    Example:
        >>> statement_timeout_s("postgresql://h/db?options=-c%20statement_timeout%3D2s")
        2.0
        >>> statement_timeout_s("postgresql://h/db")
        30.0
    """
    m = re.search(
        r"statement_timeout\s*=\s*'?(\d+(?:\.\d+)?)\s*(us|ms|s|min|h)?",
        _url_query(url).get("options", ""),
    )
    if m is None or float(m[1]) == 0:  # 0: PostgreSQL's "no timeout"
        return PG_STATEMENT_TIMEOUT_MS / 1000
    return float(m[1]) * _UNITS_S[m[2] or "ms"]


def _serialize_sqlite(storage: RDBStorage) -> None:
    """Start every SQLite transaction with ``BEGIN IMMEDIATE`` (the write lock at once).

    SQLite ignores ``SELECT ... FOR UPDATE``, so two workers could both read a queued trial
    as WAITING and both run it; taking the write lock first serializes such steps, as row
    locks do in PostgreSQL. (The SQLAlchemy recipe for pysqlite's transaction control.)
    """
    from sqlalchemy import event

    engine = compat.rdb_engine(storage)

    def on_connect(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None  # no implicit BEGIN from pysqlite

    def on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    event.listen(engine, "connect", on_connect)
    event.listen(engine, "begin", on_begin)
    engine.dispose()  # connections made before the listeners would keep the old behaviour


def open_storage(url: str, guard: StorageGuard | None = None) -> optuna.storages.BaseStorage:
    """Open an Optuna storage with heartbeats, behind a :class:`StorageGuard`.

    Args:
        url: ``sqlite:///...``, ``postgresql://...``, ``mysql://...``; any other URL goes to
            :func:`optuna.storages.get_storage`.
        guard: the guard to use (default: a new one for ``url``).

    Raises:
        StorageError: not a URL, no driver, or the database cannot be reached (exit code 2:
            most likely a wrong URL); the message never contains the password.
        InfrastructureError: the storage is reachable but cannot be written (a read-only or
            full disk; exit code 3).

    Example:
        >>> open_storage("postgresql://u:secret@127.0.0.1:1/db")  # doctest: +SKIP
        StorageError: cannot open storage postgresql://u:***@127.0.0.1:1/db: ...
    """
    if "://" not in url:
        raise StorageError(
            f"storage {mask_password(url)!r} is not a URL; use e.g. sqlite:///study.db or "
            "postgresql://user:password@host/db"
        )
    guard = guard or StorageGuard(url)
    if not url.startswith(("sqlite", "postgres", "mysql")):
        return compat.GuardedStorage(optuna.storages.get_storage(url), guard)
    import sqlalchemy.exc

    driver_url = _with_driver(url)
    for attempt in range(6):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.8
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = RDBStorage(
                    driver_url,
                    heartbeat_interval=heartbeat_s(),  # type: ignore[arg-type]  # float is fine
                    grace_period=grace_s(),  # type: ignore[arg-type]
                    heartbeat_stale_trial_callback=retry_lost_trial(MAX_RETRY),
                    engine_kwargs=_engine_kwargs(driver_url),
                )
            if url.startswith("sqlite") and _sqlite_file(url) is not None:
                # (In memory: one process only, and dispose() would drop the database.)
                _serialize_sqlite(storage)
            elif url.startswith("postgres"):
                # A call outlasting the statement timeout by HUNG_CALL_S is hung (frozen server).
                limit = statement_timeout_s(driver_url) + HUNG_CALL_S
                guard.breaker = guard.breaker or HungCallBreaker(limit, on_hung=guard.hung)
                guard.breaker.attach(compat.rdb_engine(storage))
            return compat.GuardedStorage(compat.cached(storage), guard)
        except Exception as e:  # sqlalchemy errors carry the URL: never echo it unmasked
            if _schema_race(e, sqlalchemy.exc) and attempt < 5:
                # Workers started together race to create the schema; the loser retries.
                time.sleep(0.2 + 0.3 * attempt)
                continue
            fault = storage_fault(e)
            if fault is not None and fault[0] == WRITE:
                raise InfrastructureError(
                    f"storage {mask_password(url)}: cannot write: {describe(fault[1], url)}"
                ) from None
            raise StorageError(_storage_message(url, e)) from None
    raise AssertionError("unreachable")


def _schema_race(e: BaseException, exc: Any) -> bool:
    text = str(e).lower()
    return isinstance(e, (exc.IntegrityError, exc.ProgrammingError)) or (
        isinstance(e, exc.OperationalError)
        and ("already exists" in text or "database is locked" in text)
    )


def _storage_message(url: str, e: BaseException) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()] or [""]
    msg = scrub(scrub(lines[0], url), _with_driver_quiet(url))
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
        InfrastructureError: the storage cannot be written, or stays unreachable.

    Example:
        >>> study = load_study(load_study_spec("studies/digits.toml"))  # doctest: +SKIP
    """
    url = storage_url(spec, storage)
    opened = open_storage(url)
    sampler = make_sampler(spec, spec.seed)
    try:  # an existing study loads without a write: `front` works on a read-only file
        study = optuna.load_study(study_name=spec.name, storage=opened, sampler=sampler)
    except KeyError:
        study = optuna.create_study(
            study_name=spec.name,
            storage=opened,
            directions=spec.directions,
            sampler=sampler,
            load_if_exists=True,
        )
    _check_directions(study, spec, url)
    if study.metric_names is None:
        try:
            with warnings.catch_warnings():  # "experimental" since Optuna 3.2
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names([OBJECTIVES[o].field for o in spec.objectives])
        except InfrastructureError:  # a read-only file: the names are cosmetic
            pass
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
    """The file of a ``sqlite:///`` URL (None: not SQLite, in memory, or not a plain file).

    Example:
        >>> str(_sqlite_file("sqlite:///file:/tmp/s.db?mode=ro&uri=true"))
        '/tmp/s.db'
    """
    scheme, _, rest = url.partition(":///")
    if not scheme.startswith("sqlite") or not rest:
        return None
    path, _, query = rest.partition("?")
    if "uri=true" in query.lower():  # an SQLite URI filename: file:<path>
        if not path.startswith("file:") or "mode=memory" in query:
            return None
        path = path.removeprefix("file:").removeprefix("//")
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
