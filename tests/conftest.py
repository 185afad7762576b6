from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

# Spinning OpenMP threads make torch 10x slower when pytest shares 2 cores with other
# processes (worker subprocesses, ONNX Runtime); must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

from autoquant.tasks import data_dir  # noqa: E402

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


def _require(relpath: str) -> Path:
    path = data_dir() / relpath
    if not path.is_file():
        msg = f"{relpath} not found in {data_dir()} (set AUTOQUANT_DATA to run this test)"
        if os.environ.get(REQUIRE_DATA_ENV) == "1":
            pytest.fail(f"{msg}; {REQUIRE_DATA_ENV}=1 requires the data", pytrace=False)
        pytest.skip(msg)
    return path


@pytest.fixture
def require_data() -> Callable[[str], Path]:
    """``require_data(relpath)``: the path of a file under ``AUTOQUANT_DATA``; the test skips
    when it is absent, or fails with ``AUTOQUANT_REQUIRE_DATA=1`` (CI sets it), so a data folder
    that went missing cannot silently turn the real-data tests into skips."""
    return _require
