#!/usr/bin/env bash
# GPU correctness tests + the quick benchmark sweep, in ONE call, on a machine where nothing can
# be installed (torch and triton preinstalled; no network). Everything goes to $OUT:
#   $OUT/env.txt            GPU, driver, torch/triton versions, commit, date
#   $OUT/tests.log          pytest --device cuda (kernels, paged, CUDA graphs, full-size checks,
#                           the DeepGEMM drop-in's no-host-sync / graph-capture check)
#   $OUT/bench/             CSV, JSON, PNG of `python -m flashmemory_triton.bench --quick`
#                           (the v2 dense scorer as `triton`, the kernel before it as `triton_v1`)
#   $OUT/bench-mixed/       CSV, JSON, PNG of `... bench --mixed` (32 requests of 8K-256K
#                           chunks: one launch for the batch versus one per request)
#   $OUT/summary.txt        exit codes and the tail of each step
# Budget: well inside 8 minutes on an H100 including Triton compilation. The step time limits
# (220 + 240 + 130 s) add up to under 10 minutes, the longest a lent machine runs one command.
# Usage: OUT=/some/dir bash scripts/gpu_check.sh   (OUT defaults to a temp dir)
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
PY=${PYTHON:-python3}

# Stage the package without installing it: kernels/ and bench/ become flashmemory_triton/kernels
# and flashmemory_triton/bench, as the wheel lays them out (pyproject's package-dir), and the
# tests and benchmarks run from the stage.
STAGE=$(mktemp -d)
cp -r "$REPO/flashmemory_triton" "$STAGE/"
cp -r "$REPO/kernels" "$STAGE/flashmemory_triton/kernels"
cp -r "$REPO/bench" "$STAGE/flashmemory_triton/bench"
cp -r "$REPO/tests" "$REPO/pyproject.toml" "$STAGE/"
cd "$STAGE" || exit 2
export PYTHONPATH="$STAGE${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
export FLASHMEMORY_POISON=1

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)"
  echo "dirty: $(git -C "$REPO" status --porcelain 2>/dev/null | wc -l) files"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv 2>&1
  "$PY" - <<'PY'
import torch, triton, platform
print("python", platform.python_version(), "torch", torch.__version__, "triton", triton.__version__)
print("cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
PY
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

step() {  # step NAME TIMEOUT_S CMD...: run, log, record the exit code
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc in $(( $(date +%s) - t0 ))s" | tee -a "$OUT/summary.txt"
  tail -n 25 "$OUT/$name.log" >> "$OUT/summary.txt"
  return $rc
}

step tests 220 "$PY" -m pytest -q -p no:cacheprovider --device cuda \
  tests/test_kernels.py tests/test_gpu.py tests/test_paged.py tests/test_cuda_graphs.py \
  tests/test_deepgemm.py::test_gpu_no_host_sync_and_graph_capture \
  -k "not compile" -o addopts=""
tests_rc=$?
# --time-budget: rows not started after 170 s are recorded as skipped and the results written
# (the headline first), so a slow row never costs the whole step's output to its time limit.
step bench 240 "$PY" -m flashmemory_triton.bench --quick --device cuda --time-budget 170 \
  --out "$OUT/bench"
bench_rc=$?
# (the same for the mixed batch: 90 s of its 130 s; the paged v2 kernel as triton_paged, the
# kernel before it as triton_paged_v1, the shared pool first)
step mixed 130 "$PY" -m flashmemory_triton.bench --mixed --device cuda --time-budget 90 \
  --out "$OUT/bench-mixed"
mixed_rc=$?
rm -rf "$STAGE"
echo "tests_rc=$tests_rc bench_rc=$bench_rc mixed_rc=$mixed_rc" | tee -a "$OUT/summary.txt"
tail -n 40 "$OUT/bench.log"
tail -n 16 "$OUT/mixed.log"
exit $(( tests_rc != 0 || bench_rc != 0 || mixed_rc != 0 ))
