"""The timing protocol: warm-up, then repeated samples until a count or a time budget."""

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


def check_protocol(threads: int, warmup: int, repeats: int, budget_s: float) -> None:
    """Raise ``ValueError`` naming the first bad protocol setting."""
    for name, value, low in (
        ("threads", threads, 1),
        ("warmup", warmup, 0),
        ("repeats", repeats, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(
                f"{name}={value!r} is not allowed; allowed values: an integer >= {low}"
            )
    if not (isinstance(budget_s, (int, float)) and math.isfinite(budget_s) and budget_s > 0):
        raise ValueError(f"budget_s={budget_s!r} is not allowed; allowed values: a number > 0")


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
    w0 = time.perf_counter()
    done = 0
    while done < warmup or (done and time.perf_counter() - w0 < min_warmup_s):
        fn()
        done += 1
    t0 = time.perf_counter()
    # One probe call decides how many calls make one sample.
    p0 = time.perf_counter()
    fn()
    probe = time.perf_counter() - p0
    inner = max(1, math.ceil(MIN_SAMPLE_S / max(probe, 1e-9)))
    deadline = t0 + budget_s
    samples: list[float] = []
    while len(samples) < repeats:
        s0 = time.perf_counter_ns()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter_ns() - s0) / 1e6 / inner)
        if time.perf_counter() > deadline and len(samples) >= MIN_SAMPLES:
            break
    return Timing(samples_ms=tuple(samples), inner=inner)
