from __future__ import annotations

import statistics
import time

import numpy as np
import pytest
import torch

from autoquant.measure._timing import Timing, check_protocol, time_calls
from autoquant.train import torch_threads


def test_stops_at_repeats_and_counts_warmup() -> None:
    calls = []
    t = time_calls(
        lambda: calls.append(1) or time.sleep(0.001),
        warmup=3,
        repeats=7,
        budget_s=60,
        min_warmup_s=0,
    )
    assert len(t.samples_ms) == 7
    assert t.inner == 1  # a 1 ms call needs no grouping
    assert len(calls) == 3 + 1 + 7  # warm-up, probe, samples
    assert all(s >= 1.0 for s in t.samples_ms)


def test_warmup_lasts_a_minimum_time() -> None:
    calls = []
    time_calls(
        lambda: calls.append(1) or time.sleep(0.001),
        warmup=2,
        repeats=1,
        budget_s=60,
        min_warmup_s=0.05,
    )
    assert len(calls) - 1 - 3 >= 0.05 / 0.0015  # ~33+ warm-up calls, not 2
    calls.clear()
    time_calls(
        lambda: calls.append(1) or time.sleep(0.001),
        warmup=0,
        repeats=1,
        budget_s=60,
        min_warmup_s=1.0,
    )
    assert len(calls) == 2  # warmup=0: no warm-up at all, just the probe and one sample


def test_stops_at_budget_with_minimum_samples() -> None:
    t0 = time.perf_counter()
    t = time_calls(lambda: time.sleep(0.02), warmup=0, repeats=1000, budget_s=0.05)
    assert 3 <= len(t.samples_ms) < 10
    assert time.perf_counter() - t0 < 1.0


def test_fast_calls_are_grouped() -> None:
    t = time_calls(lambda: None, warmup=1, repeats=5, budget_s=5)
    assert t.inner > 1
    assert t.median_ms < 0.5


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
    ],
)
def test_bad_protocol_names_the_field(kwargs: dict, field: str) -> None:
    args = {"threads": 1, "warmup": 0, "repeats": 1, "budget_s": 1.0, **kwargs}
    with pytest.raises(ValueError, match=f"{field}=.*allowed values"):
        check_protocol(**args)


def test_torch_threads_restored_even_on_error() -> None:
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError), torch_threads(1):
        assert torch.get_num_threads() == 1
        raise RuntimeError
    assert torch.get_num_threads() == before
