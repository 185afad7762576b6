from __future__ import annotations

import os

# Spinning OpenMP threads make torch 10x slower when pytest shares 2 cores with other
# processes (worker subprocesses, ONNX Runtime); must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

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
