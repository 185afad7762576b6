from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
import pytest
import torch

from autoquant.measure import _timing
from autoquant.measure._timing import Timing, check_protocol, stable_timing, time_calls
from autoquant.train import torch_threads


class _Clock:
    """A fake clock: time passes only when the timed call runs (no real timing)."""

    def __init__(self) -> None:
        self.ns = 0

    def __call__(self) -> int:
        return self.ns

    def call(self, ms: float, calls: list) -> Callable[[], None]:
        def fn() -> None:
            calls.append(1)
            self.ns += int(ms * 1e6)

        return fn


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    fake = _Clock()
    monkeypatch.setattr(_timing, "now_ns", fake)
    return fake


def test_stops_at_repeats_and_counts_warmup(clock: _Clock) -> None:
    calls: list = []
    t = time_calls(clock.call(1.0, calls), warmup=3, repeats=7, budget_s=60, min_warmup_s=0)
    assert t.samples_ms == (1.0,) * 7
    assert t.inner == 1  # a 1 ms call needs no grouping
    assert len(calls) == 3 + 1 + 7  # warm-up, probe, samples


def test_warmup_lasts_a_minimum_time(clock: _Clock) -> None:
    calls: list = []
    time_calls(clock.call(1.0, calls), warmup=2, repeats=1, budget_s=60, min_warmup_s=0.05)
    assert len(calls) == 50 + 1 + 1  # 50 warm-up calls of 1 ms, not 2
    calls.clear()
    time_calls(clock.call(1.0, calls), warmup=0, repeats=1, budget_s=60, min_warmup_s=1.0)
    assert len(calls) == 2  # warmup=0: no warm-up at all, just the probe and one sample


def test_stops_at_budget_with_minimum_samples(clock: _Clock) -> None:
    calls: list = []
    t = time_calls(clock.call(20.0, calls), warmup=0, repeats=1000, budget_s=0.05)
    assert len(t.samples_ms) == 3  # the probe and 2 samples spend the budget; 3 at least
    t = time_calls(clock.call(20.0, calls), warmup=0, repeats=1000, budget_s=0.1)
    assert len(t.samples_ms) == 5  # the 20 ms probe, then samples ending at 40 .. 120 ms


def test_fast_calls_are_grouped(clock: _Clock) -> None:
    calls: list = []
    t = time_calls(clock.call(0.01, calls), warmup=1, repeats=5, budget_s=5, min_warmup_s=0)
    assert t.inner == 50  # 0.5 ms per sample
    assert t.samples_ms == pytest.approx((0.01,) * 5)


def test_real_calls_are_timed() -> None:
    t = time_calls(lambda: time.sleep(0.001), warmup=0, repeats=3, budget_s=5)
    assert len(t.samples_ms) == 3 and min(t.samples_ms) >= 1.0


def test_stable_timing_retries_only_while_noisy(clock: _Clock) -> None:
    calls: list = []
    steady = clock.call(1.0, calls)
    t, attempts = stable_timing(steady, warmup=0, repeats=5, budget_s=5, retries=3, min_warmup_s=0)
    assert attempts == 1 and t.spread == 0.0
    jitter = iter([1.0, 2.0] * 100)

    def noisy() -> None:
        clock.ns += int(next(jitter) * 1e6)

    t, attempts = stable_timing(noisy, warmup=0, repeats=4, budget_s=5, retries=3, min_warmup_s=0)
    assert attempts == 4 and t.spread > 0.1  # 1 + retries, then the least noisy kept


def test_median_and_iqr_match_numpy() -> None:
    samples = (5.0, 1.0, 3.0, 2.0, 4.0, 10.0)
    t = Timing(samples, 1)
    assert t.median_ms == np.median(samples)
    q1, q3 = np.percentile(samples, [25, 75])
    assert t.iqr_ms == pytest.approx(q3 - q1)
    assert Timing((2.0,), 1).iqr_ms == 0.0
    assert statistics.median(samples) == t.median_ms


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"threads": 0}, "threads"),
        ({"warmup": -1}, "warmup"),
        ({"repeats": 0}, "repeats"),
        ({"budget_s": 0.0}, "budget_s"),
        ({"threads": True}, "threads"),
        ({"budget_s": float("nan")}, "budget_s"),
        ({"retries": -1}, "retries"),
        ({"max_spread": 0}, "max_spread"),
    ],
)
def test_bad_protocol_names_the_field(kwargs: dict, field: str) -> None:
    args = {"threads": 1, "warmup": 0, "repeats": 1, "budget_s": 1.0, "retries": 0, **kwargs}
    with pytest.raises(ValueError, match=f"{field}=.*allowed values"):
        check_protocol(**args)


def test_torch_threads_restored_even_on_error() -> None:
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError), torch_threads(1):
        assert torch.get_num_threads() == 1
        raise RuntimeError
    assert torch.get_num_threads() == before
