"""Ctrl-C and SIGTERM: the trial in flight fails as "interrupted (...)" and the search stops.

A rerun resumes the study; an interrupted baseline trial is queued again.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from ._record import INTERRUPTED


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: the trial in flight fails as interrupted."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` (a KeyboardInterrupt) in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise Terminated("SIGTERM")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def abandon_reason(e: BaseException) -> str:
    """The ``fail_reason`` of a trial left by ``e``: an interrupt, or an error outside it.

    Example:
        >>> abandon_reason(KeyboardInterrupt()), abandon_reason(Terminated())
        ('interrupted (Ctrl-C)', 'interrupted (SIGTERM)')
    """
    if isinstance(e, Terminated):
        return f"{INTERRUPTED} (SIGTERM)"
    if isinstance(e, KeyboardInterrupt):
        return f"{INTERRUPTED} (Ctrl-C)"
    return f"{type(e).__name__}: {e}"[:2000]
