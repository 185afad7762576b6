"""Liveness without waiting: a worker on the same machine whose process is gone is known dead
at once (its trials failed and retried, its claims released, in one log line), and nobody is
declared lost for beats missed while the database was down. (The whole story with a real
``kill -9``: tests/search/test_distributed.py.)"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from autoquant.search import TrialRecord, open_storage, read_record, write_record
from autoquant.search import _optuna_compat as compat
from autoquant.search._guard import StorageGuard
from autoquant.search._liveness import (
    MAX_RETRY,
    fail_lost_trials,
    process_gone,
    reap_dead_workers,
    this_process,
)
from autoquant.search._locks import Beater, Claims

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/stat").exists(), reason="process identity needs Linux /proc"
)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: the pid is free
    return child.pid


def test_a_process_is_gone_only_when_it_ran_here_and_no_longer_runs() -> None:
    me = this_process()
    assert not process_gone(me)
    assert process_gone({**me, "pid": _dead_pid()})
    assert process_gone({**me, "start": me["start"] - 1})  # our pid, reused by us: not them
    # Elsewhere, or unknown: cannot tell, so not gone (heartbeats decide).
    assert not process_gone({**me, "pid": _dead_pid(), "host": "another-host"})
    assert not process_gone({**me, "pid": _dead_pid(), "boot": "another-boot"})
    assert not process_gone({**me, "pid": _dead_pid(), "pidns": "pid:[1]"})
    assert not process_gone(None) and not process_gone({"host": me["host"]})


def test_a_zombie_counts_as_gone() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    start = None
    while start is None:  # read its start time while it runs (or is already a zombie)
        try:
            with open(f"/proc/{child.pid}/stat") as f:
                start = int(f.read().rsplit(")", 1)[1].split()[19])
        except FileNotFoundError:
            pytest.skip("the child was reaped before it could be looked at")
    deadline = time.monotonic() + 30
    while open(f"/proc/{child.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert process_gone({**this_process(), "pid": child.pid, "start": start})
    child.wait()


@pytest.fixture
def study(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> optuna.Study:
    monkeypatch.setenv("AUTOQUANT_HEARTBEAT_S", "0.2")
    monkeypatch.setenv("AUTOQUANT_GRACE_S", "600")  # nothing here may wait for the grace
    return optuna.create_study(
        study_name="s", storage=open_storage(f"sqlite:///{tmp_path / 's.db'}")
    )


def _running(study: optuna.Study, process: dict[str, Any]) -> optuna.Trial:
    trial = study.ask({"x": optuna.distributions.IntDistribution(0, 9)})
    write_record(trial, TrialRecord(worker=f"h:{process['pid']}", worker_process=process))
    compat.trial_beat(study, trial)()
    return trial


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")
def test_a_rerun_fails_dead_local_trials_and_releases_their_claims_at_once(
    study: optuna.Study, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="autoquant")
    me = this_process()
    dead = {**me, "pid": _dead_pid()}
    killed = _running(study, dead)
    alive = _running(study, me)
    remote = _running(study, {**dead, "host": "another-host"})
    storage = compat.storage_of(study)
    holder = Claims(storage, "s", beater=Beater(10.0))
    for key in ("float_baseline", "latency:k"):
        assert holder.try_claim(key)
        storage.set_study_user_attr(compat.find_study(storage, holder.marker_name(key)),
                                    "process", dead)  # fmt: skip
    live_claim = Claims(storage, "s", beater=Beater(10.0))
    assert live_claim.try_claim("latency:mine")

    caplog.clear()
    t0 = time.monotonic()
    claims = Claims(storage, "s", beater=Beater(10.0))
    failed, released = reap_dead_workers(study, claims)
    assert time.monotonic() - t0 < 5
    assert failed == [killed.number]
    assert sorted(released) == ["float_baseline", "latency:k"]
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        f"resuming: failed trial(s) {killed.number} as worker lost (queued again) and "
        "released claim(s) float_baseline, latency:k of worker(s) on this machine whose "
        "process is gone"
    ]

    trials = study.get_trials()
    lost = trials[killed.number]
    assert lost.state == TrialState.FAIL
    assert read_record(lost).fail_reason == (
        f"worker lost: its process (pid {dead['pid']} on {me['host']}) is gone (killed or "
        f"crashed); queued again up to {MAX_RETRY} times"
    )
    retry = [t for t in trials if compat.retried_number(t) == killed.number]
    assert len(retry) == 1 and retry[0].state == TrialState.WAITING
    assert retry[0].params == lost.params
    assert trials[alive.number].state == TrialState.RUNNING  # a live worker's
    assert trials[remote.number].state == TrialState.RUNNING  # another machine's: heartbeats
    names = optuna.get_all_study_names(storage)
    assert "s:claim:latency:mine" in names and "s:claim:float_baseline" not in names


def test_a_waiter_takes_a_dead_local_holders_claim_without_waiting(
    study: optuna.Study, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="autoquant")
    storage = compat.storage_of(study)
    holder = Claims(storage, "s", beater=Beater(10.0))
    assert holder.try_claim("float_baseline")
    sid = compat.find_study(storage, holder.marker_name("float_baseline"))
    storage.set_study_user_attr(sid, "process", {**this_process(), "pid": _dead_pid()})

    waiter = Claims(storage, "s", beater=Beater(10.0), grace_s=600, timeout_s=600)
    t0 = time.monotonic()
    assert waiter.obtain("float_baseline", lambda: None) is None  # ours to compute now
    assert time.monotonic() - t0 < 5
    assert waiter.held() == ["float_baseline"]
    assert "waiting for another worker" not in caplog.text
    assert "is gone; taking over" in caplog.text
    waiter.release_all()


def test_a_holder_killed_before_recording_its_owner_is_known_gone_by_its_process(
    study: optuna.Study,
) -> None:
    # Killed between writing its process and its "owner" (a claim is two writes; a
    # full-suite run once killed a worker between them): a waiter and a rerun must not
    # wait out the grace period for it.
    storage = compat.storage_of(study)
    key = "latency:k"
    holder = Claims(storage, "s", beater=Beater(10.0))
    dead = {**this_process(), "pid": _dead_pid()}
    sid = storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], holder.marker_name(key))
    storage.set_study_user_attr(sid, "process", dead)
    waiter = Claims(storage, "s", beater=Beater(10.0), grace_s=600, timeout_s=600)
    t0 = time.monotonic()
    assert waiter.obtain(key, lambda: None) is None and waiter.held() == [key]
    assert time.monotonic() - t0 < 5
    waiter.release_all()
    # The same for a rerun's release_dead; a live holder's marker stays.
    sid = storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], holder.marker_name(key))
    storage.set_study_user_attr(sid, "process", dead)
    live = holder.marker_name("live")
    sid2 = storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], live)
    storage.set_study_user_attr(sid2, "process", this_process())
    assert waiter.release_dead() == [key]


def test_a_claim_records_its_process_before_its_owner(study: optuna.Study) -> None:
    storage = compat.storage_of(study)
    writes: list[str] = []
    real = storage.set_study_user_attr

    def record(sid: int, key: str, value: object) -> None:
        writes.append(key)
        real(sid, key, value)

    storage.set_study_user_attr = record  # type: ignore[method-assign]
    holder = Claims(storage, "s", beater=Beater(10.0))
    assert holder.try_claim("k")
    assert writes[:2] == ["process", "owner"]
    holder.release_all()


# -- outages: no one is lost for the beats the database could not take --------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")
def test_no_trial_is_failed_for_missing_beats_until_the_database_has_been_back_a_while(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTOQUANT_HEARTBEAT_S", "0.2")
    monkeypatch.setenv("AUTOQUANT_GRACE_S", "1")
    clock = Clock()
    guard = StorageGuard("sqlite:///x", 120, clock=clock)
    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}", guard=guard)
    study = optuna.create_study(study_name="s", storage=storage)
    remote = {**this_process(), "host": "another-host"}  # only its heartbeat tells
    trial = _running(study, remote)
    time.sleep(2.2)  # SQLite times heartbeats to the second: stale once 2 s have passed

    guard.back_at = clock.now  # the database just came back
    assert fail_lost_trials(study) == []
    # The window: the grace period, but at least the longest retry wait + 2 heartbeats.
    window = max(1.0, guard.backoff_s[1] + 2 * 0.2)
    clock.now += window - 0.1
    assert fail_lost_trials(study) == []
    clock.now += 0.2
    assert fail_lost_trials(study) == [trial.number]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")
def test_a_stale_query_that_waited_out_an_outage_fails_nobody(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The query for stale trials itself waits for the database: when it returns, every
    heartbeat is old, live workers' included. Found in a run: the check must come after it."""
    monkeypatch.setenv("AUTOQUANT_HEARTBEAT_S", "0.2")
    monkeypatch.setenv("AUTOQUANT_GRACE_S", "1")
    guard = StorageGuard("sqlite:///x", 120, sleep=lambda s: None)
    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}", guard=guard)
    study = optuna.create_study(study_name="s", storage=storage)
    trial = _running(study, {**this_process(), "host": "another-host"})
    time.sleep(2.2)  # stale, as after an outage of 2 s
    down = {"n": 1}

    def down_once(name: str, call: Callable[[], Any]) -> Any:
        if name == "_get_stale_trial_ids" and down["n"]:  # the query meets the outage ...
            down["n"] -= 1
            raise ConnectionRefusedError(111, "connection refused")
        return call()  # ... and the database is back for its retry

    monkeypatch.setattr(storage, "inner", compat.GuardedStorage(storage.inner, down_once))
    assert fail_lost_trials(study) == []
    assert guard.outages == 1 and down["n"] == 0
    assert study.get_trials()[trial.number].state == TrialState.RUNNING


def test_no_claim_is_taken_over_for_missing_beats_while_the_database_settles(
    tmp_path: Path,
) -> None:
    clock = Clock()
    guard = StorageGuard("sqlite:///x", 120, clock=clock)
    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}", guard=guard)
    optuna.create_study(study_name="s", storage=storage)
    holder = Claims(storage, "s", beater=Beater(10.0))  # never beats: looks dead
    assert holder.try_claim("k")
    sid = compat.find_study(storage, holder.marker_name("k"))
    storage.set_study_user_attr(sid, "process", {**this_process(), "host": "another-host"})

    guard.back_at = clock.now  # the database came back just now
    waiter = Claims(storage, "s", beater=Beater(10.0), grace_s=0.3, timeout_s=1.5, poll_s=0.05)
    assert waiter.obtain("k", lambda: None) is None  # gave up waiting at the timeout ...
    assert waiter.held() == []  # ... without taking the claim over

    clock.now += 3600  # long settled: the silent holder is taken over after the grace period
    t0 = time.monotonic()
    assert waiter.obtain("k", lambda: None) is None
    assert waiter.held() == ["k"] and time.monotonic() - t0 < 1.4
    waiter.release_all()
