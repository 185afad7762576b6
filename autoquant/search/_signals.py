"""What stops a search: Ctrl-C, SIGTERM, and a storage that is gone (:class:`InfrastructureError`).

The trial in flight fails as "interrupted (...)" or "infrastructure: ..." and the search
stops; a rerun resumes. An interrupted baseline trial is queued again; a trial stopped by the
infrastructure is retried. Neither counts towards the failure limit.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from ._record import INFRASTRUCTURE, INTERRUPTED

_stopping = threading.Event()  # set by Ctrl-C / SIGTERM: storage calls stop retrying


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: the trial in flight fails as interrupted."""


class InfrastructureError(BaseException):
    """The study's storage failed for good: an outage longer than ``AUTOQUANT_DB_OUTAGE_S``,
    or a write that cannot succeed (disk full, read-only file or folder).

    The message is one line that names the storage (password masked) and the cause. It
    derives from :class:`BaseException`, like :class:`KeyboardInterrupt`, so that no
    ``except Exception`` (in task code, or around a trial) turns it into a trial failure
    that counts; the command exits with code 3.

    Example:
        >>> str(InfrastructureError("storage sqlite:///s.db: cannot write: disk is full"))
        'storage sqlite:///s.db: cannot write: disk is full'
    """


def stopping() -> bool:
    """Whether Ctrl-C or SIGTERM arrived: cleanup calls are then tried once, not retried."""
    return _stopping.is_set()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` (a KeyboardInterrupt) in the main thread; both it
    and Ctrl-C also set :func:`stopping`, so a storage outage cannot delay the exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum: int, frame: object) -> None:
        _stopping.set()
        raise Terminated("SIGTERM")

    def on_int(signum: int, frame: object) -> None:
        _stopping.set()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    previous_int = signal.getsignal(signal.SIGINT)
    if previous_int is signal.default_int_handler:  # leave a caller's own handler alone
        signal.signal(signal.SIGINT, on_int)
    _stopping.clear()
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        if previous_int is signal.default_int_handler:
            signal.signal(signal.SIGINT, previous_int)
        # stopping() stays set: the caller's cleanup after the interrupt must not wait either.


def abandon_reason(e: BaseException) -> str:
    """The ``fail_reason`` of a trial left by ``e``: an interrupt, the infrastructure, or an
    error outside the objective.

    Example:
        >>> abandon_reason(KeyboardInterrupt()), abandon_reason(Terminated())
        ('interrupted (Ctrl-C)', 'interrupted (SIGTERM)')
        >>> abandon_reason(InfrastructureError("storage x: cannot write: disk is full"))
        'infrastructure: storage x: cannot write: disk is full'
    """
    if isinstance(e, Terminated):
        return f"{INTERRUPTED} (SIGTERM)"
    if isinstance(e, KeyboardInterrupt):
        return f"{INTERRUPTED} (Ctrl-C)"
    if isinstance(e, InfrastructureError):
        return f"{INFRASTRUCTURE}: {e}"[:2000]
    return f"{type(e).__name__}: {e}"[:2000]
