"""Latency you can trust: spread, noisy flags, bounded re-timing, the cache, and interleaved
re-measurement with drift detection. A fake backend runs on a fake clock: no real timing."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn

from autoquant.measure import (
    BACKENDS,
    LatencyCache,
    LatencyResult,
    _timing,
    measure_latency,
    register_backend,
    remeasure,
)

X = torch.zeros(1, 4)
FAST = {"warmup": 1, "repeats": 8, "budget_s": 10.0}


class Clock:
    """Nanoseconds that pass only when a fake model runs."""

    def __init__(self) -> None:
        self.ns = 0

    def __call__(self) -> int:
        return self.ns


class FakeDeployed:
    def __init__(self, clock: Clock, cost: Callable[[int, int], float], log: list, name: str):
        self.clock, self.cost, self.log, self.name = clock, cost, log, name
        self.formats: dict[str, str] = {}
        self.notes: dict[str, str] = {}
        self.kernels = {"fake": 1}
        self.calls = 0

    def runner(self, x: Any) -> Callable[[], object]:
        def run() -> None:
            self.calls += 1
            self.log.append(self.name)
            self.clock.ns += int(self.cost(self.calls, self.clock.ns) * 1e6)

        return run

    def run(self, x: Any) -> torch.Tensor:
        raise NotImplementedError


class FakeBackend:
    """Each model's per-call cost in ms comes from its ``cost(call, now_ns)`` attribute."""

    name = "fake"

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.log: list[str] = []

    def deploy(self, model: nn.Module, plan: object, example_input: Any, **kw: Any) -> Any:
        return FakeDeployed(self.clock, model.cost, self.log, model.label)

    def threads_context(self, threads: int) -> Any:
        return contextlib.nullcontext()

    def version(self) -> str:
        return "fake-1"


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeBackend]:
    clock = Clock()
    monkeypatch.setattr(_timing, "now_ns", clock)
    backend = FakeBackend(clock)
    register_backend(backend)
    yield backend
    BACKENDS.pop("fake")


def _model(label: str, cost: Callable[[int, int], float]) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 2 + len(label)))  # its own architecture, own cache key
    model.cost, model.label = cost, label  # type: ignore[assignment]
    return model


def _steady(ms: float) -> Callable[[int, int], float]:
    return lambda call, now: ms


def _jittery(ms: float) -> Callable[[int, int], float]:
    return lambda call, now: ms * (1.0 if call % 2 else 1.6)  # IQR/median ~ 0.46


def test_a_steady_measurement_has_no_spread(fake: FakeBackend) -> None:
    r = measure_latency(_model("a", _steady(1.0)), None, X, backend="fake", **FAST)
    assert (r.median_ms, r.spread, r.noisy, r.attempts) == (1.0, 0.0, False, 1)


def test_a_wide_spread_is_flagged_noisy(fake: FakeBackend) -> None:
    r = measure_latency(_model("a", _jittery(1.0)), None, X, backend="fake", retries=0, **FAST)
    assert r.noisy and r.attempts == 1
    assert r.spread == pytest.approx(r.iqr_ms / r.median_ms) and r.spread > 0.1
    assert LatencyResult.from_dict(r.to_dict()) == r


def test_a_noisy_timing_is_timed_again_until_it_settles(fake: FakeBackend) -> None:
    # The first timing (a 0.2 s warm-up, then ~10 ms of samples) jitters, the second does not.
    def cost(call: int, now: int) -> float:
        return _jittery(1.0)(call, now) if now < 250e6 else 1.0

    cache = LatencyCache()
    r = measure_latency(_model("a", cost), None, X, backend="fake", cache=cache, **FAST)
    assert (r.noisy, r.attempts, r.median_ms) == (False, 2, 1.0)
    stored = cache.get(r.key)
    assert stored["noisy"] is False and stored["attempts"] == 2


def test_a_still_noisy_figure_is_cached_flagged(fake: FakeBackend) -> None:
    model, cache = _model("a", _jittery(1.0)), LatencyCache()
    first = measure_latency(model, None, X, backend="fake", cache=cache, retries=2, **FAST)
    assert first.noisy and first.attempts == 3  # bounded: 1 + retries timings
    assert cache.get(first.key)["noisy"] is True  # never stored as if it were good
    calls = len(fake.log)
    again = measure_latency(model, None, X, backend="fake", cache=cache, retries=2, **FAST)
    assert again.cached and again.noisy and len(fake.log) == calls  # reused, still flagged


def test_a_cached_figure_without_a_spread_gets_one() -> None:
    old = {"median_ms": 2.0, "iqr_ms": 0.5, "backend": "x", "threads": 1, "batch_size": 1, "n": 5}
    r = LatencyResult.from_dict(old)
    assert (r.spread, r.noisy, r.attempts) == (0.25, False, 1)


def test_remeasure_interleaves_rounds_and_keeps_ratios(fake: FakeBackend) -> None:
    items = [(_model("a", _steady(2.0)), None), (_model("b", _steady(3.0)), None)]
    out = remeasure(items, _model("f", _steady(4.0)), X, backend="fake", rounds=3, **FAST)
    assert [r.median_ms for r in out.results] == [2.0, 3.0]
    assert out.float_result.median_ms == 4.0 and out.float_drift == 0.0
    assert not out.drifted and not out.noisy
    assert all(r.attempts == 3 and r.n == 3 for r in out.results)
    # Round-robin: each round times every model once, the order rotated.
    runs = [name for i, name in enumerate(fake.log) if i == 0 or fake.log[i - 1] != name]
    assert runs == ["f", "a", "b", "a", "b", "f", "b", "f", "a"]


def test_remeasure_sees_the_float_reference_drift(fake: FakeBackend) -> None:
    # The machine gets twice as slow after the first round (its warm-ups last 0.2 s each):
    # every model pays, and the reference shows it.
    def loaded(ms: float) -> Callable[[int, int], float]:
        return lambda call, now: ms * (2.0 if now > 500e6 else 1.0)

    items = [(_model("a", loaded(2.0)), None)]
    cache = LatencyCache()
    out = remeasure(
        items, _model("f", loaded(4.0)), X, backend="fake", rounds=4, cache=cache, **FAST
    )
    assert out.drifted and out.noisy and out.float_drift >= 0.5
    assert all(r.noisy for r in out.results) and out.float_result.noisy
    assert cache.get(out.results[0].key)["noisy"] is True
    # Interleaved, the plan's ratio to float stays true even though both moved.
    assert out.results[0].median_ms / out.float_result.median_ms == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"rounds": 0}, "rounds"), ({"max_drift": 0.0}, "max_drift"), ({"max_spread": -1}, "max_")],
)
def test_remeasure_names_a_bad_setting(kwargs: dict, field: str, fake: FakeBackend) -> None:
    with pytest.raises(ValueError, match=f"{field}.*allowed values"):
        remeasure([], _model("f", _steady(1.0)), X, backend="fake", **kwargs)
