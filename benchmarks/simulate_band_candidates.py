"""How often the band kernel's tiles keep candidates: the row-block sweep of ``band_topk_triton`` simulated on the CPU.

The kernel streams the columns past a block of 128 rows in tiles of 128 and appends to a row's scratch the
entries in the band and before the row's running K-th best (its *candidates*). This script replays that sweep
for a few sampled row blocks of the benchmark's clustered embeddings (``bench_order.clustered_embeddings``, the
threshold of ``estimate_threshold``, the band of ``bench_band_topk``) with the *exact* running K-th best (the
kernel's cutoff, tightened only at merges, is looser: it keeps at least these), and counts per tile whether some
row keeps a candidate and the most any row keeps. No GPU needed.

    python -m benchmarks.simulate_band_candidates --n 65536 --k 64
    python -m benchmarks.simulate_band_candidates --n 262144 --k 128

Writes ``benchmarks/results/simulate_band_candidates_n<N>_k<K>_<host>.json``.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks._harness import write_results
from benchmarks.bench_order import clustered_embeddings
from tfp_kernels import estimate_threshold


def simulate(n: int, dim: int, k: int, blocks: int, tile: int = 128, seed: int = 0, sample_every: int = 0) -> dict:
    x = clustered_embeddings(n, dim)
    t = estimate_threshold(x)
    lower = t * t * 0.999  # (bench_band_topk's band)
    sq = x.square().sum(1)
    g = torch.Generator().manual_seed(seed)
    sampled = torch.randperm(n // tile, generator=g)[:blocks].tolist()
    num_tiles = -(-n // tile)
    rows_out = []
    for block in sampled:
        r0 = block * tile
        s2 = (sq[r0 : r0 + tile, None] + sq[None, :] - 2.0 * x[r0 : r0 + tile] @ x.T).clamp_min(0.0)
        s2[torch.arange(tile), torch.arange(r0, r0 + tile)] = -1.0  # the row itself: never in the band
        band = torch.where(s2 >= lower, s2, torch.full_like(s2, torch.inf))
        best = torch.full((tile, k), torch.inf)
        start = torch.full((tile, 1), torch.inf)  # a cutoff to start from (none: +inf)
        if sample_every and -(-n // sample_every) >= k:  # the K-th best among every sample_every-th column
            start = band[:, ::sample_every].topk(k, dim=1, largest=False).values[:, -1:]
        with_some = at_most_one = 0
        kept = 0
        for j in range(num_tiles):
            part = band[:, j * tile : (j + 1) * tile]
            keep = part < torch.minimum(best[:, -1:], start)
            per_row = keep.sum(1)
            kept += int(per_row.sum())
            with_some += bool(per_row.max() > 0)
            at_most_one += bool(per_row.max() <= 1)
            best = torch.cat([best, part], 1).topk(k, dim=1, largest=False).values.sort(1).values
        rows_out.append({"block": block, "tiles": num_tiles, "tiles_with_a_candidate": with_some,
                         "tiles_with_at_most_one_per_row": at_most_one, "candidates_per_row": kept / tile})
        print(f"N={n} K={k} row block {block}: {with_some}/{num_tiles} tiles keep some candidate, "
              f"{at_most_one} keep at most one per row; {kept / tile:.0f} candidates per row", flush=True)
    return {"n": n, "dim": dim, "k": k, "tile": tile, "threshold": t, "sample_every": sample_every,
            "blocks": rows_out}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=65536)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--blocks", type=int, default=2, help="row blocks sampled")
    p.add_argument("--sample-every", type=int, default=0,
                   help="start each row's cutoff at its K-th best among every S-th column (0: at +inf, as the kernel)")
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    result = simulate(args.n, args.dim, args.k, args.blocks, sample_every=args.sample_every)
    name = f"simulate_band_candidates_n{args.n}_k{args.k}" + (f"_start{args.sample_every}" if args.sample_every else "")
    path = write_results(name, "cpu", result, out_dir=args.out_dir)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
