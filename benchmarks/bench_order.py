"""Ordering benchmark: the naive algorithm (the paper's way) vs the exact reference vs ``tfp_order``.

Same embeddings for all (clustered, with planted near-duplicates, D = 768 by default), measured in
one run. Each implementation gets the same threshold (the naive one's own ``torch.quantile`` when
it can compute it, else ``estimate_threshold``) and the paper's cap ``max_rejections=10000``; the
paths are compared for identity and validated with ``check_path``.

    python -m benchmarks.bench_order --device cpu --sizes 1000 4000
    python -m benchmarks.bench_order --device cuda --sizes 1024 4096 16384

writes ``benchmarks/results/order_<device name>.json``. ``pytest benchmarks/bench_order.py`` runs a
small pytest-benchmark version.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks._harness import write_results
from benchmarks.naive_tfp import naive_distance_matrix, naive_tfp_order, naive_threshold
from tfp_kernels import check_path, estimate_threshold, tfp_order, tfp_order_reference
from tfp_kernels.order.options import DEFAULT_SETTINGS, EngineSettings

PAPER_CAP = 10000


def clustered_embeddings(n: int, d: int, *, seed: int = 0, device="cpu") -> torch.Tensor:
    """(n, d) float32: n // 64 + 1 Gaussian clusters with 3% near-duplicates (the pairs TFP rejects)."""
    g = torch.Generator().manual_seed(seed)
    k = n // 64 + 1
    centres = torch.randn(k, d, generator=g)
    labels = torch.randint(0, k, (n,), generator=g)
    emb = centres[labels] + 0.7 * torch.randn(n, d, generator=g)
    dup = torch.randperm(n, generator=g)[: int(0.03 * n)]
    emb[dup] = emb[torch.randint(0, n, (dup.numel(),), generator=g)] + 1e-3 * torch.randn(dup.numel(), d, generator=g)
    return emb.to(device)


