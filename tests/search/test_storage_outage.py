"""A search rides out a storage outage, and a storage that fails for good stops it with one
line and exit code 3, its trial in flight failed as "infrastructure: ..." (not counted,
queued again). A fake layer between the guard and a real SQLite storage makes the calls fail:
no database server needed. (With a real PostgreSQL: tests/search/test_distributed.py.)"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from optuna.trial import TrialState

from autoquant.cli import main
from autoquant.search import (
    InfrastructureError,
    SearchContext,
    StudySpec,
    _guard,
    _optuna_compat,
    _storages,
    _worker,
    open_storage,
    read_record,
    run_search,
    study_spec_from_dict,
)
from autoquant.search._budget import counted_failure

SPEC = {
    "study": {"name": "outage", "trials": 3, "seed": 0},
    "task": {"name": "digits-cnn"},
    "space": {"w_bits": [2, 4, 8], "a_bits": [4, 8]},
    "qat": {"steps": 2, "calib_batches": 1},
}


class FastContext(SearchContext):
    """The digits pipeline without the latency measurement (seconds per trial, not tens)."""

    def _latencies(self, model: torch.nn.Module, plan: Any) -> list[dict[str, Any]]:
        return [{"median_ms": 1.0, "iqr_ms": 0.0, "batch_size": 1, "cached": False, "key": "k"}]


@pytest.fixture(scope="module")
def ctx() -> FastContext:
    torch.set_num_threads(1)
    return FastContext(study_spec_from_dict(SPEC, "outage.toml"))


class Flaky:
    """Sits between the guard and the real storage. Once ``trigger(name)`` is true for a call
    of the main thread, every call raises ``error()`` until ``until(self)`` is true."""

    def __init__(
        self,
        error: Callable[[], BaseException],
        trigger: Callable[[str], bool],
        until: Callable[[Flaky], bool],
    ) -> None:
        self.error, self.trigger, self.until = error, trigger, until
        self.since: float | None = None  # when the failure began
        self.over = False
        self.failed: list[str] = []

    def __call__(self, name: str, call: Callable[[], Any]) -> Any:
        main = threading.current_thread() is threading.main_thread()
        if self.since is None and main and self.trigger(name):
            self.since = time.monotonic()
        if self.since is not None and not self.over and self.until(self):
            self.over = True
        if self.since is not None and not self.over:
            self.failed.append(name)
            raise self.error()
        return call()


@pytest.fixture
def guards(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[_guard.StorageGuard]:
    """The guards open_storage creates (to watch them), with short back-off."""
    made: list[_guard.StorageGuard] = []

    class Recorded(_guard.StorageGuard):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(_storages, "StorageGuard", Recorded)
    monkeypatch.setattr(_guard, "BACKOFF_S", (0.1, 0.3))
    monkeypatch.setenv("AUTOQUANT_RUNS", str(tmp_path))
    return made


def _install(monkeypatch: pytest.MonkeyPatch, flaky: Flaky) -> None:
    real = _optuna_compat.cached
    monkeypatch.setattr(
        _optuna_compat, "cached", lambda rdb: _optuna_compat.GuardedStorage(real(rdb), flaky)
    )


def _refused() -> BaseException:
    return ConnectionRefusedError(errno.ECONNREFUSED, "connection refused")


def _trial_start(n: int) -> Callable[[str], bool]:
    """True at the n-th trial's first heartbeat (sent by the main thread as the trial starts)."""
    seen = {"n": 0}

    def trigger(name: str) -> bool:
        seen["n"] += name == "record_heartbeat"
        return name == "record_heartbeat" and seen["n"] == n

    return trigger


def _trials(tmp_path: Path) -> list[optuna.trial.FrozenTrial]:
    storage = open_storage(f"sqlite:///{tmp_path / 'outage' / 'study.db'}")
    return optuna.load_study(study_name="outage", storage=storage).get_trials()


