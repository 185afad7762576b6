"""Importing a layer loads nothing above it (and quant, transform, measure never load optuna).

lint-imports checks the static imports; these check what actually lands in sys.modules.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

UPPER = ("optuna", "autoquant.search", "autoquant.report", "autoquant.cli")


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("autoquant.quant", ("optuna", "autoquant.transform", *UPPER)),
        ("autoquant.transform", ("optuna", "autoquant.train", "autoquant.measure", *UPPER)),
        ("autoquant.train", ("autoquant.measure", "autoquant.tasks", "autoquant.space", *UPPER)),
        ("autoquant.tasks", ("autoquant.measure", "autoquant.space", *UPPER)),
        ("autoquant.measure", ("autoquant.tasks", "autoquant.space", *UPPER)),
    ],
)
def test_import_loads_nothing_from_upper_layers(module: str, forbidden: tuple[str, ...]) -> None:
    code = (
        f"import sys, {module}; "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] == 'optuna' "
        f"or m.startswith({forbidden!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
