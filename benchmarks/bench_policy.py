"""Where the threshold runs out: the paper's rule against the ``"spread"`` policy, TFP order against random order.

Two data sets, each read, tokenized with the byte tokenizer and embedded with the hashed embedder (the text of
the format's default embed field: alpaca's ``instruction``) as ``tfp-pack`` does with its defaults:

- the bundled default (``tfp_kernels/data/sft_default.jsonl.gz``, 4,000 records);
- a duplicate-heavy set: ``make_sft.make_duplicate_heavy_records(3000, 0.2)``, 3,000 records of which 600 share
  the instruction "Summarize the following text." (differing inputs: their embeddings are exact duplicates).

For each, in one run: ``tfp_order`` with ``policy="paper"`` and ``policy="spread"`` (exact; q = 0.02, window 4, no
cap) and a seeded random order; per order: forced steps (steps whose sample lies closer than t to one of the
``window`` samples before it: :func:`~tfp_kernels.order.policy.count_forced_steps`), the first of them and the
longest run of consecutive ones; then next_fit packs of ``--max-len`` tokens (2048): their fill, mean intra-pack
similarity (:func:`~tfp_kernels.report.intra_pack_similarity`) and near-duplicate pair fraction
(:func:`~tfp_kernels.report.near_duplicate_pair_fraction`); and the ordering time of each policy.

    python -m benchmarks.bench_policy                # writes benchmarks/results/policy_<device>.json
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time

import torch

from benchmarks._harness import write_results
from tfp_kernels import check_path, pack_lengths, tfp_order
from tfp_kernels.order.policy import count_forced_steps
from tfp_kernels.order.threshold import threshold_estimate
from tfp_kernels.report import intra_pack_similarity, near_duplicate_pair_fraction


def load_set(name: str, records: list[dict]) -> dict:
    """Tokenize (byte tokenizer) and embed (hashed embedder, default embed field) as tfp-pack does."""
    from tfp_kernels.embed import load_embedder
    from tfp_kernels.text import formats, tokenize

    fmt = formats.detect_format(records)
    tok = tokenize.tokenize_records(records, fmt, tokenize.load_tokenizer("byte"))
    texts = [formats.embed_text(r, fmt, None, i) for i, r in enumerate(records)]
    emb = load_embedder("hashed").embed_texts(texts)
    distinct = len(set(texts))
    top = max(texts.count(t) for t in set(texts))
    return {"name": name, "embeddings": emb, "lengths": torch.from_numpy(tok.lengths).long(), "format": fmt,
            "embed_field": formats.default_embed_field(fmt), "records": len(records), "distinct_texts": distinct,
            "largest_shared_text": top}


def longest_run(flags: torch.Tensor) -> int:
    """Length of the longest run of True in a 1-D bool tensor."""
    best = run = 0
    for f in flags.tolist():
        run = run + 1 if f else 0
        best = max(best, run)
    return best


def forced_flags(emb: torch.Tensor, order: torch.Tensor, t: float, window: int) -> torch.Tensor:
    """(N,) bool: steps whose sample is closer than t to one of the ``window`` before it."""
    from tfp_kernels.order.policy import exact_pair_distances

    flags = torch.zeros(order.numel(), dtype=torch.bool)
    for lag in range(1, window + 1):
        flags[lag:] |= exact_pair_distances(emb, order[lag:], order[:-lag], "l2") < t
    return flags


def measure_order(data: dict, order: torch.Tensor, t: float, window: int, max_len: int) -> dict:
    emb, lengths = data["embeddings"], data["lengths"]
    forced, first = count_forced_steps(emb, order, threshold=t, window=window, metric="l2")
    packing = pack_lengths(lengths[order], max_len, strategy="next_fit", overlong="split")
    packing = dataclasses.replace(packing, sample_index=order[packing.sample_index])
    sim = intra_pack_similarity(packing, emb)
    sim = sim[~torch.isnan(sim)]
    near = near_duplicate_pair_fraction(packing, emb, t)
    return {
        "forced_steps": forced,
        "first_forced_step": first,
        "longest_forced_run": longest_run(forced_flags(emb, order, t, window)),
        "next_fit_packs": packing.num_packs,
        "next_fit_fill": round(packing.fill_ratio, 6),
        "mean_intra_pack_similarity": round(float(sim.mean()), 6) if sim.numel() else None,
        "near_duplicate_pair_fraction": None if math.isnan(near) else round(near, 6),
    }


def bench_set(data: dict, *, window: int, max_len: int, seed: int) -> dict:
    emb = data["embeddings"]
    n = emb.shape[0]
    est = threshold_estimate(emb, quantile=0.02)
    t = est.value
    row = {k: v for k, v in data.items() if k not in ("embeddings", "lengths")}
    row.update(threshold=t, threshold_exact=est.exact, window=window, max_len=max_len, orders={})
    for policy in ("paper", "spread"):
        t0 = time.perf_counter()
        path, stats = tfp_order(emb, threshold=t, window=window, policy=policy, return_stats=True)
        seconds = time.perf_counter() - t0
        check = check_path(emb, path, threshold=t, window=window, policy=policy)
        row["orders"][f"tfp_{policy}"] = {
            "seconds": round(seconds, 4), "fallbacks": stats.num_fallbacks, "check_path_ok": check.ok,
            "stats_forced_steps": stats.num_forced_steps, **measure_order(data, path, t, window, max_len),
        }
    random = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    row["orders"]["random"] = measure_order(data, random, t, window, max_len)
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-len", type=int, default=2048, help="tokens per next_fit pack")
    p.add_argument("--window", type=int, default=4)
    p.add_argument("--num", type=int, default=3000, help="records of the duplicate-heavy set")
    p.add_argument("--duplicate-fraction", type=float, default=0.2, help="of the duplicate-heavy set")
    p.add_argument("--seed", type=int, default=0, help="of the random order")
    p.add_argument("--out-dir", default=None, help="folder of the JSON (default benchmarks/results)")
    args = p.parse_args(argv)
    from tfp_kernels import data as bundled
    from tfp_kernels.data.make_sft import make_duplicate_heavy_records
    from tfp_kernels.text import readers

    sets = [
        load_set("bundled default", readers.read_records(bundled.DEFAULT_SFT)),
        load_set(f"duplicate-heavy ({args.num}, {args.duplicate_fraction:g} shared)",
                 make_duplicate_heavy_records(args.num, args.duplicate_fraction)),
    ]
    rows = []
    for data in sets:
        row = bench_set(data, window=args.window, max_len=args.max_len, seed=args.seed)
        rows.append(row)
        print(f"{row['name']}: {row['records']} records, {row['distinct_texts']} distinct texts (largest group "
              f"{row['largest_shared_text']}), t = {row['threshold']:.4g}")
        print(f"  {'order':<14}{'forced':>8}{'first':>7}{'run':>6}{'packs':>7}{'fill':>8}{'sim':>8}{'near-dup':>10}"
              f"{'seconds':>9}")
        for name, o in row["orders"].items():
            print(f"  {name:<14}{o['forced_steps']:>8}{str(o['first_forced_step']):>7}{o['longest_forced_run']:>6}"
                  f"{o['next_fit_packs']:>7}{o['next_fit_fill']:>8.3f}{o['mean_intra_pack_similarity']:>8.3f}"
                  f"{o['near_duplicate_pair_fraction']:>10.4f}{o.get('seconds', float('nan')):>9.2f}")
    path = write_results("policy", "cpu", {"max_len": args.max_len, "window": args.window, "rows": rows},
                         out_dir=args.out_dir)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
