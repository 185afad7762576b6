from __future__ import annotations

import os

# Spinning OpenMP threads make torch 10x slower when pytest shares 2 cores with other
# processes (worker subprocesses, ONNX Runtime); must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402


def _devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


@pytest.fixture(params=_devices())
def device(request: pytest.FixtureRequest) -> str:
    """CPU always; CUDA too when present (as in optimum-quanto's conftest)."""
    return request.param


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
