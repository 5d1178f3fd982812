"""Sharded ordering benchmark: the list phase and the whole order on 1, 2, 4 gloo processes (CPU).

Every run orders the same clustered embeddings (benchmarks.bench_order.clustered_embeddings, D = 768 by
default) with ``tfp_order(shard, group=...)``, each process holding its ``tensor_split`` block, with the
same given threshold (``estimate_threshold`` of the full data, computed once) so that only the ordering is
timed. Each process uses ``max(1, cpu_count // processes)`` threads. Per run: the first list phase (ring of
column blocks; the slowest rank), the gather of lists and rows to rank 0, the walk with its sharded scans,
the whole order, and the ratio of each to the 1-process run of the same invocation; plus single-process
``tfp_order`` (no group) for comparison and a check that every path is identical to it.

    python -m benchmarks.bench_distributed --sizes 4096 8192 --procs 1 2 4

writes ``benchmarks/results/distributed_<device name>.json``. On a machine with fewer cores than
processes the ratios measure oversubscription, not scaling: read them with ``cpu_count`` in the file.

``--data sft-duplicates`` orders instead the embeddings of a duplicate-heavy synthetic SFT set,
``make_sft.make_duplicate_heavy_records(--records, --duplicate-fraction)`` (20,000 and 0.2 by default),
tokenized and embedded as ``tfp-pack`` does by default (byte tokenizer, hashed embedder over the format's default
embed field: ``benchmarks.bench_policy.load_set``), with ``k="auto"`` unless ``--k`` is given, for each
``--policies`` entry (``paper`` by default). It measures how many exact scans (fallbacks) the sharded path needs
against the single process's: per run, the path's equality with single-process ``tfp_order`` (and, when it
differs, whether ``check_path`` accepts it and where it first differs: ``first_difference``), the exact scans,
the duplicate groups, the forced steps, the seconds, and the ratio of scans to the single process's.

    python -m benchmarks.bench_distributed --data sft-duplicates --procs 1 2 4 --policies paper spread

writes ``benchmarks/results/distributed_sft_duplicates_<device name>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._harness import REPO_ROOT, write_results
from benchmarks.bench_order import clustered_embeddings


def _worker(rank: int, world: int, store_file: str, spec_file: str, out_file: str) -> None:
    """One process of a run: join the gloo group, warm up, order the shard, report its stats."""
    import torch.distributed as dist

    from tfp_kernels import tfp_order
    from tfp_kernels.distributed import shard_bounds

    spec = json.loads(Path(spec_file).read_text())
    torch.set_num_threads(spec["threads"])
    store = dist.FileStore(store_file, world)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600)
    )
    try:
        group = dist.group.WORLD
        warm = clustered_embeddings(256, spec["dim"], seed=1)
        s, e = shard_bounds(256, world)[rank]
        tfp_order(warm[s:e], group=group, k=spec["k"])
        if spec.get("embeddings_file"):
            emb = torch.load(spec["embeddings_file"], weights_only=True)
        else:
            emb = clustered_embeddings(spec["n"], spec["dim"], seed=0)
        s, e = shard_bounds(spec["n"], world)[rank]
        shard = emb[s:e].clone()
        del emb
        dist.barrier()
        t0 = time.perf_counter()
        path, stats = tfp_order(
            shard,
            group=group,
            threshold=spec["threshold"],
            k=spec["k"],
            max_rejections=spec["max_rejections"],
            policy=spec.get("policy", "paper"),
            fallback=spec.get("fallback", "auto"),
            return_stats=True,
        )
        wall = time.perf_counter() - t0
        mine = {
            "rank": rank,
            "wall_s": wall,
            "lists_s": stats.time_lists_s,
            "gather_s": stats.time_gather_s,
            "walk_s": stats.time_walk_s,
            "fallback_s": stats.time_fallback_s,
            "band_s": stats.time_band_s,
            "fallbacks": stats.num_fallbacks,
            "rebuilds": stats.num_rebuilds,
            "groups": stats.num_groups,
            "forced_steps": stats.num_forced_steps,
            "k": stats.k,
            "bytes_ring": stats.bytes_ring,
            "bytes_to_root": stats.bytes_to_root,
        }
        everyone = [None] * world
        dist.all_gather_object(everyone, mine)
        if rank == 0:
            torch.save({"ranks": everyone, "path": path}, out_file)
    finally:
        dist.destroy_process_group()


def run_procs(world: int, spec: dict, *, timeout: float) -> dict:
    """Start ``world`` worker processes of this script on ``spec``; return rank 0's report."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        spec_file, out_file = tmp / "spec.json", tmp / "out.pt"
        spec_file.write_text(json.dumps(spec))
        env = dict(
            os.environ,
            PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            OMP_NUM_THREADS=str(spec["threads"]),
        )
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.bench_distributed",
                    "--worker",
                    str(r),
                    str(world),
                    str(tmp / "store"),
                    str(spec_file),
                    str(out_file),
                ],
                cwd=REPO_ROOT,
                env=env,
            )
            for r in range(world)
        ]
        deadline = time.monotonic() + timeout
        try:
            for p in procs:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        if any(p.returncode != 0 for p in procs):
            raise RuntimeError(f"a worker of the {world}-process run failed: {[p.returncode for p in procs]}")
        return torch.load(out_file, weights_only=False)


