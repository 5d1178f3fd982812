"""Benchmarks of bin packing: next fit (op vs pure torch vs reference) and BFD against TRL and plain-Python FFD.

**Suite ``next_fit``** (the default): ordered next-fit bin packing, compiled op vs pure-torch pointer jumping
vs Python reference.

Lengths: log-normal (mean ~512 tokens, sigma 1), rounded and clipped to ``[1, max_len]``, ``max_len = 2048``,
``N = 10**5`` and ``10**6`` (the Python reference only at ``10**5``). All implementations get the same
lengths and must agree bit for bit before they are timed.

Implementations (``impl`` in the results):

- ``cpp_op``: ``torch.ops.tfp_kernels.next_fit_pack_ids`` (CPU: sequential C++ loop; CUDA: pointer jumping);
- ``torch_pointer_jumping``: :func:`tfp_kernels.packing.next_fit_pack_ids_torch` (plain torch ops);
- ``python_reference``: :func:`tfp_kernels.packing.reference.next_fit_pack_ids_reference` on a Python list
  (the list is built before timing);
- ``pack_lengths``: the public entry point end to end (validation, op, pack offsets), for scale.

Two ways to run it:

- ``pytest benchmarks/bench_binpack.py`` (pytest-benchmark tables; CUDA cases skipped without a GPU);
- ``python benchmarks/bench_binpack.py [--sizes 100000 1000000] [--max-len 2048] [--repeat 10]``: plain
  timers; writes ``benchmarks/results/binpack_<device-name>.json`` (device name: the GPU's when CUDA is
  available, else ``cpu-<nproc>core``) with timings and speedups over the reference and over pure torch,
  all measured in the same run.

**Suite ``bfd``** (``python benchmarks/bench_binpack.py --suite bfd [--sizes 100000 1000000 10000000]
[--max-lens 2048 8192] [--trl-max-n ...] [--ffd-max-n ...]``): on the same log-normal lengths (mean 512,
sigma 1, clipped to ``[1, max_len]``), time and fill ratio of

- ``bfd``: ``pack_lengths(lengths, max_len, strategy="bfd")`` end to end (validation, C++ op, Packing);
- ``bfd_op``: the C++ op ``torch.ops.tfp_kernels.best_fit_decreasing`` alone;
- ``window_best_fit`` (window 1024), ``next_fit``, ``stream``: the other strategies, for their fill;
- ``python_ffd``: plain-Python first-fit-decreasing with a segment tree (``benchmarks/ffd_python.py``);
- ``trl_bfd``: TRL's ``pack_dataset(dataset, max_len, strategy="bfd")`` on a ``datasets.Dataset`` whose
  ``input_ids`` column is a ``large_list<null>`` of the given lengths (Arrow stores no token values for
  it, so this times TRL's bin packing and Arrow bookkeeping without moving tokens: a lower bound on
  TRL's time, and the like-for-like peer of ``bfd``, which sees lengths only);
- ``trl_bfd_int32_tokens``: the same with real int32 token columns (what a user runs), at the smaller sizes.

TRL packs per ``datasets.map`` batch of 1000 rows, not globally: its fill is lower. Writes
``benchmarks/results/binpack_bfd_<device-name>.json`` with ``speedup_vs_trl`` (TRL median / row median)
and ``fill_minus_trl`` for every row. Needs the ``bench`` extra (``trl``, ``datasets``) for the TRL rows.

**Suite ``fill_in_order``** (``python benchmarks/bench_binpack.py --suite fill_in_order [--sizes ...]
[--max-lens 2048 8192]``): time and fill of ``pack_lengths(lengths, max_len, strategy=...)`` end to end for
``next_fit``, ``fill_in_order`` (window 1024, length-only: no embeddings), ``window_best_fit`` (window 1024)
and ``bfd``, plus the ``fill_in_order`` C++ op alone (``fill_in_order_op``) and its pure-Python fallback
(``fill_in_order_python``, up to ``--reference-max-n``), on the same log-normal lengths; the op and the
fallback must give the same packs before anything is timed. Every row gets ``time_vs_next_fit`` and
``time_vs_bfd`` (its median / theirs, same run). Writes ``binpack_fill_in_order_<device-name>.json``.

**Suite ``trade_off``** (``python benchmarks/bench_binpack.py --suite trade_off [--plot PNG]``): what
``tfp-pack`` does with its defaults on the bundled default dataset (4,000 records, byte tokenizer, hashed
embedder, TFP order with t = the 0.02 quantile), packed at max_len 2048 (``--max-len``) in TFP order and in a
seeded random order by every strategy of :data:`tfp_kernels.report.TRADE_OFF_STRATEGIES`; ``fill_in_order``
three ways: length-only, with the embeddings, with the embeddings and ``min_distance=t``. Each row: packs,
fill ratio, mean intra-pack similarity (:func:`tfp_kernels.report.intra_pack_similarity`), its ratio to
next fit's in the same order, the share of same-pack sample pairs closer than t (near duplicates) and the
packing time. Writes ``binpack_trade_off_<device-name>.json`` (and the fill/similarity plot with
``--plot``).
"""

