"""The guard every storage call runs through: outages ridden out, write failures stopped.

:func:`~autoquant.search._storages.open_storage` returns the storage behind a
:class:`StorageGuard` (through :class:`~autoquant.search._optuna_compat.GuardedStorage`), so
every call (ask, tell, attributes, heartbeats, claims) is handled the same way:

* a *connection* error (the server restarts, the network drops, SQLite stays locked) is
  retried with back-off (1, 2, 4, 8, 10, 10 ... s) for up to ``AUTOQUANT_DB_OUTAGE_S``
  seconds (default 120; 0: no retries), with one log line when the outage starts and one
  when it ends;
* a *write* failure (disk full, read-only file or folder) is not retried;
* either one, once final, raises :class:`InfrastructureError` with a one-line message naming
  the storage and the cause: the command exits with code 3, the trial in flight is failed as
  "infrastructure: ..." (not counted as a failure, queued again) when the storage still
  allows it, and otherwise left for the lost-trial logic;
* any other error (Optuna's own signals, such as a finished trial) passes through untouched.

After Ctrl-C or SIGTERM (:func:`~autoquant.search._signals.stopping`) calls are tried once:
an outage cannot delay the exit. A PostgreSQL server that is frozen (``kill -STOP``, a paused
VM) still acknowledges TCP, so no driver timeout notices a query it never answers: a call that
outlasts the statement timeout (30 s unless the URL sets one) by :data:`HUNG_CALL_S` has its
connections' sockets shut down (:class:`HungCallBreaker`), which turns the hang into a lost
connection, retried like any other.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import unquote, unquote_plus

from ._liveness import env_seconds
from ._signals import InfrastructureError, stopping
from ._spec import mask_password, password_spans

log = logging.getLogger("autoquant")
T = TypeVar("T")

OUTAGE_S = 120.0  # default of AUTOQUANT_DB_OUTAGE_S: how long storage calls are retried
BACKOFF_S = (1.0, 10.0)  # first and longest wait between two tries of a failing call
HUNG_CALL_S = 15.0  # a PostgreSQL call this long past the statement timeout is broken


def db_outage_s() -> float:
    """How long storage calls are retried through an outage: ``AUTOQUANT_DB_OUTAGE_S``
    (seconds, default 120; 0 turns the retries off)."""
    return env_seconds("AUTOQUANT_DB_OUTAGE_S", OUTAGE_S, allow_zero=True)


# -- what a storage error means ----------------------------------------------------------------

OUTAGE, WRITE = "outage", "write"
# Lower-case message fragments, checked in this order (a full disk on the server is a write
# failure even when its message also says "could not ...").
_WRITE_TEXT = (
    "readonly database",
    "read-only",
    "disk is full",
    "no space left",
    "disk quota",
    "disk i/o error",
    "could not extend file",
    "unable to open database file",
    "permission denied",
)
_OUTAGE_TEXT = (
    "database is locked",
    "database table is locked",
    "database is busy",
    "connection",  # refused, failed, reset, timed out, closed, terminating connection ...
    "could not receive data",
    "could not send data",
    "consuming input failed",
    "sending query failed",
    "the database system is",  # starting up, shutting down, in recovery mode
    "statement timeout",
    "timeout expired",
    "ssl syscall",
    "broken pipe",
    "server closed",
    "no route to host",
    "network is unreachable",
    "gone away",  # MySQL
    "lost connection",  # MySQL
)
_DB_ERROR_TYPES = {"OperationalError", "InterfaceError", "DisconnectionError", "TimeoutError"}
_WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EIO}


def storage_fault(e: BaseException) -> tuple[str, BaseException] | None:
    """What a storage call's exception means: ``("outage", cause)``, ``("write", cause)``, or
    None for anything else (Optuna's own signals, bugs), which the guard lets pass.

    ``cause`` is the most specific exception in the chain (the driver's, not SQLAlchemy's
    or Optuna's wrapper), for the message.

    Example:
        >>> import errno
        >>> storage_fault(ConnectionRefusedError(errno.ECONNREFUSED, "refused"))[0]
        'outage'
        >>> storage_fault(OSError(errno.ENOSPC, "No space left on device"))[0]
        'write'
        >>> storage_fault(KeyError("no study")) is None
        True
    """
    chain: list[BaseException] = []
    seen: BaseException | None = e
    while seen is not None and len(chain) < 8:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    match: BaseException | None = None  # the first error that says "outage"
    for err in chain:
        if isinstance(err, OSError) and not _is_db_error(err):
            if not isinstance(err, ConnectionError | TimeoutError) and (
                err.errno in _WRITE_ERRNOS or err.errno is None
            ):
                return WRITE, err
            match = match or err
            continue
        if not _is_db_error(err):
            continue
        text = str(err).lower()
        if any(t in text for t in _WRITE_TEXT):
            return WRITE, _driver_error(chain, err)
        if (
            getattr(err, "connection_invalidated", False)
            or any(t in text for t in _OUTAGE_TEXT)
            or type(err).__module__.startswith(("psycopg", "pymysql", "MySQLdb"))
        ):  # a server-side operational error is transient too: retried
            match = match or err
    return None if match is None else (OUTAGE, _driver_error(chain, match))


def _is_db_error(err: BaseException) -> bool:
    return any(
        c.__name__ in _DB_ERROR_TYPES
        and c.__module__.split(".")[0] in ("sqlalchemy", "psycopg", "psycopg2", "sqlite3")
        for c in type(err).__mro__
    ) or type(err).__module__.split(".")[0] in ("pymysql", "MySQLdb")


def _driver_error(chain: list[BaseException], match: BaseException) -> BaseException:
    """The driver's own exception (psycopg, sqlite3), else what SQLAlchemy wrapped, else
    ``match``: the cause worth naming, not Optuna's "exception during the commit" wrapper."""
    for err in chain:
        if type(err).__module__.split(".")[0] in ("psycopg", "psycopg2", "sqlite3", "pymysql"):
            return err
    orig = getattr(match, "orig", None)
    return orig if isinstance(orig, BaseException) else match


def scrub(text: str, url: str) -> str:
    """``text`` with every form of ``url``'s password (raw, percent-decoded) replaced by ``***``.

    Example:
        >>> scrub("failed for postgresql://u:p%40ss@h/db (p@ss)", "postgresql://u:p%40ss@h/db")
        'failed for postgresql://u:***@h/db (***)'
    """
    text = text.replace(url, mask_password(url))
    secrets: set[str] = set()
    for a, b in password_spans(url):
        raw = url[a:b]
        if len(raw) > 1 and raw[0] == raw[-1] == "'":  # a quoted key/value
            raw = raw[1:-1].replace("\\'", "'").replace("\\\\", "\\")
        secrets |= {raw, unquote(raw), unquote_plus(raw)}
    for secret in sorted(secrets, key=len, reverse=True):
        if secret:
            text = text.replace(secret, "***")
    return text


def describe(cause: BaseException, url: str) -> str:
    """One line: the exception's type and first line, password scrubbed."""
    lines = [ln.strip() for ln in str(cause).splitlines() if ln.strip()] or [""]
    first = scrub(lines[0], url)
    for wrapper in ("(psycopg.OperationalError) ", "(sqlite3.OperationalError) "):
        first = first.removeprefix(wrapper)
    return f"{type(cause).__name__}: {first}"[:300]


# -- the guard -----------------------------------------------------------------------------------


class StorageGuard:
    """Runs storage calls: retries through outages, stops on write failures (module docstring).

    Shared by every thread of a worker (the heartbeat thread too): one status line per
    outage, however many calls wait for it. :attr:`back_at` (``clock()``) tells
    :mod:`~autoquant.search._liveness` and the claims when the last outage ended, so that no
    worker is declared lost for the beats it could not send while the database was down.

    Args:
        url: the storage URL (only its masked form is ever shown).
        outage_s: longest outage ridden out (default: :func:`db_outage_s`).
        backoff_s: first and longest wait between two tries (default :data:`BACKOFF_S`).
        sleep: how to wait; clock: seconds, monotonic (tests pass fakes of both).

    Example:
        >>> guard = StorageGuard("sqlite:///s.db", outage_s=5, sleep=lambda s: None)
        >>> tries = iter([ConnectionResetError(104, "reset"), None])
        >>> def call():
        ...     e = next(tries)
        ...     if e:
        ...         raise e
        ...     return "ok"
        >>> guard("get_trial", call), guard.outages
        ('ok', 1)
    """

    def __init__(
        self,
        url: str,
        outage_s: float | None = None,
        *,
        backoff_s: tuple[float, float] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.clock = clock
        self.where = mask_password(url)
        self.outage_s = db_outage_s() if outage_s is None else outage_s
        self.backoff_s = backoff_s or BACKOFF_S
        self.sleep = sleep
        self._lock = threading.Lock()
        self.down_at: float | None = None  # monotonic time the current outage began
        self.back_at: float | None = None  # ... the last outage ended
        self.outages = 0
        self.gave_up = False
        self.breaker: HungCallBreaker | None = None  # set by open_storage for PostgreSQL

    def __call__(self, what: str, call: Callable[[], T]) -> T:
        delay = self.backoff_s[0]
        while True:
            started = self.clock()
            try:
                with self.breaker.watch() if self.breaker else contextlib.nullcontext():
                    result = call()
            except Exception as e:
                fault = storage_fault(e)
                if fault is None:
                    raise
                kind, cause = fault
                if kind == WRITE:
                    raise InfrastructureError(
                        f"storage {self.where}: cannot write: {describe(cause, self.url)}"
                    ) from None
                left = self._down(started, cause)
                self.sleep(min(delay, left))
                delay = min(2 * delay, self.backoff_s[1])
                continue
            if self.down_at is not None:
                self._up()
            return result

    def quiet(self, window_s: float) -> bool:
        """True during an outage and for ``window_s`` seconds after it ended."""
        if self.down_at is not None:
            return True
        return self.back_at is not None and self.clock() - self.back_at < window_s

    def _down(self, started: float, cause: BaseException) -> float:
        """Record a failed call; the seconds left to retry, or raise when there are none."""
        now = self.clock()
        with self._lock:
            if self.down_at is None and (self.back_at is None or started >= self.back_at):
                self._begin(started, describe(cause, self.url))
            down_for = now - (self.down_at if self.down_at is not None else now)
            if self.gave_up or stopping() or down_for >= self.outage_s:
                self.gave_up = True
                raise InfrastructureError(
                    f"database unreachable for {down_for:.0f} s (AUTOQUANT_DB_OUTAGE_S="
                    f"{self.outage_s:g}): {self.where}: {describe(cause, self.url)}"
                ) from None
            return max(self.outage_s - down_for, 0.05)

    def hung(self, seconds: float) -> None:
        """A call has had no answer for ``seconds`` (the :class:`HungCallBreaker` is breaking
        it): the outage began when that call started."""
        with self._lock:
            if self.down_at is None:
                self._begin(self.clock() - seconds, f"no answer for {seconds:.0f} s")

    def _begin(self, started: float, cause: str) -> None:
        """Start an outage (the caller holds the lock): the status line."""
        self.down_at = started  # a call that hung: the outage began when it started
        self.outages += 1
        if self.outage_s > 0 and not self.gave_up and not stopping():
            since = datetime.now() - timedelta(seconds=self.clock() - started)
            log.warning(
                "database unreachable since %s, retrying for up to %.0f s "
                "(AUTOQUANT_DB_OUTAGE_S): %s: %s",
                since.strftime("%H:%M:%S"),
                self.outage_s,
                self.where,
                cause,
            )

    def _up(self) -> None:
        with self._lock:
            if self.down_at is None:
                return
            now = self.clock()
            log.warning("database back after %.0f s: %s", now - self.down_at, self.where)
            self.down_at, self.back_at, self.gave_up = None, now, False


class HungCallBreaker:
    """Breaks storage calls that hang on a frozen server.

    It tracks the engine's database connections; when a call watched by :meth:`watch` has run
    ``limit_s`` seconds, a daemon thread shuts down the sockets of all of them, so the blocked
    call fails as a lost connection (the guard retries it, and the pool reconnects) instead of
    waiting forever. Every connection goes: a server that does not answer one does not answer
    the others either.

    Example:
        >>> a, b = socket.socketpair()
        >>> breaker = HungCallBreaker(limit_s=0.2, poll_s=0.05)
        >>> breaker.track(a)
        >>> with breaker.watch():
        ...     a.recv(1)  # nothing is ever sent: without the breaker this waits forever
        b''
    """

    def __init__(
        self,
        limit_s: float,
        *,
        poll_s: float = 1.0,
        on_hung: Callable[[float], None] | None = None,
    ) -> None:
        self.limit_s = limit_s
        self.poll_s = poll_s
        self.on_hung = on_hung  # told how long the calls it breaks have hung
        self._connections: weakref.WeakSet[Any] = weakref.WeakSet()
        self._calls: dict[int, float] = {}  # call id -> start (monotonic)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.broken = 0  # calls broken (for tests and logs)

    def attach(self, engine: Any) -> None:
        """Track every connection ``engine`` opens from now on (its pool is emptied)."""
        from sqlalchemy import event

        event.listen(
            engine, "connect", lambda dbapi_connection, record: self.track(dbapi_connection)
        )
        engine.dispose()

    def track(self, connection: Any) -> None:
        """Watch a DB-API connection (psycopg, psycopg2) or a socket."""
        with self._lock:
            self._connections.add(connection)

    @contextlib.contextmanager
    def watch(self) -> Iterator[None]:
        token = object()
        with self._lock:
            self._calls[id(token)] = time.monotonic()
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="autoquant-hung-calls", daemon=True
                )
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._calls.pop(id(token), None)

    def _run(self) -> None:
        while True:
            time.sleep(self.poll_s)
            now = time.monotonic()
            with self._lock:
                hung = [(k, now - t) for k, t in self._calls.items() if now - t >= self.limit_s]
                for k, _ in hung:
                    self._calls.pop(k)  # broken once
                connections = list(self._connections) if hung else []
            if hung:
                log.debug("storage call hung for %.0f s: closing its connections", self.limit_s)
                self.broken += len(hung)
                if self.on_hung is not None:
                    self.on_hung(max(seconds for _, seconds in hung))
                for connection in connections:
                    _shut_down(connection)


def _shut_down(connection: Any) -> None:
    """Shut down the socket under a connection (a blocked read on it then returns at once)."""
    try:
        if isinstance(connection, socket.socket):
            fd = connection.fileno()
        elif hasattr(connection, "pgconn"):  # psycopg 3
            fd = connection.pgconn.socket
        else:  # psycopg2
            fd = connection.fileno()
        if fd < 0:
            return
        with socket.socket(fileno=os.dup(fd)) as dup:  # the dup shares the connection
            dup.shutdown(socket.SHUT_RDWR)
    except Exception as e:  # closed already, or not a socket: nothing to break
        log.debug("could not shut down a storage connection: %s", e)
