"""Fixtures of the quantizer tests."""

from __future__ import annotations

import pytest
import torch

from autoquant.quant import clear_weight_range_cache


@pytest.fixture(params=["function", "traced"])
def fq_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both fake-quant paths: the eager ``autograd.Function``s, and the plain-op forms that
    compiled code takes (chosen by ``torch.compiler.is_compiling()``, patched true here)."""
    if request.param == "traced":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    return request.param


@pytest.fixture(autouse=True)
def _fresh_weight_ranges() -> None:
    """Each test computes its weight ranges itself: the process-wide cache would otherwise hand
    a test the range an earlier test computed (equal values, but a patched observer would not
    run)."""
    clear_weight_range_cache()