from __future__ import annotations

import argparse
import json
import time

import pytest
import torch

from tfp_kernels import has_cuda_ops, has_extension
from tfp_kernels.packing import next_fit_pack_ids_torch, pack_lengths
from tfp_kernels.packing.reference import next_fit_pack_ids_reference
from tfp_kernels.testing import lognormal_lengths

try:  # run as `python benchmarks/bench_binpack.py` or collected by pytest as benchmarks.bench_binpack
    from benchmarks._harness import device_name, time_call, write_results
except ImportError:
    from _harness import device_name, time_call, write_results

MAX_LEN = 2048
MEAN_LENGTH = 512.0
SIZES = (100_000, 1_000_000)
REFERENCE_MAX_N = 100_000
SEED = 0


def make_lengths(n: int, *, max_len: int = MAX_LEN, device: str = "cpu") -> torch.Tensor:
    """(N,) int64 log-normal lengths on ``device`` (same values on every device)."""
    return lognormal_lengths(n, mean=MEAN_LENGTH, max_len=max_len, seed=SEED, device=device)


def implementations(device: str, max_len: int) -> dict:
    """name -> (prepare(lengths) -> argument, run(argument) -> result) for the given device."""
    impls = {}
    if has_extension() and (device == "cpu" or has_cuda_ops()):
        impls["cpp_op"] = (lambda x: x, lambda x: torch.ops.tfp_kernels.next_fit_pack_ids(x, max_len))
    impls["torch_pointer_jumping"] = (lambda x: x, lambda x: next_fit_pack_ids_torch(x, max_len))
    impls["pack_lengths"] = (lambda x: x, lambda x: pack_lengths(x, max_len).pack_id)
    if device == "cpu":
        impls["python_reference"] = (lambda x: x.tolist(), lambda x: next_fit_pack_ids_reference(x, max_len))
    return impls


# ================================================================================== pytest-benchmark

