"""Observers: turn the values a tensor takes during calibration into a clipping range.

Every observer works on a 2-D view ``[G, N]`` of its input: ``G = 1`` per tensor, ``G = C``
per channel (the channel axis moved to the front). That keeps one code path for both
granularities; only the histogram methods loop over groups (weights are small).

State kept across batches:

* ``minmax`` / ``moving_average``: one min and max per group.
* ``percentile`` / ``kl``: a histogram per group on a zero-anchored grid (bin ``k`` covers
  ``[k*w, (k+1)*w)``). A batch outside the grid appends empty bins; past ``4 * spec.bins`` bins,
  adjacent bins merge by a power of two (exact, because the grid is anchored at 0), so a growing
  range costs no re-binning error and the memory stays bounded. Symmetric specs histogram
  ``|x|``, asymmetric ones ``x``.
* ``mse``: a uniform random sample of at most 65,536 values per tensor (fixed seed, so
  calibration is reproducible), plus the exact min and max. The MSE of each candidate range is
  computed on the sample exactly rather than from bin centres, which are too coarse once the
  best clip is a small fraction of the observed range.

For weights (``for_weight=True``) ``update`` replaces the state: the tensor is the same at
every calibration batch, so observing it once or ten times gives the same range. A weight's
range depends only on its values and the spec, and every trial of a search calibrates the same
float weights: the histogram and MSE methods keep their weight ranges in a process-wide cache
keyed by both (a hash of the bytes), so a trial does not repeat a search over clip ranges that
an earlier trial or the sensitivity pre-pass did (MiniLM: 4 s of a trial).
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from typing import ClassVar

import torch
from torch import Tensor

from autoquant.quant._qparams import qparams_from_qrange
from autoquant.types import CalibrationMethod, PlanError, QuantSpec


def _groups(x: Tensor, axis: int | None) -> Tensor:
    """``[G, N]`` float32 view: one row per channel along ``axis`` (or one row)."""
    x = x.detach().float()
    if axis is None:
        return x.reshape(1, -1)
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


_WeightKey = tuple[object, ...]
# Weight ranges by (observer class, spec, shape, dtype, hash of the values); evicted oldest
# first past WEIGHT_RANGE_CACHE_BYTES of cached ranges.
_WEIGHT_RANGES: OrderedDict[_WeightKey, tuple[Tensor, Tensor]] = OrderedDict()
WEIGHT_RANGE_CACHE_BYTES = 64 << 20


def clear_weight_range_cache() -> None:
    """Forget every cached weight range (the cache is exact; this only frees its memory)."""
    _WEIGHT_RANGES.clear()


def _weight_key(obs: Observer, x: Tensor) -> _WeightKey:
    data = x.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    spec = obs.spec.replace(learned_scale=False, learned_zero_point=False)
    digest = hashlib.blake2b(data, digest_size=16).hexdigest()
    return (type(obs), spec, tuple(x.shape), str(x.dtype), digest)


def _cache_weight_range(key: _WeightKey, lo: Tensor, hi: Tensor) -> None:
    _WEIGHT_RANGES[key] = (lo.detach().cpu().clone(), hi.detach().cpu().clone())
    total = sum(a.nbytes + b.nbytes for a, b in _WEIGHT_RANGES.values())
    while total > WEIGHT_RANGE_CACHE_BYTES and len(_WEIGHT_RANGES) > 1:
        a, b = _WEIGHT_RANGES.popitem(last=False)[1]
        total -= a.nbytes + b.nbytes


class Observer:
    """Base class: accumulates statistics with :meth:`update`, answers :meth:`compute_range`.

    Args:
        spec: an integer :class:`~autoquant.types.QuantSpec`; its granularity, axis, bit width
            and calibration options drive the observer.
        for_weight: the observed tensor is a weight (per-channel axis may be 0; each update
            replaces the state). For activations axis 0 is the batch and is refused.

    Example:
        >>> obs = MinMaxObserver(QuantSpec(bits=8))
        >>> obs.update(torch.tensor([-1.0, 2.0]))
        >>> [float(v) for v in obs.compute_range()]
        [-1.0, 2.0]
    """

    method: ClassVar[CalibrationMethod]
    caches_weights: ClassVar[bool] = True  # False where computing is cheaper than hashing

    def __init__(self, spec: QuantSpec, *, for_weight: bool = False) -> None:
        if spec.is_float:
            raise PlanError(
                f"bits={spec.bits!r} is not integer-quantized and has no observer; "
                "allowed values: 2..8"
            )
        if spec.per_channel and not for_weight and spec.axis == 0:
            raise PlanError(
                "axis=0 is not allowed for a per-channel activation (axis 0 is the "
                "batch); allowed values: an integer >= 1 (1 for NCHW channels)"
            )
        self.spec = spec
        self.for_weight = for_weight
        self.axis: int | None = spec.axis if spec.per_channel else None
        self.qmin, self.qmax = spec.qrange
        self.reset()

    def reset(self) -> None:
        """Forget everything observed."""
        self.batches = 0
        self.min_val: Tensor | None = None
        self.max_val: Tensor | None = None
        self._weight_key: _WeightKey | None = None
        self._device = torch.device("cpu")
        self._reset()

    @property
    def has_data(self) -> bool:
        return self.batches > 0

    def update(self, x: Tensor) -> None:
        """Observe one batch (or the weight tensor)."""
        if self.axis is not None and not 0 <= self.axis < x.ndim:
            raise ValueError(
                f"axis={self.axis} is out of range for a {x.ndim}-d tensor of shape "
                f"{tuple(x.shape)}; allowed values: 0..{x.ndim - 1}"
            )
        if x.numel() == 0:
            return
        if self.for_weight:
            self.reset()
            if self.caches_weights:
                self._weight_key = _weight_key(self, x)
                self._device = x.device
                if self._weight_key in _WEIGHT_RANGES:  # computed before: no statistics needed
                    self.batches = 1
                    return
        g = _groups(x, self.axis)
        bmin, bmax = torch.aminmax(g, dim=1)
        self._update(g, bmin, bmax)
        self.min_val = bmin if self.min_val is None else torch.minimum(self.min_val, bmin)
        self.max_val = bmax if self.max_val is None else torch.maximum(self.max_val, bmax)
        self.batches += 1

    def compute_range(self) -> tuple[Tensor, Tensor]:
        """``(min_val, max_val)``: shape ``[]`` per tensor, ``[C]`` per channel (float32)."""
        if not self.has_data:
            raise RuntimeError(
                f"{type(self).__name__} has observed no data; feed at least one "
                "batch during calibration"
            )
        key = self._weight_key
        if key is not None and key in _WEIGHT_RANGES:
            _WEIGHT_RANGES.move_to_end(key)
            lo, hi = (t.to(self._device, copy=True) for t in _WEIGHT_RANGES[key])
        else:
            lo, hi = self._compute()
            lo, hi = lo.float(), hi.float()
            if key is not None:
                _cache_weight_range(key, lo, hi)
        if self.axis is None:
            return lo.reshape(()), hi.reshape(())
        return lo, hi

    # Subclass hooks ------------------------------------------------------------------------
    def _reset(self) -> None:
        pass

    def _update(self, g: Tensor, bmin: Tensor, bmax: Tensor) -> None:
        pass

    def _compute(self) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec.short()}, batches={self.batches})"


class MinMaxObserver(Observer):
    """Running minimum and maximum over all batches."""

    method = CalibrationMethod.MINMAX
    caches_weights = False

    def _compute(self) -> tuple[Tensor, Tensor]:
        assert self.min_val is not None and self.max_val is not None
        return self.min_val, self.max_val


class MovingAverageObserver(Observer):
    """Exponential moving average of per-batch min and max.

    The first batch initialises the average; then ``m <- (1 - momentum) * m + momentum * b``.
    """

    method = CalibrationMethod.MOVING_AVERAGE
    caches_weights = False

    def _reset(self) -> None:
        self.avg_min: Tensor | None = None
        self.avg_max: Tensor | None = None

    def _update(self, g: Tensor, bmin: Tensor, bmax: Tensor) -> None:
        if self.avg_min is None or self.avg_max is None:
            self.avg_min, self.avg_max = bmin.clone(), bmax.clone()
            return
        m = self.spec.momentum
        self.avg_min = torch.lerp(self.avg_min, bmin, m)
        self.avg_max = torch.lerp(self.avg_max, bmax, m)

    def _compute(self) -> tuple[Tensor, Tensor]:
        assert self.avg_min is not None and self.avg_max is not None
        return self.avg_min, self.avg_max


class _Histogram:
    """Counts on a zero-anchored grid of width ``w``: ``counts[j]`` covers bin ``k_lo + j``.

    Grows by appending bins; merges bins by a power of two when it would exceed ``max_bins``.
    """

    def __init__(self, bins: int) -> None:
        self.bins = bins
        self.max_bins = 4 * bins
        self.width: float | None = None
        self.k_lo = 0
        self.counts: Tensor | None = None
        self.pending_zeros = 0  # all-zero values seen before the grid could be sized

    @staticmethod
    def start_all(hists: list[_Histogram], values: Tensor) -> None:
        """First batch of every group at once (``values`` is ``[G, N]``): one ``bincount`` for
        all groups instead of a Python loop, which matters for per-channel weights."""
        vmin, vmax = torch.aminmax(values.double(), dim=1)
        span = vmax.clamp(min=0.0) - vmin.clamp(max=0.0)
        live = span > 0
        width = torch.where(live, span, 1.0) / hists[0].bins
        k_lo = torch.floor(vmin.clamp(max=0.0) / width).long()
        n = torch.floor(vmax / width).long() - k_lo + 1
        m = int(n.max())
        idx = torch.floor(values.double() / width[:, None]).long() - k_lo[:, None]
        idx = torch.minimum(idx.clamp_(min=0), n[:, None] - 1)
        idx += torch.arange(len(hists), device=idx.device)[:, None] * m
        counts = torch.bincount(idx.reshape(-1), minlength=len(hists) * m).reshape(-1, m)
        counts = counts.to(torch.float64)
        for i, (h, ok, w, k, size) in enumerate(
            zip(hists, live.tolist(), width.tolist(), k_lo.tolist(), n.tolist(), strict=True)
        ):
            if not ok:
                h.pending_zeros += values.shape[1]
                continue
            h.width, h.k_lo, h.counts = w, k, counts[i, :size].clone()

    def update(self, v: Tensor) -> None:
        if self.width is None:
            _Histogram.start_all([self], v.reshape(1, -1))
            return
        assert self.counts is not None
        vmin, vmax = float(v.min()), float(v.max())
        lo = min(self.k_lo, math.floor(vmin / self.width))
        hi = max(self.k_lo + self.counts.numel() - 1, math.floor(vmax / self.width))
        factor = 1
        while hi // factor - lo // factor + 1 > self.max_bins:
            factor *= 2
        if factor > 1:
            self._coarsen(factor)
            lo = min(self.k_lo, math.floor(vmin / self.width))
            hi = max(self.k_lo + self.counts.numel() - 1, math.floor(vmax / self.width))
        self.counts = torch.cat(
            [
                self.counts.new_zeros(self.k_lo - lo),
                self.counts,
                self.counts.new_zeros(hi - (self.k_lo + self.counts.numel() - 1)),
            ]
        )
        self.k_lo = lo
        n = self.counts.numel()
        idx = (torch.floor(v.reshape(-1).double() / self.width).long() - lo).clamp_(0, n - 1)
        self.counts += torch.bincount(idx, minlength=n).to(self.counts.dtype)

    def _coarsen(self, factor: int) -> None:
        assert self.counts is not None and self.width is not None
        k = torch.arange(self.counts.numel(), device=self.counts.device) + self.k_lo
        new_lo = self.k_lo // factor
        idx = torch.div(k, factor, rounding_mode="floor") - new_lo
        self.counts = self.counts.new_zeros(int(idx[-1]) + 1).index_add_(0, idx, self.counts)
        self.k_lo = new_lo
        self.width *= factor

    def final_counts(self) -> Tensor | None:
        """Counts with the all-zero values seen before sizing added to the zero bin."""
        if self.counts is None or not self.pending_zeros:
            return self.counts
        counts = self.counts.clone()
        counts[-self.k_lo] += self.pending_zeros
        return counts


class _Stacked:
    """Per-group histograms padded into one ``[G, m]`` matrix, so methods run batched."""

    def __init__(self, hists: list[_Histogram], device: torch.device) -> None:
        finals = [h.final_counts() for h in hists]
        self.live = torch.tensor([c is not None for c in finals], device=device)
        self.n = torch.tensor([0 if c is None else c.numel() for c in finals], device=device)
        self.k_lo = torch.tensor([h.k_lo for h in hists], device=device)
        self.width = torch.tensor(
            [h.width or 0.0 for h in hists], dtype=torch.float64, device=device
        )
        m = max(1, int(self.n.max()))
        self.counts = torch.zeros(len(hists), m, dtype=torch.float64, device=device)
        for i, c in enumerate(finals):
            if c is not None:
                self.counts[i, : c.numel()] = c

    def value(self, bin_pos: Tensor) -> Tensor:
        """Real value at fractional bin position ``bin_pos`` ``[G]`` (0 for empty groups)."""
        return torch.where(self.live, (self.k_lo + bin_pos) * self.width, 0.0)

    def quantile(self, q: float) -> Tensor:
        """Per group, the value below which a fraction ``q`` of the mass lies (linear inside a
        bin)."""
        cdf = torch.cumsum(self.counts, 1)
        target = q * cdf[:, -1:]
        j = torch.searchsorted(cdf, target).clamp(max=self.counts.shape[1] - 1)
        before = torch.where(j > 0, cdf.gather(1, (j - 1).clamp(min=0)), 0.0)
        inside = self.counts.gather(1, j)
        frac = torch.where(inside > 0, (target - before) / inside.clamp(min=1e-300), 0.0)
        return self.value((j + frac.clamp(0.0, 1.0))[:, 0])


class _HistogramObserver(Observer):
    """Shared state of the percentile and KL observers: one :class:`_Histogram` per group."""

    def _reset(self) -> None:
        self.hists: list[_Histogram] = []

    def _update(self, g: Tensor, bmin: Tensor, bmax: Tensor) -> None:
        values = g.abs() if self.spec.symmetric else g
        if not self.hists:
            self.hists = [_Histogram(self.spec.bins) for _ in range(g.shape[0])]
            _Histogram.start_all(self.hists, values)
            return
        for hist, row in zip(self.hists, values, strict=True):
            hist.update(row)

    def _compute(self) -> tuple[Tensor, Tensor]:
        assert self.min_val is not None and self.max_val is not None
        mn, mx = self.min_val.double(), self.max_val.double()
        lo, hi = self._group_ranges(_Stacked(self.hists, mn.device))
        if self.spec.symmetric:
            t = torch.minimum(hi, torch.maximum(-mn, mx))
            return -t, t
        # Never wider than what was seen; never past the observed extremes.
        return torch.maximum(lo, mn), torch.minimum(hi, mx)

    def _group_ranges(self, stacked: _Stacked) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class PercentileObserver(_HistogramObserver):
    """Clip at ``spec.percentile`` of the histogram.

    Symmetric: the percentile of ``|x|`` gives ``[-T, T]``. Asymmetric: each tail is clipped at
    ``100 - spec.percentile`` percent (low end) and ``spec.percentile`` percent (high end).
    """

    method = CalibrationMethod.PERCENTILE

    def _group_ranges(self, stacked: _Stacked) -> tuple[Tensor, Tensor]:
        p = self.spec.percentile / 100.0
        return stacked.quantile(1.0 - p), stacked.quantile(p)


def _kl_divergences(
    h: Tensor, z0: Tensor, n: Tensor, levels: int, alpha: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Score candidate windows of each group's histogram.

    Args:
        h: ``[G, m]`` counts (rows zero-padded past ``n``).
        z0: ``[G]`` index of the bin that starts at 0.
        n: ``[G]`` bins in use.
        levels: quantization levels.
        alpha: ``[G, K]`` shrink factors: window ``[z0 - a*z0, z0 + a*(n - z0))``.

    Returns:
        ``a, b, kl``, each ``[G, K]``: window bounds (bins) and KL(P || Q).
    """
    g, k = alpha.shape
    z0f, nf = z0[:, None].double(), n[:, None].double()
    a = (z0f - torch.round(alpha * z0f)).long()
    b = (z0f + torch.round(alpha * (nf - z0f))).long()
    b = torch.minimum(torch.maximum(b, a + levels), n[:, None])
    a = torch.minimum(a, b - levels).clamp(min=0)
    cdf = torch.cat([h.new_zeros(g, 1), torch.cumsum(h, 1)], 1)
    left = cdf.gather(1, a).float().reshape(-1, 1)  # clipped mass on each side
    right = (cdf.gather(1, n[:, None]) - cdf.gather(1, b)).float().reshape(-1, 1)
    # Only the columns some window covers take part; float32 halves the memory traffic.
    first, stop = int(a.min()), int(b.max())
    hs = h[:, first:stop].float().repeat_interleave(k, 0)  # row r: group r // k
    a0, b0 = (a - first).reshape(-1, 1), (b - first).reshape(-1, 1)
    j = torch.arange(stop - first, device=h.device).expand_as(hs)
    inside = (j >= a0) & (j < b0)
    hin = torch.where(inside, hs, 0.0)
    p = hin.clone()
    p.scatter_add_(1, a0, left)  # TensorRT: clipped mass goes into the edge bins
    p.scatter_add_(1, b0 - 1, right)
    group = torch.div((j - a0).clamp(min=0) * levels, b0 - a0, rounding_mode="floor")
    group = group.clamp_(max=levels - 1)
    nonzero = (p > 0).float()
    group_sum = hs.new_zeros(g * k, levels).scatter_add_(1, group, hin)
    group_nz = hs.new_zeros(g * k, levels).scatter_add_(1, group, nonzero)
    q = nonzero * group_sum.gather(1, group) / group_nz.gather(1, group).clamp(min=1.0)
    p, q = _smooth(p, inside), _smooth(q, inside)
    p = p / p.sum(1, keepdim=True)
    q = q / q.sum(1, keepdim=True)
    kl = torch.where(inside, p * (torch.log(p) - torch.log(q)), 0.0).sum(1)
    return a, b, kl.reshape(g, k)


