"""Benchmark of the hashed token-bag embedder: hashed_embed (vectorised torch, CPU / CUDA) vs its plain-Python
reference, on the buffer size of pack_gpu.

Data: N = 4096 samples (default), log-normal lengths (mean 512, sigma 1, clipped to [1, 2048]), random token
ids below 128,000; d = 256, n-grams 1..2 (the defaults). The tokens live on the benchmarked device.

Implementations (``impl``):

- ``list``: ``hashed_embed(list_of_tensors)`` end to end (includes the concatenation and the id check);
- ``jagged``: ``hashed_embed(Jagged(values, offsets))`` with CPU offsets;
- ``jagged_nocheck``: the same with ``check=False`` (no host read on CUDA);
- ``jagged_device_offsets`` (CUDA only): offsets on the GPU (binary search for the sample ids);
- ``padded``: ``hashed_embed(Padded(tokens, lengths))`` on a ``[N, max_len]`` tensor (CPU lengths);
- ``direct_keys`` (CPU only): ``jagged`` with the per-id lookup table of token keys turned off;
- ``python_reference``: :func:`tfp_kernels.embed.reference.hashed_embed_reference` on the first
  ``--ref-n`` samples (Python lists, CPU); its time is also extrapolated to all tokens.

Every fast implementation must equal ``jagged`` bit for bit (``torch.equal``; CUDA results are compared with
the CPU ones), and ``jagged`` must equal the Python reference on its subset, before anything is timed.
Run ``python benchmarks/bench_embed.py [--n 4096] [--devices cpu cuda] [--repeat 20] [--threads 1]``: writes
``benchmarks/results/embed_<device-name>.json``; or ``pytest benchmarks/bench_embed.py``.
"""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch

from tfp_kernels.assembly import Jagged, Padded
from tfp_kernels.embed import hashed as hashed_module
from tfp_kernels.embed import hashed_embed
from tfp_kernels.embed.reference import hashed_embed_reference
from tfp_kernels.testing import lognormal_lengths

try:  # run as `python benchmarks/bench_embed.py` or collected by pytest as benchmarks.bench_embed
    from benchmarks._harness import device_name, time_call, write_results
except ImportError:
    from _harness import device_name, time_call, write_results

N = 4096
MAX_LEN = 2048
MEAN_LENGTH = 512.0
VOCAB = 128_000
DIM = 256
NGRAM = 2
SEED = 0
REF_N = 64


