"""Work shared by parallel workers through the study's storage: heartbeats and atomic claims.

A *claim* is a marker study named ``<study>:claim:<key>``. Creating a study is atomic in every
Optuna storage (the name is unique: in an RDB a unique constraint, so of two workers racing,
one gets :class:`optuna.exceptions.DuplicatedStudyError`), so exactly one worker holds a claim.
The holder computes the claimed value (a latency measurement, the float baseline), stores it
in the study's user attributes and deletes the marker. The others poll for the value. A holder
refreshes a ``beat`` attribute of its marker every heartbeat; a claim whose beat has not
changed for the grace period (timed on the waiter's own clock, so machines' clocks may differ)
belongs to a dead worker and is taken over. The marker also records the holder's process
(:func:`~autoquant.search._liveness.this_process`): a holder on the same machine whose process
is gone is taken over at once, and no waiter says it waits for a worker known to be dead.
While the database is down or has just come back, no claim is taken over for a missing beat
(see :func:`~autoquant.search._liveness.settling`).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import optuna
from optuna.exceptions import DuplicatedStudyError
from optuna.study import StudyDirection

from ._liveness import process_gone, settling, this_process
from ._optuna_compat import find_study, study_user_attrs
from ._optuna_compat import storage_of as storage_of  # for the examples below
from ._signals import InfrastructureError

log = logging.getLogger("autoquant")


class Beater:
    """A daemon thread that calls registered functions every ``interval_s`` seconds.

    One per worker: it records the running trial's heartbeat and refreshes held claims.

    Example:
        >>> beats = []
        >>> b = Beater(0.01)
        >>> b.add("x", lambda: beats.append(1))  # called once at once, then periodically
        >>> b.close(); len(beats) >= 1
        True
    """

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._jobs: dict[str, Callable[[], None]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, name: str, beat: Callable[[], None]) -> None:
        """Call ``beat`` now (errors propagate) and then every interval until :meth:`remove`."""
        beat()
        with self._lock:
            self._jobs[name] = beat
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(
                    target=self._run, name="autoquant-heartbeat", daemon=True
                )
                self._thread.start()

    def remove(self, name: str) -> None:
        with self._lock:
            self._jobs.pop(name, None)

    def close(self) -> None:
        """Stop the thread (a daemon: a stuck storage call cannot block the exit)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + 5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                jobs = list(self._jobs.items())
            for name, beat in jobs:
                try:
                    beat()
                except (Exception, InfrastructureError) as e:  # retried at the next interval
                    log.debug("heartbeat %s failed: %s", name, e)


