"""Fixtures of the quantizer tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(params=["function", "traced"])
def fq_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both fake-quant paths: the eager ``autograd.Function``s, and the plain-op forms that
    compiled code takes (chosen by ``torch.compiler.is_compiling()``, patched true here)."""
    if request.param == "traced":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    return request.param
