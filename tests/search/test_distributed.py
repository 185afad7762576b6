"""Distributed search: budget slots, storage claims, per-trial seeds, and real workers on
PostgreSQL (``AUTOQUANT_TEST_POSTGRES_URL``, started by ``scripts/start_postgres.sh``)."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

from autoquant.search import (
    TrialRecord,
    judged,
    load_study_spec,
    make_sampler,
    open_storage,
    read_float_baseline,
    read_record,
    record_attrs,
)
from autoquant.search._budget import taken_slots
from autoquant.search._liveness import MAX_RETRY
from autoquant.search._locks import Beater, ClaimingAttrStore, Claims
from autoquant.search._optuna_compat import storage_of
from autoquant.search._record import WORKER_LOST

ROOT = Path(__file__).resolve().parents[2]
PG_URL = os.environ.get("AUTOQUANT_TEST_POSTGRES_URL", "")
needs_postgres = pytest.mark.skipif(
    not PG_URL,
    reason="AUTOQUANT_TEST_POSTGRES_URL is not set; start a server with "
    'eval "$(scripts/start_postgres.sh)" (.ci/run does)',
)

STUDY = """
[study]
name = "{name}"
trials = {trials}
seed = 0
[task]
name = "digits-cnn"
[space]
w_bits = [2, 4, 8]
a_bits = [4, 8]
a_calib = ["minmax", "mse"]
[qat]
steps = {steps}
calib_batches = 2
[latency]
warmup = 3
repeats = 10
budget_s = 0.2
[constraint]
max_accuracy_drop = 0.05
"""


# -- budget slots (no database) ---------------------------------------------------------


def _trial(number: int, state: TrialState, **kw: Any) -> FrozenTrial:
    now = datetime.now()
    return FrozenTrial(
        number=number,
        state=state,
        value=None,
        values=[1.0] if state == TrialState.COMPLETE else None,
        datetime_start=now,
        datetime_complete=kw.pop("ended", now if state.is_finished() else None),
        params={},
        distributions={},
        user_attrs=record_attrs(kw.pop("record", TrialRecord())),
        system_attrs=kw.pop("system_attrs", {}),
        intermediate_values={},
        trial_id=number,
    )


def test_budget_slots_count_each_trial_once_and_keep_lost_trials_slots() -> None:
    lost = TrialRecord(fail_reason=f"{WORKER_LOST}: no heartbeat")
    old = datetime.now() - timedelta(minutes=10)
    trials = [
        _trial(0, TrialState.COMPLETE),
        _trial(1, TrialState.RUNNING),
        _trial(2, TrialState.FAIL, record=TrialRecord(fail_reason="ValueError: x")),
        _trial(3, TrialState.PRUNED),
        _trial(4, TrialState.WAITING),
        _trial(5, TrialState.FAIL, record=lost),  # lost; its retry is trial 8
        _trial(6, TrialState.FAIL, record=lost, ended=old),  # lost long ago, no retry
        _trial(7, TrialState.FAIL, record=lost, system_attrs={"retry_history": [1] * 2}),
        _trial(8, TrialState.RUNNING, system_attrs={"failed_trial": 5, "retry_history": [5]}),
        _trial(9, TrialState.FAIL, record=lost),  # lost just now: retry not queued yet
    ]
    assert MAX_RETRY == 2  # trial 7 has used its retries
    # Slots: 0, 1, 4, 5 (trials 5 and 8 share it), 9.
    assert taken_slots(trials) == 5
    assert taken_slots(trials, before=5) == 3  # what the retry (trial 8, slot 5) sees
    assert taken_slots(trials[:5], before=4) == 2


# -- claims through a real storage (SQLite) ---------------------------------------------


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'claims.db'}"
    optuna.create_study(study_name="s", storage=url)
    return url


def _claim_in_process(url: str, barrier: Any, out: Any) -> None:
    storage = optuna.storages.RDBStorage(url)
    claims = Claims(storage, "s", beater=Beater(10.0))
    barrier.wait()
    out.put(claims.try_claim("k"))


def test_exactly_one_of_several_processes_wins_a_claim(sqlite_url: str) -> None:
    ctx = multiprocessing.get_context("fork")
    barrier, out = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_claim_in_process, args=(sqlite_url, barrier, out)) for _ in "abcd"]
    for p in procs:
        p.start()
    won = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert sorted(won) == [False, False, False, True]
    assert "s:claim:k" in optuna.get_all_study_names(sqlite_url)


def test_waiter_gets_the_value_the_holder_stores(sqlite_url: str) -> None:
    study = optuna.load_study(study_name="s", storage=sqlite_url)
    holder = ClaimingAttrStore(study, Claims(storage_of(study), "s", beater=Beater(0.1)))
    waiter_claims = Claims(storage_of(study), "s", beater=Beater(0.1), grace_s=5.0, poll_s=0.05)
    waiter = ClaimingAttrStore(study, waiter_claims)
    assert holder.get("k") is None  # claimed: the holder measures
    threading.Timer(0.5, holder.set, args=("k", {"median_ms": 1.5})).start()
    t0 = time.monotonic()
    assert waiter.get("k") == {"median_ms": 1.5}
    assert time.monotonic() - t0 >= 0.4
    assert (waiter_claims.claimed, waiter_claims.waited) == (0, 1)
    assert optuna.get_all_study_names(sqlite_url) == ["s"]  # the marker is gone


def test_a_dead_holders_claim_is_taken_over_and_a_live_one_is_not(sqlite_url: str) -> None:
    storage = optuna.storages.RDBStorage(sqlite_url)
    # Dead holder: its marker exists but nobody refreshes it.
    storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], "s:claim:dead")
    waiter = Claims(storage, "s", beater=Beater(0.1), grace_s=0.5, timeout_s=30, poll_s=0.05)
    t0 = time.monotonic()
    assert waiter.obtain("dead", lambda: None) is None
    assert 0.5 <= time.monotonic() - t0 < 10
    assert waiter.held() == ["dead"]
    waiter.release_all()

    # Live holder: beats every 0.1 s, so the waiter only gives up at its timeout.
    holder = Claims(storage, "s", beater=Beater(0.1))
    assert holder.try_claim("live")
    waiter = Claims(storage, "s", beater=Beater(0.1), grace_s=0.5, timeout_s=1.5, poll_s=0.05)
    t0 = time.monotonic()
    assert waiter.obtain("live", lambda: None) is None
    assert time.monotonic() - t0 >= 1.5
    assert waiter.held() == [] and holder.held() == ["live"]
    holder.release_all()
    holder.beater.close()
    assert optuna.get_all_study_names(sqlite_url) == ["s"]


# -- samplers ---------------------------------------------------------------------------


def test_workers_sharing_a_seed_propose_different_plans_and_runs_repeat() -> None:
    spec = load_study_spec(ROOT / "studies" / "digits.toml")
    choices = list(range(8))

    def propose(n_workers: int) -> list[int]:
        storage = optuna.storages.InMemoryStorage()
        workers = [
            optuna.create_study(
                study_name="s",
                storage=storage,
                sampler=make_sampler(spec, 0),
                directions=spec.directions,
                load_if_exists=True,
            )
            for _ in range(n_workers)
        ]
        out = []
        for i in range(6):
            trial = workers[i % n_workers].ask()
            out.append(trial.suggest_categorical("x", choices))
            workers[i % n_workers].tell(trial, [1.0, 1.0, 1.0])
        return out

    two = propose(2)
    assert two[0] != two[1] or two[2] != two[3], "workers repeated each other's proposals"
    assert two == propose(2) and propose(1) == two  # reproducible, whatever the worker count


# -- real workers on PostgreSQL ---------------------------------------------------------


@pytest.fixture(scope="module")
def digits_ready() -> None:
    """Train/cache the digits model once, before workers start in parallel."""
    from autoquant.tasks import get_task

    get_task("digits-cnn")


def _study_file(tmp_path: Path, *, trials: int, steps: int) -> tuple[str, Path]:
    name = f"dist-{uuid.uuid4().hex[:8]}"
    path = tmp_path / f"{name}.toml"
    path.write_text(STUDY.format(name=name, trials=trials, steps=steps))
    assert load_study_spec(path).name == name
    return name, path


def _worker(path: Path, log: Path, storage: str = PG_URL, **env: str) -> subprocess.Popen[bytes]:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env}
    cmd = [sys.executable, "-m", "autoquant.cli", "worker", str(path), "--storage", storage]
    with open(log, "wb") as out:
        return subprocess.Popen(
            [*cmd, "--threads", "1", "-q"],
            cwd=ROOT,
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _wait_all(procs: list[subprocess.Popen[bytes]], logs: list[Path], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    text = "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')}" for log in logs)
    assert [p.returncode for p in procs] == [0] * len(procs), text
    return text


def _running_trial(
    name: str, storage: optuna.storages.BaseStorage, procs: dict[int, subprocess.Popen[bytes]]
) -> tuple[int, int]:
    """(pid, trial number) of a trial that one of ``procs`` is training, once there is one.

    In training, not while it suggests its plan: killed between two suggestions, a trial
    leaves a partial plan that its retry completes with new values. A complete trial shows
    how many parameters a whole plan has.
    """
    deadline = time.monotonic() + 180
    while True:
        assert time.monotonic() < deadline, "no trial started"
        assert all(p.poll() is None for p in procs.values()), "a worker ended early"
        try:
            study = optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            time.sleep(0.2)
            continue
        trials = study.get_trials(deepcopy=False)
        whole = max((len(t.params) for t in trials if t.state == TrialState.COMPLETE), default=0)
        for t in trials:
            if t.state != TrialState.RUNNING or not whole or len(t.params) < whole:
                continue
            pid = int(str(read_record(t).worker or ":0").rsplit(":", 1)[1])
            if pid in procs:
                return pid, t.number
        time.sleep(0.1)


def _check_outcomes(trials: list[FrozenTrial], budget: int) -> None:
    assert sum(judged(t) for t in trials) == budget  # complete, or stopped by the pruning rule
    for t in trials:
        assert t.state in (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED), t
        if t.state != TrialState.COMPLETE:
            assert read_record(t).fail_reason, f"trial {t.number} has no reason"
    # No plan is evaluated twice, except by a retry of a lost trial.
    ran = [
        tuple(sorted(t.params.items()))
        for t in trials
        if t.state != TrialState.PRUNED and "failed_trial" not in t.system_attrs
    ]
    assert len(ran) == len(set(ran))


@needs_postgres
@pytest.mark.slow
@pytest.mark.postgres
def test_three_workers_fill_the_budget_exactly_and_measure_once(
    tmp_path: Path, digits_ready: None
) -> None:
    budget = 8
    name, path = _study_file(tmp_path, trials=budget, steps=10)
    logs = [tmp_path / f"worker{i}.log" for i in range(3)]
    procs = [_worker(path, log) for log in logs]
    output = _wait_all(procs, logs, timeout=240)

    storage = open_storage(PG_URL)
    study = optuna.load_study(study_name=name, storage=storage)
    trials = study.get_trials()
    _check_outcomes(trials, budget)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert all(read_record(t).worker for t in complete)
    assert len({read_record(t).worker for t in complete}) >= 2, "the workers shared no work"
    assert {read_record(t).baseline for t in complete} >= {"w8a8", "w4a8"}

    # Each latency measurement was paid once; every other use of it was a cache hit.
    entries = [e for t in complete for e in read_record(t).latency]
    entries += read_float_baseline(study).latency
    measured = Counter(e["key"] for e in entries if not e["cached"])
    assert measured and set(measured.values()) == {1}, measured
    assert {e["key"] for e in entries} == set(measured), "a cache hit without a measurement"
    stored = {k.removeprefix("latency:") for k in study.user_attrs if k.startswith("latency:")}
    assert set(measured) <= stored
    assert not [n for n in optuna.get_all_study_names(storage) if n.startswith(f"{name}:claim:")]

    # The password appears in no output, stored attribute or report.
    password = urlsplit(PG_URL).password
    assert password and password not in output
    stored_text = json.dumps(
        [study.user_attrs, [(t.user_attrs, t.system_attrs) for t in trials]], default=str
    )
    assert password not in stored_text
    from autoquant.report import write_report

    write_report(study, tmp_path / "report", study_ref=str(path))
    files = [p for p in (tmp_path / "report").rglob("*") if p.is_file()]
    assert files and not [p for p in files if password.encode() in p.read_bytes()]


@needs_postgres
@pytest.mark.slow
@pytest.mark.postgres
def test_killed_worker_trial_is_failed_with_a_reason_and_retried(
    tmp_path: Path, digits_ready: None
) -> None:
    budget = 5
    name, path = _study_file(tmp_path, trials=budget, steps=300)  # ~2 s trials: time to kill
    env = {"AUTOQUANT_HEARTBEAT_S": "0.5", "AUTOQUANT_GRACE_S": "3"}
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    procs = {p.pid: p for p in (_worker(path, log, **env) for log in logs)}
    storage = open_storage(PG_URL)
    pid, lost_number = _running_trial(name, storage, procs)
    os.kill(pid, signal.SIGKILL)
    procs[pid].wait(timeout=30)
    survivor = [p for p in procs.values() if p.pid != pid]
    _wait_all(survivor, [log for log in logs], timeout=180)

    trials = optuna.load_study(study_name=name, storage=storage).get_trials()
    _check_outcomes(trials, budget)
    lost = trials[lost_number]
    assert lost.state == TrialState.FAIL
    assert read_record(lost).fail_reason.startswith(WORKER_LOST)
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == lost_number]
    assert len(retries) == 1
    retry = retries[0]
    assert retry.state == TrialState.COMPLETE and retry.params == lost.params
    assert read_record(retry).retry_of == lost_number
    retry_worker, lost_worker = read_record(retry).worker, read_record(lost).worker
    assert retry_worker and lost_worker and retry_worker != lost_worker


# -- SQLite with several workers, and a rerun after kill -9 (no server needed) -----------------


@pytest.mark.slow
def test_several_workers_started_together_on_one_sqlite_file_lose_nothing(
    tmp_path: Path, digits_ready: None
) -> None:
    budget = 4
    name, path = _study_file(tmp_path, trials=budget, steps=2)
    url = f"sqlite:///{tmp_path / 'study.db'}"  # a fresh file: the workers race to create it
    logs = [tmp_path / f"worker{i}.log" for i in range(6)]
    procs = [_worker(path, log, url) for log in logs]
    output = _wait_all(procs, logs, timeout=420)

    assert "Traceback" not in output and "Error" not in output, output
    assert "by another worker" not in output  # no trial was taken by two workers
    trials = optuna.load_study(study_name=name, storage=open_storage(url)).get_trials()
    _check_outcomes(trials, budget)
    baselines = [read_record(t).baseline for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(b for b in baselines if b) == ["w4a8", "w8a8"]  # each run exactly once
    assert not [t for t in trials if t.state == TrialState.FAIL], "a trial was lost"


@pytest.mark.slow
def test_a_rerun_after_kill_9_fails_the_killed_trial_at_once_and_retries_it(
    tmp_path: Path, digits_ready: None
) -> None:
    budget = 3
    name, path = _study_file(tmp_path, trials=budget, steps=300)  # ~2 s trials: time to kill
    url = f"sqlite:///{tmp_path / 'study.db'}"
    # A grace period of 10 minutes: a rerun that waited for it could not pass.
    env = {"AUTOQUANT_HEARTBEAT_S": "1", "AUTOQUANT_GRACE_S": "600"}
    killed = _worker(path, tmp_path / "killed.log", url, **env)
    pid, lost_number = _running_trial(name, open_storage(url), {killed.pid: killed})
    os.kill(pid, signal.SIGKILL)
    killed.wait(timeout=30)

    started = datetime.now()
    log = tmp_path / "rerun.log"
    output = _wait_all([_worker(path, log, url, **env)], [log], timeout=300)
    trials = optuna.load_study(study_name=name, storage=open_storage(url)).get_trials()
    _check_outcomes(trials, budget)
    lost = trials[lost_number]
    assert lost.state == TrialState.FAIL
    assert read_record(lost).fail_reason.startswith(f"{WORKER_LOST}: its process (pid {pid} on "), (
        read_record(lost).fail_reason
    )
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == lost_number]
    assert [t.state for t in retries] == [TrialState.COMPLETE]
    assert retries[0].params == lost.params and read_record(retries[0]).retry_of == lost_number
    # The rerun's first trial starts after the process and the model load, not the grace.
    first = min(t.datetime_start for t in trials if t.datetime_start and t.datetime_start > started)
    assert (first - started).total_seconds() < 60, output
    assert f"resuming: failed trial(s) {lost_number} as worker lost" in output
    assert "waiting for another worker" not in output


# -- PostgreSQL going away: a restart, a freeze ----------------------------------------------

PG_DIR = os.environ.get("AUTOQUANT_PG_DIR", "")
needs_pg_control = pytest.mark.skipif(
    not (PG_URL and PG_DIR),
    reason="needs a throw-away server from scripts/start_postgres.sh (AUTOQUANT_PG_DIR)",
)


def _pg(action: str) -> None:
    subprocess.run([str(ROOT / "scripts" / "start_postgres.sh"), action, PG_DIR], check=True)


def _outage_lines(log: Path) -> tuple[int, int]:
    text = log.read_text(errors="replace")
    return text.count("database unreachable since"), text.count("database back after")


@needs_pg_control
@pytest.mark.slow
@pytest.mark.postgres
def test_workers_ride_out_a_database_restart_longer_than_the_grace_period(
    tmp_path: Path, digits_ready: None
) -> None:
    budget = 4
    name, path = _study_file(tmp_path, trials=budget, steps=300)
    env = {"AUTOQUANT_HEARTBEAT_S": "0.5", "AUTOQUANT_GRACE_S": "3"}
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    procs = {p.pid: p for p in (_worker(path, log, **env) for log in logs)}
    _running_trial(name, open_storage(PG_URL), procs)
    _pg("--down")
    try:
        time.sleep(8)  # > the grace period: beats missed meanwhile must not count
    finally:
        _pg("--up")
    output = _wait_all(list(procs.values()), logs, timeout=300)

    assert "Traceback" not in output, output
    assert [_outage_lines(log) for log in logs] == [(1, 1), (1, 1)], output
    trials = optuna.load_study(study_name=name, storage=open_storage(PG_URL)).get_trials()
    _check_outcomes(trials, budget)
    assert not [t for t in trials if t.state == TrialState.FAIL], [
        read_record(t).fail_reason for t in trials
    ]


@needs_pg_control
@pytest.mark.slow
@pytest.mark.postgres
def test_a_frozen_database_is_detected_and_ridden_out(tmp_path: Path, digits_ready: None) -> None:
    budget = 3
    name, path = _study_file(tmp_path, trials=budget, steps=300)
    # A 2 s statement timeout: a call hung for 2 + 15 s is broken (the default is 30 + 15 s).
    url = PG_URL + ("&" if "?" in PG_URL else "?") + "options=-c%20statement_timeout%3D2000"
    env = {"AUTOQUANT_HEARTBEAT_S": "0.5", "AUTOQUANT_GRACE_S": "3"}
    log = tmp_path / "worker.log"
    proc = _worker(path, log, url, **env)
    _running_trial(name, open_storage(PG_URL), {proc.pid: proc})
    _pg("--freeze")  # SIGSTOP: the kernel still acknowledges TCP, nothing answers
    try:
        time.sleep(25)
    finally:
        _pg("--thaw")
    output = _wait_all([proc], [log], timeout=300)

    assert "Traceback" not in output, output
    assert _outage_lines(log) == (1, 1), output
    trials = optuna.load_study(study_name=name, storage=open_storage(PG_URL)).get_trials()
    _check_outcomes(trials, budget)