def bench_size(n: int, dim: int, procs: list[int], *, k: int, max_rejections, timeout: float) -> dict:
    from tfp_kernels import estimate_threshold, tfp_order

    emb = clustered_embeddings(n, dim, seed=0)
    threshold = estimate_threshold(emb)
    cores = os.cpu_count() or 1
    row: dict = {"n": n, "dim": dim, "k": k, "max_rejections": max_rejections, "threshold": threshold}
    tfp_order(emb[:256], k=k)  # warm-up
    t0 = time.perf_counter()
    single, stats = tfp_order(emb, threshold=threshold, k=k, max_rejections=max_rejections, return_stats=True)
    row["single_process"] = {
        "wall_s": time.perf_counter() - t0,
        "band_s": stats.time_band_s,
        "walk_s": stats.time_walk_s,
        "fallback_s": stats.time_fallback_s,
        "fallbacks": stats.num_fallbacks,
        "rebuilds": stats.num_rebuilds,
        "threads": torch.get_num_threads(),
    }
    del emb
    runs = {}
    for world in procs:
        spec = {
            "n": n,
            "dim": dim,
            "k": k,
            "threshold": threshold,
            "max_rejections": max_rejections,
            "threads": max(1, cores // world),
        }
        report = run_procs(world, spec, timeout=timeout)
        ranks = report["ranks"]
        runs[world] = {
            "threads_per_process": spec["threads"],
            "lists_s": max(r["lists_s"] for r in ranks),  # the list phase ends with the slowest rank
            "gather_s": ranks[0]["gather_s"],
            "walk_s": ranks[0]["walk_s"],
            "fallback_s": ranks[0]["fallback_s"],
            "band_s_rank0": ranks[0]["band_s"],
            "order_s": max(r["wall_s"] for r in ranks),
            "fallbacks": ranks[0]["fallbacks"],
            "rebuilds": ranks[0]["rebuilds"],
            "bytes_ring_per_rank": [r["bytes_ring"] for r in ranks],
            "bytes_to_root_per_rank": [r["bytes_to_root"] for r in ranks],
            "same_path_as_single_process": bool(torch.equal(report["path"], single)),
        }
        print(f"n={n} procs={world}: {runs[world]}", flush=True)
    base = runs.get(1)
    if base is not None:
        for world, run in runs.items():
            run["ratio_to_1_process"] = {
                key: run[key] / base[key] for key in ("lists_s", "order_s", "fallback_s") if base[key] > 0
            }
    row["runs"] = {str(w): r for w, r in runs.items()}
    return row


def sft_duplicate_embeddings(records: int, duplicate_fraction: float) -> dict:
    """The duplicate-heavy SFT set, tokenized and embedded as ``tfp-pack`` does by default.

    Returns ``benchmarks.bench_policy.load_set``'s dict: ``embeddings`` (records, D) float32 on the CPU, the
    per-record token ``lengths``, the format, the embed field, the record count, the distinct embedded texts
    and the largest group of records sharing one text.
    """
    from benchmarks.bench_policy import load_set
    from tfp_kernels.data.make_sft import make_duplicate_heavy_records

    name = f"duplicate-heavy SFT ({records} records, {duplicate_fraction:g} shared)"
    return load_set(name, make_duplicate_heavy_records(records, duplicate_fraction))


def bench_sft_duplicates(
    records: int, duplicate_fraction: float, procs: list[int], policies: list[str], *, k, max_rejections,
    timeout: float, save=None,
) -> dict:
    """Order the duplicate-heavy SFT set in one process and sharded on ``procs`` gloo processes; per policy.

    ``save(row)``, when given, is called after every run with the results so far (so that a long run that is
    stopped keeps what it measured; ``row["complete"]`` is False until the last run)."""
    from tfp_kernels import check_path, estimate_threshold, tfp_order

    data = sft_duplicate_embeddings(records, duplicate_fraction)
    emb = data["embeddings"].contiguous()
    n, dim = emb.shape
    t0 = time.perf_counter()
    threshold = estimate_threshold(emb)
    threshold_s = time.perf_counter() - t0
    cores = os.cpu_count() or 1
    row: dict = {
        "data": data["name"], "records": n, "dim": dim, "dtype": str(emb.dtype).replace("torch.", ""),
        "embed_field": data["embed_field"], "distinct_texts": data["distinct_texts"],
        "largest_shared_text": data["largest_shared_text"], "k": k, "max_rejections": max_rejections,
        "threshold": threshold, "threshold_s": threshold_s, "policies": {}, "complete": False,
    }
    print(f"{data['name']}: N = {n}, D = {dim}, {data['distinct_texts']} distinct texts (largest shared "
          f"{data['largest_shared_text']}), t = {threshold:.6g} ({threshold_s:.1f} s)", flush=True)
    tfp_order(emb[:256], k=k)  # warm-up
    with tempfile.TemporaryDirectory() as tmp:
        emb_file = Path(tmp) / "embeddings.pt"
        torch.save(emb, emb_file)
        for policy in policies:
            t0 = time.perf_counter()
            single, stats = tfp_order(
                emb, threshold=threshold, k=k, max_rejections=max_rejections, policy=policy, return_stats=True
            )
            single_s = time.perf_counter() - t0
            single_check = check_path(emb, single, threshold=threshold, max_rejections=max_rejections,
                                      policy=policy)
            entry: dict = {
                "single_process": {
                    "seconds": single_s, "scans": stats.num_fallbacks, "groups": stats.num_groups,
                    "forced_steps": stats.num_forced_steps, "rebuilds": stats.num_rebuilds, "k": stats.k,
                    "check_path_ok": single_check.ok, "threads": torch.get_num_threads(),
                },
                "runs": {},
            }
            print(f"policy={policy} single process: {entry['single_process']}", flush=True)
            row["policies"][policy] = entry
            if save is not None:
                save(row)
            for world in procs:
                spec = {
                    "n": n, "dim": dim, "k": k, "threshold": threshold, "max_rejections": max_rejections,
                    "threads": max(1, cores // world), "policy": policy, "embeddings_file": str(emb_file),
                }
                report = run_procs(world, spec, timeout=timeout)
                ranks, path = report["ranks"], report["path"]
                same = bool(torch.equal(path, single))
                run = {
                    "threads_per_process": spec["threads"],
                    "seconds": max(r["wall_s"] for r in ranks),
                    "lists_s": max(r["lists_s"] for r in ranks),
                    "walk_s": ranks[0]["walk_s"],
                    "fallback_s": ranks[0]["fallback_s"],
                    "scans": ranks[0]["fallbacks"],
                    "groups": ranks[0]["groups"],
                    "forced_steps": ranks[0]["forced_steps"],
                    "rebuilds": ranks[0]["rebuilds"],
                    "k": ranks[0]["k"],
                    "same_path_as_single_process": same,
                    "check_path_ok": None if same else check_path(
                        emb, path, threshold=threshold, max_rejections=max_rejections, policy=policy).ok,
                    "first_difference": first_difference(emb, single, path),
                    "scans_ratio_to_single_process": (
                        ranks[0]["fallbacks"] / stats.num_fallbacks if stats.num_fallbacks else None),
                }
                entry["runs"][str(world)] = run
                print(f"policy={policy} procs={world}: {run}", flush=True)
                if save is not None:
                    save(row)
    row["complete"] = True
    return row


def first_difference(emb: torch.Tensor, single: torch.Tensor, path: torch.Tensor) -> dict | None:
    """Where ``path`` first leaves ``single`` (both (N,) int64 paths of the rows ``emb`` (N, D), l2): the step,
    the node each took, their float64 distances to the previous node and the relative gap between those (a
    gap of a few 1e-16 is a floating-point tie, which two exact scans summing in different orders may break
    differently); None when the paths are equal."""
    differ = torch.nonzero(single != path).flatten()
    if differ.numel() == 0:
        return None
    step = int(differ[0])
    last, a, b = (emb[int(node)].double() for node in (single[step - 1], single[step], path[step]))
    d_single, d_sharded = float((a - last).norm()), float((b - last).norm())
    return {"step": step, "steps_differing": int(differ.numel()), "single_node": int(single[step]),
            "sharded_node": int(path[step]), "equal_rows": bool(torch.equal(a, b)), "distance_single": d_single,
            "distance_sharded": d_sharded, "relative_gap": abs(d_single - d_sharded) / max(d_single, d_sharded)}


def print_sft_table(row: dict) -> None:
    print(f"\n{row['data']}, t = {row['threshold']:.6g}, k = {row['k']}")
    print(f"{'policy':<8}{'run':<12}{'scans':>8}{'ratio':>8}{'groups':>8}{'forced':>8}{'same path':>11}"
          f"{'check_path':>12}{'seconds':>9}")
    for policy, entry in row["policies"].items():
        single = entry["single_process"]
        lines = [("1 process", {**single, "same_path_as_single_process": True,
                                "scans_ratio_to_single_process": 1.0})]
        lines += [(f"{w} gloo", r) for w, r in entry["runs"].items()]
        for name, r in lines:
            ratio = r["scans_ratio_to_single_process"]
            print(f"{policy:<8}{name:<12}{r['scans']:>8}{'-' if ratio is None else f'{ratio:.2f}':>8}"
                  f"{r['groups']:>8}{r['forced_steps']:>8}{str(r['same_path_as_single_process']):>11}"
                  f"{str(r['check_path_ok']):>12}{r['seconds']:>9.2f}")


def _k_arg(text: str):
    return text if text == "auto" else int(text)


def main(argv=None) -> None:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--k", type=_k_arg, default=None,
                        help="band list length or 'auto' (default: 64 for clustered, 'auto' for sft-duplicates)")
    parser.add_argument("--max-rejections", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per multi-process run")
    parser.add_argument("--out-dir", type=Path, default=None)
    parser.add_argument("--data", choices=["clustered", "sft-duplicates"], default="clustered")
    parser.add_argument("--records", type=int, default=20000, help="records of --data sft-duplicates")
    parser.add_argument("--duplicate-fraction", type=float, default=0.2, help="of --data sft-duplicates")
    parser.add_argument("--policies", nargs="+", choices=["paper", "spread"], default=["paper"],
                        help="of --data sft-duplicates")
    args = parser.parse_args(argv)
    if args.data == "sft-duplicates":

        def save(row: dict) -> Path:
            payload = {"procs": args.procs, "transport": "gloo (CPU, one machine)", "row": row}
            return write_results("distributed_sft_duplicates", "cpu", payload, out_dir=args.out_dir)

        row = bench_sft_duplicates(
            args.records, args.duplicate_fraction, args.procs, args.policies,
            k="auto" if args.k is None else args.k, max_rejections=args.max_rejections, timeout=args.timeout,
            save=save,
        )
        print_sft_table(row)
        print(f"wrote {save(row)}")
        return
    if args.k is None:
        args.k = 64
    rows = [
        bench_size(
            n, args.dim, args.procs, k=args.k, max_rejections=args.max_rejections, timeout=args.timeout
        )
        for n in args.sizes
    ]
    payload = {"sizes": args.sizes, "procs": args.procs, "transport": "gloo (CPU, one machine)", "rows": rows}
    path = write_results("distributed", "cpu", payload, out_dir=args.out_dir)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