class Claims:
    """Atomic claims on named pieces of work, held through the study's storage.

    Args:
        storage: the study's Optuna storage (``storage_of(study)``).
        study_name: prefix of the marker studies.
        beater: refreshes the markers of held claims.
        grace_s: a claim whose beat does not change for this long is taken over.
        timeout_s: a waiter gives up after this long and computes the value itself.
        poll_s: how often waiters look for the value.

    Example:
        >>> storage = optuna.storages.InMemoryStorage()
        >>> a, b = (Claims(storage, "s", beater=Beater(1.0)) for _ in range(2))
        >>> a.try_claim("k"), b.try_claim("k")
        (True, False)
        >>> a.release("k"); b.try_claim("k")
        True
    """

    def __init__(
        self,
        storage: optuna.storages.BaseStorage,
        study_name: str,
        *,
        beater: Beater,
        grace_s: float = 60.0,
        timeout_s: float = 600.0,
        poll_s: float = 0.2,
    ) -> None:
        self.storage = storage
        self.study_name = study_name
        self.beater = beater
        self.grace_s = grace_s
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self._held: dict[str, int] = {}  # key -> marker study id
        self._lock = threading.Lock()
        self.claimed = 0  # claims this worker won (for tests and logs)
        self.waited = 0  # values this worker got from another worker's claim

    def marker_name(self, key: str) -> str:
        return f"{self.study_name}:claim:{key}"

    def try_claim(self, key: str) -> bool:
        """Claim ``key``; False when another worker holds it."""
        try:
            sid = self.storage.create_new_study([StudyDirection.MINIMIZE], self.marker_name(key))
        except (DuplicatedStudyError, KeyError):  # KeyError: taken over before we read its id
            return False
        with self._lock:
            self._held[key] = sid
            first = len(self._held) == 1
        try:
            # The process first: a holder killed after it is known gone at once by a rerun
            # on this machine (process_gone); "owner" only names it in messages.
            self.storage.set_study_user_attr(sid, "process", this_process())
            self.storage.set_study_user_attr(sid, "owner", self.owner)
        except KeyError:  # taken over already: treat it as lost
            with self._lock:
                self._held.pop(key, None)
            return False
        if first:
            self.beater.add(f"claims:{id(self)}", self._beat)
        self.claimed += 1
        return True

    def release(self, key: str) -> None:
        """Delete the marker of a held claim (no-op when not held).

        With the storage gone for good the marker stays: another worker takes it over after
        the grace period, a rerun on this machine at once. Said in a log line, not raised, so
        that cleanup after Ctrl-C or an earlier storage failure ends as that failure.
        """
        with self._lock:
            sid = self._held.pop(key, None)
            empty = not self._held
        if sid is not None:
            try:
                self.storage.delete_study(sid)
            except KeyError:  # already taken over and deleted
                pass
            except InfrastructureError as e:
                log.warning("claim %s not released (%s); it is taken over later", key, e)
        if empty:
            self.beater.remove(f"claims:{id(self)}")

    def release_dead(self) -> list[str]:
        """Delete the claims of this study held by gone processes of this machine.

        Returns:
            The keys released.
        """
        prefix = self.marker_name("")
        released = []
        for study in self.storage.get_all_studies():
            name = study.study_name
            if not name.startswith(prefix) or not process_gone(study.user_attrs.get("process")):
                continue
            try:
                self.storage.delete_study(find_study(self.storage, name))
            except KeyError:  # released or taken over meanwhile
                continue
            released.append(name.removeprefix(prefix))
        return released

    def release_all(self) -> None:
        for key in list(self._held):
            self.release(key)

    def held(self) -> list[str]:
        with self._lock:
            return sorted(self._held)

    def _beat(self) -> None:
        with self._lock:
            held = list(self._held.values())
        for sid in held:
            try:
                self.storage.set_study_user_attr(sid, "beat", time.time())
            except KeyError:
                pass

    def _marker(self, key: str) -> tuple[tuple[int, Any], Any] | None:
        """The marker's (id, beat), and its holder's process; None when there is none."""
        try:
            sid = find_study(self.storage, self.marker_name(key))
            attrs = self.storage.get_study_user_attrs(sid)
        except KeyError:
            return None
        return (sid, attrs.get("beat")), attrs.get("process")

    def _take_over(self, key: str, sid: int, why: str) -> None:
        log.warning("the worker computing %s %s; taking over", key, why)
        try:  # by id: a fresh claim made by a faster waiter has another id
            self.storage.delete_study(sid)
        except KeyError:
            pass

    def obtain(self, key: str, lookup: Callable[[], Any]) -> Any:
        """The value of ``lookup()``, waiting while another worker computes it.

        Returns ``None`` when this worker must compute the value: it then holds the claim on
        ``key`` (it stores the value, then calls :meth:`release`), or the holder looked dead
        for the grace period, or waiting took longer than ``timeout_s``.
        """
        seen: tuple[int, Any] | None = None
        seen_at = start = time.monotonic()
        logged = False
        while True:
            value = lookup()
            if value is not None:
                if logged:
                    self.waited += 1
                return value
            if self.try_claim(key):
                value = lookup()  # stored and released between our lookup and our claim
                if value is not None:
                    self.release(key)
                    return value
                return None
            found = self._marker(key)
            if found is None:  # released just now: look again
                continue
            marker, process = found
            if process_gone(process):
                pid = process.get("pid")
                self._take_over(key, marker[0], f"(pid {pid} on this machine) is gone")
                continue
            now = time.monotonic()
            if not logged:
                log.info("waiting for another worker to compute %s", key)
                logged = True
            if marker != seen or settling(self.storage):
                seen, seen_at = marker, now  # after an outage, the grace period starts anew
            elif now - seen_at > self.grace_s:
                self._take_over(key, marker[0], f"stopped beating for {self.grace_s:.0f} s")
                continue
            if now - start > self.timeout_s:
                log.warning("gave up waiting %.0f s for %s; computing it here", self.timeout_s, key)
                return None
            time.sleep(self.poll_s)


class OptunaAttrStore:
    """A key-value store in the study's user attributes, shared by every worker.

    Used for the latency cache so that resumed and parallel workers reuse measurements.

    Example:
        >>> store = OptunaAttrStore(optuna.create_study())
        >>> store.set("k", {"median_ms": 1.0}); store.get("k")
        {'median_ms': 1.0}
    """

    prefix = "latency:"

    def __init__(self, study: optuna.Study) -> None:
        self.study = study

    def get(self, key: str) -> Any:
        return study_user_attrs(self.study).get(self.prefix + key)

    def set(self, key: str, value: Any) -> None:
        self.study.set_user_attr(self.prefix + key, value)


class ClaimingAttrStore(OptunaAttrStore):
    """An :class:`OptunaAttrStore` where a missing value is claimed, so it is measured once.

    ``get`` of a missing key either claims the key and returns ``None`` (this worker measures,
    and ``set`` stores the value and releases the claim) or waits for the worker that holds
    the claim. This is how :class:`~autoquant.measure.LatencyCache` is used by
    :func:`~autoquant.measure.measure_latency`: ``get``, and ``set`` after a miss.

    Example:
        >>> study = optuna.create_study()
        >>> store = ClaimingAttrStore(study, Claims(storage_of(study), "s", beater=Beater(1.0)))
        >>> store.get("k") is None  # claimed: this worker measures
        True
        >>> store.set("k", {"median_ms": 1.0}); store.get("k")
        {'median_ms': 1.0}
    """

    def __init__(self, study: optuna.Study, claims: Claims) -> None:
        super().__init__(study)
        self.claims = claims

    def get(self, key: str) -> Any:
        return self.claims.obtain(self.prefix + key, lambda: OptunaAttrStore.get(self, key))

    def set(self, key: str, value: Any) -> None:
        super().set(key, value)
        self.claims.release(self.prefix + key)
