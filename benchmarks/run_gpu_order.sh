#!/usr/bin/env bash
# Issue 3's GPU checks in one short call (a lent machine gives ~15 minutes of device time per session, start-up
# included, and at most 10 minutes per call), most wanted first: build offline, the band top-k kernel against
# torch's bf16 GEMM, tfp_order on N = 131,072 and 1,000,000 (no cap, fused Triton scans) with the path checked on
# sampled steps, the GPU tests of the ordering, naive vs tfp_order at N = 4096 (the 100x target; the paper's
# cap), the kernels' tests, each stage cut to the time left.
#   usage: [K=64] [BUDGET=570] bash benchmarks/run_gpu_order.sh [all|tests|bench|large] [N of the large run, default 1000000]
#   K: band list length of the large run (on the 2-core CPU, K = 128 took 119 s at N = 100,000 vs 193 s with 64).
#   BUDGET: seconds the whole script may take (each stage is cut to what is left).
# $OUT gets at most 8 files (the device tool's limit): run.log, pytest_order_gpu.log, two progress logs and the
# JSON results written by this run (also left under benchmarks/results/); build.log only if the build fails.
set -uo pipefail
OUT="${OUT:-/tmp/tfp_gpu_out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
STAGE="${1:-all}"
N="${2:-1000000}"
K="${K:-64}"
BUDGET="${BUDGET:-575}"
start=$SECONDS
left() { local l=$((BUDGET - (SECONDS - start))); [ "$l" -gt "$1" ] && echo "$1" || echo $((l > 5 ? l : 5)); }
marker=$(mktemp); touch "$marker"
exec > >(tee -a "$OUT/run.log") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if ! python3 -c "import tfp_kernels, sys; sys.exit(0 if tfp_kernels.has_cuda_ops() else 1)" 2>/dev/null; then
  python3 -m pip install -v --no-build-isolation --no-deps -e . > /tmp/build.log 2>&1 ||
    { cp /tmp/build.log "$OUT/"; tail -40 /tmp/build.log; exit 1; }
fi
echo "build: $((SECONDS - start)) s"
pytests() {  # pytest "$@" in at most $1 seconds (cut to the time left), appended to pytest_order_gpu.log
  local cap=$1; shift
  echo "== pytest $*" >> "$OUT/pytest_order_gpu.log"
  timeout "$(left "$cap")" python3 -m pytest -q -rs --maxfail=10 -p no:cacheprovider "$@" >> "$OUT/pytest_order_gpu.log" 2>&1
  tail -4 "$OUT/pytest_order_gpu.log"; echo "tests: $((SECONDS - start)) s"
}
if [ "$STAGE" = all ] || [ "$STAGE" = bench ]; then
  timeout "$(left 130)" python3 -m benchmarks.bench_band_topk --sizes 65536
  echo "band top-k: $((SECONDS - start)) s"
fi
if [ "$STAGE" = all ] || [ "$STAGE" = large ]; then
  # N = 131,072 first (a finished JSON with every counter), then 10^6; the walk's tqdm bar (carriage returns,
  # scans and rebuilds in its postfix) goes to a file of its own, its last states to the log
  for n in 131072 "$N"; do
    cap=$([ "$n" = 131072 ] && echo 90 || echo 250)
    timeout "$(left "$cap")" python3 -m benchmarks.bench_order --device cuda --cap none --fallback triton \
        --naive-max-n 0 --reference-max-n 0 --check-steps 500 --k "$K" --sizes "$n" --progress \
        2> "$OUT/order_${n}_progress.log"
    for f in benchmarks/results/order_triton_nocap_*.json; do  # one JSON per size
      [ -e "$f" ] && [ "$f" -nt "$marker" ] && mv "$f" "${f/order_triton_nocap_/order_n${n}_triton_nocap_}"
    done
    tr '\r' '\n' < "$OUT/order_${n}_progress.log" | grep -v '^\s*$' | tail -3
    echo "N = $n: $((SECONDS - start)) s"
  done
fi
if [ "$STAGE" = all ] || [ "$STAGE" = tests ]; then
  pytests 120 -m gpu tests/order  # the GPU equalities with the reference (every fallback, band dtype, metric)
fi
if [ "$STAGE" = all ] || [ "$STAGE" = bench ]; then
  timeout "$(left 110)" python3 -m benchmarks.bench_order --device cuda --sizes 4096
  echo "naive vs tfp_order at 4096: $((SECONDS - start)) s"
fi
if [ "$STAGE" = all ] || [ "$STAGE" = tests ]; then  # the kernels' tests (their CPU cases run on the GPU here)
  pytests 200 tests/order/test_band_topk.py
  pytests 200 tests/order/test_scan_triton.py
fi
find benchmarks/results -name '*.json' -newer "$marker" -exec cp {} "$OUT/" \;
ls "$OUT"
