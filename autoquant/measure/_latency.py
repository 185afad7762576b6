"""Measured latency of the deployed model on a real integer backend, cached by graph signature.

A measurement records its spread (interquartile range over median); above ``max_spread`` it is
timed again (``retries`` more times at most) and, if still too wide, cached and returned flagged
``noisy``, never as if it were good. :func:`~autoquant.measure.remeasure` re-times a set of
deployed plans interleaved with the float model, e.g. a search's front before it is reported.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from autoquant.measure._backends import get_backend
from autoquant.measure._cache import LatencyCache
from autoquant.measure._formats import graph_signature, plan_formats
from autoquant.measure._timing import (
    MAX_SPREAD,
    Timing,
    check_count,
    check_protocol,
    spread,
    stable_timing,
)
from autoquant.transform import Inputs, as_tuple, batch_len, fold_batchnorm, map_inputs
from autoquant.types import QuantPlan


@dataclass(frozen=True)
class LatencyResult:
    """One latency measurement (or a cached copy of one).

    Attributes:
        median_ms: median per-call latency in milliseconds.
        iqr_ms: interquartile range of the per-call samples (ms).
        backend: ``"onnxruntime"`` or ``"torch-x86"``.
        threads: intra-op threads used.
        batch_size: batch size of the timed input.
        n: number of timed samples (each the mean of ``inner`` calls).
        formats: per quantized layer, the format it actually ran in (see
            :func:`autoquant.measure.describe_layer`): sub-8-bit tensors mapped to int8/uint8,
            fp16 run as fp32, layers without an integer kernel, ...
        cached: the value came from the cache (no run this time).
        measure_s: seconds this call took (export, session set-up and timing; or the lookup).
        signature: :func:`graph_signature` of the deployed graph.
        key: the cache key (signature, backend, batch size, threads, input shape, versions).
        kernels: what ran, e.g. ``{"QLinearConv": 19, "QGemm": 1}`` (ONNX Runtime's fused ops)
            or ``{"int8:Conv2d": 19}`` (torch-x86).
        inner: calls per timed sample (fast calls are grouped to beat timer overhead).
        notes: per layer, the backend's plan-independent part of ``formats`` (output grids,
            fallbacks); a cache hit rebuilds ``formats`` for the asking plan from it.
        spread: ``iqr_ms / median_ms``.
        noisy: the spread stayed above the threshold after every attempt: the machine was too
            busy for a trustworthy figure.
        attempts: timings this figure took (1 + retries while noisy; rounds of a re-measure).
    """

    median_ms: float
    iqr_ms: float
    backend: str
    threads: int
    batch_size: int
    n: int
    formats: dict[str, str] = field(default_factory=dict)
    cached: bool = False
    measure_s: float = 0.0
    signature: str = ""
    key: str = ""
    kernels: dict[str, int] = field(default_factory=dict)
    inner: int = 1
    notes: dict[str, str] = field(default_factory=dict)
    spread: float = 0.0
    noisy: bool = False
    attempts: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyResult:
        """From :meth:`to_dict` (also of a version without ``spread``: computed)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values.setdefault("spread", spread(values["iqr_ms"], values["median_ms"]))
        return cls(**values)


# ---------------------------------------------------------------------------------------
# Cache key and the measurement itself
# ---------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def machine_info() -> dict[str, Any]:
    """Platform, CPU model and logical core count of this machine.

    Example:
        >>> sorted(machine_info())
        ['cores', 'cpu', 'platform', 'python']
    """
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
    }


def hardware_id() -> str:
    """CPU model and core count: latencies are only comparable on the same hardware."""
    info = machine_info()
    return f"{info['cpu']} x{info['cores']}"


def input_signature(example_input: Inputs) -> list[Any]:
    """What of the inputs sets the time, besides the batch size: the per-sample shape of a
    float32 tensor; for other dtypes or several inputs, each one's per-sample shape and dtype.

    Example:
        >>> import torch
        >>> input_signature(torch.zeros(2, 3, 8, 8))
        [3, 8, 8]
        >>> input_signature((torch.zeros(2, 7, dtype=torch.long), torch.ones(2, 7)))
        [[[7], 'int64'], [[7], 'float32']]
    """
    inputs = as_tuple(example_input)
    if len(inputs) == 1 and inputs[0].dtype == torch.float32:
        return list(inputs[0].shape[1:])  # the key's form before other inputs existed
    return [[list(t.shape[1:]), str(t.dtype).removeprefix("torch.")] for t in inputs]