def _smooth(counts: Tensor, inside: Tensor, eps: float = 1e-4) -> Tensor:
    """Give empty bins of each window a tiny count taken from the non-empty ones (as MXNet and
    ONNX Runtime do), so an empty edge bin that receives clipped outliers scores a finite
    divergence instead of infinity."""
    zero = inside & (counts == 0)
    nonzero = inside & (counts > 0)
    eps1 = eps * zero.sum(1, keepdim=True) / nonzero.sum(1, keepdim=True).clamp(min=1)
    smoothed = counts + eps * zero - eps1 * nonzero
    return torch.where(inside, smoothed.clamp(min=eps * 1e-3), 0.0)


def _kl_best_windows(
    h: Tensor, z0: Tensor, n: Tensor, levels: int, candidates: int = 32
) -> tuple[Tensor, Tensor]:
    """TensorRT-style entropy calibration: per group, the bin window ``[a, b)`` whose
    ``levels``-level quantization loses the least information (min KL(P || Q)).

    Candidate windows shrink towards the zero bin ``z0`` by a common factor, so the symmetric
    (``|x|``, ``z0 = 0``) and asymmetric cases share the code. As in TensorRT, P folds the
    clipped mass into the edge bins; Q merges the window into ``levels`` groups and spreads each
    group's (unclipped) mass evenly over its non-empty bins; both are smoothed (:func:`_smooth`).
    The factor is searched on a coarse grid, then on a fine grid around the best coarse value;
    all groups and candidates of a stage are scored in one vectorised pass.
    """
    g = h.shape[0]
    a_out, b_out = torch.zeros_like(n), n.clone()  # default: the whole histogram
    ok = ((n >= levels) & (h.sum(1) > 0)).nonzero()[:, 0]
    t = torch.linspace(0.0, 1.0, candidates, dtype=torch.float64, device=h.device)
    step = max(1, (1 << 22) // (2 * candidates * h.shape[1]))  # bound memory per pass
    for start in range(0, ok.numel(), step):
        rows = ok[start : start + step]
        hr, zr, nr = h[rows], z0[rows], n[rows]
        low = levels / nr.double()
        coarse = low[:, None] + t * (1.0 - low[:, None])
        a, b, kl = _kl_divergences(hr, zr, nr, levels, coarse)
        i = kl.argmin(1, keepdim=True)
        left = coarse.gather(1, (i - 1).clamp(min=0))
        right = coarse.gather(1, (i + 1).clamp(max=candidates - 1))
        a2, b2, kl2 = _kl_divergences(hr, zr, nr, levels, left + t * (right - left))
        a, b, kl = torch.cat([a, a2], 1), torch.cat([b, b2], 1), torch.cat([kl, kl2], 1)
        best = kl.argmin(1, keepdim=True)
        a_out[rows], b_out[rows] = a.gather(1, best)[:, 0], b.gather(1, best)[:, 0]
    del g
    return a_out, b_out


class KLObserver(_HistogramObserver):
    """Entropy (KL-divergence) calibration as in TensorRT (Migacz, 2017).

    Symmetric specs search thresholds ``T`` on the ``|x|`` histogram with ``Qmax + 1`` levels;
    asymmetric specs search windows around zero on the ``x`` histogram with ``2^bits`` levels.
    """

    method = CalibrationMethod.KL

    def _group_ranges(self, stacked: _Stacked) -> tuple[Tensor, Tensor]:
        levels = self.qmax + 1 if self.spec.symmetric else self.qmax - self.qmin + 1
        a, b = _kl_best_windows(stacked.counts, -stacked.k_lo, stacked.n, levels)
        return stacked.value(a.double()), stacked.value(b.double())


class MSEObserver(Observer):
    """The range minimising the mean squared fake-quantization error at the target bit width.

    Candidates scale the observed range (``[a*min, a*max]``, or ``[-a*T, a*T]`` symmetric) by a
    factor ``a``: 60 log-spaced values in ``[0.01, 1]``, then 25 between the best one's
    neighbours. ``a = 1`` (the min/max range) is always a candidate, so the result is never
    worse than min/max on the observed data. Activations are scored on a uniform random sample
    of at most ``sample_cap`` values; weights on all their values.
    """

    method = CalibrationMethod.MSE
    sample_cap: ClassVar[int] = 1 << 16
    block_cells: ClassVar[int] = 1 << 18  # CPU: candidates x elements evaluated at once

    def _reset(self) -> None:
        self.samples: Tensor | None = None
        self.seen = 0
        self._gen = torch.Generator().manual_seed(0)

    def _update(self, g: Tensor, bmin: Tensor, bmax: Tensor) -> None:
        if self.for_weight:
            self.samples = g.clone()
            return
        cap = max(256, self.sample_cap // g.shape[0])
        old = self.samples if self.samples is not None else g[:, :0]
        n_old, n_new = old.shape[1], g.shape[1]
        self.seen += n_new
        if n_old + n_new <= cap:
            self.samples = torch.cat([old, g], 1)
            return
        # Keep the sample uniform over everything seen: the new batch's share is n_new / seen.
        k_new = min(n_new, round(cap * n_new / self.seen))
        k_old = min(n_old, cap - k_new)
        keep_old = torch.randperm(n_old, generator=self._gen)[:k_old].to(g.device)
        keep_new = torch.randperm(n_new, generator=self._gen)[:k_new].to(g.device)
        self.samples = torch.cat([old[:, keep_old], g[:, keep_new]], 1)

    def _errors(self, x: Tensor, alpha: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        """Mean squared error ``[K, G]`` of fake-quantizing ``x [G, N]`` on each candidate.

        Computed in place, on the CPU in blocks of at most ``block_cells`` (rows of ``x`` x
        candidates) that stay in the cache: on a 30522 x 384 embedding table (per row, 2
        threads) 1.2 s instead of 9.1 s for whole-tensor passes. A GPU gets large blocks (few
        kernel launches)."""
        s, z = qparams_from_qrange(
            alpha * lo, alpha * hi, self.qmin, self.qmax, self.spec.symmetric
        )
        s, z = s.to(x.device), z.to(x.device)
        inv, low, high = torch.reciprocal(s), self.qmin - z, self.qmax - z
        n_cand, n_rows, width = s.shape[0], x.shape[0], x.shape[1]
        out = torch.empty(n_cand, n_rows, device=x.device)
        cells = self.block_cells if x.device.type == "cpu" else 1 << 24
        rows = max(1, cells // width)
        for r in range(0, n_rows, rows):
            xb = x[r : r + rows]
            step = max(1, cells // xb.numel())
            for k in range(0, n_cand, step):
                cand = (slice(k, k + step), slice(r, r + rows), None)
                err = (xb * inv[cand]).round_().clamp_(low[cand], high[cand])
                out[cand[:2]] = err.mul_(s[cand]).sub_(xb).square_().mean(-1)
        return out

    def _compute(self) -> tuple[Tensor, Tensor]:
        assert self.samples is not None and self.min_val is not None and self.max_val is not None
        x = self.samples
        lo, hi = self.min_val.cpu().clamp(max=0.0), self.max_val.cpu().clamp(min=0.0)
        if self.spec.symmetric:
            hi = torch.maximum(-lo, hi)
            lo = -hi
        coarse = torch.logspace(-2.0, 0.0, 60, dtype=torch.float32)
        coarse[-1] = 1.0
        grid = coarse[:, None].expand(-1, x.shape[0])
        err = self._errors(x, grid, lo, hi)
        best = err.argmin(0).cpu()
        left = coarse[(best - 1).clamp(min=0)]
        right = coarse[(best + 1).clamp(max=coarse.numel() - 1)]
        t = torch.linspace(0.0, 1.0, 25)[:, None]
        fine = left + t * (right - left)  # [25, G]
        grid = torch.cat([grid, fine])
        err = torch.cat([err, self._errors(x, fine, lo, hi)])
        alpha = grid.gather(0, err.argmin(0).cpu()[None])[0]
        dev = self.min_val.device
        return (alpha * lo).to(dev), (alpha * hi).to(dev)


_OBSERVERS: dict[CalibrationMethod, type[Observer]] = {
    cls.method: cls
    for cls in (MinMaxObserver, MovingAverageObserver, PercentileObserver, MSEObserver, KLObserver)
}


def make_observer(spec: QuantSpec, *, for_weight: bool) -> Observer:
    """The observer for ``spec.calibration``.

    Example:
        >>> type(make_observer(QuantSpec(bits=4, calibration="kl"), for_weight=False)).__name__
        'KLObserver'
    """
    return _OBSERVERS[spec.calibration](spec, for_weight=for_weight)
