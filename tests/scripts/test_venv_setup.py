"""The set-up scripts: the venv is completed when a command needs other extras."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# A stand-in for python3: `-m venv DIR` makes DIR/bin/python (this same stub); any other call
# (pip) is logged, so the test sees what the script would install without installing anything.
STUB = """#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
  mkdir -p "$3/bin" && cp "$0" "$3/bin/python" && exit 0
fi
echo "$*" >> "$AQ_LOG"
"""


def _source(extras: str, venv: Path, py: Path, log: Path) -> list[str]:
    env = {
        **os.environ,
        "AUTOQUANT_EXTRAS": extras,
        "AUTOQUANT_VENV": str(venv),
        "PYTHON": str(py),
        "AQ_LOG": str(log),
    }
    before = log.read_text().splitlines() if log.exists() else []
    subprocess.run(["bash", "-c", f"source {ROOT / 'scripts' / '_venv.sh'}"], env=env, check=True)
    after = log.read_text().splitlines() if log.exists() else []
    return [line for line in after[len(before) :] if "install" in line and "-e" in line]


def test_demo_venv_is_completed_by_the_test_command(tmp_path: Path) -> None:
    py = tmp_path / "python3"
    py.write_text(STUB)
    py.chmod(py.stat().st_mode | stat.S_IEXEC)
    venv, log = tmp_path / "venv", tmp_path / "pip.log"
    demo = _source("export,plots", venv, py, log)
    assert len(demo) == 1 and "[export,plots]" in demo[0] and "torch==2.13.0" in demo[0]
    test = _source("dev", venv, py, log)  # the demo's venv lacks the dev tools
    assert len(test) == 1 and "[dev]" in test[0]
    assert _source("dev", venv, py, log) == []  # reused once installed
    assert _source("export,plots", venv, py, log) == []
