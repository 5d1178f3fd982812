"""Where the threshold runs out: the paper's rule against the ``"spread"`` policy, TFP order against random order.

Two data sets, each read, tokenized with the byte tokenizer and embedded with the hashed embedder (the text of
the format's default embed field: alpaca's ``instruction``) as ``tfp-pack`` does with its defaults:

- the bundled default (``tfp_kernels/data/sft_default.jsonl.gz``, 4,000 records);
- a duplicate-heavy set: ``make_sft.make_duplicate_heavy_records(3000, 0.2)``, 3,000 records of which 600 share
  the instruction "Summarize the following text." (differing inputs: their embeddings are exact duplicates).

For each, in one run: ``tfp_order`` with ``policy="paper"`` and ``policy="spread"`` (exact; q = 0.02, window 4, no
cap) and a seeded random order; per order: forced steps (steps whose sample lies closer than t to one of the
``window`` samples before it: :func:`~tfp_kernels.order.policy.count_forced_steps`), the first of them and the
longest run of consecutive ones; then packs of ``--max-len`` tokens (2048) by each packer of ``PACKERS``
(next_fit, next_fit + keep_apart, fill_in_order with the embeddings and ``min_distance=t``, the same + keep_apart,
bfd): packs, fill, mean intra-pack similarity (:func:`~tfp_kernels.report.intra_pack_similarity`), near-duplicate
pair fraction and the packs holding a near-duplicate pair (:func:`~tfp_kernels.report.near_duplicate_pairs`), and
the packer's time; and the ordering time of each policy. ``--keep-apart`` lists the K values to run (default 4).

    python -m benchmarks.bench_policy                # writes benchmarks/results/policy_<device>.json
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from benchmarks._harness import write_results
from tfp_kernels import check_path, pack_lengths, tfp_order
from tfp_kernels.order.policy import count_forced_steps
from tfp_kernels.order.threshold import threshold_estimate
from tfp_kernels.report import intra_pack_similarity, near_duplicate_pairs

PACK_WINDOW = 1024  # fill_in_order's top-up window (tfp-pack's --pack-window default)


def packers(keep_apart: list[int]) -> list[tuple[str, str, dict]]:
    """(name, strategy, options) of the packers compared; ``"embeddings"`` in options: with the order's rows and
    ``min_distance=t``."""
    out = [("next_fit", "next_fit", {})]
    out += [(f"next_fit + keep_apart {k}", "next_fit", {"keep_apart": k, "embeddings": True}) for k in keep_apart]
    out.append(("fill_in_order", "fill_in_order", {"window": PACK_WINDOW, "embeddings": True}))
    out += [(f"fill_in_order + keep_apart {k}", "fill_in_order",
             {"window": PACK_WINDOW, "keep_apart": k, "embeddings": True}) for k in keep_apart]
    out.append(("bfd", "bfd", {}))
    return out


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


def measure_packing(data: dict, order: torch.Tensor, t: float, max_len: int, strategy: str, options: dict) -> dict:
    """Pack ``lengths[order]`` with ``strategy`` and ``options``; its figures."""
    emb, lengths = data["embeddings"], data["lengths"]
    options = dict(options)
    if options.pop("embeddings", False):
        options.update(embeddings=emb[order], min_distance=t)
    t0 = time.perf_counter()
    packing = pack_lengths(lengths[order], max_len, strategy=strategy, overlong="split", **options)
    seconds = time.perf_counter() - t0
    packing = dataclasses.replace(packing, sample_index=order[packing.sample_index])
    sim = intra_pack_similarity(packing, emb)
    sim = sim[~torch.isnan(sim)]
    near = near_duplicate_pairs(packing, emb, t)
    return {
        "packs": packing.num_packs,
        "fill": round(packing.fill_ratio, 6),
        "mean_intra_pack_similarity": round(float(sim.mean()), 6) if sim.numel() else None,
        "near_duplicate_pair_fraction": round(near.close / near.pairs, 6) if near.pairs else None,
        "near_duplicate_packs": near.packs,
        "seconds": round(seconds, 4),
    }


def measure_order(data: dict, order: torch.Tensor, t: float, window: int, max_len: int,
                  keep_apart: list[int]) -> dict:
    emb = data["embeddings"]
    forced, first = count_forced_steps(emb, order, threshold=t, window=window, metric="l2")
    packings = {name: measure_packing(data, order, t, max_len, strategy, options)
                for name, strategy, options in packers(keep_apart)}
    return {
        "forced_steps": forced,
        "first_forced_step": first,
        "longest_forced_run": longest_run(forced_flags(emb, order, t, window)),
        "packings": packings,
    }


def bench_set(data: dict, *, window: int, max_len: int, seed: int, keep_apart: list[int]) -> dict:
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
            "stats_forced_steps": stats.num_forced_steps,
            **measure_order(data, path, t, window, max_len, keep_apart),
        }
    random = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    row["orders"]["random"] = measure_order(data, random, t, window, max_len, keep_apart)
    return row


def verdicts(row: dict, keep_apart: list[int]) -> dict:
    """Per keep_apart packer: does it, in the ``tfp_spread`` order, keep a near-duplicate pair fraction at or
    below random order + next_fit's, fill at least next_fit's (TFP order) and a mean intra-pack similarity at
    least 0.9x next_fit's (TFP order)?"""
    tfp = row["orders"]["tfp_spread"]["packings"]
    random = row["orders"]["random"]["packings"]["next_fit"]
    base = tfp["next_fit"]
    out = {}
    for name in [p for p, _, o in packers(keep_apart) if "keep_apart" in o]:
        got = tfp[name]
        checks = {
            "near_duplicates_at_most_random": got["near_duplicate_pair_fraction"] <= random["near_duplicate_pair_fraction"],
            "fill_at_least_next_fit": got["fill"] >= base["fill"],
            "similarity_ratio_to_next_fit": round(got["mean_intra_pack_similarity"] / base["mean_intra_pack_similarity"], 4),
        }
        checks["similarity_at_least_0.9x"] = checks["similarity_ratio_to_next_fit"] >= 0.9
        checks["meets_all"] = all(v for k, v in checks.items() if isinstance(v, bool))
        out[name] = checks
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-len", type=int, default=2048, help="tokens per next_fit pack")
    p.add_argument("--window", type=int, default=4)
    p.add_argument("--num", type=int, default=3000, help="records of the duplicate-heavy set")
    p.add_argument("--duplicate-fraction", type=float, default=0.2, help="of the duplicate-heavy set")
    p.add_argument("--seed", type=int, default=0, help="of the random order")
    p.add_argument("--keep-apart", type=int, nargs="+", default=[4], help="K values of the keep_apart packers")
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
        row = bench_set(data, window=args.window, max_len=args.max_len, seed=args.seed, keep_apart=args.keep_apart)
        row["keep_apart_verdicts"] = verdicts(row, args.keep_apart)
        rows.append(row)
        print(f"{row['name']}: {row['records']} records, {row['distinct_texts']} distinct texts (largest group "
              f"{row['largest_shared_text']}), t = {row['threshold']:.4g}")
        print(f"  {'order':<12}{'forced':>7}{'first':>6}{'run':>5}  {'packer':<28}{'packs':>6}{'fill':>7}{'sim':>7}"
              f"{'near-dup':>9}{'nd packs':>9}{'pack s':>8}")
        for name, o in row["orders"].items():
            for i, (packer, f) in enumerate(o["packings"].items()):
                head = (f"  {name:<12}{o['forced_steps']:>7}{str(o['first_forced_step']):>6}{o['longest_forced_run']:>5}"
                        if i == 0 else " " * 32)
                print(f"{head}  {packer:<28}{f['packs']:>6}{f['fill']:>7.3f}{f['mean_intra_pack_similarity']:>7.3f}"
                      f"{f['near_duplicate_pair_fraction']:>9.4f}{f['near_duplicate_packs']:>9}{f['seconds']:>8.3f}")
        for packer, v in row["keep_apart_verdicts"].items():
            print(f"  {packer} (spread order): {v}")
    path = write_results("policy", "cpu", {"max_len": args.max_len, "window": args.window,
                                           "pack_window": PACK_WINDOW, "keep_apart": args.keep_apart, "rows": rows},
                         out_dir=args.out_dir)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