def test_a_search_rides_out_an_outage_mid_trial_longer_than_the_grace_period(
    ctx: FastContext,
    guards: list[_guard.StorageGuard],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="autoquant")
    monkeypatch.setenv("AUTOQUANT_HEARTBEAT_S", "0.2")
    monkeypatch.setenv("AUTOQUANT_GRACE_S", "1")  # the outage lasts 3 grace periods
    flaky = Flaky(_refused, _trial_start(3), until=lambda f: time.monotonic() - f.since > 3)
    _install(monkeypatch, flaky)
    study = run_search(ctx.spec, ctx=ctx, progress=False)

    assert flaky.over and "record_heartbeat" in flaky.failed
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3, [
        (t.state, read_record(t).fail_reason) for t in trials
    ]
    lines = [r.getMessage() for r in caplog.records if r.name == "autoquant"]
    assert sum(m.startswith("database unreachable since") for m in lines) == 1, lines
    assert sum(m.startswith("database back after") for m in lines) == 1, lines
    assert not [m for m in lines if "worker lost" in m or "taking over" in m], lines
    assert guards[0].outages == 1


def test_an_outage_past_the_limit_stops_the_search_and_retries_the_trial(
    ctx: FastContext,
    guards: list[_guard.StorageGuard],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("AUTOQUANT_DB_OUTAGE_S", "1")
    monkeypatch.setenv("AUTOQUANT_HEARTBEAT_S", "30")  # only the main thread calls
    # Down from the 2nd trial's start until the guard gives up; then back, so the worker
    # can record why its trial stopped.
    flaky = Flaky(_refused, _trial_start(2), until=lambda f: guards[0].gave_up)
    _install(monkeypatch, flaky)
    with pytest.raises(InfrastructureError, match=r"^database unreachable for 1 s"):
        run_search(ctx.spec, ctx=ctx, progress=False)

    trials = _trials(tmp_path)
    stopped = [t for t in trials if read_record(t).infrastructure]
    assert len(stopped) == 1 and stopped[0].state == TrialState.FAIL
    assert read_record(stopped[0]).fail_reason.startswith(
        "infrastructure: database unreachable for 1 s (AUTOQUANT_DB_OUTAGE_S=1): sqlite:///"
    )
    assert not counted_failure(stopped[0])
    retry = [t for t in trials if read_record(t).retry_of == stopped[0].number]
    assert len(retry) == 1 and retry[0].state == TrialState.WAITING
    assert retry[0].params == stopped[0].params

    # A rerun runs the retry and completes the budget; nothing counts as a failure.
    monkeypatch.undo()
    monkeypatch.setenv("AUTOQUANT_RUNS", str(tmp_path))
    study = run_search(ctx.spec, ctx=ctx, progress=False)
    trials = study.get_trials()
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 3
    assert trials[retry[0].number].state == TrialState.COMPLETE
    assert not [t for t in trials if counted_failure(t)]


def test_a_full_disk_is_one_line_exit_code_3_and_the_trial_is_retried(
    ctx: FastContext,
    guards: list[_guard.StorageGuard],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(_worker, "build_context", lambda spec, cache: ctx)
    # ENOSPC on the 2nd trial's first write, then the disk has room again.
    flaky = Flaky(
        lambda: OSError(errno.ENOSPC, "No space left on device"),
        _trial_start(2),
        until=lambda f: len(f.failed) >= 1,
    )
    _install(monkeypatch, flaky)
    study_file = tmp_path / "outage.toml"
    study_file.write_text(_toml(ctx.spec))
    assert main(["search", str(study_file), "-q"]) == 3
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [ln for ln in err.splitlines() if ln.startswith("autoquant:")] == [
        f"autoquant: error: storage sqlite:///{tmp_path.resolve() / 'outage' / 'study.db'}: "
        "cannot write: OSError: [Errno 28] No space left on device; completed trials are "
        "kept, rerun to resume"
    ], err
    trials = _trials(tmp_path)
    stopped = [t for t in trials if read_record(t).infrastructure]
    assert len(stopped) == 1 and stopped[0].state == TrialState.FAIL
    assert [t.state for t in trials if read_record(t).retry_of == stopped[0].number] == [
        TrialState.WAITING
    ]


def _toml(spec: StudySpec) -> str:
    return (
        f"[study]\nname = '{spec.name}'\ntrials = {spec.trials}\nseed = 0\n"
        "[task]\nname = 'digits-cnn'\n[space]\nw_bits = [2, 4, 8]\na_bits = [4, 8]\n"
        "[qat]\nsteps = 2\ncalib_batches = 1\n"
    )
