#!/usr/bin/env bash
# Issue 3's GPU checks in short calls (a lent machine gives ~15 minutes of device time per session, start-up
# included, and at most 10 minutes per call): build offline, the GPU tests of the ordering, the band top-k
# kernel against torch's bf16 GEMM, naive vs tfp_order at N = 4096 (the 100x target; the paper's cap), and
# tfp_order on N = 1,000,000 (no cap, fused Triton scans) with its path checked on sampled steps. Results go to $OUT and benchmarks/results/.
#   usage: [K=64] bash benchmarks/run_gpu_order.sh [all|tests|bench] [N for the large run, default 1000000]
#   K: band list length of the large run (on the 2-core CPU, K = 128 took 130 s at N = 100,000 vs 219 s with 64).
#   "tests" (~5 min with the build) and "bench" (~5 min) fit one call each; "all" runs both (~9 min).
set -uo pipefail
OUT="${OUT:-/tmp/tfp_gpu_out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
STAGE="${1:-all}"
N="${2:-1000000}"
K="${K:-64}"
start=$SECONDS
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
if ! python3 -c "import tfp_kernels, sys; sys.exit(0 if tfp_kernels.has_cuda_ops() else 1)" 2>/dev/null; then
  python3 -m pip install -v --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
fi
echo "build: $((SECONDS - start)) s"
if [ "$STAGE" = all ] || [ "$STAGE" = tests ]; then
  timeout 240 python3 -m pytest -q -rs -p no:cacheprovider -m gpu tests/order 2>&1 | tee "$OUT/pytest_order_gpu.log" | tail -8
  echo "tests: $((SECONDS - start)) s"
fi
if [ "$STAGE" = all ] || [ "$STAGE" = bench ]; then
  timeout 100 python3 -m benchmarks.bench_band_topk --sizes 16384 65536 2>&1 | tee "$OUT/band_topk.log" | tail -4
  echo "band top-k: $((SECONDS - start)) s"
  timeout 90 python3 -m benchmarks.bench_order --device cuda --sizes 4096 2>&1 | tee "$OUT/order_4096.log" | tail -3
  echo "naive vs tfp_order at 4096: $((SECONDS - start)) s"
  timeout 200 python3 -m benchmarks.bench_order --device cuda --cap none --fallback triton --naive-max-n 0 \
      --reference-max-n 0 --check-steps 500 --k "$K" --sizes "$N" 2>&1 | tee "$OUT/order_large.log" | tail -4
  echo "total: $((SECONDS - start)) s"
fi
cp benchmarks/results/*NVIDIA*.json "$OUT/" 2>/dev/null
ls "$OUT"
