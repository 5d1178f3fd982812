#!/usr/bin/env bash
# Issue 3's GPU checks, in named stages run in the order given, each cut to the time left of BUDGET seconds (a
# lent machine gives ~15 minutes of device time per session, start-up included, at most 10 minutes per call;
# a second call within 30 s finds the machine warm, built and with Triton's cache):
#   band     the band top-k kernel (float16 x 3 tuned, the pairs kernel in float16 x 3 and bf16, then pointer vs
#            tensor-descriptor tiles; bf16 x 3, tf32, float32, bf16) against torch's bf16 GEMM, N = 65,536
#   pairs    the row-block vs the pairs kernel (float16 x 3), each with and without SINGLES, the pairs kernel with
#            64-row tiles, at N = 262,144 (larger super blocks; more tiles with one candidate per row), no torch lists
#   large    tfp_order on N = 131,072 then $N (default 10^6; LARGE_SIZES="n ..." for others), no cap, fused Triton
#            scans, K = $K (default auto), paths checked on 500 sampled steps; first a K = 128 band kernel check
#            (its compile timed; K = 64 if it fails); the walk's progress (scans, ms each, rebuilds) in
#            order_<n>_progress.log; BAND_SCHEDULE=pairs: the band lists of the pairs kernel (JSON *_pairs_*)
#   new-tests  the GPU tests of the kernels added since the last GPU run (settle kernels, stacked products,
#            longer lists, float64 long lists, close sets with a cap, the pairs kernel)
#   sharded  the sharded path's CUDA pieces: the rows-against-columns band launch's tests on the GPU, then
#            benchmarks/bench_sharded_cuda.py: the ring's Triton lists and the sharded masked scans in a one-rank
#            NCCL group vs one process at N = 65,536 (sharded_cuda_*.json)
#   band-k   the float16 x 3 band kernel at K = 128 and 256, N = 65,536 (band_topk_k<K>_*.json)
#   profile  torch.profiler over tfp_order at N = 131,072 (where a scan's time goes)
#   tests    the GPU tests of the ordering, then the kernels' tests (their CPU cases run on the GPU here)
#   n4096    naive vs reference vs tfp_order at N = 4096 (the 100x target; the paper's cap)
#   device-scans  N = 131,072 with the torch device scans (the auto rule beyond 16,384 rows), vs `large`
#   all      = band large tests profile n4096
# usage: [K=auto] [N=1000000] [LARGE_SIZES="131072 $N"] [BUDGET=575] bash benchmarks/run_gpu_order.sh STAGE...
#   e.g. first call: BUDGET=300 bash benchmarks/run_gpu_order.sh new-tests band; at once after (warm):
#   LARGE_SIZES=1000000 BUDGET=400 bash benchmarks/run_gpu_order.sh large
#   (a session has ~15 minutes of device time, the machine's start included; first calls of a new list length
#   or launch setting compile for tens of seconds: benchmarks/compile_times.py measures them without a GPU)
# $OUT gets at most 8 files (the device tool's limit): run.log, pytest_order_gpu.log, the progress logs and the
# JSON results written by this call (also left under benchmarks/results/); build.log only if the build fails.
set -uo pipefail
OUT="${OUT:-/tmp/tfp_gpu_out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
N="${N:-1000000}"
K="${K:-auto}"
BAND_SCHEDULE="${BAND_SCHEDULE:-rows}"
LARGE_SIZES="${LARGE_SIZES:-131072 $N}"
BUDGET="${BUDGET:-575}"
STAGES=("$@"); [ ${#STAGES[@]} -eq 0 ] && STAGES=(all)
[ "${STAGES[*]}" = all ] && STAGES=(band large tests profile n4096)
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
# the extension's parallel loops on torch's threads (built with -fopenmp; 1 here means they run serially)
python3 -c "import torch, tfp_kernels; torch.set_num_threads(4); print('extension parallel threads (of 4):', torch.ops.tfp_kernels.parallel_threads())"
pytests() {  # pytest "$@" in at most $1 seconds (cut to the time left), appended to pytest_order_gpu.log
  local cap=$1; shift
  echo "== pytest $*" >> "$OUT/pytest_order_gpu.log"
  timeout "$(left "$cap")" python3 -m pytest -q -rs --maxfail=10 -p no:cacheprovider "$@" >> "$OUT/pytest_order_gpu.log" 2>&1
  tail -4 "$OUT/pytest_order_gpu.log"; echo "tests: $((SECONDS - start)) s"
}
for stage in "${STAGES[@]}"; do
  case "$stage" in
    band)
      timeout "$(left 200)" python3 -m benchmarks.bench_band_topk --sizes 65536 ;;
    large)
      # K = 128 (k="auto" at 10^6): its band kernel's first compile, timed, before the large runs
      if [ "$K" = auto ] && ! timeout "$(left 90)" python3 - <<'PY'