def latency_key(
    signature: str, backend: str, batch_size: int, threads: int, input_shape: Sequence[Any]
) -> str:
    """Cache key of one measurement: the graph signature plus everything else that sets the
    time (backend and its version, batch size, threads, per-sample input shape (see
    :func:`input_signature`), hardware)."""
    payload = {
        "sig": signature,
        "backend": backend,
        "version": get_backend(backend).version(),
        "batch": batch_size,
        "threads": threads,
        "shape": list(input_shape),
        "hw": hardware_id(),
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return f"{backend}:b{batch_size}:t{threads}:" + hashlib.sha256(text.encode()).hexdigest()[:24]


def batched(example_input: Inputs, batch_size: int) -> Inputs:
    """``example_input`` at ``batch_size``: each input's rows cycled (or cut)."""
    if batch_len(example_input) == batch_size:
        return example_input
    n = batch_len(example_input)
    idx = torch.arange(batch_size) % n
    return map_inputs(example_input, lambda t: t[idx].contiguous())


def measure_latencies(
    model: nn.Module,
    plan: QuantPlan | None,
    example_input: Inputs,
    batch_sizes: Sequence[int] | None = None,
    *,
    backend: str = "onnxruntime",
    threads: int = 1,
    warmup: int = 10,
    repeats: int = 50,
    budget_s: float = 2.0,
    cache: LatencyCache | None = None,
    calib_inputs: Iterable[Inputs] | None = None,
    retries: int = 2,
    max_spread: float = MAX_SPREAD,
) -> list[LatencyResult]:
    """:func:`measure_latency` at several batch sizes, deploying the model at most once.

    Args:
        batch_sizes: batch sizes to time (default: ``example_input``'s); inputs of another
            batch size cycle ``example_input``'s rows (every input's).
        (others): as in :func:`measure_latency`.

    Returns:
        One :class:`LatencyResult` per batch size, in order.
    """
    check_protocol(threads, warmup, repeats, budget_s, retries, max_spread)
    impl = get_backend(backend)
    if batch_sizes is None:
        batch_sizes = [batch_len(example_input)]
    for b in batch_sizes:
        check_count("batch_size", b, 1)
    t0 = time.perf_counter()
    if plan is None or not plan.layers:
        model = fold_batchnorm(model).eval()  # the float graph is deployed BN-folded
    sig = graph_signature(model, plan)
    shape = input_signature(example_input)
    keys = [latency_key(sig, backend, b, threads, shape) for b in batch_sizes]
    results: list[LatencyResult | None] = [None] * len(keys)
    if cache is not None:
        for i, key in enumerate(keys):
            hit = cache.get(key)
            if hit is not None:
                # Same kernels, maybe other bit widths: describe the asking plan's layers.
                formats = plan_formats(plan, backend, hit.get("notes", {}))
                results[i] = LatencyResult.from_dict(
                    {**hit, "formats": formats, "cached": True, "measure_s": 0.0}
                )
    todo = [i for i, r in enumerate(results) if r is None]
    if todo:
        deployed = impl.deploy(
            model, plan, example_input, threads=threads, calib_inputs=calib_inputs
        )
        for i in todo:
            t1 = time.perf_counter()
            b = batch_sizes[i]
            fn = deployed.runner(batched(example_input, b))
            with impl.threads_context(threads):
                timing, attempts = stable_timing(
                    fn,
                    warmup=warmup,
                    repeats=repeats,
                    budget_s=budget_s,
                    retries=retries,
                    max_spread=max_spread,
                )
            result = result_of(
                timing,
                attempts,
                max_spread,
                backend=backend,
                threads=threads,
                batch_size=b,
                formats=dict(deployed.formats),
                notes=dict(deployed.notes),
                signature=sig,
                key=keys[i],
                kernels=dict(deployed.kernels),
            )
            if cache is not None:
                cache.set(
                    keys[i], {**result.to_dict(), "measure_s": round(time.perf_counter() - t1, 4)}
                )
            results[i] = result
    elapsed = time.perf_counter() - t0
    # The call's whole cost (lookup, or deployment and timing) goes on each result.
    return [replace(r, measure_s=elapsed) for r in results if r is not None]


def result_of(timing: Timing, attempts: int, max_spread: float, **fields: Any) -> LatencyResult:
    """A fresh :class:`LatencyResult` of ``timing``, flagged noisy above ``max_spread``."""
    return LatencyResult(
        median_ms=timing.median_ms,
        iqr_ms=timing.iqr_ms,
        n=len(timing.samples_ms),
        inner=timing.inner,
        spread=timing.spread,
        noisy=timing.spread > max_spread,
        attempts=attempts,
        **fields,
    )


def measure_latency(
    model: nn.Module,
    plan: QuantPlan | None,
    example_input: Inputs,
    *,
    backend: str = "onnxruntime",
    threads: int = 1,
    warmup: int = 10,
    repeats: int = 50,
    budget_s: float = 2.0,
    cache: LatencyCache | None = None,
    calib_inputs: Iterable[Inputs] | None = None,
    retries: int = 2,
    max_spread: float = MAX_SPREAD,
) -> LatencyResult:
    """Latency of ``plan`` deployed on a real integer backend, at ``example_input``'s batch size.

    Protocol: ``threads`` intra-op threads (ONNX Runtime session option; torch's thread count
    is set and restored), ``warmup`` untimed runs, then timed samples until ``repeats`` samples
    or ``budget_s`` seconds (at least 3 samples); median and interquartile range. A timing
    whose spread (IQR / median) exceeds ``max_spread`` is done again, ``retries`` times at
    most; the least spread one is kept, flagged ``noisy`` if still too wide. With a ``cache``,
    a graph with the same signature (see :func:`graph_signature`), backend, batch size, threads
    and input shape is measured once (a noisy figure stays flagged in the cache; re-time it
    with :func:`~autoquant.measure.remeasure`).

    Args:
        model: the calibrated result of :func:`autoquant.transform.apply_plan` (values do not
            change the latency, but integer weights are computed from them).
        plan: the plan ``model`` was built from; ``None`` for a float model.
        example_input: one input batch (a tensor, or a tuple of tensors of any dtype); its
            batch size is the one measured.
        backend: ``"onnxruntime"`` or ``"torch-x86"``.
        threads: intra-op threads.
        warmup: untimed runs first.
        repeats: timed samples at most.
        budget_s: stop sampling after this many seconds (once 3 samples exist).
        cache: a :class:`LatencyCache` to reuse measurements.
        calib_inputs: inputs for the output ranges of layers that need their own 8-bit output
            grid (default ``[example_input]``; latency does not depend on it).
        retries: timings again at most while the spread exceeds ``max_spread``.
        max_spread: the largest IQR / median of a trustworthy measurement.

    Returns:
        A :class:`LatencyResult`.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval()
        >>> r = measure_latency(net, None, torch.randn(1, 3, 16, 16), repeats=5)
        >>> r.median_ms > 0, r.batch_size, r.cached
        (True, 1, False)
    """
    return measure_latencies(
        model,
        plan,
        example_input,
        None,
        backend=backend,
        threads=threads,
        warmup=warmup,
        repeats=repeats,
        budget_s=budget_s,
        cache=cache,
        calib_inputs=calib_inputs,
        retries=retries,
        max_spread=max_spread,
    )[0]


def measure_float_latency(
    model: nn.Module,
    example_input: Inputs,
    *,
    backend: str = "onnxruntime",
    threads: int = 1,
    warmup: int = 10,
    repeats: int = 50,
    budget_s: float = 2.0,
    cache: LatencyCache | None = None,
    retries: int = 2,
    max_spread: float = MAX_SPREAD,
) -> LatencyResult:
    """Latency of the float32 model (BatchNorm folded) on ``backend``: the baseline.

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 4)).eval()
        >>> measure_float_latency(net, torch.randn(2, 8), repeats=5).formats
        {}
    """
    return measure_latency(
        model,
        None,
        example_input,
        backend=backend,
        threads=threads,
        warmup=warmup,
        repeats=repeats,
        budget_s=budget_s,
        cache=cache,
        retries=retries,
        max_spread=max_spread,
    )