CASES = [
    pytest.param(device, impl, n, id=f"{device}-{impl}-n{n}", marks=marks)
    for device, marks in [
        ("cpu", ()),
        ("cuda", pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
    ]
    for impl in ("cpp_op", "torch_pointer_jumping", "python_reference", "pack_lengths")
    for n in SIZES
    if not (impl == "python_reference" and (device != "cpu" or n > REFERENCE_MAX_N))
]


@pytest.mark.parametrize("device, impl, n", CASES)
def test_next_fit(benchmark, device, impl, n):
    impls = implementations(device, MAX_LEN)
    if impl not in impls:
        pytest.skip(f"{impl} is not available on {device} (extension built: {has_extension()})")
    prepare, run = impls[impl]
    lengths = make_lengths(n, device=device)
    argument = prepare(lengths)
    expected = torch.ops.tfp_kernels.next_fit_pack_ids(lengths.cpu(), MAX_LEN) if has_extension() else None

    def call():
        result = run(argument)
        if device == "cuda":
            torch.cuda.synchronize()
        return result

    benchmark.group = f"next_fit {device} N={n} max_len={MAX_LEN}"
    benchmark.extra_info.update(device=device_name(device), n=n, max_len=MAX_LEN)
    result = benchmark.pedantic(call, rounds=5 if n >= 1_000_000 else 10, iterations=1, warmup_rounds=1)
    if expected is not None:
        result = torch.as_tensor(result).cpu()
        assert torch.equal(result, expected), f"{impl} on {device} disagrees with the C++ op"


# ================================================================================== BFD suite

BFD_SIZES = (100_000, 1_000_000, 10_000_000)
BFD_MAX_LENS = (2048, 8192)
TRL_TOKENS_MAX_N = 1_000_000


def trl_available() -> bool:
    try:
        import datasets  # noqa: F401
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


def trl_dataset(lengths: torch.Tensor, *, tokens: bool):
    """A ``datasets.Dataset`` with an ``input_ids`` column of the given lengths (null or int32 token values)."""
    import datasets
    import numpy as np
    import pyarrow as pa

    datasets.disable_progress_bars()
    offsets = np.concatenate([[0], np.cumsum(lengths.numpy())])
    if tokens:
        values = pa.array(np.zeros(int(offsets[-1]), dtype=np.int32))
        column = pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), values)
    else:
        column = pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), pa.nulls(int(offsets[-1])))
    return datasets.Dataset(pa.table({"input_ids": column}))


def trl_bfd_packs(dataset, max_len: int) -> int:
    from trl import pack_dataset

    return len(pack_dataset(dataset, max_len, strategy="bfd"))


def bfd_peers(max_len: int, n: int, trl_max_n: int, ffd_max_n: int, trl_tokens_max_n: int) -> dict:
    """name -> (prepare(lengths) -> argument, run(argument) -> number of packs, timed runs)."""
    try:
        from benchmarks.ffd_python import first_fit_decreasing
    except ImportError:  # run as a script from benchmarks/
        from ffd_python import first_fit_decreasing

    many = 3 if n >= 10_000_000 else 5
    peers = {
        "bfd": (lambda x: x, lambda x: pack_lengths(x, max_len, strategy="bfd").num_packs, many),
        "bfd_op": (
            lambda x: x,
            lambda x: int(torch.ops.tfp_kernels.best_fit_decreasing(x, max_len, x.numel())[1][-1]) + 1,
            many,
        ),
        "window_best_fit": (
            lambda x: x,
            lambda x: pack_lengths(x, max_len, strategy="window_best_fit").num_packs,
            many,
        ),
        "next_fit": (lambda x: x, lambda x: pack_lengths(x, max_len, strategy="next_fit").num_packs, many),
        "stream": (lambda x: x, lambda x: pack_lengths(x, max_len, strategy="stream").num_packs, many),
    }
    if not has_extension():
        del peers["bfd_op"]
    if n <= ffd_max_n:
        peers["python_ffd"] = (
            lambda x: x.tolist(),
            lambda x: max(first_fit_decreasing(x, max_len)) + 1,
            1 if n >= 1_000_000 else 3,
        )
    if trl_available() and n <= trl_max_n:
        peers["trl_bfd"] = (
            lambda x: trl_dataset(x, tokens=False),
            lambda d: trl_bfd_packs(d, max_len),
            1 if n >= 1_000_000 else 3,
        )
    if trl_available() and n <= min(trl_max_n, trl_tokens_max_n):
        peers["trl_bfd_int32_tokens"] = (
            lambda x: trl_dataset(x, tokens=True),
            lambda d: trl_bfd_packs(d, max_len),
            1 if n >= 1_000_000 else 3,
        )
    return peers


