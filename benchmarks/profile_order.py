"""Where ``tfp_order``'s time goes: ``torch.profiler`` over one run on the benchmark's clustered data.

    python -m benchmarks.profile_order --device cuda --n 131072 --fallback triton
    python -m benchmarks.profile_order --device cpu --n 20000

The walk's phases are labelled (``tfp_walk``: the C++ walk calls, ``tfp_scan``: the scans run from Python,
``tfp_rebuild``: list rebuilds); the tables list the operators by self CPU time and by self device time, and
the run's counters (scans, rebuilds, seconds per phase) are printed first. The Triton kernels are compiled
by an unprofiled run on the leading rows first. Profiling slows the small operators down: read the tables
for where the time goes (which operators, how many calls per scan), and the benchmarks for the figures.
Writes ``benchmarks/results/profile_order_<device>.json`` (the top operators of both tables).
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks._harness import write_results
from benchmarks.bench_order import clustered_embeddings
from tfp_kernels import estimate_threshold, tfp_order


def _rows(events, key: str, limit: int) -> list[dict]:
    rows = []
    for e in sorted(events, key=lambda e: getattr(e, key, 0.0), reverse=True)[:limit]:
        rows.append({
            "name": e.key, "calls": e.count,
            "self_cpu_ms": e.self_cpu_time_total / 1e3,
            "cpu_total_ms": e.cpu_time_total / 1e3,
            "self_device_ms": getattr(e, "self_device_time_total", 0.0) / 1e3,
        })
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n", type=int, default=131072)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--k", type=lambda v: v if v == "auto" else int(v), default="auto")
    p.add_argument("--fallback", default="auto", choices=["auto", "host", "device", "triton"])
    p.add_argument("--rows", type=int, default=25, help="operators per table")
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    emb = clustered_embeddings(args.n, args.dim, device=args.device)
    t = estimate_threshold(emb)
    tfp_order(emb[: min(args.n, 32768)], threshold=t, k=args.k, fallback=args.fallback)  # compiles, tuning
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with profile(activities=activities) as prof:
        _, stats = tfp_order(emb, threshold=t, k=args.k, fallback=args.fallback, return_stats=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
    counters = {
        "n": args.n, "k": stats.k, "fallback": args.fallback, "band_dtype": stats.band_dtype,
        "scans": stats.num_fallbacks, "rebuilds": stats.num_rebuilds, "band_s": stats.time_band_s,
        "walk_s": stats.time_walk_s, "fallback_s": stats.time_fallback_s,
        "scan_candidates": stats.scan_candidates, "long_lists": stats.num_long_lists, "long_k": stats.long_k,
        "long_s": stats.time_long_s, "close_sets": stats.num_close_sets, "cap_scans": stats.num_cap_fallbacks,
        "close_set_scans": stats.num_close_set_scans,
    }
    print(counters, flush=True)
    events = prof.key_averages()
    device_key = "self_device_time_total"
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows), flush=True)
    if args.device == "cuda":
        print(events.table(sort_by=device_key, row_limit=args.rows), flush=True)
    payload = {"counters": counters, "by_self_cpu": _rows(events, "self_cpu_time_total", args.rows),
               "by_self_device": _rows(events, device_key, args.rows) if args.device == "cuda" else []}
    path = write_results("profile_order", args.device, payload, out_dir=args.out_dir)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
