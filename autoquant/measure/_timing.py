"""The timing protocol: warm-up, then repeated samples until a count or a time budget; the
spread of the samples, and re-timing while it is too wide.

All times come from :func:`now_ns` (``time.perf_counter_ns``), one place a test can replace
with a fake clock.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

# A sample shorter than this is dominated by timer and loop overhead; such fast calls are
# timed in groups ("inner" calls per sample) and the per-call mean is recorded.
MIN_SAMPLE_S = 5e-4
MIN_SAMPLES = 3
# Warm-up also lasts at least this long: a few fast calls do not settle caches, thread pools
# and CPU clocks (10 calls of a 0.3 ms model left a 7 % drift between runs; 0.2 s did not).
MIN_WARMUP_S = 0.2
#: A measurement whose interquartile range exceeds this fraction of its median is noisy: on a
#: quiet machine the samples of one model agree within a few percent, on a loaded one a
#: re-measure gave 0.175 ms against 0.308 ms stored.
MAX_SPREAD = 0.1


def now_ns() -> int:
    """The clock every timing reads (monotonic nanoseconds)."""
    return time.perf_counter_ns()


@dataclass(frozen=True)
class Timing:
    """Per-call latency samples in milliseconds."""

    samples_ms: tuple[float, ...]
    inner: int  # calls per sample

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def iqr_ms(self) -> float:
        if len(self.samples_ms) < 2:
            return 0.0
        q = statistics.quantiles(self.samples_ms, n=4, method="inclusive")
        return q[2] - q[0]

    @property
    def spread(self) -> float:
        """Interquartile range over median (0 for a zero median)."""
        return spread(self.iqr_ms, self.median_ms)


def spread(iqr_ms: float, median_ms: float) -> float:
    """``iqr / median``: the relative spread of a measurement.

    Example:
        >>> spread(0.1, 2.0)
        0.05
    """
    return iqr_ms / median_ms if median_ms > 0 else 0.0


def check_count(name: str, value: object, low: int) -> None:
    """Raise ``ValueError`` unless ``value`` is an integer >= ``low``, naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} is not allowed; allowed values: an integer >= {low}")


def check_positive(name: str, value: object) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number > 0, naming ``name``."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name}={value!r} is not allowed; allowed values: a number > 0")


def check_protocol(
    threads: int,
    warmup: int,
    repeats: int,
    budget_s: float,
    retries: int = 0,
    max_spread: float = MAX_SPREAD,
) -> None:
    """Raise ``ValueError`` naming the first bad protocol setting."""
    check_count("threads", threads, 1)
    check_count("warmup", warmup, 0)
    check_count("repeats", repeats, 1)
    check_count("retries", retries, 0)
    check_positive("budget_s", budget_s)
    check_positive("max_spread", max_spread)


def time_calls(
    fn: Callable[[], object],
    *,
    warmup: int,
    repeats: int,
    budget_s: float,
    min_warmup_s: float = MIN_WARMUP_S,
) -> Timing:
    """Time ``fn``: ``warmup`` untimed calls (lasting at least ``min_warmup_s``), then samples
    until ``repeats`` or ``budget_s``.

    At least :data:`MIN_SAMPLES` samples are taken even when the budget is spent; the warm-up
    does not count against the budget.

    Example:
        >>> t = time_calls(lambda: sum(range(100)), warmup=2, repeats=5, budget_s=1.0)
        >>> len(t.samples_ms), t.median_ms > 0
        (5, True)
    """
    w0 = now_ns()
    done = 0
    while done < warmup or (done and (now_ns() - w0) / 1e9 < min_warmup_s):
        fn()
        done += 1
    t0 = now_ns()
    # One probe call decides how many calls make one sample.
    fn()
    probe = (now_ns() - t0) / 1e9
    inner = max(1, math.ceil(MIN_SAMPLE_S / max(probe, 1e-9)))
    deadline = t0 + budget_s * 1e9
    samples: list[float] = []
    while len(samples) < repeats:
        s0 = now_ns()
        for _ in range(inner):
            fn()
        s1 = now_ns()
        samples.append((s1 - s0) / 1e6 / inner)
        if s1 > deadline and len(samples) >= MIN_SAMPLES:
            break
    return Timing(samples_ms=tuple(samples), inner=inner)


def stable_timing(
    fn: Callable[[], object],
    *,
    warmup: int,
    repeats: int,
    budget_s: float,
    retries: int,
    max_spread: float = MAX_SPREAD,
    min_warmup_s: float = MIN_WARMUP_S,
) -> tuple[Timing, int]:
    """:func:`time_calls`, timed again (up to ``retries`` more times) while the samples'
    :attr:`~Timing.spread` exceeds ``max_spread``.

    Returns ``(timing, attempts)``: the first timing within ``max_spread``, else the one with
    the least spread (still noisy).
    """
    best: Timing | None = None
    for attempt in range(1, retries + 2):
        timing = time_calls(
            fn, warmup=warmup, repeats=repeats, budget_s=budget_s, min_warmup_s=min_warmup_s
        )
        if best is None or timing.spread < best.spread:
            best = timing
        if timing.spread <= max_spread:
            return timing, attempt
    assert best is not None
    return best, retries + 1