def run_bfd_comparison(
    sizes: list[int], max_lens: list[int], trl_max_n: int, ffd_max_n: int, trl_tokens_max_n: int
) -> dict:
    rows = []
    for max_len in max_lens:
        for n in sizes:
            lengths = make_lengths(n, max_len=max_len)
            total = int(lengths.sum())
            for impl, (prepare, run, repeat) in bfd_peers(
                max_len, n, trl_max_n, ffd_max_n, trl_tokens_max_n
            ).items():
                start = time.perf_counter()
                argument = prepare(lengths)
                prepare_s = time.perf_counter() - start
                start = time.perf_counter()
                num_packs = run(argument)
                first_ms = (time.perf_counter() - start) * 1e3
                if repeat > 1:  # the first call was the warm-up
                    timing = time_call(
                        lambda run=run, argument=argument: run(argument), warmup=0, repeat=repeat
                    )
                else:  # slow peers: the one call is the measurement
                    timing = {
                        "median_ms": first_ms,
                        "p20_ms": first_ms,
                        "p80_ms": first_ms,
                        "min_ms": first_ms,
                        "runs": 1,
                    }
                row = {
                    "impl": impl,
                    "n": n,
                    "max_len": max_len,
                    "num_tokens": total,
                    "num_packs": num_packs,
                    "fill_ratio": total / (num_packs * max_len),
                    "prepare_s": prepare_s,
                    **timing,
                    "items_per_s": n / (timing["median_ms"] / 1e3),
                }
                rows.append(row)
                print(
                    f"max_len={max_len} N={n:>10,d} {impl:22s} median {timing['median_ms']:12.1f} ms "
                    f"({timing['runs']} runs)  fill {row['fill_ratio']:.5f}  packs {num_packs}",
                    flush=True,
                )
    by_key = {(row["impl"], row["n"], row["max_len"]): row for row in rows}
    for row in rows:
        trl = by_key.get(("trl_bfd", row["n"], row["max_len"]))
        row["speedup_vs_trl"] = trl["median_ms"] / row["median_ms"] if trl else None
        row["fill_minus_trl"] = row["fill_ratio"] - trl["fill_ratio"] if trl else None
    return {
        "config": {
            "suite": "bfd",
            "lengths": f"log-normal, mean {MEAN_LENGTH}, sigma 1, rounded, clipped to [1, max_len]; seed {SEED}",
            "sizes": sizes,
            "max_lens": max_lens,
            "trl_max_n": trl_max_n,
            "ffd_max_n": ffd_max_n,
            "trl_tokens_max_n": trl_tokens_max_n,
            "torch_threads": torch.get_num_threads(),
            "trl": _version("trl"),
            "datasets": _version("datasets"),
            "timer": "time.perf_counter around each call; fast peers: one untimed call first (it also gives "
            "the pack count), then 3-5 timed runs, quantiles 0.5/0.2/0.8; slow peers (python_ffd, trl at N >= "
            "10^6): the single call is the measurement; the argument (list, Dataset) is built before timing "
            "(prepare_s)",
            "ratios": "speedup_vs_trl = median of trl_bfd (lengths-only dataset) / median of this row; "
            "fill_minus_trl = fill ratio of this row - fill ratio of trl_bfd; same run, same lengths",
        },
        "rows": rows,
    }


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


BFD_CASES = [
    pytest.param(impl, n, id=f"{impl}-n{n}")
    for n in (100_000, 1_000_000)
    for impl in ("bfd", "bfd_op", "next_fit", "python_ffd", "trl_bfd")
    if not (impl in ("python_ffd", "trl_bfd") and n > 100_000)
]


@pytest.mark.parametrize("impl, n", BFD_CASES)
def test_bfd_vs_peers(benchmark, impl, n):
    peers = bfd_peers(MAX_LEN, n, trl_max_n=100_000, ffd_max_n=100_000, trl_tokens_max_n=0)
    if impl not in peers:
        pytest.skip(
            f"{impl} is not available (extension: {has_extension()}, trl/datasets: {trl_available()})"
        )
    prepare, run, _ = peers[impl]
    lengths = make_lengths(n)
    argument = prepare(lengths)
    benchmark.group = f"bfd cpu N={n} max_len={MAX_LEN}"
    num_packs = benchmark.pedantic(lambda: run(argument), rounds=3, iterations=1, warmup_rounds=0)
    fill = int(lengths.sum()) / (num_packs * MAX_LEN)
    benchmark.extra_info.update(n=n, max_len=MAX_LEN, num_packs=num_packs, fill_ratio=fill)
    assert fill > 0.99


# ================================================================================== fill_in_order suite

