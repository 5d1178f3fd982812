"""Benchmark of ordered next-fit bin packing: compiled op vs pure-torch pointer jumping vs Python reference.

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
"""

from __future__ import annotations

import argparse
import json

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
    args = parser.parse_args(argv)
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
