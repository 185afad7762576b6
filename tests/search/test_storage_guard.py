"""The storage guard: what a storage error means, back-off through outages, one status line,
a one-line error when it gives up, write failures at once, hung calls broken, and every
storage method routed through it. No database needed (fakes and SQLite)."""

from __future__ import annotations

import errno
import logging
import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

import optuna
import pytest
import sqlalchemy.exc
from optuna.exceptions import DuplicatedStudyError, StorageInternalError, UpdateFinishedTrialError

from autoquant.search import InfrastructureError, _guard, _signals
from autoquant.search._guard import (
    HungCallBreaker,
    StorageGuard,
    db_outage_s,
    describe,
    scrub,
    storage_fault,
)
from autoquant.search._locks import Beater
from autoquant.search._optuna_compat import GuardedStorage
from autoquant.search._storages import _engine_kwargs

URL = "postgresql://u:pw%40x@db.example:5432/study"


def _wrapped(driver_error: BaseException) -> StorageInternalError:
    """How Optuna's RDB storage raises a driver error: StorageInternalError from SQLAlchemy's."""
    sa = sqlalchemy.exc.OperationalError("SELECT 1", {}, driver_error)
    try:
        try:
            raise sa from driver_error
        except sqlalchemy.exc.SQLAlchemyError as e:
            raise StorageInternalError("An exception is raised during the commit.") from e
    except StorageInternalError as e:
        return e


PG_REFUSED = (
    'connection failed: connection to server at "1.2.3.4", port 5432 failed: Connection refused'
)

FAULTS = [
    (_wrapped(sqlite3.OperationalError("database is locked")), "outage"),
    (_wrapped(sqlite3.OperationalError("attempt to write a readonly database")), "write"),
    (_wrapped(sqlite3.OperationalError("database or disk is full")), "write"),
    (_wrapped(sqlite3.OperationalError("unable to open database file")), "write"),
    (_wrapped(sqlite3.OperationalError("no such table: studies")), None),  # a bug, not infra
    (_wrapped(ConnectionRefusedError(errno.ECONNREFUSED, PG_REFUSED)), "outage"),
    (sqlalchemy.exc.OperationalError("x", {}, Exception("server closed the connection")), "outage"),
    (
        sqlalchemy.exc.InterfaceError("x", {}, Exception("x"), connection_invalidated=True),
        "outage",
    ),
    (ConnectionResetError(errno.ECONNRESET, "reset by peer"), "outage"),
    (TimeoutError("timed out"), "outage"),
    (OSError(errno.ENOSPC, "No space left on device"), "write"),
    (PermissionError(errno.EACCES, "Permission denied"), "write"),
    (OSError(errno.EROFS, "Read-only file system"), "write"),
    # Optuna's own signals and plain bugs pass through untouched.
    (KeyError("no study"), None),
    (UpdateFinishedTrialError("finished"), None),
    (DuplicatedStudyError("exists"), None),
    (sqlalchemy.exc.IntegrityError("x", {}, Exception("UNIQUE constraint failed")), None),
    (ValueError("bad"), None),
]


@pytest.mark.parametrize(("error", "kind"), FAULTS, ids=[repr(f[0])[:50] for f in FAULTS])
def test_storage_errors_are_told_apart(error: BaseException, kind: str | None) -> None:
    fault = storage_fault(error)
    assert (fault and fault[0]) == kind


def test_the_psycopg_cause_is_named_not_optunas_misleading_wrapper() -> None:
    import psycopg

    error = _wrapped(psycopg.OperationalError(PG_REFUSED))
    kind, cause = storage_fault(error)
    assert kind == "outage" and isinstance(cause, psycopg.OperationalError)
    assert describe(cause, URL) == f"OperationalError: {PG_REFUSED.splitlines()[0]}"
    assert "commit" not in describe(cause, URL)


def test_scrub_hides_every_form_of_the_password() -> None:
    text = f"failed: {URL} (user u, password pw@x, raw pw%40x)"
    assert scrub(text, URL) == (
        "failed: postgresql://u:***@db.example:5432/study (user u, password ***, raw ***)"
    )
    dsn = "host=h password='a b' dbname=d"
    assert scrub("auth failed for a b", dsn) == "auth failed for ***"


# -- the guard, with a fake clock ---------------------------------------------------------------


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s

    def clock(self) -> float:
        return self.now


def _guard_with(fake: FakeTime, outage_s: float = 120.0) -> StorageGuard:
    return StorageGuard(URL, outage_s, sleep=fake.sleep, clock=fake.clock)


def _failing(n: int, error: Callable[[], BaseException]) -> Callable[[], str]:
    calls = {"n": 0}

    def call() -> str:
        calls["n"] += 1
        if calls["n"] <= n:
            raise error()
        return f"ok after {calls['n']} calls"

    return call