FILL_IN_ORDER_SIZES = (100_000, 1_000_000, 10_000_000)
FILL_IN_ORDER_WINDOW = 1024


def fill_in_order_peers(max_len: int, n: int, python_max_n: int) -> dict:
    """name -> (run(lengths) -> number of packs, timed runs)."""
    from tfp_kernels.packing import fill_in_order_pack, fill_in_order_pack_python

    repeat = 3 if n >= 10_000_000 else 5
    peers = {}
    for strategy in ("next_fit", "fill_in_order", "window_best_fit", "bfd"):
        peers[strategy] = (
            lambda x, s=strategy: pack_lengths(x, max_len, strategy=s, window=FILL_IN_ORDER_WINDOW).num_packs,
            repeat,
        )
    if has_extension():
        peers["fill_in_order_op"] = (
            lambda x: len(fill_in_order_pack(x, max_len, window=FILL_IN_ORDER_WINDOW, backend="op").pack_offsets)
            - 1,
            repeat,
        )
    if n <= python_max_n:
        peers["fill_in_order_python"] = (
            lambda x: max(fill_in_order_pack_python(x.tolist(), max_len, FILL_IN_ORDER_WINDOW)) + 1,
            1,
        )
    return peers


def run_fill_in_order_comparison(sizes: list[int], max_lens: list[int], python_max_n: int) -> dict:
    from tfp_kernels.packing import fill_in_order_pack, fill_in_order_pack_python

    rows = []
    for max_len in max_lens:
        for n in sizes:
            lengths = make_lengths(n, max_len=max_len)
            total = int(lengths.sum())
            if has_extension() and n <= python_max_n:  # same packs before timing
                op = fill_in_order_pack(lengths, max_len, window=FILL_IN_ORDER_WINDOW, backend="op")
                python = fill_in_order_pack_python(lengths.tolist(), max_len, FILL_IN_ORDER_WINDOW)
                pack_of = torch.empty(n, dtype=torch.int64)
                pack_of[op.order] = op.pack_id
                assert pack_of.tolist() == python, f"op and Python fallback disagree at N={n}"
            for impl, (run, repeat) in fill_in_order_peers(max_len, n, python_max_n).items():
                num_packs = run(lengths)  # untimed warm-up (and the pack count) ...
                timing = time_call(lambda run=run: run(lengths), warmup=0, repeat=repeat)
                row = {
                    "impl": impl,
                    "n": n,
                    "max_len": max_len,
                    "window": FILL_IN_ORDER_WINDOW,
                    "num_tokens": total,
                    "num_packs": num_packs,
                    "fill_ratio": total / (num_packs * max_len),
                    **timing,
                    "items_per_s": n / (timing["median_ms"] / 1e3),
                }
                rows.append(row)
                print(
                    f"max_len={max_len} N={n:>10,d} {impl:22s} median {timing['median_ms']:10.1f} ms "
                    f"({timing['runs']} runs)  fill {row['fill_ratio']:.5f}  packs {num_packs}",
                    flush=True,
                )
    by_key = {(row["impl"], row["n"], row["max_len"]): row["median_ms"] for row in rows}
    for row in rows:
        for peer in ("next_fit", "bfd"):
            other = by_key.get((peer, row["n"], row["max_len"]))
            row[f"time_vs_{peer}"] = row["median_ms"] / other if other else None
    return {
        "config": {
            "suite": "fill_in_order",
            "lengths": f"log-normal, mean {MEAN_LENGTH}, sigma 1, rounded, clipped to [1, max_len]; seed {SEED}",
            "sizes": sizes,
            "max_lens": max_lens,
            "window": FILL_IN_ORDER_WINDOW,
            "python_max_n": python_max_n,
            "torch_threads": torch.get_num_threads(),
            "timer": "time.perf_counter around each call; one untimed call first (it gives the pack count), "
            "then 3-5 timed runs (1 for the Python fallback), quantiles 0.5/0.2/0.8",
            "ratios": "time_vs_next_fit / time_vs_bfd = median of this row / median of pack_lengths with "
            "next_fit / bfd; same run, same lengths",
        },
        "rows": rows,
    }


# ================================================================================== trade_off suite


