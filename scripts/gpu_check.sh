#!/usr/bin/env bash
# The GPU checks of issue 13, as one script for a borrowed CUDA machine that has torch,
# onnxruntime and pytest but no network. Before the call, next to the repository root:
#   .whl/      wheels of optuna and its needs (alembic, colorlog, sqlalchemy, mako, greenlet)
#   .devdata/  a copy of the data folder (AUTOQUANT_DATA)
#   .devdata/cache/  optional: autoquant cache files to start from (a fine-tuned baseline)
# Usage: scripts/gpu_check.sh [tests] [overhead] [search] [recovery]   (default: all four)
# Writes its logs under $OUT (default ./gpu-check-out). Each step has its own time limit, so
# one that hangs does not hide the others.
set -u
OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
export AUTOQUANT_DATA="$PWD/.devdata/data" AUTOQUANT_CACHE=/tmp/aq-cache AUTOQUANT_RUNS=/tmp/aq-runs
mkdir -p "$AUTOQUANT_CACHE" && { [ ! -d .devdata/cache ] || cp -r .devdata/cache/. "$AUTOQUANT_CACHE"; }
STEPS="${*:-tests overhead search recovery}"
want() { [[ " $STEPS " == *" $1 "* ]]; }
step() {  # step NAME SECONDS CMD...: run, log to $OUT/NAME.log, report the exit status
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "=== $name: exit $? after $((SECONDS - t0)) s"
  tail -n 25 "$OUT/$name.log"
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, optuna, onnxruntime as o; print('torch', torch.__version__,
  'optuna', optuna.__version__, 'ort', o.__version__, 'cuda', torch.cuda.is_available())"

# 1. Every CUDA test (skipped in CI) and the device-parametrised ones.
want tests && step tests 110 python3 -m pytest -q -p no:cacheprovider tests -k cuda -rs
# 2. The fake-quant step cost against the folded float step, eager and compiled.
want overhead && step overhead 130 python3 scripts/bench_qat_overhead.py --device cuda --batch-size 256 \
  --compile --rounds 40
# 3. A real search end to end on the GPU (QAT and evaluation on CUDA, latency on the CPU).
want search && step search $((${SEARCH_TIMEOUT:-150} + 50)) python3 -m autoquant.cli search studies/cifar10_resnet20.toml \
  --device cuda --trials 6 --timeout "${SEARCH_TIMEOUT:-150}" -q
want search && python3 - <<'EOF' >"$OUT/trials.log" 2>&1
import optuna
s = optuna.load_study(study_name="cifar10_resnet20",
                      storage="sqlite:////tmp/aq-runs/cifar10_resnet20/study.db")
for t in s.trials:
    d = t.duration.total_seconds() if t.duration else float("nan")
    print(t.number, t.state.name, f"{d:.1f}s", t.values)
EOF
want search && cat "$OUT/trials.log"
# 4. Recovery at more steps than the CPU could afford (is the mixed plan step-limited?).
want recovery && step recovery 150 python3 scripts/bench_qat_recovery.py --device cuda \
  --eval-size 2000 --steps 200 1000 --plans w4a4 mixed --variants plain both