def _refused() -> BaseException:
    return _wrapped(ConnectionRefusedError(errno.ECONNREFUSED, PG_REFUSED))


def test_an_outage_is_ridden_out_with_back_off_and_one_line_each_way(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="autoquant")
    fake = FakeTime()
    guard = _guard_with(fake)
    assert guard("get_trial", _failing(7, _refused)) == "ok after 8 calls"
    assert fake.sleeps == [1, 2, 4, 8, 10, 10, 10]  # doubling, capped at 10 s
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0].startswith("database unreachable since ")
    assert "retrying for up to 120 s" in lines[0] and "Connection refused" in lines[0]
    assert lines[1] == "database back after 45 s: postgresql://u:***@db.example:5432/study"
    assert "pw" not in caplog.text
    assert not guard.quiet(0) and guard.quiet(60)  # heartbeats are untrustworthy for a while

    # A second outage: a new pair of lines, and the back-off starts again from 1 s.
    fake.sleeps.clear()
    assert guard("get_trial", _failing(2, _refused)) == "ok after 3 calls"
    assert fake.sleeps == [1, 2] and guard.outages == 2 and len(caplog.records) == 4


def test_an_outage_longer_than_the_limit_is_one_line_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FakeTime()
    guard = _guard_with(fake, outage_s=30)
    with pytest.raises(InfrastructureError) as info:
        guard("set_trial_user_attr", _failing(1000, _refused))
    msg = str(info.value)
    assert msg == (
        "database unreachable for 30 s (AUTOQUANT_DB_OUTAGE_S=30): postgresql://u:***@"
        f"db.example:5432/study: ConnectionRefusedError: [Errno 111] {PG_REFUSED}"
    )
    assert "\n" not in msg and sum(fake.sleeps) == pytest.approx(30)
    assert info.value.__cause__ is None and info.value.__suppress_context__
    # Given up: later calls are tried once (cleanup must not wait another 30 s) ...
    fake.sleeps.clear()
    call = _failing(1, _refused)
    with pytest.raises(InfrastructureError):
        guard("get_trial", call)
    assert fake.sleeps == []
    # ... and the first one that succeeds ends the outage.
    assert guard("get_trial", call) == "ok after 2 calls"
    assert not guard.gave_up and "database back after" in caplog.text


def test_a_write_failure_stops_at_once_naming_the_storage_and_cause() -> None:
    fake = FakeTime()
    guard = _guard_with(fake)
    call = _failing(1, lambda: OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(InfrastructureError) as info:
        guard("set_trial_user_attr", call)
    assert str(info.value) == (
        "storage postgresql://u:***@db.example:5432/study: cannot write: "
        "OSError: [Errno 28] No space left on device"
    )
    assert fake.sleeps == [] and guard.outages == 0


def test_other_errors_pass_through_untouched() -> None:
    guard = _guard_with(FakeTime())
    with pytest.raises(UpdateFinishedTrialError):
        guard("set_trial_state_values", _failing(1, lambda: UpdateFinishedTrialError("done")))


def test_after_ctrl_c_a_failing_call_is_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeTime()
    guard = _guard_with(fake)
    monkeypatch.setattr(_signals._stopping, "is_set", lambda: True)
    with pytest.raises(InfrastructureError):
        guard("get_trial", _failing(1, _refused))
    assert fake.sleeps == []


@pytest.mark.parametrize("raw", ["-1", "abc", "inf", "nan"])
def test_the_outage_limit_is_validated(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("AUTOQUANT_DB_OUTAGE_S", raw)
    with pytest.raises(ValueError, match=f"AUTOQUANT_DB_OUTAGE_S={raw!r} is not allowed; "):
        db_outage_s()


def test_an_outage_limit_of_zero_turns_retries_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOQUANT_DB_OUTAGE_S", "0")
    fake = FakeTime()
    guard = StorageGuard(URL, sleep=fake.sleep, clock=fake.clock)
    with pytest.raises(InfrastructureError, match="unreachable for 0 s"):
        guard("get_trial", _failing(1, _refused))
    assert guard.outage_s == 0 and fake.sleeps == []


# -- threads: one line for all, the heartbeat thread survives ---------------------------------


def test_threads_waiting_for_one_outage_share_one_status_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="autoquant")
    down = threading.Event()
    down.set()
    guard = StorageGuard(URL, 30, backoff_s=(0.01, 0.02))

    def call() -> str:
        if down.is_set():
            raise _refused()
        return "ok"

    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(guard("x", call))) for _ in "abcd"]
    for t in threads:
        t.start()
    time.sleep(0.3)
    down.clear()
    for t in threads:
        t.join(timeout=10)
    assert results == ["ok"] * 4
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("database unreachable") for m in messages) == 1, messages
    assert sum(m.startswith("database back") for m in messages) == 1, messages


