"""The sharded ordering's CUDA pieces on one GPU: ``tfp_order_sharded`` in a one-rank NCCL group against
single-process ``tfp_order`` on the same rows, per choice of ring lists and scans.

One rank holds every row, so the ring is one square launch of the fused band kernel (``band_backend="triton"``,
IEEE float32 products) or torch tiles, and the walk's scans are the sharded masked scans (``fallback="triton"``:
the Triton scan kernel over the rank's unvisited rows; ``"device"``: the same pass in torch ops) with their two
collectives each (one rank: no traffic, but the same calls). What it measures: the same path as one process (or
where they part, the float64 gap there), the scans, and the seconds of each phase, side by side with the
single-process engine (float16 x 3 lists, fused scans).

    python -m benchmarks.bench_sharded_cuda [--sizes 65536] [--dim 768]

Writes ``benchmarks/results/sharded_cuda_<gpu>.json``. Needs a CUDA device and NCCL; ``--device cpu`` runs the
same on CPU tensors in a one-rank gloo group (the Triton variants under ``TRITON_INTERPRET=1`` only: a smoke
test of this script at tiny sizes, ``tests/benchmarks/test_bench_sharded_cuda.py``).
"""

from __future__ import annotations

import argparse
import datetime
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._harness import write_results
from benchmarks.bench_order import clustered_embeddings

VARIANTS = [
    {"band_backend": "triton", "fallback": "triton"},
    {"band_backend": "triton", "fallback": "device"},
    {"band_backend": "torch", "fallback": "triton"},
]


def _sampled_steps(n: int, count: int) -> torch.Tensor:
    """``count`` seeded steps of a path of ``n`` nodes to check (all of them for a short path)."""
    if n - 1 <= count:
        return torch.arange(1, n)
    return torch.randperm(n - 1, generator=torch.Generator().manual_seed(0))[:count] + 1


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench_size(n: int, dim: int, device: str = "cuda", k: int | str = "auto") -> dict:
    """One size: the single-process run, then each sharded variant, on the same rows and threshold."""
    import torch.distributed as dist

    from tfp_kernels import check_path, estimate_threshold, tfp_order
    from tfp_kernels.distributed import tfp_order_sharded

    emb = clustered_embeddings(n, dim, seed=0, device=device)
    threshold = estimate_threshold(emb)
    tfp_order(emb[:2048], threshold=threshold)  # warm-up (compiles)
    _sync(device)
    t0 = time.perf_counter()
    single, stats = tfp_order(emb, threshold=threshold, k=k, return_stats=True)
    _sync(device)
    row = {"n": n, "dim": dim, "k": k, "threshold": threshold,
           "single_process": {"seconds": time.perf_counter() - t0, "scans": stats.num_fallbacks,
                              "band_backend": stats.band_backend, "band_dtype": stats.band_dtype,
                              "band_s": stats.time_band_s, "fallback_s": stats.time_fallback_s},
           "sharded": []}
    print(f"N = {n}: single process {row['single_process']}", flush=True)
    group = dist.group.WORLD
    for variant in VARIANTS:
        if device == "cuda":  # warm-up (compiles; the interpreter compiles nothing)
            tfp_order_sharded(emb[:2048], threshold=threshold, group=group, k=k, **variant)
        _sync(device)
        t0 = time.perf_counter()
        path, st = tfp_order_sharded(emb, threshold=threshold, group=group, k=k, return_stats=True, **variant)
        _sync(device)
        seconds = time.perf_counter() - t0
        same = bool(torch.equal(path.cpu(), single.cpu()))
        entry = {**variant, "seconds": seconds, "scans": st.num_fallbacks, "band_backend_used": st.band_backend,
                 "lists_s": st.time_lists_s, "band_s": st.time_band_s, "fallback_s": st.time_fallback_s,
                 "walk_s": st.time_walk_s, "scan_candidates": st.scan_candidates, "same_path": same,
                 "check_path_ok": True if same else check_path(emb, path, threshold=threshold,
                                                               steps=_sampled_steps(n, 500)).ok}
        row["sharded"].append(entry)
        print(f"N = {n}: sharded {entry}", flush=True)
    return row


def main(argv=None) -> None:
    import torch.distributed as dist

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[65536])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--k", type=lambda text: text if text == "auto" else int(text), default="auto",
                        help="band lists' length (auto, or an int: short lists make more scans)")
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("bench_sharded_cuda needs a CUDA device (--device cpu: a smoke test on CPU tensors)")
        torch.cuda.set_device(0)
    transport = "nccl" if args.device == "cuda" else "gloo"
    with tempfile.TemporaryDirectory() as tmp:
        store = dist.FileStore(str(Path(tmp) / "store"), 1)
        dist.init_process_group(transport, store=store, rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=600))
        try:
            rows = [bench_size(n, args.dim, args.device, args.k) for n in args.sizes]
        finally:
            dist.destroy_process_group()
    path = write_results("sharded_cuda", args.device, {"rows": rows, "transport": f"{transport}, one rank"},
                         out_dir=args.out_dir)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
