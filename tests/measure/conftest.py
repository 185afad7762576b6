"""Fixtures of the measure tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from measure_models import calib_inputs, quantized, tiny_model
from torch import nn

from autoquant.types import QuantPlan


@pytest.fixture
def make_quantized() -> Callable[[QuantPlan], nn.Module]:
    """``make_quantized(plan)``: the tiny model, quantized per ``plan`` and calibrated."""
    return lambda plan: quantized(tiny_model(), plan, calib_inputs())