def make_data(n: int, device: str):
    """Samples (list of 1-D int64 tensors on ``device``), their Jagged (CPU offsets) and Padded forms."""
    lengths = lognormal_lengths(n, mean=MEAN_LENGTH, max_len=MAX_LEN, seed=SEED)
    generator = torch.Generator().manual_seed(SEED)
    values = torch.randint(0, VOCAB, (int(lengths.sum()),), generator=generator, dtype=torch.int64)
    offsets = torch.zeros(n + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    samples = [s.to(device) for s in values.split(lengths.tolist())]
    padded = torch.zeros(n, int(lengths.max()), dtype=torch.int64)
    mask = torch.arange(padded.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
    padded[mask] = values
    return samples, Jagged(values.to(device), offsets), Padded(padded.to(device), lengths)


def implementations(samples, jagged: Jagged, padded: Padded, device: str) -> dict:
    """name -> run() -> (N, DIM) float32."""
    kw = {"dim": DIM, "ngram": NGRAM, "seed": SEED}
    impls = {
        "list": lambda: hashed_embed(samples, **kw),
        "jagged": lambda: hashed_embed(jagged, **kw),
        "jagged_nocheck": lambda: hashed_embed(jagged, check=False, **kw),
        "padded": lambda: hashed_embed(padded, **kw),
    }
    if device == "cuda":
        on_device = Jagged(jagged.values, jagged.offsets.to(device))
        impls["jagged_device_offsets"] = lambda: hashed_embed(on_device, **kw)
    else:

        def direct():
            saved = hashed_module._TABLE_MIN_TOKENS
            hashed_module._TABLE_MIN_TOKENS = 1 << 62
            try:
                return hashed_embed(jagged, **kw)
            finally:
                hashed_module._TABLE_MIN_TOKENS = saved

        impls["direct_keys"] = direct
    return impls


def run_comparisons(n: int, devices: list[str], repeat: int, ref_n: int) -> dict:
    load_before = os.getloadavg()[0]
    rows = []
    cpu_result = None
    for device in devices:
        samples, jagged, padded = make_data(n, device)
        num_tokens = int(jagged.offsets[-1])
        impls = implementations(samples, jagged, padded, device)
        expected = impls["jagged"]()
        if cpu_result is None:
            cpu_result = expected.cpu()
        assert torch.equal(expected.cpu(), cpu_result), f"{device}: differs from the first device's result"
        for impl, run in impls.items():
            assert torch.equal(run(), expected), f"{device} {impl}: differs from jagged"
            timing = time_call(run, device=device, warmup=2, repeat=repeat)
            rows.append(_row(device, impl, n, num_tokens, timing))
        if device == "cpu":
            subset = [s.tolist() for s in samples[:ref_n]]
            ref_tokens = sum(len(s) for s in subset)
            reference = torch.tensor(
                hashed_embed_reference(subset, dim=DIM, ngram=NGRAM, seed=SEED), dtype=torch.float64
            ).float()
            assert torch.equal(reference, expected[:ref_n]), "the Python reference differs from jagged"
            timing = time_call(
                lambda subset=subset: hashed_embed_reference(subset, dim=DIM, ngram=NGRAM, seed=SEED),
                warmup=0,
                repeat=3,
            )
            row = _row(device, "python_reference", ref_n, ref_tokens, timing)
            row["extrapolated_ms_all_tokens"] = timing["median_ms"] * num_tokens / ref_tokens
            rows.append(row)
    for row in rows:
        ref = next((r for r in rows if r["impl"] == "python_reference"), None)
        row["speedup_vs_python_reference"] = (
            ref["tokens_per_s"] and row["tokens_per_s"] / ref["tokens_per_s"] if ref else None
        )
    return {
        "config": {
            "samples": f"N={n}, log-normal lengths mean {MEAN_LENGTH} sigma 1 clipped to [1, {MAX_LEN}], "
            f"random ids < {VOCAB}; seed {SEED}",
            "embedder": f"hashed_embed(dim={DIM}, ngram={NGRAM}, seed={SEED}, normalize=True)",
            "python_reference": f"first {ref_n} samples on the CPU; speedup_vs_python_reference compares "
            "tokens per second",
            "torch_threads": torch.get_num_threads(),
            "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
            "timer": "time.perf_counter around each call, torch.cuda.synchronize after CUDA calls; quantiles "
            "0.5/0.2/0.8 over the runs",
        },
        "rows": rows,
    }


def _row(device: str, impl: str, n: int, num_tokens: int, timing: dict) -> dict:
    row = {
        "device": device,
        "impl": impl,
        "n": n,
        "num_tokens": num_tokens,
        **timing,
        "tokens_per_s": num_tokens / (timing["median_ms"] / 1e3),
    }
    print(
        f"{device:5s} {impl:22s} N={n:5d} tokens={num_tokens:8d} median {timing['median_ms']:10.3f} ms "
        f"(p20 {timing['p20_ms']:.3f}, p80 {timing['p80_ms']:.3f}, {timing['runs']} runs) "
        f"{row['tokens_per_s'] / 1e6:8.2f} M tokens/s",
        flush=True,
    )
    return row


# ================================================================================== pytest-benchmark

CASES = [
    pytest.param(device, impl, id=f"{device}-{impl}", marks=marks)
    for device, marks in [
        ("cpu", ()),
        ("cuda", pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
    ]
    for impl in ("list", "jagged", "jagged_nocheck", "padded")
]


@pytest.fixture(scope="module")
def data_by_device():
    return {}


@pytest.mark.parametrize("device, impl", CASES)
def test_hashed_embed(benchmark, data_by_device, device, impl):
    if device not in data_by_device:
        data_by_device[device] = make_data(N, device)
    impls = implementations(*data_by_device[device], device)
    run = impls[impl]

    def call():
        result = run()
        if device == "cuda":
            torch.cuda.synchronize()
        return result

    benchmark.group = f"hashed_embed {device} N={N} d={DIM}"
    benchmark.extra_info.update(device=device_name(device), n=N, dim=DIM)
    result = benchmark.pedantic(call, rounds=5, iterations=1, warmup_rounds=1)
    assert torch.equal(result, impls["jagged"]())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=N)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--ref-n", type=int, default=REF_N, help="samples run through the Python reference")
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when available")
    parser.add_argument("--out-dir", default=None, help="default: benchmarks/results")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    payload = run_comparisons(args.n, devices, args.repeat, args.ref_n)
    main_device = "cuda" if "cuda" in devices else "cpu"
    path = write_results("embed", main_device, payload, out_dir=args.out_dir)
    print(f"wrote {path}")
    keys = ("device", "impl", "median_ms", "tokens_per_s", "speedup_vs_python_reference")
    print(json.dumps([{k: r.get(k) for k in keys} for r in payload["rows"]], indent=1))


if __name__ == "__main__":
    main()
