"""Liveness of workers: heartbeat settings, lost trials failed with a reason, and their retries.

A worker records its running trial's heartbeat every ``AUTOQUANT_HEARTBEAT_S`` seconds (the
worker loop, :mod:`autoquant.search._worker`). A running trial is *lost*, failed with the
``fail_reason`` "worker lost: ..." and queued again (up to :data:`MAX_RETRY` times) by
whichever worker notices first (:func:`fail_lost_trials`), when

* its worker's process is gone and ran on this machine: the trial records the host, pid,
  process start time, boot id and pid namespace of its worker (:func:`this_process`), so a
  worker on the same machine tells a ``kill -9``'ed or crashed worker at once (pid gone, or
  reused by a process that started at another time; :func:`process_gone`); or
* it has had no heartbeat for ``AUTOQUANT_GRACE_S`` seconds (workers on other machines).

The retry keeps the plan and the ``baseline`` mark and records ``retry_of``.

**Outages.** While the database is down no worker can beat. A worker that saw the database
unreachable does not declare anyone lost by heartbeat (trials or claims) until the database
has been back for ``max(AUTOQUANT_GRACE_S, 10 s + 2 heartbeats)``: by then every live
worker, retrying at most every 10 s, has beaten again (:func:`settling`; asked after the
stale-trial query, which may itself have waited out the outage). A process that is known to
be gone is failed at once, outage or not.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from collections.abc import Mapping
from datetime import datetime
from functools import cache
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from . import _optuna_compat as compat
from ._record import (
    WORKER_LOST,
    AttrWriter,
    TrialRecord,
    read_record,
    record_attrs,
    retry_record,
    write_record,
)

log = logging.getLogger("autoquant")

HEARTBEAT_S = 10.0  # default of AUTOQUANT_HEARTBEAT_S: how often a worker proves it is alive
GRACE_S = 60.0  # default of AUTOQUANT_GRACE_S: a trial silent this long is failed and retried
CLAIM_TIMEOUT_S = 600.0  # default of AUTOQUANT_CLAIM_TIMEOUT_S: longest wait for another worker
MAX_RETRY = 2  # times a trial whose worker was lost is queued again


def env_seconds(name: str, default: float, *, allow_zero: bool = False) -> float:
    """A duration from the environment variable ``name`` (> 0, or >= 0), else ``default``.

    Raises:
        ValueError: not a finite number in range; the message names the variable.
    """
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and (value >= 0 if allow_zero else value > 0)):
        allowed = "a number of seconds >= 0 (0: off)" if allow_zero else "a number of seconds > 0"
        raise ValueError(f"{name}={raw!r} is not allowed; allowed values: {allowed}")
    return value


def heartbeat_s() -> float:
    """Seconds between heartbeats: ``AUTOQUANT_HEARTBEAT_S`` (default 10)."""
    return env_seconds("AUTOQUANT_HEARTBEAT_S", HEARTBEAT_S)


def grace_s() -> float:
    """Seconds without a heartbeat before a trial counts as lost: ``AUTOQUANT_GRACE_S`` (60).

    Raises:
        ValueError: it is less than 2 × ``AUTOQUANT_HEARTBEAT_S``: one late beat would fail a
            healthy trial as "worker lost".
    """
    grace, beat = env_seconds("AUTOQUANT_GRACE_S", GRACE_S), heartbeat_s()
    if grace < 2 * beat:
        raise ValueError(
            f"AUTOQUANT_GRACE_S={grace:g} is not allowed with AUTOQUANT_HEARTBEAT_S={beat:g}; "
            f"allowed values: >= 2 x AUTOQUANT_HEARTBEAT_S = {2 * beat:g} seconds (a healthy "
            "trial must be able to miss one heartbeat)"
        )
    return grace


def claim_timeout_s() -> float:
    """Longest wait for another worker's result: ``AUTOQUANT_CLAIM_TIMEOUT_S`` (600)."""
    return env_seconds("AUTOQUANT_CLAIM_TIMEOUT_S", CLAIM_TIMEOUT_S)


# -- which process runs a trial or holds a claim ----------------------------------------------


@cache
def _machine() -> tuple[str | None, str | None]:
    """This machine's boot id and this process's pid namespace (Linux; None elsewhere)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot: str | None = f.read().strip()
        pidns: str | None = os.readlink("/proc/self/ns/pid")
    except OSError:
        boot = pidns = None
    return boot, pidns


def _stat(pid: int) -> tuple[str, int] | None:
    """State and start time (clock ticks after boot) of ``pid``; None when there is none."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the name may hold spaces and ')'
        return fields[0], int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def this_process() -> dict[str, Any]:
    """Who runs a trial or holds a claim: host, pid, start time, boot id, pid namespace.

    Example:
        >>> p = this_process()
        >>> p["pid"] == os.getpid(), process_gone(p)
        (True, False)
    """
    boot, pidns = _machine()
    stat = _stat(os.getpid())
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "start": stat[1] if stat else None,
        "boot": boot,
        "pidns": pidns,
    }


def process_gone(process: Mapping[str, Any] | None) -> bool:
    """True when ``process`` ran on this machine, in this pid namespace, since its last boot,
    and no longer runs: its pid is free, a zombie, or taken by a process with another start
    time. False whenever that cannot be told (another machine, no ``/proc``): such workers
    are judged by their heartbeats.

    Example:
        >>> gone = {**this_process(), "pid": 2**22 + 1}  # above Linux's highest pid
        >>> process_gone(gone), process_gone({**this_process(), "host": "elsewhere"})
        (True, False)
    """
    if not process:
        return False
    me = this_process()
    if me["boot"] is None or me["start"] is None:
        return False
    if any(process.get(k) != me[k] for k in ("host", "boot", "pidns")):
        return False
    pid = process.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's live process
        pass
    stat = _stat(pid)
    if stat is None:  # exists, but /proc hides it (hidepid): cannot tell
        return False
    state, start = stat
    return state in ("Z", "X") or start != process.get("start")


