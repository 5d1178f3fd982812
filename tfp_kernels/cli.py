"""``tfp-pack``: order a dataset by TFP, pack it, and compare with the original and a random order.

With no ``--data`` it runs on the bundled default dataset (``tfp_kernels/data``), with no downloads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from . import __version__
from .order import check_path, tfp_order
from .order.distance import pair_distances, prepare
from .packing import pack_lengths

OVERLONG_POLICIES = ("error", "split", "truncate", "drop")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tfp-pack",
        description=(
            "Order samples by Threshold Filtering Packing (arXiv:2408.09327), pack their token lengths "
            "into sequences of --max-len tokens, validate the path, and print how the packs compare "
            "with the original order and a random order. Without --data it runs on the bundled "
            "synthetic dataset (2,000 samples, 64-dim embeddings, 16 topics)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", default=None,
                   help="a .pt (torch.save of a dict) or .npz file with 'embeddings' (N, D) float and "
                        "'lengths' (N,) int token counts, optionally 'topic' (N,) int; default: bundled data")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where to compute; auto = cuda when available")
    p.add_argument("--metric", default="l2", choices=("l2", "cosine"), help="distance between embeddings")
    p.add_argument("--quantile", type=float, default=0.02,
                   help="threshold t = this quantile of the pairwise distances (paper: 0.02)")
    p.add_argument("--threshold", type=float, default=None, help="use this threshold t instead of estimating it")
    p.add_argument("--window", type=int, default=4,
                   help="a new sample must be >= t from each of the last WINDOW path samples (paper: 4)")
    p.add_argument("--max-rejections", type=int, default=None,
                   help="the paper's cap (10000): after this many rejected candidates take the next one "
                        "unchecked; default: no cap")
    p.add_argument("--start", type=int, default=0, help="first sample of the path")
    p.add_argument("--max-len", type=int, default=2048, help="tokens per pack")
    p.add_argument("--overlong", default="error", choices=OVERLONG_POLICIES,
                   help="what to do with samples longer than --max-len")
    p.add_argument("--seed", type=int, default=0, help="seed of the random-order comparison")
    p.add_argument("--no-check", action="store_true", help="skip validating the path with check_path")
    p.add_argument("--report", default=None, help="also write the figures as JSON to this path")
    p.add_argument("--version", action="version", version=f"tfp_kernels {__version__}")
    return p


def _load(path: str | None) -> tuple[dict, str]:
    if path is None:
        from .data import load_default

        return load_default(), "bundled default dataset (synthetic, tfp_kernels/data/README.md)"
    if not os.path.exists(path):
        raise FileNotFoundError(f"--data {path}: no such file")
    if path.endswith(".npz"):
        import numpy as np

        with np.load(path) as f:
            data = {k: torch.from_numpy(f[k]) for k in f.files}
    elif path.endswith(".pt"):
        data = torch.load(path, weights_only=True)
    else:
        raise ValueError(f"--data {path}: expected a .pt or .npz file")
    if not isinstance(data, dict):
        raise ValueError(f"--data {path}: expected a dict with 'embeddings' and 'lengths', got {type(data).__name__}")
    for key in ("embeddings", "lengths"):
        if key not in data:
            raise ValueError(f"--data {path}: missing key '{key}' (found: {sorted(data)})")
    n = data["embeddings"].shape[0]
    if data["lengths"].shape != (n,):
        raise ValueError(f"--data {path}: 'lengths' must have shape ({n},), got {tuple(data['lengths'].shape)}")
    return data, path


def pack_neighbour_stats(order, packing, x, metric, threshold, topic=None) -> dict:
    """Figures on the pairs of samples that are adjacent inside a pack.

    Args:
        order: (N,) int64, the sample order that was packed.
        packing: the :class:`~tfp_kernels.packing.Packing` of ``lengths[order]``.
        x: (N, D) embeddings prepared for ``metric``.
        topic: optional (N,) int64 topic labels.
    """
    pieces = packing.sample_index
    same_pack = packing.pack_id[1:] == packing.pack_id[:-1]
    distinct = pieces[1:] != pieces[:-1]  # two pieces of one split sample are not a pair
    keep = same_pack & distinct
    a = order[pieces[:-1][keep]]
    b = order[pieces[1:][keep]]
    stats = {"adjacent_pairs": int(a.numel())}
    if a.numel():
        d = pair_distances(x, a, b, metric)
        stats["mean_adjacent_distance"] = float(d.mean())
        stats["near_duplicate_adjacent_fraction"] = float((d < threshold).double().mean())
        if topic is not None:
            stats["same_topic_adjacent_fraction"] = float((topic[a] == topic[b]).double().mean())
    return stats


def run(args: argparse.Namespace) -> dict:
    data, source = _load(args.data)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device")
    emb = data["embeddings"].to(device)
    lengths = data["lengths"].to(device)
    topic = data.get("topic")
    topic = topic.to(device) if topic is not None else None
    n, d = emb.shape
    print(f"tfp-pack {__version__}: {n} samples, D={d}, {source}, device {device}")

    path, stats = tfp_order(
        emb, metric=args.metric, quantile=args.quantile, threshold=args.threshold, window=args.window,
        max_rejections=args.max_rejections, start=args.start, progress=True, return_stats=True,
    )
    t = stats.threshold
    how = {"given": "given", "exact": "exact over all pairs", "sampled": "sampled pairs"}[stats.threshold_source]
    print(f"  threshold t = {t:.6g} ({how}, q={args.quantile})  {stats.time_threshold_s:8.2f} s")
    print(f"  TFP order ({stats.backend} backend, window {args.window}, "
          f"max_rejections {args.max_rejections})  {stats.time_order_s:8.2f} s")
    report = {
        "version": __version__, "source": source, "device": device, "num_samples": n, "dim": d,
        "metric": args.metric, "quantile": args.quantile, "threshold": t,
        "threshold_source": stats.threshold_source, "window": args.window,
        "max_rejections": args.max_rejections, "max_len": args.max_len, "overlong": args.overlong,
        "time_threshold_s": stats.time_threshold_s, "time_order_s": stats.time_order_s,
    }
    if not args.no_check:
        t0 = time.perf_counter()
        res = check_path(emb, path, metric=args.metric, threshold=t, window=args.window,
                         max_rejections=args.max_rejections)
        dt = time.perf_counter() - t0
        print(f"  path check: {'ok' if res.ok else 'FAILED'} ({res.num_steps_checked} steps, "
              f"{res.num_tolerated} floating-point ties)  {dt:8.2f} s")
        report["path_check"] = {"ok": res.ok, "steps": res.num_steps_checked, "message": res.message}
        if not res.ok:
            raise RuntimeError(f"the TFP path failed validation: {res.message}")

    x = prepare(emb, args.metric)
    gen = torch.Generator().manual_seed(args.seed)
    orders = {
        "tfp": path,
        "original": torch.arange(n, device=device),
        "random": torch.randperm(n, generator=gen).to(device),
    }
    print(f"  packing: next_fit, max_len {args.max_len}, overlong '{args.overlong}'")
    header = f"  {'order':<9}{'packs':>7}{'fill':>8}{'adj. dist':>11}{'near-dup adj.':>15}"
    if topic is not None:
        header += f"{'same-topic adj.':>17}"
    print(header)
    report["orders"] = {}
    for name, order in orders.items():
        packing = pack_lengths(lengths[order], args.max_len, strategy="next_fit", overlong=args.overlong)
        s = pack_neighbour_stats(order, packing, x, args.metric, t, topic)
        row = {"packs": packing.num_packs, "fill_ratio": packing.fill_ratio, **s}
        report["orders"][name] = row
        line = (f"  {name:<9}{packing.num_packs:>7}{packing.fill_ratio:>8.3f}"
                f"{s.get('mean_adjacent_distance', float('nan')):>11.4g}"
                f"{s.get('near_duplicate_adjacent_fraction', float('nan')):>15.3f}")
        if topic is not None:
            line += f"{s.get('same_topic_adjacent_fraction', float('nan')):>17.3f}"
        print(line)
    print("  (adjacent = consecutive samples in one pack; near-dup = closer than t)")
    if args.report:
        with open(args.report, "w") as f:
            json.dump(report, f, indent=2)
        print(f"  report written to {args.report}")
    return report


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError, ImportError) as err:
        print(f"tfp-pack: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
