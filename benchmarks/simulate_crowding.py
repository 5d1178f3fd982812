"""How often band lists of K entries can decide a TFP step, simulated with an exact brute-force walk.

The first ``--steps`` steps of the exact TFP walk (no cap) over the order benchmark's clustered rows, each
step by a float64 pass over all N rows (no band lists: the rule itself). For each step, with ``p`` the rule's
pick and ``b`` the lists' error bound for ``last`` (``--band-dtype``'s bound, as ``tfp_order`` uses it):

- a K-entry band list of ``last`` proves ``p`` iff fewer than K nodes (visited ones included: they keep their
  slots) have ``t^2 - b <= s2 <= s2(p) + b`` (the list holds every node from ``t^2 - b`` up, and proves ``p``
  only if its last entry lies above ``s2(p) + b``); the fast squared distances are taken as the exact ones,
  their error only as the bound (the real lists' ordering near a decision can only differ within it);
- the list is *crowded* (:func:`~tfp_kernels.order.builders.crowded_lists`) if fewer than 4 of its entries lie
  below its last one minus ``2 b``;
- a float64 long list of ``4 K`` entries (bound ~1e-13 here, taken as 0) proves ``p`` iff fewer than ``4 K``
  nodes have ``t^2 <= s2 <= s2(p)``.

The JSON gives, per K, the fraction of steps the lists could not decide, the fraction of crowded lists, and
the fraction left undecided when the crowded lists are replaced by long ones (what ``long_lists`` does).

    python -m benchmarks.simulate_crowding --n 1000000 --steps 300     # ~2 minutes on 2 cores, 10 GB
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks._harness import write_results
from benchmarks.bench_order import clustered_embeddings
from tfp_kernels import estimate_threshold
from tfp_kernels.order.band_precision import band_error_coef, resolve_band_dtype
from tfp_kernels.order.options import DEFAULT_SETTINGS

LONG_LIST_FACTOR, LONG_LIST_ROOM = DEFAULT_SETTINGS.long_list_factor, DEFAULT_SETTINGS.long_list_room


def simulate(n: int, steps: int, dim: int, window: int, band_dtype: str, ks: list[int], seed: int = 0) -> dict:
    x32 = clustered_embeddings(n, dim, seed=seed)
    t = float(estimate_threshold(x32, quantile=0.02))
    t2 = t * t
    x = x32.double()
    sq = x.square().sum(dim=1)
    dtype = resolve_band_dtype(band_dtype, "triton")
    coef = band_error_coef(dim, dtype, "triton")
    visited = torch.zeros(n, dtype=torch.bool)
    path = [0]
    visited[0] = True
    rows = {k: {"undecided": 0, "crowded": 0, "undecided_crowded": 0, "undecided_with_long_lists": 0} for k in ks}
    pick_ranks = []
    t0 = time.perf_counter()
    for _ in range(1, steps):
        last = path[-1]
        s2 = (sq + sq[last] - 2.0 * (x @ x[last])).clamp_(min=0)
        s2[last] = torch.inf
        bound = coef * float(sq[last] + sq.max())
        # the rule: the nearest unvisited node at >= t from last and from the other window nodes
        order = torch.nonzero(~visited & (s2 >= t2)).flatten()
        order = order[torch.argsort(s2[order], stable=True)]
        win = path[-window:-1]
        pick, rank = None, 0
        for j0 in range(0, order.numel(), 512):
            block = order[j0 : j0 + 512]
            ok = torch.ones(block.numel(), dtype=torch.bool)
            for w in win:
                ok &= (x[block] - x[w]).square().sum(dim=1) >= t2
            if ok.any():
                rank = j0 + int(torch.nonzero(ok)[0])
                pick = int(order[rank])
                break
        if pick is None:  # (no valid node: the rule takes the nearest unvisited one; not at these sizes)
            pick = int(torch.nonzero(~visited)[0])
        pick_ranks.append(rank)
        band = s2[s2 >= t2 - bound]
        slots = int((band <= s2[pick] + bound).sum())
        slots64 = int(((s2 >= t2) & (s2 <= s2[pick])).sum())
        for k in ks:
            top = torch.topk(band, min(k, band.numel()), largest=False).values
            full = top.numel() == k
            crowded = full and int((top < top[-1] - 2.0 * bound).sum()) < LONG_LIST_ROOM
            undecided = full and slots >= k
            r = rows[k]
            r["undecided"] += undecided
            r["crowded"] += crowded
            r["undecided_crowded"] += undecided and crowded
            r["undecided_with_long_lists"] += undecided and (not crowded or slots64 >= LONG_LIST_FACTOR * k)
        path.append(pick)
        visited[pick] = True
    done = steps - 1
    return {
        "n": n, "dim": dim, "steps": done, "window": window, "threshold": t, "band_dtype": str(band_dtype),
        "bound_median": coef * float((sq + sq.max()).median()), "seconds": time.perf_counter() - t0,
        "pick_rank_among_valid_max": max(pick_ranks) if pick_ranks else 0,
        "per_k": {str(k): {name: v / done for name, v in r.items()} for k, r in rows.items()},
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--window", type=int, default=4)
    p.add_argument("--band-dtype", default="float16x3", help="whose error bound the lists have (tfp_order's band_dtype)")
    p.add_argument("--k", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    result = simulate(args.n, args.steps, args.dim, args.window, args.band_dtype, args.k)
    for k, r in result["per_k"].items():
        print(f"K = {k}: undecided {r['undecided']:.3f}, crowded {r['crowded']:.3f}, undecided and crowded "
              f"{r['undecided_crowded']:.3f}, undecided with long lists {r['undecided_with_long_lists']:.3f}")
    path = write_results(f"simulate_crowding_n{args.n}", "cpu", result, out_dir=args.out_dir)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
