"""Fixtures of the measure tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from measure_models import calib_inputs, quantized, tiny_model
from torch import nn

from autoquant.measure import SATURATION_ENV
from autoquant.types import QuantPlan


@pytest.fixture
def vnni(monkeypatch: pytest.MonkeyPatch) -> None:
    """Deploy as on a CPU whose int8 kernels do not saturate (x86 with VNNI, or ARM), for
    tests of the graph's structure; their outputs may differ on a CPU without VNNI."""
    monkeypatch.setenv(SATURATION_ENV, "0")


@pytest.fixture
def make_quantized() -> Callable[[QuantPlan], nn.Module]:
    """``make_quantized(plan)``: the tiny model, quantized per ``plan`` and calibrated."""
    return lambda plan: quantized(tiny_model(), plan, calib_inputs())
