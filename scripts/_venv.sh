# Sourced by scripts/demo and scripts/test: create .venv once, reuse it after.
# torch is pinned to the CPU wheel; any other torch spec pulls GBs of CUDA packages.
# AUTOQUANT_EXTRAS names the extras the caller needs (e.g. "export,plots" or "dev").
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${AUTOQUANT_VENV:-$ROOT/.venv}"
EXTRAS="${AUTOQUANT_EXTRAS:?set AUTOQUANT_EXTRAS before sourcing _venv.sh}"
# One stamp per set of extras: a venv made by scripts/demo (no dev tools) is completed by
# scripts/test instead of being reused as it is.
STAMP="$VENV/.autoquant-installed.${EXTRAS//,/+}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# (Re)install when these extras were never installed, or pyproject.toml changed since.
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet "torch==2.13.0" -e "$ROOT[$EXTRAS]"
  touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
