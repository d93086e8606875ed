#!/usr/bin/env bash
# Every pending GPU check of docs/PERFORMANCE.md as ONE device call (docs/PERFORMANCE.md, "Running the GPU checks"):
#
#   bash benchmarks/gpu_session.sh                 # device call: carry [".whl"], timeout_s 560
#   DEVICE=cpu PYTHON=.venv/bin/python bash benchmarks/gpu_session.sh   # CPU dry run of the plumbing, tiny sizes
#
# 1. writes the environment (nvidia-smi, versions) to $OUT/env.txt; 2. installs the wheels in .whl/ (deepspeed,
# webdataset and what they need that the GPU image lacks: `make wheels` prepares them) into /tmp/site;
# 3. runs benchmarks/gpu_session.py: every step under its own time limit, all of them within BUDGET_S seconds of
# this script's start, results rewritten after each step: $OUT/summary.md, results.json, session.log.
#
# Variables: DEVICE (cuda | cpu), BUDGET_S (500), OUT (the device call's $OUT, else runs/gpu_session), PYTHON
# (python3), ONLY / SKIP (comma lists of step names or prefixes: `ONLY=gpu_multicrop,engine_ddp_bf16_compile`),
# SELFTEST=1 (adds steps that fail, hang and get skipped), COMMIT (recorded in the summary).
set -u
T0=$(date +%s)
cd "$(dirname "$0")/.." || exit 1
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/runs/gpu_session}
BUDGET_S=${BUDGET_S:-500}
DEADLINE=$((T0 + BUDGET_S))
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
ENV_TXT="$OUT/env.txt"

{
  echo "== $(date -u '+%Y-%m-%d %H:%M:%S UTC'), device $DEVICE, budget ${BUDGET_S} s, commit ${COMMIT:-?}"
  uname -srm
  echo "cpus: $(nproc)"; free -g | head -2
  if command -v nvidia-smi >/dev/null 2>&1; then
    timeout 30 nvidia-smi
    timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.sm,power.limit,temperature.gpu \
      --format=csv
  else
    echo "(no nvidia-smi)"
  fi
} >"$ENV_TXT" 2>&1

if ls .whl/*.whl >/dev/null 2>&1; then
  echo "== wheels: $(ls .whl | tr '\n' ' ')" >>"$ENV_TXT"
  if [ "$DEVICE" = cuda ]; then
    if timeout 180 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl >>"$ENV_TXT" 2>&1; then
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
      echo "installed into /tmp/site" >>"$ENV_TXT"
    else
      echo "WHEEL INSTALL FAILED: the deepspeed steps will be skipped" >>"$ENV_TXT"
    fi
  else  # dry run: check the set installs for the device's Python 3.12 without putting it on this path
    if timeout 180 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "${TMPDIR:-/tmp}/gpu_session_site_check" --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux_2_28_x86_64 --platform any .whl/*.whl >>"$ENV_TXT" 2>&1; then
      echo "wheel set installs for cp312 manylinux (checked, not used)" >>"$ENV_TXT"
    else
      echo "WHEEL INSTALL CHECK FAILED" >>"$ENV_TXT"
    fi
  fi
else
  echo "== no .whl/ folder: deepspeed/webdataset only if already installed (make wheels; carry .whl)" >>"$ENV_TXT"
fi

timeout 120 "$PY" - >>"$ENV_TXT" 2>&1 <<'EOF'
import importlib, platform
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
for m in ("triton", "torchvision", "timm", "deepspeed", "webdataset", "pydantic", "numpy", "PIL"):
    try:
        mod = importlib.import_module(m)
        print(f"{m} {getattr(mod, '__version__', '?')} ({mod.__file__})")
    except Exception as e:  # noqa: BLE001
        print(f"{m}: {type(e).__name__}: {str(e)[:200]}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"gpu {p.name}, {p.total_memory / 2**30:.1f} GiB, sm {p.major}.{p.minor}, {p.multi_processor_count} SMs")
EOF
echo "== env done after $(($(date +%s) - T0)) s" >>"$ENV_TXT"
cat "$ENV_TXT"

LEFT=$((DEADLINE - $(date +%s)))
ARGS=(--device "$DEVICE" --out "$OUT" --deadline "$DEADLINE")
[ -n "${ONLY:-}" ] && ARGS+=(--only "$ONLY")
[ -n "${SKIP:-}" ] && ARGS+=(--skip "$SKIP")
[ -n "${SELFTEST:-}" ] && ARGS+=(--selftest)
# backstop: the driver keeps its own deadline; this only fires if the driver itself hangs
timeout -k 10 $((LEFT + 30)) "$PY" benchmarks/gpu_session.py "${ARGS[@]}"
rc=$?
echo "== gpu_session.sh: driver exit $rc after $(($(date +%s) - T0)) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $rc