def _timed(fn, device: str):
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def bench_size(n: int, d: int, device: str, *, naive_max_n: int, reference_max_n: int = 20000, k="auto",
               check_steps: int = 2000, fallback: str = "auto", cap: int | None = PAPER_CAP,
               progress: bool = False, long_lists="auto", settings: EngineSettings = DEFAULT_SETTINGS) -> dict:
    emb = clustered_embeddings(n, d, device=device)
    row: dict = {"n": n, "dim": d, "max_rejections": cap, "fallback": fallback}
    threshold = None
    if n <= naive_max_n:
        try:
            threshold, dt = _timed(lambda: naive_threshold(naive_distance_matrix(emb), 0.02), device)
            row["naive_threshold_s"] = dt
        except RuntimeError as err:  # torch.quantile's input limit (2^24), or out of memory
            row["naive"] = {"ran": False, "why": str(err).splitlines()[0][:300]}
    else:
        row["naive"] = {"ran": False, "why": f"skipped above N={naive_max_n} (O(N^2) memory, hours of Python loop)"}
    if threshold is None:
        threshold, dt = _timed(lambda: estimate_threshold(emb, quantile=0.02), device)
        row["threshold_source"] = "estimate_threshold"
        row["estimate_threshold_s"] = dt
    else:
        row["threshold_source"] = "naive torch.quantile"
    row["threshold"] = threshold

    paths = {}
    if "naive" not in row:
        paths["naive"], dt = _timed(
            lambda: naive_tfp_order(emb, threshold=threshold, max_rejections=cap), device)
        row["naive"] = {"ran": True, "seconds": dt}
    if n <= reference_max_n:
        paths["reference"], dt = _timed(
            lambda: tfp_order_reference(emb, threshold=threshold, max_rejections=cap), device)
        row["reference"] = {"seconds": dt}
    else:
        row["reference"] = {"ran": False, "why": f"skipped above N={reference_max_n} (O(N^2 D) Python-driven walk)"}
    if device == "cuda":  # compile and tune the Triton kernels for this size class and K outside the timing
        from tfp_kernels.order.list_length import list_length

        tfp_order(emb[: min(n, 32768)], threshold=threshold, max_rejections=cap, fallback=fallback,
                  k=list_length(emb, threshold, k=k, settings=settings), settings=settings)
    (paths["tfp_order"], stats), dt = _timed(
        lambda: tfp_order(emb, threshold=threshold, max_rejections=cap, k=k, fallback=fallback,
                          return_stats=True, progress=progress, long_lists=long_lists, settings=settings), device)
    row["tfp_order"] = {
        "seconds": dt, "backend": stats.backend, "band_backend": stats.band_backend,
        "band_dtype": stats.band_dtype, "k": stats.k, "threshold_s": stats.time_threshold_s,
        "fallbacks": stats.num_fallbacks, "fallback_rate": stats.fallback_rate, "rebuilds": stats.num_rebuilds,
        "band_s": stats.time_band_s,
        "walk_s": stats.time_walk_s, "fallback_s": stats.time_fallback_s,
        "scan_candidates": stats.scan_candidates, "long_lists": stats.num_long_lists, "long_k": stats.long_k,
        "long_s": stats.time_long_s, "close_sets": stats.num_close_sets, "cap_scans": stats.num_cap_fallbacks,
        "close_set_scans": stats.num_close_set_scans,
    }

    # validate our path: every step up to N = 20000, else a seeded sample of steps
    steps = None
    if n - 1 > max(check_steps, 20000):
        gen = torch.Generator().manual_seed(0)
        steps = torch.randperm(n - 1, generator=gen)[:check_steps] + 1
    check, dt = _timed(lambda: check_path(emb, paths["tfp_order"], threshold=threshold, max_rejections=cap,
                                          steps=steps), device)
    row["check_path"] = {"ok": check.ok, "steps_checked": check.num_steps_checked,
                         "tolerated_ties": check.num_tolerated, "seconds": dt, "message": check.message}
    if "naive" in paths:
        naive_check = check_path(emb, paths["naive"].to(device), threshold=threshold, max_rejections=cap)
        row["naive"]["check_path"] = {"ok": naive_check.ok, "tolerated_ties": naive_check.num_tolerated}
    # every other path compared with the reference's (or, without it, with tfp_order's)
    base = "reference" if "reference" in paths else "tfp_order"
    row["identical_paths"] = {
        f"{name}_vs_{base}": bool(torch.equal(p.cpu(), paths[base].cpu())) for name, p in paths.items() if name != base
    }
    if row["naive"].get("ran"):
        row["speedup_vs_naive"] = {
            name: row["naive"]["seconds"] / row[name]["seconds"] for name in ("reference", "tfp_order")
            if "seconds" in row[name]
        }
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000])
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--naive-max-n", type=int, default=20000)
    p.add_argument("--reference-max-n", type=int, default=20000)
    p.add_argument("--k", type=lambda v: v if v == "auto" else int(v), default="auto",
                   help="band list length of tfp_order: an integer or 'auto' (its default)")
    p.add_argument("--fallback", default="auto", choices=["auto", "host", "device", "triton"],
                   help="where tfp_order runs its exact fallback scans (tfp_order(fallback=...))")
    p.add_argument("--check-steps", type=int, default=2000,
                   help="above N = 20,000 the path is checked on this many sampled steps (each an O(N D) float64 pass)")
    p.add_argument("--cap", default=str(PAPER_CAP),
                   help="max_rejections of every implementation: an integer, or 'none' (tfp_order's default)")
    p.add_argument("--progress", action="store_true", help="progress bars of the timed tfp_order run (stderr)")
    p.add_argument("--long-lists", default="auto", choices=["auto", "on", "off"],
                   help="tfp_order(long_lists=...): long lists of the crowded band lists (auto: from 65,536 rows)")
    p.add_argument("--close-sets", default="on", choices=["on", "off"],
                   help="with a cap: close sets for the nodes where the lists' counts let the cap fire (off: a "
                        "budget of 0 sets, EngineSettings.close_set_budget; same path, more scans)")
    p.add_argument("--band-schedule", default="rows", choices=["rows", "pairs"],
                   help="the Triton band lists' schedule (EngineSettings.band_schedule): every row block "
                        "against all columns, or each unordered pair's product once (CUDA)")
    p.add_argument("--out-dir", default=None, help="folder of the JSON (default benchmarks/results)")
    args = p.parse_args(argv)
    settings = EngineSettings(close_set_budget=0 if args.close_sets == "off" else DEFAULT_SETTINGS.close_set_budget,
                              band_schedule=args.band_schedule)
    cap = None if args.cap.lower() == "none" else int(args.cap)
    if args.device == "cuda":  # CUDA context, cuBLAS and first compiles before any timing (the baselines included)
        tfp_order(clustered_embeddings(700, args.dim, device="cuda"), k=args.k, fallback=args.fallback)
    rows = []
    for n in args.sizes:
        row = bench_size(n, args.dim, args.device, naive_max_n=args.naive_max_n,
                         reference_max_n=args.reference_max_n, k=args.k, fallback=args.fallback, cap=cap,
                         check_steps=args.check_steps, progress=args.progress,
                         long_lists={"auto": "auto", "on": True, "off": False}[args.long_lists], settings=settings)
        rows.append(row)
        naive = row["naive"]
        fast = row["tfp_order"]
        print(
            f"N={n:>7} naive={naive.get('seconds', float('nan')):8.2f}s "
            f"reference={row['reference'].get('seconds', float('nan')):8.2f}s "
            f"tfp_order={fast['seconds']:8.2f}s ({fast['backend']}/{fast['band_backend']}, band {fast['band_s']:.2f}s, "
            f"walk {fast['walk_s']:.2f}s, fallbacks {fast['fallback_rate']:.1%}) "
            f"identical={row['identical_paths']} check={row['check_path']['ok']}"
            + ("" if naive.get("ran") else f" naive: {naive['why'][:80]}"),
            flush=True,
        )
    stage = "order" if args.k == "auto" else f"order_k{args.k}"
    if args.fallback != "auto":
        stage += f"_{args.fallback}"
    if cap != PAPER_CAP:
        stage += f"_cap{cap}" if cap is not None else "_nocap"
    if args.long_lists != "auto":
        stage += f"_long{args.long_lists}"
    if args.close_sets == "off":
        stage += "_nosets"
    if args.band_schedule != "rows":
        stage += f"_{args.band_schedule}"
    path = write_results(stage, args.device, {"sizes": args.sizes, "k": args.k, "max_rejections": cap,
                                              "long_lists": args.long_lists, "close_sets": args.close_sets,
                                              "band_schedule": args.band_schedule,
                                              "rows": rows},
                         out_dir=args.out_dir)
    print(f"wrote {path}")


# --- pytest-benchmark version (small sizes) -------------------------------------------------------

def test_naive_order_1000(benchmark):
    emb = clustered_embeddings(1000, 768)
    t = naive_threshold(naive_distance_matrix(emb), 0.02)
    benchmark.pedantic(lambda: naive_tfp_order(emb, threshold=t), rounds=1, iterations=1)


def test_tfp_order_1000(benchmark):
    emb = clustered_embeddings(1000, 768)
    t = naive_threshold(naive_distance_matrix(emb), 0.02)
    benchmark.pedantic(lambda: tfp_order(emb, threshold=t, max_rejections=PAPER_CAP), rounds=1, iterations=1)


if __name__ == "__main__":
    main()
