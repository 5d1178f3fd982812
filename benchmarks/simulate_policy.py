"""Simulated walks of policy variants where the threshold runs out, on the sets of ``bench_policy`` (a plain numpy
walk over the full float64 distance matrix: small N only; not the package's walk).

Variants, each a rule on top of the paper's (take the nearest valid node):

- urgency ``none`` (the paper), ``exact`` (the ``"spread"`` policy's: a group of ``m >= 2`` unvisited exact
  duplicates is urgent when ``m (window + 1) >= u``, ``u`` unvisited nodes) or ``near`` (not implemented in the
  package: a node with ``c >= 1`` unvisited nodes closer than ``t`` is urgent when ``(c + 1) (window + 1) >= u``;
  of the urgent valid nodes, the largest ``c``; for exact duplicates without other near ones it is ``exact``);
- forced pick ``paper`` (the nearest node to ``last``) or ``farthest`` (the ``"spread"`` policy's: largest
  distance to the nearest window node).

Per variant: forced steps, and next_fit packs (``--max-len``): near-duplicate pair fraction and mean intra-pack
similarity. The paths follow the package's rules, but this walk's float64 distances (one ``torch.cdist`` of all
rows) round some exact ties (hashed embeddings have many) apart differently from the package's, so the counts
differ slightly from ``bench_policy``'s.

    python -m benchmarks.simulate_policy          # writes benchmarks/results/simulate_policy_<device>.json
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import torch

from benchmarks._harness import write_results
from benchmarks.bench_policy import load_set
from tfp_kernels import pack_lengths
from tfp_kernels.order.threshold import threshold_estimate
from tfp_kernels.report import intra_pack_similarity, near_duplicate_pair_fraction


def simulate(dist: np.ndarray, t: float, window: int, urgency: str, forced_pick: str) -> tuple[np.ndarray, int]:
    """The walk from node 0 under a variant (module docstring); returns the path and its forced steps."""
    n = dist.shape[0]
    close = dist < t
    np.fill_diagonal(close, False)
    same = dist == 0
    np.fill_diagonal(same, False)
    unvisited = np.ones(n, dtype=bool)
    unvisited[0] = False
    close_count = close.sum(1) - close[:, 0]  # unvisited nodes closer than t (near) / equal (exact), per node
    group_count = same.sum(1) + 1 - same[:, 0]
    path, forced = [0], 0
    for step in range(1, n):
        u, last = n - step, path[-1]
        win = path[max(0, step - window) : step]
        cand = np.nonzero(unvisited)[0]
        valid = (dist[np.ix_(win, cand)] >= t).all(0)
        pick = None
        if urgency != "none":
            score = group_count[cand] if urgency == "exact" else close_count[cand] + 1
            urgent = (score >= 2) & (score * (window + 1) >= u) & valid
            if urgent.any():
                sel = cand[urgent & (score == score[urgent].max())]
                pick = sel[np.lexsort((sel, dist[last, sel]))[0]]
        if pick is None and valid.any():
            sel = cand[valid]
            pick = sel[np.lexsort((sel, dist[last, sel]))[0]]
        if pick is None:
            forced += 1
            if forced_pick == "paper":
                pick = cand[np.lexsort((cand, dist[last, cand]))[0]]
            else:
                pick = cand[np.lexsort((cand, -dist[np.ix_(win, cand)].min(0)))[0]]
        path.append(pick)
        unvisited[pick] = False
        close_count -= close[:, pick]
        group_count -= same[:, pick]
    return np.array(path), forced


def measure(data: dict, path: np.ndarray, t: float, max_len: int) -> dict:
    emb, lengths = data["embeddings"], data["lengths"]
    order = torch.as_tensor(path)
    packing = pack_lengths(lengths[order], max_len, overlong="split")
    packing = dataclasses.replace(packing, sample_index=order[packing.sample_index])
    sim = intra_pack_similarity(packing, emb)
    return {"mean_intra_pack_similarity": round(float(sim[~torch.isnan(sim)].mean()), 6),
            "near_duplicate_pair_fraction": round(near_duplicate_pair_fraction(packing, emb, t), 6)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--window", type=int, default=4)
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    from tfp_kernels import data as bundled
    from tfp_kernels.data.make_sft import make_duplicate_heavy_records
    from tfp_kernels.text import readers

    rows = []
    for data in (load_set("bundled default", readers.read_records(bundled.DEFAULT_SFT)),
                 load_set("duplicate-heavy (3000, 0.2 shared)", make_duplicate_heavy_records(3000, 0.2))):
        emb = data["embeddings"].double()
        t = threshold_estimate(data["embeddings"], quantile=0.02).value
        dist = torch.cdist(emb, emb, compute_mode="donot_use_mm_for_euclid_dist").numpy()
        row = {"name": data["name"], "threshold": t, "variants": {}}
        random = torch.randperm(emb.shape[0], generator=torch.Generator().manual_seed(0)).numpy()
        row["variants"]["random order"] = measure(data, random, t, args.max_len)
        for urgency in ("none", "exact", "near"):
            for forced_pick in ("paper", "farthest"):
                path, forced = simulate(dist, t, args.window, urgency, forced_pick)
                name = f"urgency {urgency}, forced pick {forced_pick}"
                row["variants"][name] = {"forced_steps": forced, **measure(data, path, t, args.max_len)}
                print(f"{data['name']}: {name}: {row['variants'][name]}", flush=True)
        rows.append(row)
    path = write_results("simulate_policy", "cpu", {"max_len": args.max_len, "window": args.window, "rows": rows},
                         out_dir=args.out_dir)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