def bundled_default_data(device: str = "cpu") -> dict:
    """What ``tfp-pack`` computes from the bundled default with its defaults: lengths (byte tokenizer),
    hashed embeddings of the default text, the TFP path (l2, quantile 0.02, window 4) and its threshold."""
    from tfp_kernels.data import load_default
    from tfp_kernels.embed import load_embedder
    from tfp_kernels.order import tfp_order
    from tfp_kernels.text import formats, tokenize

    records = load_default()
    fmt = formats.detect_format(records)
    tokenized = tokenize.tokenize_records(records, fmt, tokenize.load_tokenizer("byte"))
    texts = [formats.embed_text(record, fmt, None, i) for i, record in enumerate(records)]
    embeddings = load_embedder("hashed").embed_texts(texts, device=device).cpu()
    path, stats = tfp_order(embeddings, metric="l2", quantile=0.02, window=4, return_stats=True)
    return {
        "lengths": torch.from_numpy(tokenized.lengths).long(),
        "embeddings": embeddings,
        "path": path.cpu(),
        "threshold": float(stats.threshold),
    }


def near_duplicate_pair_fraction(pack_id, sample_index, embeddings, threshold: float) -> float:
    """Share of the pairs of distinct samples sharing a pack whose l2 distance is below ``threshold``."""
    close = pairs = 0
    x = embeddings.double()
    bounds = torch.searchsorted(pack_id, torch.arange(int(pack_id[-1]) + 2))
    for begin, end in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        members = torch.unique(sample_index[begin:end])
        if members.numel() < 2:
            continue
        distance = torch.cdist(x[members], x[members])
        upper = torch.triu_indices(members.numel(), members.numel(), 1)
        values = distance[upper[0], upper[1]]
        close += int((values < threshold).sum())
        pairs += values.numel()
    return close / pairs if pairs else float("nan")


def run_trade_off(max_len: int, seed: int, plot: str | None) -> dict:
    from tfp_kernels.report import (
        TRADE_OFF_STRATEGIES,
        fill_similarity_points,
        plot_fill_vs_similarity,
    )

    start = time.perf_counter()
    data = bundled_default_data()
    prepare_s = time.perf_counter() - start
    lengths, embeddings, t = data["lengths"], data["embeddings"], data["threshold"]
    n = lengths.numel()
    orders = {"tfp": data["path"], "random": torch.randperm(n, generator=torch.Generator().manual_seed(seed))}
    variants = {  # fill_in_order three ways; the other strategies once (in the first)
        "": {"use_embeddings": False},
        " + embeddings": {"use_embeddings": True},
        " + embeddings, min_distance=t": {"use_embeddings": True, "min_distance": t},
    }
    rows, plotted = [], []
    for suffix, options in variants.items():
        strategies = [
            spec
            for spec in TRADE_OFF_STRATEGIES
            if not suffix or (not isinstance(spec, str) and spec[0] == "fill_in_order")
        ]
        for order_name, order in orders.items():
            for spec in strategies:
                begin = time.perf_counter()
                (point,) = fill_similarity_points(
                    lengths, embeddings, max_len, {order_name: order}, [spec], **options
                )
                seconds = time.perf_counter() - begin
                name, window = (spec, None) if isinstance(spec, str) else spec
                extra = {"window": window} if window else {}
                if name == "fill_in_order" and options["use_embeddings"]:
                    extra.update(embeddings=embeddings[order], min_distance=options.get("min_distance"))
                packing = pack_lengths(lengths[order], max_len, strategy=name, overlong="split", **extra)
                near = near_duplicate_pair_fraction(packing.pack_id, order[packing.sample_index], embeddings, t)
                label = name + (suffix if name == "fill_in_order" else "")
                near = round(near, 6)
                rows.append({**point, "strategy": label, "near_duplicate_pair_fraction": near, "seconds": seconds})
                plotted.append({**point, "strategy": label})
    base = {r["order"]: r["mean_intra_pack_similarity"] for r in rows if r["strategy"] == "next_fit"}
    for row in rows:
        row["similarity_vs_next_fit"] = round(row["mean_intra_pack_similarity"] / base[row["order"]], 4)
        print(
            f"{row['order']:7s} {row['strategy']:45s} W={str(row['window']):5s} packs {row['packs']:4d} "
            f"fill {row['fill_ratio']:.4f} sim {row['mean_intra_pack_similarity']:.4f} "
            f"({row['similarity_vs_next_fit']:.3f}x next_fit) near-dup {row['near_duplicate_pair_fraction']:.4f}",
            flush=True,
        )
    if plot:
        plot_fill_vs_similarity(
            plotted, plot, f"Fill against intra-pack similarity: bundled default, N = {n}, max_len {max_len}"
        )
        print(f"wrote {plot}")
    return {
        "config": {
            "suite": "trade_off",
            "data": "bundled default (tfp_kernels/data/sft_default.jsonl.gz): byte tokenizer, hashed embedder of "
            "the default text, tfp_order(l2, quantile 0.02, window 4), overlong 'split'",
            "n": n,
            "max_len": max_len,
            "threshold": t,
            "random_order_seed": seed,
            "prepare_s": prepare_s,
            "similarity": "mean over packs of two or more samples of the mean pairwise cosine similarity of the "
            "samples in a pack (tfp_kernels.report.intra_pack_similarity); similarity_vs_next_fit: ratio to "
            "next_fit's in the same order",
            "near_duplicate_pair_fraction": "same-pack pairs of distinct samples at l2 distance < t / all "
            "same-pack pairs",
            "seconds": "fill_similarity_points for that one point: packing plus the similarity",
        },
        "rows": rows,
    }


