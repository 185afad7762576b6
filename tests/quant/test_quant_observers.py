"""Observers: a contract every method must meet, then each method on known distributions."""

from __future__ import annotations

import pytest
import torch

from autoquant.quant import (
    KLObserver,
    MinMaxObserver,
    MovingAverageObserver,
    MSEObserver,
    Observer,
    PercentileObserver,
    clear_weight_range_cache,
    fake_quantize,
    make_observer,
    qparams_from_range,
)
from autoquant.quant import _observers as observers_module
from autoquant.types import CalibrationMethod, PlanError, QuantSpec

METHODS = [m.value for m in CalibrationMethod]
CLASSES = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "kl": KLObserver,
}


def _outlier_gaussian(n: int = 100_000, seed: int = 0) -> torch.Tensor:
    """N(0, 1) plus 4 far outliers (0.004 %, below the default 99.99th percentile)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    x[:4] = torch.tensor([40.0, -35.0, 50.0, -60.0])
    return x[torch.randperm(n, generator=g)]


def _quant_mse(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> float:
    s, z = qparams_from_range(lo, hi, spec)
    qmin, qmax = spec.qrange
    return float(((fake_quantize(x, s, z, qmin, qmax) - x) ** 2).mean())


# Contract -------------------------------------------------------------------------------------
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", ["tensor", "weight_channel", "act_channel"])
def test_observer_contract(method: str, symmetric: bool, case: str) -> None:
    per_channel = case != "tensor"
    spec = QuantSpec(
        bits=6,
        symmetric=symmetric,
        calibration=method,
        bins=256,
        granularity="per_channel" if per_channel else "per_tensor",
        axis=1 if case == "act_channel" else 0,
    )
    obs = make_observer(spec, for_weight=case == "weight_channel")
    assert isinstance(obs, CLASSES[method]) and not obs.has_data
    xs = [torch.randn(5, 3, 4, 4) * (i + 1) + 0.3 for i in range(3)]
    for x in xs:
        obs.update(x)
    lo, hi = obs.compute_range()
    seen = xs[-1:] if case == "weight_channel" else xs  # a weight observer keeps the last
    data = torch.cat(seen, 0)
    if case == "tensor":
        assert lo.shape == hi.shape == ()
        mn, mx = data.min(), data.max()
    else:
        axis = spec.axis
        assert lo.shape == hi.shape == (data.shape[axis],)
        flat = data.movedim(axis, 0).reshape(data.shape[axis], -1)
        mn, mx = flat.min(1).values, flat.max(1).values
    assert torch.isfinite(lo).all() and torch.isfinite(hi).all() and (lo <= hi).all()
    if symmetric and method in ("percentile", "mse", "kl"):
        assert torch.equal(lo, -hi)  # these search |x|; min/max are left to qparams
        assert (hi <= torch.maximum(-mn, mx) + 1e-5).all()
    elif method != "moving_average":  # (an EMA of batch extremes may sit inside the range)
        assert (lo >= mn - 1e-5).all() and (hi <= mx + 1e-5).all()
    if method == "minmax" and not symmetric:
        assert torch.equal(lo, mn) and torch.equal(hi, mx)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("value", [0.0, 2.5, -1e-3])
def test_degenerate_inputs_give_finite_qparams(method: str, value: float) -> None:
    for symmetric in (True, False):
        spec = QuantSpec(bits=4, symmetric=symmetric, calibration=method)
        obs = make_observer(spec, for_weight=False)
        obs.update(torch.full((64,), value))
        obs.update(torch.full((32,), value))
        lo, hi = obs.compute_range()
        s, z = qparams_from_range(lo, hi, spec)
        assert torch.isfinite(s) and s > 0 and torch.isfinite(z)


def test_bad_specs_and_inputs_are_refused() -> None:
    with pytest.raises(PlanError, match="bits='fp16'"):
        make_observer(QuantSpec(bits="fp16"), for_weight=False)
    with pytest.raises(PlanError, match="axis=0"):
        make_observer(QuantSpec(granularity="per_channel", axis=0), for_weight=False)
    obs = make_observer(QuantSpec(granularity="per_channel", axis=3), for_weight=True)
    with pytest.raises(ValueError, match="axis=3"):
        obs.update(torch.zeros(2, 2))
    with pytest.raises(RuntimeError, match="no data"):
        MinMaxObserver(QuantSpec()).compute_range()


# Methods on known data ------------------------------------------------------------------------
def test_minmax_over_batches() -> None:
    obs = MinMaxObserver(QuantSpec(symmetric=False))
    batches = [torch.randn(100) * s for s in (1.0, 3.0, 0.5)]
    for b in batches:
        obs.update(b)
    lo, hi = obs.compute_range()
    assert torch.equal(torch.stack([lo, hi]), torch.stack(torch.aminmax(torch.cat(batches))))


def test_moving_average_matches_hand_computed_ema() -> None:
    spec = QuantSpec(calibration="moving_average", momentum=0.25, granularity="per_channel", axis=1)
    obs = make_observer(spec, for_weight=False)
    batches = [torch.randn(8, 2) * s + s for s in (1.0, 4.0, 2.0)]
    mins = [b.min(0).values for b in batches]
    maxs = [b.max(0).values for b in batches]
    for b in batches:
        obs.update(b)
    exp_min, exp_max = mins[0], maxs[0]
    for mn, mx in zip(mins[1:], maxs[1:], strict=True):
        exp_min = 0.75 * exp_min + 0.25 * mn
        exp_max = 0.75 * exp_max + 0.25 * mx
    lo, hi = obs.compute_range()
    torch.testing.assert_close(lo, exp_min)
    torch.testing.assert_close(hi, exp_max)


@pytest.mark.parametrize("symmetric", [True, False])
def test_percentile_matches_exact_quantile(symmetric: bool) -> None:
    x = torch.randn(50_000)
    obs = PercentileObserver(
        QuantSpec(calibration="percentile", percentile=99.0, symmetric=symmetric)
    )
    for chunk in x.chunk(5):
        obs.update(chunk)
    lo, hi = obs.compute_range()
    if symmetric:
        t = torch.quantile(x.abs(), 0.99)
        assert float(hi) == pytest.approx(float(t), abs=2e-3)
    else:
        assert float(hi) == pytest.approx(float(torch.quantile(x, 0.99)), abs=2e-3)
        assert float(lo) == pytest.approx(float(torch.quantile(x, 0.01)), abs=2e-3)


def test_histogram_handles_growing_range() -> None:
    # Each batch is wider than the last: the histogram must extend and merge bins exactly.
    batches = [torch.randn(4000) * s for s in (0.01, 1.0, 30.0, 1000.0)]
    obs = PercentileObserver(QuantSpec(calibration="percentile", percentile=90.0, bins=64))
    for b in batches:
        obs.update(b)
    hist = obs.hists[0]
    assert float(hist.counts.sum()) == 16_000
    assert hist.counts.numel() <= 4 * 64
    exact = float(torch.quantile(torch.cat(batches).abs(), 0.9))
    # Resolution is one (merged) bin.
    assert float(obs.compute_range()[1]) == pytest.approx(exact, abs=hist.width)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("method", ["percentile", "mse", "kl"])
def test_tighter_than_minmax_on_gaussian_with_outliers(method: str, symmetric: bool) -> None:
    x = _outlier_gaussian()
    spec = QuantSpec(bits=4, symmetric=symmetric, calibration=method)
    ref, obs = (
        make_observer(spec.replace(calibration="minmax"), for_weight=False),
        make_observer(spec, for_weight=False),
    )
    for chunk in x.chunk(4):
        ref.update(chunk)
        obs.update(chunk)
    (rlo, rhi), (lo, hi) = ref.compute_range(), obs.compute_range()
    assert float(hi - lo) < 0.5 * float(rhi - rlo)
    assert float(hi) > 1.0 and float(lo) < -1.0  # ... but not collapsed onto the bulk either


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_beats_minmax_on_quantization_error(bits: int, symmetric: bool) -> None:
    x = _outlier_gaussian(seed=1)
    spec = QuantSpec(bits=bits, symmetric=symmetric, calibration="mse")
    mse, mm = MSEObserver(spec), MinMaxObserver(spec)
    for chunk in x.chunk(4):
        mse.update(chunk)
        mm.update(chunk)
    err_mse = _quant_mse(x, *mse.compute_range(), spec)
    err_mm = _quant_mse(x, *mm.compute_range(), spec)
    assert err_mse <= err_mm
    if bits == 4:
        assert err_mse < 0.2 * err_mm


@pytest.mark.parametrize("block_cells", [1 << 6, 1 << 10])
def test_mse_weight_ranges_do_not_depend_on_the_block_size(
    monkeypatch: pytest.MonkeyPatch, block_cells: int
) -> None:
    # Rows of 75 values: 1 << 6 splits every row from the next, 1 << 10 takes 13 rows at once.
    g = torch.Generator().manual_seed(5)
    w = torch.randn(37, 3, 5, 5, generator=g) * torch.rand(37, 1, 1, 1, generator=g)
    spec = QuantSpec(bits=3, granularity="per_channel", calibration="mse")

    def ranges() -> tuple[torch.Tensor, torch.Tensor]:
        clear_weight_range_cache()
        obs = MSEObserver(spec, for_weight=True)
        obs.update(w)
        return obs.compute_range()

    monkeypatch.setattr(MSEObserver, "block_cells", 1 << 30)
    whole = ranges()
    monkeypatch.setattr(MSEObserver, "block_cells", block_cells)
    blocked = ranges()
    assert torch.equal(blocked[0], whole[0]) and torch.equal(blocked[1], whole[1])

    # Per row, never worse than min/max (errors from torch's own per-channel fake-quant).
    def row_errors(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        s, z = qparams_from_range(lo, hi, spec)
        out = torch.fake_quantize_per_channel_affine(w, s, z.int(), 0, *spec.qrange)
        return ((out - w) ** 2).flatten(1).mean(1)

    mm = MinMaxObserver(spec, for_weight=True)
    mm.update(w)
    err_mse, err_mm = row_errors(*blocked), row_errors(*mm.compute_range())
    assert bool((err_mse <= err_mm * (1 + 1e-6)).all())
    assert float(err_mse.sum()) < 0.9 * float(err_mm.sum())  # 3 bits: clipping pays


def test_mse_finds_known_optimum_for_gaussian() -> None:
    # Uniform 4-bit quantization of N(0, 1): the MSE-optimal symmetric clip is about 2.5 sigma
    # (Banner et al. 2019, Table 1: 2.55 for 4 bits with 16 levels; 15 levels here).
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(3))
    obs = MSEObserver(QuantSpec(bits=4, calibration="mse"))
    obs.update(x)
    assert 2.2 < float(obs.compute_range()[1]) < 2.8


def test_kl_threshold_for_gaussian_in_known_band() -> None:
    # 8-bit entropy calibration of N(0, 1) clips in the far tail but inside the max.
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(4))
    obs = KLObserver(QuantSpec(bits=8, calibration="kl"))
    for chunk in x.chunk(4):
        obs.update(chunk)
    t = float(obs.compute_range()[1])
    assert 3.0 < t < float(x.abs().max())


def test_weight_observer_per_channel_loops_channels() -> None:
    w = torch.randn(4, 3, 3, 3) * torch.tensor([0.1, 1.0, 10.0, 100.0]).reshape(4, 1, 1, 1)
    for method in METHODS:
        obs = make_observer(
            QuantSpec(bits=8, granularity="per_channel", calibration=method, symmetric=False),
            for_weight=True,
        )
        obs.update(w)
        lo, hi = obs.compute_range()
        spread = (hi - lo) / (w.reshape(4, -1).amax(1) - w.reshape(4, -1).amin(1))
        assert ((spread > 0.3) & (spread <= 1.0 + 1e-5)).all(), method


@pytest.mark.parametrize("method", ["mse", "percentile", "kl"])
def test_weight_ranges_are_cached_by_value_and_spec(
    monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    clear_weight_range_cache()
    cls = CLASSES[method]
    calls = []
    compute = cls._compute

    def counting(self: Observer) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(self)
        return compute(self)

    monkeypatch.setattr(cls, "_compute", counting)
    g = torch.Generator().manual_seed(6)
    w = torch.randn(8, 4, 3, 3, generator=g)
    spec = QuantSpec(bits=3, granularity="per_channel", calibration=method)

    def weight_range(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        obs = make_observer(spec, for_weight=True)
        obs.update(w)
        return obs.compute_range()

    first = weight_range(w, spec)
    again = weight_range(w.clone(), spec)  # another tensor, same values: a hit
    assert len(calls) == 1
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    again[0].zero_()  # the caller's copy: the cache stays intact
    assert torch.equal(weight_range(w, spec)[0], first[0]) and len(calls) == 1
    # LSQ starts from the same calibrated range: still a hit.
    weight_range(w, spec.replace(learned_scale=True))
    assert len(calls) == 1
    # One changed value, or another bit width: computed afresh, and equal to an uncached run.
    w2 = w.clone()
    w2[0, 0, 0, 0] += 1.0
    for args in ((w2, spec), (w, spec.replace(bits=4))):
        got = weight_range(*args)
        clear_weight_range_cache()
        assert all(torch.equal(a, b) for a, b in zip(got, weight_range(*args), strict=True))
    assert len(calls) == 5


def test_weight_range_cache_stays_under_its_byte_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_weight_range_cache()
    monkeypatch.setattr(observers_module, "WEIGHT_RANGE_CACHE_BYTES", 3 * 2 * 64 * 4)
    spec = QuantSpec(bits=4, granularity="per_channel", calibration="mse")
    for seed in range(5):  # five weights of 64 channels: 512 bytes of range each
        obs = make_observer(spec, for_weight=True)
        obs.update(torch.randn(64, 9, generator=torch.Generator().manual_seed(seed)))
        obs.compute_range()
    cached = observers_module._WEIGHT_RANGES
    assert len(cached) == 3  # the two oldest were evicted
    assert sum(a.nbytes + b.nbytes for a, b in cached.values()) <= 3 * 2 * 64 * 4
    clear_weight_range_cache()
