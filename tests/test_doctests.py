"""Every docstring example in the package runs as a test (``# doctest: +SKIP`` opts out)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import autoquant

MODULES = sorted(m.name for m in pkgutil.walk_packages(autoquant.__path__, prefix="autoquant."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    try:
        module = importlib.import_module(name)
    except ImportError as e:  # an optional extra (e.g. nlp) that is not installed
        pytest.skip(f"{name} needs an optional dependency: {e}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
