"""Fixtures of the task tests (missing data and extras: see the root ``tests/conftest.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from autoquant.tasks import CACHE_ENV


@pytest.fixture(scope="module")
def tmp_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh AUTOQUANT_CACHE for the whole test module (trained artifacts shared inside it)."""
    path = tmp_path_factory.mktemp("aq-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(path))
        yield path
