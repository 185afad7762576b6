"""A storage that cannot be written (read-only file or folder, a lost answer to a write) gives
one clear line and exit code 3, never a traceback; reading it still works. (A full disk under
a running trial: tests/search/test_storage_outage.py.)"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from _studies import digits_study
from optuna.trial import TrialState

from autoquant.cli import main
from autoquant.search import SearchContext, run_search, study_spec_from_dict
from autoquant.search._guard import StorageGuard
from autoquant.search._optuna_compat import GuardedStorage


class FastContext(SearchContext):
    """The digits pipeline without the latency measurement."""

    def _latencies(self, model: torch.nn.Module, plan: Any) -> list[dict[str, Any]]:
        return [{"median_ms": 1.0, "iqr_ms": 0.0, "batch_size": 1, "cached": False, "key": "k"}]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a finished study (study.toml, ro/study.db)."""
    folder = tmp_path_factory.mktemp("ro")
    (folder / "study.toml").write_text(digits_study("ro"))
    torch.set_num_threads(1)
    os.environ["AUTOQUANT_RUNS"] = str(folder)
    try:
        spec = study_spec_from_dict(
            {
                "study": {"name": "ro", "trials": 2, "seed": 0},
                "task": {"name": "digits-cnn"},
                "space": {"w_bits": [4, 8], "a_bits": [8]},
                "qat": {"steps": 2, "calib_batches": 1},
            },
            "study.toml",
        )
        study = run_search(spec, ctx=FastContext(spec), progress=False)
    finally:
        del os.environ["AUTOQUANT_RUNS"]
    assert sum(t.state == TrialState.COMPLETE for t in study.trials) == 2
    return folder


def _error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("autoquant:")]


def test_a_read_only_database_stops_with_one_line_and_still_reads(
    finished: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = finished / "ro" / "study.db"
    url = f"sqlite:///file:{db}?mode=ro&uri=true"  # read-only even for root
    before = db.read_bytes()
    assert main(["search", str(finished / "study.toml"), "--storage", url, "--trials", "3"]) == 3
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert _error_lines(err) == [
        f"autoquant: error: storage {url}: cannot write: OperationalError: attempt to write a "
        "readonly database; completed trials are kept, rerun to resume"
    ], err
    assert db.read_bytes() == before
    # Reading needs no write: the front of a read-only study still prints.
    assert main(["front", str(finished / "study.toml"), "--storage", url]) == 0
    assert "trial" in capsys.readouterr().out


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[Callable[[Path], None]]:
    """chmod a-w, undone after the test; skips where that does not stop writes (root)."""
    changed: list[tuple[Path, int]] = []

    def make(path: Path) -> None:
        changed.append((path, path.stat().st_mode))
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))

    yield make
    for path, mode in reversed(changed):
        path.chmod(mode)


def _writable(folder: Path) -> bool:
    try:
        (folder / ".probe").write_text("x")
    except OSError as e:
        assert e.errno in (errno.EACCES, errno.EROFS, errno.EPERM)
        return False
    (folder / ".probe").unlink()
    return True


def test_a_read_only_study_folder_stops_with_one_line(
    finished: Path, tmp_path: Path, read_only: Callable[[Path], None], capsys: Any
) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    db = folder / "study.db"
    db.write_bytes((finished / "ro" / "study.db").read_bytes())
    read_only(db)
    read_only(folder)
    if _writable(folder):
        pytest.skip(f"chmod does not stop writes here (euid {os.geteuid()}: root?)")
    url = f"sqlite:///{db}"
    assert main(["search", str(finished / "study.toml"), "--storage", url, "--trials", "3"]) == 3
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = _error_lines(err)
    assert len(lines) == 1 and lines[0].startswith(f"autoquant: error: storage {url}: "), err
    assert "readonly database" in lines[0] or "unable to open database file" in lines[0]


def test_a_read_only_runs_folder_stops_with_one_line(
    finished: Path,
    tmp_path: Path,
    read_only: Callable[[Path], None],
    capsys: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    read_only(runs)
    if _writable(runs):
        pytest.skip(f"chmod does not stop writes here (euid {os.geteuid()}: root?)")
    monkeypatch.setenv("AUTOQUANT_RUNS", str(runs))
    assert main(["search", str(finished / "study.toml")]) == 3
    err = capsys.readouterr().err
    assert _error_lines(err) == [
        f"autoquant: error: cannot create the study folder {runs / 'ro'}: Permission denied; "
        "completed trials are kept, rerun to resume"
    ], err


def test_a_write_whose_answer_was_lost_is_not_done_twice(caplog: pytest.LogCaptureFixture) -> None:
    """The connection drops after the commit of a tell: the retry finds the trial already
    COMPLETE, which is success, not an UpdateFinishedTrialError."""
    caplog.set_level(logging.INFO, logger="autoquant")
    dropped = {"n": 0}

    def drop_after_first_tell(name: str, call: Callable[[], Any]) -> Any:
        result = call()  # committed ...
        if name == "set_trial_state_values" and not dropped["n"]:
            dropped["n"] += 1  # ... but the answer never arrives
            raise ConnectionResetError(errno.ECONNRESET, "server closed the connection")
        return result

    inner = GuardedStorage(optuna.storages.InMemoryStorage(), drop_after_first_tell)
    guard = StorageGuard("sqlite:///x", 30, backoff_s=(0.01, 0.02))
    study = optuna.create_study(storage=GuardedStorage(inner, guard))
    trial = study.ask()
    frozen = study.tell(trial, 1.0)
    assert frozen.state == TrialState.COMPLETE and dropped["n"] == 1
    assert study.trials[0].state == TrialState.COMPLETE and study.trials[0].value == 1.0
    assert "database back after" in caplog.text


def test_a_runs_folder_that_cannot_be_made_stops_with_one_line(
    finished: Path, tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = tmp_path / "runs"
    runs.write_text("a file where the folder should be")  # fails for root too
    monkeypatch.setenv("AUTOQUANT_RUNS", str(runs))
    assert main(["search", str(finished / "study.toml")]) == 3
    assert _error_lines(capsys.readouterr().err) == [
        f"autoquant: error: cannot create the study folder {runs / 'ro'}: Not a directory; "
        "completed trials are kept, rerun to resume"
    ]