# ================================================================================== plain script


def run_comparisons(
    devices: list[str], sizes: list[int], max_len: int, repeat: int, reference_max_n: int, threads: list[int]
) -> dict:
    rows = []
    for num_threads in threads:
        torch.set_num_threads(num_threads)
        rows += _run_sizes(devices, sizes, max_len, repeat, reference_max_n, num_threads)
    _add_ratios(rows)
    return {
        "config": {
            "lengths": f"log-normal, mean {MEAN_LENGTH}, sigma 1, rounded, clipped to [1, max_len]; seed {SEED}",
            "max_len": max_len,
            "sizes": sizes,
            "reference_max_n": reference_max_n,
            "torch_threads": threads,
            "timer": "time.perf_counter around each call, torch.cuda.synchronize after CUDA calls; "
            "2 warm-up calls; quantiles 0.5/0.2/0.8 over the runs",
            "ratios": "speedup_vs_* = median of the other implementation / median of this row, same run and "
            "same torch thread count; the Python reference always runs on CPU",
        },
        "rows": rows,
    }


def _run_sizes(devices, sizes, max_len, repeat, reference_max_n, num_threads) -> list[dict]:
    rows = []
    for n in sizes:
        lengths_cpu = make_lengths(n, max_len=max_len)
        packing = pack_lengths(lengths_cpu, max_len)
        data = {
            "num_packs": packing.num_packs,
            "fill_ratio": packing.fill_ratio,
            "mean_length": float(lengths_cpu.double().mean()),
        }
        expected = next_fit_pack_ids_torch(lengths_cpu, max_len)
        for device in devices:
            lengths = lengths_cpu.to(device)
            for impl, (prepare, run) in implementations(device, max_len).items():
                if impl == "python_reference" and n > reference_max_n:
                    continue
                argument = prepare(lengths)
                result = torch.as_tensor(run(argument)).cpu()
                assert torch.equal(result, expected), f"{impl} on {device} disagrees at N={n}"
                timing = time_call(
                    lambda run=run, argument=argument: run(argument), device=device, repeat=repeat
                )
                rows.append(
                    {
                        "device": device,
                        "impl": impl,
                        "n": n,
                        "max_len": max_len,
                        "torch_threads": num_threads,
                        **data,
                        **timing,
                        "items_per_s": n / (timing["median_ms"] / 1e3),
                    }
                )
                print(
                    f"{device:5s} {impl:22s} threads={num_threads} N={n:>9,d}  median {timing['median_ms']:10.3f} ms "
                    f"(p20 {timing['p20_ms']:.3f}, p80 {timing['p80_ms']:.3f}, {timing['runs']} runs)",
                    flush=True,
                )
    return rows


