"""quant and transform are pure torch: importing them must not import optuna."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["autoquant.quant", "autoquant.transform"])
def test_does_not_import_optuna(module: str) -> None:
    code = f"import sys, {module}; print('optuna' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
