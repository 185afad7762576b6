"""Faults and bad input lose nothing: bad study files, unreachable storage, failing task code,
out of memory, Ctrl-C."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from autoquant.cli import main
from autoquant.search import (
    SearchContext,
    StorageError,
    StudyFileError,
    load_study_spec,
    open_storage,
    read_record,
    run_search,
    study_spec_from_dict,
)

ROOT = Path(__file__).resolve().parents[2]

# -- bad study files: every error names the file, the key and the allowed values ---------

T = "[task]\nname='digits-cnn'\n"
BAD_FILES = [
    # unknown keys, in every table
    (T + "[space]\nw_bitz=[4]", ["[space]", "unknown space key(s) ['w_bitz']", "w_bits"]),
    (T + "[qat]\nstepz=3", ["unknown key(s) ['stepz'] in [qat]", "allowed keys:", "steps"]),
    (T + "[latency]\nrepeat=3", ["unknown key(s) ['repeat'] in [latency]", "repeats"]),
    (T + "[constraint]\nmax_drop=0.1", ["['max_drop'] in [constraint]", "max_accuracy_drop"]),
    (T + "[objectives]\nuse2=['size']", ["['use2'] in [objectives]", "allowed keys: use"]),
    (
        "[task]\nname='digits-cnn'\nbogus=1",
        ["unknown key(s) ['bogus'] in [task]", "allowed keys: name, options"],
    ),
    # wrong types
    (T + "[study]\nseed=1.5", ["study.seed = 1.5 is float", "expected an integer"]),
    (T + "[study]\nstorage=42", ["study.storage = 42 is int", "expected a string"]),
    (T + "[latency]\nbatch_sizes=4", ["latency.batch_sizes = 4 is int", "expected a list"]),
    (T + "[latency]\nbatch_sizes=['1']", ["latency.batch_sizes[] = '1' is str"]),
    (T + "[qat]\nsteps=true", ["qat.steps = True is bool", "expected an integer"]),
    (T + "[qat]\nlr='fast'", ["qat.lr = 'fast' is str", "expected a number"]),
    ("task='digits-cnn'", ["[task] = 'digits-cnn' is str", "expected a table"]),
    (T + "[constraint]\nmax_accuracy_drop='1%'", ["max_accuracy_drop = '1%' is str"]),
    # bits outside 2-8 or the float formats
    (T + "[space]\nw_bits=[9]", ["space.w_bits has 9", "allowed values: 2, 3, 4", "'fp32'"]),
    (T + "[space]\na_bits=['fp8']", ["space.a_bits has 'fp8'", "'fp16', 'fp32'"]),
    (T + "[space]\nw_bits=['int4']", ["space.w_bits has 'int4'", "allowed values"]),
    (T + "[space]\noverrides={'fc*'={w_bits=[12]}}", ["space.w_bits has 12", "allowed values"]),
    (T + "[space]\nw_gran=['per_row']", ["'per_row'", "'per_tensor', 'per_channel'"]),
    (T + "[space]\na_calib=['max']", ["'max'", "'minmax', 'moving_average', 'percentile'"]),
    # an empty space
    (T + "[space]\na_bits=[]", ["space.a_bits is empty", "at least one choice"]),
    (T + "[space]\ninclude=[]", ["space.include is empty", "'*'"]),
    # accuracy constraint outside [0, 1]
    (T + "[constraint]\nmax_accuracy_drop=1.0001", ["1.0001 is outside [0, 1]", "fraction"]),
    (T + "[constraint]\nmax_accuracy_drop=-0.01", ["-0.01 is outside [0, 1]"]),
    # other values
    (T + "[study]\ndevice='tpu'", ["study.device = 'tpu' is not allowed", "'cpu', 'cuda'"]),
    (T + "[study]\ntrials=0", ["study.trials = 0 must be >= 1"]),
    (T + "[study]\nname='a b'", ["study.name = 'a b'", "letters, digits"]),
    (T + "[latency]\nthreads=0", ["latency.threads = 0 must be > 0"]),
    (T + "[objectives]\nuse=['accuracy','energy']", ["'energy' is not allowed", "'latency'"]),
]


# Cases written without the shared prefix.
BAD_FILES += [
    # (toml snippet appended or replacing, expected message parts)
    (
        "[study]\nname='t'\ntrails=3\n[task]\nname='x'",
        ["unknown key(s) ['trails'] in [study]", "allowed keys: device, name"],
    ),
    (
        "[study]\ntrials='many'\n[task]\nname='x'",
        ["study.trials = 'many' is str", "expected an integer"],
    ),
    (
        "[study]\nsampler='cma'\n[task]\nname='x'",
        ["study.sampler = 'cma' is not allowed", "'tpe', 'nsga2', 'gp', 'random'"],
    ),
    (
        "[task]\nname='x'\n[space]\nw_bits=[1, 8]",
        ["[space]", "space.w_bits has 1", "allowed values: 2, 3"],
    ),
    ("[task]\nname='x'\n[space]\na_bits=[16]", ["space.a_bits has 16", "'fp16', 'fp32'"]),
    ("[task]\nname='x'\n[space]\nw_bits=[]", ["space.w_bits is empty"]),
    (
        "[task]\nname='x'\n[constraint]\nmax_accuracy_drop=1.5",
        ["constraint.max_accuracy_drop = 1.5 is outside [0, 1]"],
    ),
    ("[task]\nname='x'\n[constraint]\nmax_accuracy_drop=-0.1", ["outside [0, 1]"]),
    ("[task]\nname='x'\n[qat]\nsteps='ten'", ["qat.steps = 'ten' is str"]),
    (
        "[task]\nname='x'\n[qat]\noptimizer='lion'",
        ["qat.optimizer = 'lion' is not allowed", "'sgd', 'adam'"],
    ),
    (
        "[task]\nname='x'\n[latency]\nbackend='tensorrt'",
        ["latency.backend = 'tensorrt'", "'onnxruntime', 'torch-x86'"],
    ),
    ("[task]\nname='x'\n[objectives]\nuse=['size']", ["objectives.use"]),
    ("[study]\nname='t'", ["missing [task]"]),
    ("[task]\nname='x'\n[bogus]\na=1", ["unknown key(s) ['bogus'] in the top level"]),
    ("[task\nname='x'", ["not valid TOML"]),
]


@pytest.mark.parametrize(("text", "parts"), BAD_FILES, ids=[b[1][0][:40] for b in BAD_FILES])
def test_bad_study_file_names_file_key_and_allowed_values(
    tmp_path: Path, text: str, parts: list[str]
) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(StudyFileError) as info:
        load_study_spec(f)
    msg = str(info.value)
    assert msg.startswith(f"{f}: ")
    for part in parts:
        assert part in msg, msg


GOOD = """
[study]
name = "faults"
trials = 2
[task]
name = "{task}"
[space]
w_bits = [4, 8]
{space}
[qat]
steps = 5
calib_batches = 1
[latency]
warmup = 2
repeats = 5
budget_s = 0.1
"""


@pytest.mark.parametrize(
    ("task", "space", "parts"),
    [
        ("digits-cnn", "include = ['nope*']", ["space.include pattern 'nope*' matches no layer"]),
        ("digits-cnn", "exclude = ['*']", ["the search space is empty", "layers: features."]),
        ("digits-cnn", "tie = {g = ['fc9*']}", ["space.tie.g pattern 'fc9*' matches no layer"]),
        ("no-such-task", "", ["task.name = 'no-such-task'", "digits-cnn"]),
    ],
)
def test_space_and_task_errors_at_search_start_name_the_file(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    task: str,
    space: str,
    parts: list[str],
) -> None:
    monkeypatch.setenv("AUTOQUANT_RUNS", str(tmp_path))
    f = tmp_path / "study.toml"
    f.write_text(GOOD.format(task=task, space=space))
    load_study_spec(f)  # valid as a file: the layers are only known when the search starts
    assert main(["search", str(f), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"autoquant: error: {f}: "), err
    for part in parts:
        assert part in err, err


# -- storage that cannot be reached --------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "secrets"),
    [
        ("postgresql://u:secret@127.0.0.1:1/db", ["secret"]),
        ("postgresql://u:s%40cr3t@127.0.0.1:1/db", ["s%40cr3t", "s@cr3t"]),
        ("mysql://u:secret@127.0.0.1:1/db", ["secret"]),
    ],
)
def test_unreachable_storage_is_a_clear_error_without_the_password(
    url: str, secrets: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(StorageError) as info:
        open_storage(url)
    msg = str(info.value)
    assert msg.startswith(f"cannot open storage {url.split(':', 2)[0]}://u:***@127.0.0.1:1/db")
    assert info.value.__cause__ is None and info.value.__suppress_context__
    for secret in secrets:
        assert secret not in msg
        assert secret not in caplog.text


@pytest.mark.slow
def test_worker_with_unreachable_postgres_exits_cleanly_without_the_password(
    tmp_path: Path,
) -> None:
    f = tmp_path / "study.toml"
    f.write_text(GOOD.format(task="digits-cnn", space=""))
    url = "postgresql://u:secret@127.0.0.1:1/db"
    out = subprocess.run(
        [sys.executable, "-m", "autoquant.cli", "-v", "worker", str(f), "--storage", url, "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "AUTOQUANT_RUNS": str(tmp_path)},
    )
    assert out.returncode == 2, out.stderr
    assert "cannot open storage postgresql://u:***@127.0.0.1:1/db" in out.stderr
    assert "Traceback" not in out.stderr
    assert "secret" not in out.stdout + out.stderr


# -- failing trials: the reason is recorded and the study goes on ---------------------------

SPEC = {
    "study": {"name": "faults", "trials": 2, "seed": 0},
    "task": {"name": "digits-cnn"},
    "space": {"w_bits": [2, 4, 8], "a_bits": [4, 8], "a_calib": ["minmax", "mse"]},
    "qat": {"steps": 5, "calib_batches": 1},
    "latency": {"warmup": 2, "repeats": 5, "budget_s": 0.1},
    # No pre-pass: it calls the task's loss too, and this test counts the QAT's calls.
    "strategy": {"sensitivity": "off"},
}


@pytest.mark.slow
def test_task_error_and_out_of_memory_fail_one_trial_each_and_the_study_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTOQUANT_RUNS", str(tmp_path))
    spec = study_spec_from_dict(SPEC, "faults.toml")
    ctx = SearchContext(spec)
    real_loss = ctx.task.loss_fn
    calls = {"n": 0}
    steps = spec.qat.steps

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # The first QAT step of trials 1, 2 and 3 fails; trials 0 and 4 run normally.
        calls["n"] += 1
        if calls["n"] == steps + 1:
            raise ValueError("label 11 is outside the 10 classes")
        if calls["n"] == steps + 2:
            torch.empty(2**62, dtype=torch.uint8)  # a real allocation failure (2^62 bytes)
        if calls["n"] == steps + 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_loss(out, y)

    ctx.task = replace(ctx.task, loss_fn=loss_fn)
    study = run_search(spec, ctx=ctx, progress=False)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] + [TrialState.FAIL] * 3 + [
        TrialState.COMPLETE
    ]
    reasons = [read_record(t).fail_reason for t in trials[1:4]]
    assert reasons[0] == "ValueError: label 11 is outside the 10 classes"
    assert reasons[1].startswith("out of memory: RuntimeError:") and "allocate" in reasons[1]
    assert reasons[2] == "out of memory: OutOfMemoryError: CUDA out of memory. Tried to " + (
        "allocate 20.00 GiB"
    )
    for t in trials[1:4]:
        assert "loss_fn" in read_record(t).traceback


def _start_search(path: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "autoquant.cli", "search", str(path), "--threads", "1", "-q"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # A shell without job control starts background jobs with SIGINT ignored, and
        # children inherit that: give the search Ctrl-C back.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


@pytest.mark.slow
def test_ctrl_c_fails_the_trial_in_flight_and_a_rerun_resumes(tmp_path: Path) -> None:
    f = tmp_path / "sigint.toml"
    f.write_text(
        GOOD.format(task="digits-cnn", space="a_bits = [4, 8]")
        .replace("trials = 2", "trials = 4")
        .replace("steps = 5", "steps = 400")  # ~2 s trials: time to interrupt one
        + "[strategy]\nprune = false\n"  # every trial completes: 4 complete after the rerun
    )
    env = {**os.environ, "AUTOQUANT_RUNS": str(tmp_path), "OMP_NUM_THREADS": "1"}
    url = f"sqlite:///{tmp_path / 'faults' / 'study.db'}"
    proc = _start_search(f, env)
    deadline = time.monotonic() + 120
    interrupted = None
    try:
        while interrupted is None:
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "no second trial started"
            time.sleep(0.1)
            try:
                study = optuna.load_study(study_name="faults", storage=url)
                trials = study.get_trials(deepcopy=False)
            except Exception:  # not created yet
                continue
            running = [
                t
                for t in trials
                if t.state == TrialState.RUNNING and read_record(t).worker is not None
            ]
            if running and any(t.state == TrialState.COMPLETE for t in trials):
                interrupted = running[0].number
                proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, output
    assert "interrupted; completed trials are kept" in output

    before = optuna.load_study(study_name="faults", storage=url).get_trials()
    assert before[interrupted].state == TrialState.FAIL, output
    assert read_record(before[interrupted]).fail_reason == "interrupted (Ctrl-C)"
    assert not [t for t in before if t.state == TrialState.RUNNING]
    kept = {t.number: t.values for t in before if t.state == TrialState.COMPLETE}
    assert kept

    rerun = _start_search(f, env)
    output = rerun.communicate(timeout=180)[0]
    assert rerun.returncode == 0, output
    after = optuna.load_study(study_name="faults", storage=url).get_trials()
    assert sum(t.state == TrialState.COMPLETE for t in after) == 4
    assert {t.number: t.values for t in after if t.number in kept} == kept
    assert read_record(after[interrupted]).fail_reason == "interrupted (Ctrl-C)"


# -- corrupted caches -----------------------------------------------------------------------


@pytest.mark.parametrize("junk", ["{not json", '["a list"]', "\x00\x01"])
def test_corrupted_latency_json_store_is_discarded_and_rebuilt(tmp_path: Path, junk: str) -> None:
    from autoquant.measure import JsonFileStore

    path = tmp_path / "latency.json"
    path.write_text(junk)
    store = JsonFileStore(path)
    with pytest.warns(UserWarning, match="latency.json"):
        assert store.get("k") is None
    store.set("k", {"median_ms": 1.0})
    assert JsonFileStore(path).get("k") == {"median_ms": 1.0}
