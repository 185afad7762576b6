from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from autoquant.tasks import CACHE_ENV, data_dir


@pytest.fixture(scope="module")
def tmp_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh AUTOQUANT_CACHE for the whole test module (trained artifacts shared inside it)."""
    path = tmp_path_factory.mktemp("aq-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(path))
        yield path


def _require(relpath: str) -> Path:
    path = data_dir() / relpath
    if not path.is_file():
        pytest.skip(f"{relpath} not found in {data_dir()} (set AUTOQUANT_DATA to run this test)")
    return path


@pytest.fixture
def require_data() -> Callable[[str], Path]:
    """``require_data(relpath)``: the data file's path, or skip when the file truly is absent."""
    return _require