def test_the_heartbeat_thread_survives_a_storage_that_gave_up() -> None:
    beats: list[int] = []
    state = {"fail": False}

    def beat() -> None:
        if state["fail"]:
            raise InfrastructureError("database unreachable for 120 s")
        beats.append(1)

    beater = Beater(0.02)
    beater.add("trial:0", beat)
    state["fail"] = True
    time.sleep(0.2)
    state["fail"] = False
    n = len(beats)
    time.sleep(0.2)
    beater.close()
    assert len(beats) > n, "the heartbeat thread died"


# -- hung calls on a frozen server -------------------------------------------------------------


def test_a_call_hung_on_a_silent_connection_is_broken_and_retried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="autoquant")
    client, server = socket.socketpair()
    client.settimeout(10)  # without the breaker: a timeout, and this test fails
    guard = StorageGuard(URL, 30, backoff_s=(0.01, 0.02))
    guard.breaker = HungCallBreaker(limit_s=0.3, poll_s=0.05, on_hung=guard.hung)
    guard.breaker.track(client)
    calls = {"n": 0}

    def call() -> bytes:
        calls["n"] += 1
        if calls["n"] == 1:  # the server never answers: blocked until the breaker steps in
            if client.recv(1) == b"":
                raise ConnectionResetError(errno.ECONNRESET, "server closed the connection")
        return b"answer"

    t0 = time.monotonic()
    assert guard("get_trial", call) == b"answer"
    assert 0.3 <= time.monotonic() - t0 < 5
    assert guard.breaker.broken == 1 and calls["n"] == 2
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines  # said when the call is broken, not again when it fails
    assert lines[0].startswith("database unreachable since") and "no answer for" in lines[0]
    assert lines[1].startswith("database back after")
    server.close()


def test_a_slow_call_under_the_limit_is_left_alone() -> None:
    client, server = socket.socketpair()
    breaker = HungCallBreaker(limit_s=5, poll_s=0.05)
    breaker.track(client)
    threading.Timer(0.3, server.send, args=(b"x",)).start()
    with breaker.watch():
        assert client.recv(1) == b"x"
    assert breaker.broken == 0


# -- every storage method goes through the guard ------------------------------------------------


def test_every_storage_method_is_routed_through_the_guard() -> None:
    abstract = set(optuna.storages.BaseStorage.__abstractmethods__)
    routed: list[str] = []

    def guard(name: str, call: Callable[[], Any]) -> Any:
        routed.append(name)
        return call()

    storage = GuardedStorage(optuna.storages.InMemoryStorage(), guard)
    for name in sorted(abstract - {"check_trial_is_updatable"}):
        method = getattr(type(storage), name)
        assert method.__name__ == name and method is not getattr(
            optuna.storages.BaseStorage, name
        ), f"{name} is not routed"
    study = optuna.create_study(storage=storage)
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    trial.set_user_attr("k", 1)
    study.tell(trial, 1.0)
    assert {
        "create_new_study",
        "create_new_trial",
        "set_trial_param",
        "set_trial_user_attr",
        "set_trial_state_values",
        "get_all_trials",
    } <= set(routed)


def test_the_guarded_sqlite_storage_rides_out_a_lock_held_by_another_process(
    tmp_path: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="autoquant")
    monkeypatch.setattr(_guard, "BACKOFF_S", (0.05, 0.1))
    from autoquant.search import _storages, open_storage

    monkeypatch.setattr(_storages, "SQLITE_BUSY_TIMEOUT_S", 0.1)
    path = tmp_path / "locked.db"
    storage = open_storage(f"sqlite:///{path}")
    study = optuna.create_study(storage=storage, study_name="s")
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN EXCLUSIVE")  # another process holds the write lock for 0.5 s
    threading.Timer(0.5, other.execute, args=("COMMIT",)).start()
    study.set_user_attr("k", 1)
    assert study.user_attrs == {"k": 1}
    assert "database unreachable since" in caplog.text and "database is locked" in caplog.text
    assert "database back after" in caplog.text


# -- PostgreSQL connection settings ---------------------------------------------------------------


def test_postgres_gets_timeouts_and_keepalives_unless_the_url_sets_them() -> None:
    args = _engine_kwargs("postgresql+psycopg://u:p@h/db")["connect_args"]
    assert args["connect_timeout"] == 10 and args["keepalives"] == 1
    assert args["options"] == "-c statement_timeout=30000"
    mine = _engine_kwargs(
        "postgresql+psycopg://u:p@h/db?connect_timeout=3&options=-c%20search_path%3Dx"
    )["connect_args"]
    assert "connect_timeout" not in mine  # the URL's own value wins
    assert mine["options"] == "-c search_path=x -c statement_timeout=30000"
    assert _engine_kwargs("sqlite:///x.db") == {"connect_args": {"timeout": 20.0}}
    assert _engine_kwargs("sqlite:///x.db?timeout=3") == {}
