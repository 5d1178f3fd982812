#!/usr/bin/env bash
# One full session on a lent GPU machine (no network there): build offline against its torch, run the
# whole test suite (GPU tests included), the main job on CUDA, and the benchmarks. Results and logs
# go to $OUT (the device tool brings them back) and to benchmarks/results/.
#   usage: bash benchmarks/run_gpu.sh [order sizes...]    (default 4096 16384)
set -uo pipefail
OUT="${OUT:-/tmp/tfp_gpu_out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
start=$SECONDS
python3 -m pip install -v --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $((SECONDS - start)) s"; grep "tfp_kernels:" "$OUT/build.log"
python3 -c "import tfp_kernels as t, torch; print('ext', t.has_extension(), 'cuda ops', t.has_cuda_ops(), torch.ops.tfp_kernels.cuda_version())"
timeout 900 python3 -m pytest -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log" | tail -25
python3 -m tfp_kernels --device cuda --report "$OUT/tfp_pack_cuda.json" 2>&1 | tail -12
timeout 300 python3 benchmarks/bench_binpack.py 2>&1 | tail -4
timeout 300 python3 benchmarks/bench_assemble.py --devices cpu cuda 2>&1 | tail -8
timeout 300 python3 -m benchmarks.bench_band_topk --sizes 16384 65536 2>&1 | tail -4
timeout 300 python3 benchmarks/bench_embed.py --devices cpu cuda 2>&1 | tail -6
timeout 300 python3 benchmarks/bench_pack_gpu.py --device cuda 2>&1 | tail -12
timeout 600 python3 -m benchmarks.bench_order --device cuda --sizes ${@:-4096 16384} 2>&1 | tail -6
timeout 600 python3 -m benchmarks.bench_order --device cuda --fallback triton --reference-max-n 0 --sizes ${@:-4096 16384 65536} 2>&1 | tail -6
cp benchmarks/results/*NVIDIA*.json "$OUT/" 2>/dev/null
ls "$OUT"