import time, torch
from benchmarks.bench_order import clustered_embeddings
from tfp_kernels.order.band_topk import band_topk_torch
from tfp_kernels.order.band_topk_triton import band_topk_triton
x = clustered_embeddings(3000, 768, device="cuda"); sq = x.square().sum(1)
lo = torch.full((3000,), 2000.0, device="cuda"); hi = torch.full((3000,), 2100.0, device="cuda")
t0 = time.perf_counter(); out = band_topk_triton(x, sq, lo, hi, 128, input_dtype="float16x3"); torch.cuda.synchronize()
print(f"K = 128 band kernel: first call (compile) {time.perf_counter() - t0:.1f} s", flush=True)
ref = band_topk_torch(x, sq, lo, hi, 128)
err = float((out.s2 - ref.s2).nan_to_num(posinf=0.0).abs().max())  # (sorted values: robust to swapped near-ties)
print(f"K = 128 band kernel: |s2 - torch s2| <= {err:.2e}", flush=True)
raise SystemExit(0 if err < 0.1 and torch.equal(out.s2.isinf(), ref.s2.isinf()) else 1)
PY
      then echo "K = 128 band kernel check failed or timed out: K = 64"; K=64; fi
      for n in $LARGE_SIZES; do
        cap=$([ "$n" = 131072 ] && echo 150 || echo 420)  # (131,072: the first tuned call compiles 5 band settings)
        timeout "$(left "$cap")" python3 -m benchmarks.bench_order --device cuda --cap none --fallback triton \
            --naive-max-n 0 --reference-max-n 0 --check-steps 500 --k "$K" --sizes "$n" --progress \
            --band-schedule "$BAND_SCHEDULE" \
            2> "$OUT/order_${n}_progress.log"
        for f in benchmarks/results/order*_triton_nocap_*.json; do  # one JSON per size (and per K)
          case "$(basename "$f")" in order_n*) continue ;; esac
          [ -e "$f" ] && [ "$f" -nt "$marker" ] && mv "$f" "${f/results\/order_/results/order_n${n}_}"
        done
        tr '\r' '\n' < "$OUT/order_${n}_progress.log" | grep -v '^\s*$' | tail -3
        echo "N = $n: $((SECONDS - start)) s"
        # the 10^6 run only with the Triton lists at N = 131,072 (a failed kernel falls back to torch lists,
        # minutes at 10^6)
        if [ "$n" = 131072 ] && ! python3 -c "import glob, json, sys; f = glob.glob('benchmarks/results/order_n131072_*nocap_*.json')
sys.exit(0 if f and json.load(open(f[0]))['rows'][0]['tfp_order']['band_backend'] == 'triton' else 1)"; then
          echo "N = 131072 did not finish with the Triton band lists: no 10^6 run"; break
        fi
      done ;;
    pairs)
      timeout "$(left 150)" python3 -m benchmarks.bench_band_topk --sizes 262144 --no-torch \
          --cases triton_fp16x3_pointer triton_fp16x3_singles triton_fp16x3_pairs triton_fp16x3_pairs_singles \
          triton_fp16x3_pairs_b64 \
          --stage band_topk_n262144 ;;
    band-k)
      for kk in 128 256; do timeout "$(left 70)" python3 -m benchmarks.bench_band_topk --sizes 65536 --k $kk \
          --cases triton_fp16x3; done ;;
    device-scans)  # N = 131,072 with the torch device scans (fallback="auto" beyond 16,384 CUDA rows), to set
                   # the auto rule against the large stage's fused Triton scans on the same data
      timeout "$(left 120)" python3 -m benchmarks.bench_order --device cuda --cap none --fallback device \
          --naive-max-n 0 --reference-max-n 0 --check-steps 500 --k "$K" --sizes 131072 ;;
    profile)
      timeout "$(left 90)" python3 -m benchmarks.profile_order --device cuda --n 131072 --fallback triton ;;
    tests)
      pytests 120 -m gpu tests/order  # the GPU equalities with the reference (every fallback, band dtype, metric)
      pytests 150 tests/order/test_band_topk.py
      pytests 100 tests/order/test_scan_triton.py ;;
    new-tests)  # the kernels added since the last GPU run: settle kernels, stacked products, 128/256-column lists,
                # float64 long lists beside the Triton lists
      pytests 60 tests/order/test_fast.py -k "cuda_long_lists or cuda_close_sets or cuda_pairs"
      pytests 30 tests/test_extension.py -k parallel_loops  # (the OpenMP build against this machine's torch)
      pytests 60 tests/order/test_scan_triton.py -k settle
      pytests 120 tests/order/test_band_topk.py -k "256 or stacked or coherent or candidates"
      pytests 90 tests/order/test_band_pairs.py ;;
    sharded)
      pytests 60 tests/order/test_band_topk.py -k "columns"
      timeout "$(left 240)" python3 -m benchmarks.bench_sharded_cuda --sizes 65536 ;;
    n4096)
      timeout "$(left 110)" python3 -m benchmarks.bench_order --device cuda --sizes 4096 ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
  echo "$stage: $((SECONDS - start)) s"
done
# (the profile's tables are in run.log; its JSON stays behind: at most 8 files come back)
find benchmarks/results -name '*.json' ! -name 'profile_order_*' -newer "$marker" -exec cp {} "$OUT/" \;
ls "$OUT"
