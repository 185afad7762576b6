"""Re-measure several deployed plans interleaved with the float model, and tell whether the
machine's speed drifted meanwhile.

Figures measured one after the other, minutes apart (a search's trials), may come from a quiet
and a loaded machine: a stored front once ranked plans by 0.308 ms against a re-measured
0.175 ms. :func:`remeasure` deploys every plan and the float model, then times them in rounds,
each round every model once (in a rotated order), so that a change in load hits all of them
alike; each figure is the median of its per-round medians. The float model is the reference:
when its per-round medians spread more than ``max_drift``, the machine drifted and every figure
of the run is flagged noisy.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(8, 4)).eval()
    >>> again = remeasure([(net, None)], net, torch.randn(1, 8), rounds=2, repeats=3)
    >>> len(again.results), again.float_result.attempts
    (1, 2)
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from torch import nn

from autoquant.measure._backends import get_backend
from autoquant.measure._cache import LatencyCache
from autoquant.measure._formats import graph_signature
from autoquant.measure._latency import (
    LatencyResult,
    batched,
    input_signature,
    latency_key,
    result_of,
)
from autoquant.measure._timing import (
    MAX_SPREAD,
    Timing,
    check_count,
    check_positive,
    check_protocol,
    time_calls,
)
from autoquant.transform import Inputs, batch_len, fold_batchnorm
from autoquant.types import QuantPlan


@dataclass(frozen=True)
class Remeasurement:
    """What :func:`remeasure` found.

    Attributes:
        results: one fresh result per plan, in order (``attempts`` = rounds, ``n`` = rounds).
        float_result: the float model's, timed in the same rounds.
        float_drift: ``(max - min) / median`` of the float model's per-round medians.
        drifted: ``float_drift`` exceeded ``max_drift``: every result is flagged noisy.
    """

    results: list[LatencyResult]
    float_result: LatencyResult
    float_drift: float
    drifted: bool

    @property
    def noisy(self) -> bool:
        """Some figure of this run is not to be trusted (drift, or a wide spread)."""
        return self.drifted or any(r.noisy for r in [*self.results, self.float_result])


def remeasure(
    items: Sequence[tuple[nn.Module, QuantPlan | None]],
    float_model: nn.Module,
    example_input: Inputs,
    *,
    backend: str = "onnxruntime",
    threads: int = 1,
    rounds: int = 5,
    warmup: int = 5,
    repeats: int = 20,
    budget_s: float = 0.5,
    calib_inputs: Iterable[Inputs] | None = None,
    max_spread: float = MAX_SPREAD,
    max_drift: float = MAX_SPREAD,
    cache: LatencyCache | None = None,
) -> Remeasurement:
    """Fresh latencies of ``items`` (calibrated fake-quant model, plan), timed interleaved with
    ``float_model`` in ``rounds`` round-robin rounds (see the module doc).

    Args:
        items: the plans to re-measure, e.g. a search's front.
        float_model: the float model (BatchNorm folded at deployment): the reference.
        example_input: one input batch; its batch size is the one measured.
        rounds: rounds; each times every model once (``warmup`` calls, then up to
            ``repeats`` samples or ``budget_s`` seconds; the first round warms up longer).
        max_spread: a figure whose per-round medians spread more is flagged noisy.
        max_drift: the float model's per-round medians may spread this much.
        cache: where to store the fresh figures (replacing those under the same keys).
        (others): as in :func:`~autoquant.measure.measure_latency`.
    """
    check_protocol(threads, warmup, repeats, budget_s, 0, max_spread)
    check_count("rounds", rounds, 1)
    check_positive("max_drift", max_drift)
    impl = get_backend(backend)
    calib = None if calib_inputs is None else list(calib_inputs)
    models = [(fold_batchnorm(float_model).eval(), None), *items]
    b = batch_len(example_input)
    x = batched(example_input, b)
    deployed = [
        impl.deploy(m, p, example_input, threads=threads, calib_inputs=calib) for m, p in models
    ]
    runners = [d.runner(x) for d in deployed]
    medians: list[list[float]] = [[] for _ in runners]
    last: list[Timing | None] = [None] * len(runners)
    with impl.threads_context(threads):
        for r in range(rounds):
            for k in range(len(runners)):
                i = (r + k) % len(runners)  # rotated: no model always right after another
                timing = time_calls(
                    runners[i],
                    warmup=warmup,
                    repeats=repeats,
                    budget_s=budget_s,
                    **({} if r == 0 else {"min_warmup_s": 0.0}),
                )
                medians[i].append(timing.median_ms)
                last[i] = timing
    reference = medians[0]
    drift = (max(reference) - min(reference)) / statistics.median(reference)
    drifted = drift > max_drift
    shape = input_signature(example_input)
    out = []
    for (model, plan), dep, per_round, timing in zip(models, deployed, medians, last, strict=True):
        sig = graph_signature(model, plan)
        key = latency_key(sig, backend, b, threads, shape)
        result = result_of(
            Timing(tuple(per_round), timing.inner if timing else 1),
            rounds,
            max_spread,
            backend=backend,
            threads=threads,
            batch_size=b,
            formats=dict(dep.formats),
            notes=dict(dep.notes),
            signature=sig,
            key=key,
            kernels=dict(dep.kernels),
        )
        if drifted:
            result = replace(result, noisy=True)
        if cache is not None:
            cache.set(key, result.to_dict())
        out.append(result)
    return Remeasurement(out[1:], out[0], drift, drifted)
