"""Quantization math on tensors (torch only): qparams, fake-quant with STE and LSQ, observers.

Example:
    >>> import torch
    >>> from autoquant.quant import FakeQuantize, fake_quantize, qparams_from_range
    >>> from autoquant.types import QuantSpec
    >>> s, z = qparams_from_range(torch.tensor(-1.0), torch.tensor(1.0), QuantSpec(bits=8))
    >>> fake_quantize(torch.tensor([0.5]), s, z, -127, 127).tolist()
    [0.5039370059967041]
"""

from __future__ import annotations

from autoquant.quant._fake import fake_quantize, fake_quantize_lsq, lsq_grad_factor
from autoquant.quant._module import FakeQuantize, constrain_quantizers_
from autoquant.quant._observers import (
    KLObserver,
    MinMaxObserver,
    MovingAverageObserver,
    MSEObserver,
    Observer,
    PercentileObserver,
    clear_weight_range_cache,
    make_observer,
)
from autoquant.quant._qparams import (
    EPS,
    dequantize,
    qparams_from_qrange,
    qparams_from_range,
    quantize,
)

__all__ = [
    "EPS",
    "FakeQuantize",
    "KLObserver",
    "MSEObserver",
    "MinMaxObserver",
    "MovingAverageObserver",
    "Observer",
    "PercentileObserver",
    "clear_weight_range_cache",
    "constrain_quantizers_",
    "dequantize",
    "fake_quantize",
    "fake_quantize_lsq",
    "lsq_grad_factor",
    "make_observer",
    "qparams_from_qrange",
    "qparams_from_range",
    "quantize",
]