def _add_ratios(rows: list[dict]) -> None:
    """Speedups from the medians of this run, within the same torch thread count."""
    by_key = {(row["torch_threads"], row["device"], row["impl"], row["n"]): row["median_ms"] for row in rows}
    for row in rows:
        reference = by_key.get((row["torch_threads"], "cpu", "python_reference", row["n"]))
        pure_torch = by_key.get((row["torch_threads"], row["device"], "torch_pointer_jumping", row["n"]))
        row["speedup_vs_python_reference"] = reference / row["median_ms"] if reference else None
        row["speedup_vs_torch_pointer_jumping"] = pure_torch / row["median_ms"] if pure_torch else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--max-len", type=int, default=MAX_LEN)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--reference-max-n", type=int, default=REFERENCE_MAX_N)
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when available")
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=None,
        help="torch intra-op thread counts to run with (default: torch's current setting)",
    )
    parser.add_argument("--out-dir", default=None, help="default: benchmarks/results")
    parser.add_argument(
        "--suite", choices=["next_fit", "bfd", "fill_in_order", "trade_off"], default="next_fit"
    )
    parser.add_argument("--plot", default=None, help="trade_off suite: write the fill/similarity plot here")
    parser.add_argument("--seed", type=int, default=0, help="trade_off suite: seed of the random order")
    parser.add_argument("--max-lens", type=int, nargs="+", default=list(BFD_MAX_LENS), help="bfd suite")
    parser.add_argument("--trl-max-n", type=int, default=max(BFD_SIZES), help="bfd suite: largest N for TRL")
    parser.add_argument("--ffd-max-n", type=int, default=max(BFD_SIZES), help="bfd suite: largest N for FFD")
    parser.add_argument(
        "--trl-tokens-max-n",
        type=int,
        default=TRL_TOKENS_MAX_N,
        help="bfd suite: largest N for TRL on tokens",
    )
    args = parser.parse_args(argv)
    if args.suite == "fill_in_order":
        sizes = args.sizes if args.sizes != list(SIZES) else list(FILL_IN_ORDER_SIZES)
        payload = run_fill_in_order_comparison(sizes, args.max_lens, args.reference_max_n)
        path = write_results("binpack_fill_in_order", "cpu", payload, out_dir=args.out_dir)
        print(f"wrote {path}")
        keys = ("impl", "n", "max_len", "median_ms", "fill_ratio", "time_vs_next_fit", "time_vs_bfd")
        print(json.dumps([{k: row[k] for k in keys} for row in payload["rows"]], indent=1))
        return
    if args.suite == "trade_off":
        payload = run_trade_off(args.max_len, args.seed, args.plot)
        path = write_results("binpack_trade_off", "cpu", payload, out_dir=args.out_dir)
        print(f"wrote {path}")
        return
    if args.suite == "bfd":
        sizes = args.sizes if args.sizes != list(SIZES) else list(BFD_SIZES)
        payload = run_bfd_comparison(
            sizes, args.max_lens, args.trl_max_n, args.ffd_max_n, args.trl_tokens_max_n
        )
        path = write_results("binpack_bfd", "cpu", payload, out_dir=args.out_dir)
        print(f"wrote {path}")
        keys = ("impl", "n", "max_len", "median_ms", "fill_ratio", "speedup_vs_trl")
        print(json.dumps([{k: row[k] for k in keys} for row in payload["rows"]], indent=1))
        return
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    threads = args.threads or [torch.get_num_threads()]
    payload = run_comparisons(devices, args.sizes, args.max_len, args.repeat, args.reference_max_n, threads)
    main_device = "cuda" if "cuda" in devices else "cpu"
    path = write_results("binpack", main_device, payload, out_dir=args.out_dir)
    print(f"wrote {path}")
    summary = [
        {
            k: row[k]
            for k in ("device", "torch_threads", "impl", "n", "median_ms", "speedup_vs_python_reference")
        }
        for row in payload["rows"]
    ]
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
