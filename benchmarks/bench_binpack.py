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
    parser.add_argument("--suite", choices=["next_fit", "bfd"], default="next_fit")
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
