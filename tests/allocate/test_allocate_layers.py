"""autoquant.allocate sits between {measure, tasks, space} and search, and never loads optuna."""

from __future__ import annotations

import subprocess
import sys


def test_import_loads_no_optuna_and_nothing_above() -> None:
    code = (
        "import sys, autoquant.allocate; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'optuna' "
        "or m.startswith(('autoquant.search', 'autoquant.report', 'autoquant.cli', "
        "'autoquant.tasks'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