def mark_owner(trial: AttrWriter) -> None:
    """Record on a trial this process's identity (see :func:`this_process`), right after
    ``study.ask()``: a rerun on this machine fails it at once if this process dies."""
    write_record(trial, TrialRecord(worker_process=this_process()))


# -- lost trials -------------------------------------------------------------------------------


def settling(storage: optuna.storages.BaseStorage) -> bool:
    """Whether heartbeats cannot be trusted yet: the storage is down, or came back less than
    ``max(AUTOQUANT_GRACE_S, longest retry wait + 2 heartbeats)`` ago (module docstring)."""
    guard = compat.storage_guard(storage)
    if guard is None:
        return False
    return bool(guard.quiet(max(grace_s(), guard.backoff_s[1] + 2 * heartbeat_s())))


def _retry_attrs(lost: FrozenTrial) -> dict[str, object]:
    return record_attrs(retry_record(read_record(lost), lost.number))


def retry_lost_trial(max_retry: int | None = MAX_RETRY) -> compat.RetryStaleTrial:
    """The storage's callback for a lost trial: queue it again, minus the lost run's outcome."""
    return compat.RetryStaleTrial(max_retry, _retry_attrs)


def queue_retry(study: optuna.Study, trial: FrozenTrial | optuna.Trial) -> None:
    """Queue a failed trial again, as a lost one is (same plan, ``retry_of``, same limit)."""
    compat.retry_stale_trial(study, compat.stored_trial(study, trial))


def _gone_reason(process: Mapping[str, Any]) -> str:
    return (
        f"{WORKER_LOST}: its process (pid {process.get('pid')} on {process.get('host')}) is "
        f"gone (killed or crashed); queued again up to {MAX_RETRY} times"
    )


def _lost(study: optuna.Study, *, dead_only: bool) -> dict[int, tuple[FrozenTrial, str]]:
    """The running trials that are lost, with the reason of each."""
    lost: dict[int, tuple[FrozenTrial, str]] = {}
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in running:
        process = read_record(t).worker_process
        if process_gone(process):
            assert process is not None
            lost[t.number] = (t, _gone_reason(process))
    if dead_only:
        return lost
    stale = compat.stale_trials(study)
    # Checked after the query: one that waited out an outage sees everyone stale.
    if settling(compat.storage_of(study)):
        return lost
    grace = grace_s()
    reason = (
        f"{WORKER_LOST}: no heartbeat for {grace:g} s (worker killed, crashed or "
        f"disconnected); queued again up to {MAX_RETRY} times"
    )
    for t in stale:
        lost.setdefault(t.number, (t, reason))
    now = datetime.now()
    for t in running:
        started = t.datetime_start
        record = read_record(t)
        if (
            record.worker is None
            and record.worker_process is None
            and started
            and (now - started).total_seconds() > max(5 * grace, 300)
        ):
            lost.setdefault(t.number, (t, reason))
    return lost


def fail_lost_trials(study: optuna.Study, *, dead_only: bool = False) -> list[int]:
    """Fail lost running trials (module docstring), with a reason, and queue their retries.

    Like :func:`optuna.storages.fail_stale_trials` (same stale test, same retry callback),
    but it records the ``fail_reason`` first. Trials created but never marked by a worker (a
    worker killed between creating a trial and writing to it) count as lost after 5 grace
    periods.

    Args:
        dead_only: only the trials of processes known to be gone (no heartbeat test).

    Returns:
        The numbers of the trials failed here.
    """
    if not compat.beats_enabled(study):
        return []
    lost = _lost(study, dead_only=dead_only)
    failed = []
    for number in sorted(lost):
        trial, reason = lost[number]
        try:
            write_record(compat.TrialAttrWriter(study, trial), TrialRecord(fail_reason=reason))
            if compat.set_failed(study, trial):
                failed.append((trial, reason))
        except UpdateFinishedTrialError:  # finished meanwhile, or failed by another worker
            continue
    for trial, reason in failed:
        if not dead_only:
            log.warning("trial %d: %s", trial.number, reason)
        compat.retry_stale_trial(study, trial)
    return [t.number for t, _ in failed]


def reap_dead_workers(study: optuna.Study, claims: Any) -> tuple[list[int], list[str]]:
    """At a worker's start: fail the running trials and release the claims of workers that
    ran on this machine and are gone, at once, and say so in one line.

    Workers on other machines, or whose process cannot be checked, are left to the heartbeat
    grace period.

    Args:
        claims: the worker's :class:`~autoquant.search._locks.Claims`.

    Returns:
        The numbers of the trials failed and the keys of the claims released.
    """
    trials = fail_lost_trials(study, dead_only=True)
    released = claims.release_dead()
    if trials or released:
        parts = []
        if trials:
            parts.append(
                f"failed trial(s) {', '.join(map(str, trials))} as worker lost (queued again)"
            )
        if released:
            parts.append(f"released claim(s) {', '.join(released)}")
        log.warning(
            "resuming: %s of worker(s) on this machine whose process is gone", " and ".join(parts)
        )
    return trials, released
