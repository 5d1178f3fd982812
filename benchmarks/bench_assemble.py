"""Benchmark of packed-batch assembly: assemble() (C++ op / CUDA kernel) vs its torch fallback, the Python
reference and transformers' DataCollatorWithFlattening, on the same samples and packing.

Data: N = 4096 samples (default), log-normal lengths (mean 512, sigma 1, clipped to [1, 2048]), random token
ids (vocabulary 128k) and labels with a random -100 prompt; packed with ``pack_lengths(..., strategy="bfd",
max_len=2048)`` before timing (the packing time is reported apart). The tokens live on the benchmarked
device; the packing on the CPU (the training-loop case: no host sync).

Implementations (``impl``):

- ``assemble_list``: ``assemble(list_of_tensors, packing, attention=..., labels=...)`` end to end;
- ``assemble_jagged``: the same from ``Jagged(values, offsets)`` with CPU offsets (no concatenation);
- ``gather_op`` / ``gather_torch``: the gather step alone (``assemble_pieces`` with the compiled op / pure
  torch) on the same piece table;
- ``python_reference``: :func:`tfp_kernels.assembly.reference.assemble_reference` on Python lists (CPU);
- ``hf_collator``: ``transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` on the samples
  in pack order as lists of ints (its usual input), attention ``"sample"`` only (its only mode). On CUDA the
  collator still runs on the CPU; the copy of its output to the GPU is included.

Every implementation's ``input_ids``/``labels``/``position_ids`` must equal ``assemble_list``'s before it is
timed. Run ``python benchmarks/bench_assemble.py [--n 4096] [--devices cpu cuda] [--repeat 20]``: writes
``benchmarks/results/assemble_<device-name>.json``; or ``pytest benchmarks/bench_assemble.py``.
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from tfp_kernels import has_cuda_ops, has_extension
from tfp_kernels.assembly import IGNORE_INDEX, Jagged, assemble, assemble_pieces
from tfp_kernels.assembly.reference import assemble_reference
from tfp_kernels.packing import pack_lengths
from tfp_kernels.testing import lognormal_lengths

try:  # run as `python benchmarks/bench_assemble.py` or collected by pytest as benchmarks.bench_assemble
    from benchmarks._harness import device_name, time_call, write_results
except ImportError:
    from _harness import device_name, time_call, write_results

N = 4096
MAX_LEN = 2048
MEAN_LENGTH = 512.0
VOCAB = 128_000
SEED = 0


def make_data(n: int, device: str):
    """Samples, labels (lists of 1-D int64 tensors on ``device``) and the bfd packing (CPU) of their lengths."""
    lengths = lognormal_lengths(n, mean=MEAN_LENGTH, max_len=MAX_LEN, seed=SEED)
    generator = torch.Generator().manual_seed(SEED)
    samples, labels = [], []
    for length in lengths.tolist():
        tokens = torch.randint(0, VOCAB, (length,), generator=generator, dtype=torch.int64)
        label = tokens.clone()
        label[: int(torch.randint(0, length + 1, (1,), generator=generator))] = IGNORE_INDEX
        samples.append(tokens.to(device))
        labels.append(label.to(device))
    packing = pack_lengths(lengths, MAX_LEN, strategy="bfd")
    return samples, labels, packing


def implementations(samples, labels, packing, attention: str, device: str) -> dict:
    """name -> (run() -> (input_ids, labels, position_ids) on any device)."""
    impls = {}
    impls["assemble_list"] = lambda: _triple(assemble(samples, packing, attention=attention, labels=labels))
    lengths = torch.tensor([s.numel() for s in samples])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)])
    values, label_values = torch.cat(samples), torch.cat(labels)
    impls["assemble_jagged"] = lambda: _triple(
        assemble(Jagged(values, offsets), packing, attention=attention, labels=label_values)
    )
    # the gather step alone, on the table assemble() builds
    batch = assemble(Jagged(values, offsets), packing, attention=attention, labels=label_values)
    m = packing.num_pieces
    src = offsets[:-1].index_select(0, packing.sample_index) + packing.offset
    dst = torch.cumsum(packing.length, 0) - packing.length
    first = (
        dst - packing.pack_offsets.index_select(0, packing.pack_id)
        if attention == "pack"
        else torch.zeros(m, dtype=torch.int64)
    )
    table = torch.stack([src, dst, packing.length, first]).to(device)
    num_tokens = batch.num_tokens
    if has_extension() and (device == "cpu" or has_cuda_ops()):
        impls["gather_op"] = lambda: assemble_pieces(values, label_values, table, num_tokens, backend="op")
    impls["gather_torch"] = lambda: assemble_pieces(values, label_values, table, num_tokens, backend="torch")
    if device == "cpu":
        token_lists = [s.tolist() for s in samples]
        label_lists = [label.tolist() for label in labels]
        plain = {
            f: getattr(packing, f).tolist()
            for f in ("pack_id", "sample_index", "offset", "length", "pack_offsets")
        }
        impls["python_reference"] = lambda: _reference_triple(
            assemble_reference(token_lists, plain, attention=attention, labels=label_lists)
        )
    collator = _hf_collator()
    if collator is not None and attention == "sample" and _samples_are_whole(packing):
        features = [
            {"input_ids": samples[i].tolist(), "labels": labels[i].tolist()}
            for i in packing.sample_index.tolist()
        ]

        def run_collator():
            out = collator(features, return_tensors="pt")
            return tuple(
                out[k].to(device, non_blocking=True) for k in ("input_ids", "labels", "position_ids")
            )

        impls["hf_collator"] = run_collator
    return impls


def _triple(batch):
    return batch.input_ids, batch.labels, batch.position_ids


def _reference_triple(out: dict):
    return tuple(torch.tensor([out[k]]) for k in ("input_ids", "labels", "position_ids"))


def _samples_are_whole(packing) -> bool:
    return bool((packing.offset == 0).all()) and packing.num_pieces == packing.sample_index.unique().numel()


def _hf_collator():
    try:
        from transformers import DataCollatorWithFlattening
    except ImportError:
        return None
    return DataCollatorWithFlattening(return_flash_attn_kwargs=True)


def _check_same(result, expected, name: str) -> None:
    for part, a, b in zip(("input_ids", "labels", "position_ids"), result, expected):
        a, b = a.reshape(-1).cpu(), b.reshape(-1).cpu()
        assert torch.equal(a, b), f"{name}: {part} differs from assemble_list"


def run_comparisons(n: int, devices: list[str], repeat: int) -> dict:
    rows = []
    for device in devices:
        samples, labels, packing = make_data(n, device)
        sample_lengths = torch.tensor([s.numel() for s in samples])
        pack_timing = time_call(
            lambda lengths=sample_lengths: pack_lengths(lengths, MAX_LEN, strategy="bfd"), repeat=repeat
        )
        for attention in ("pack", "sample"):
            impls = implementations(samples, labels, packing, attention, device)
            expected = impls["assemble_list"]()
            for impl, run in impls.items():
                _check_same(run(), expected, impl)
                slow = impl in ("python_reference", "hf_collator")
                timing = time_call(run, device=device, warmup=1 if slow else 3, repeat=3 if slow else repeat)
                row = {
                    "device": device,
                    "impl": impl,
                    "attention": attention,
                    "n": n,
                    "max_len": MAX_LEN,
                    "num_tokens": packing.num_tokens,
                    "num_packs": packing.num_packs,
                    "num_pieces": packing.num_pieces,
                    **timing,
                    "tokens_per_s": packing.num_tokens / (timing["median_ms"] / 1e3),
                }
                rows.append(row)
                print(
                    f"{device:5s} {attention:6s} {impl:18s} median {timing['median_ms']:10.3f} ms "
                    f"(p20 {timing['p20_ms']:.3f}, p80 {timing['p80_ms']:.3f}, {timing['runs']} runs)",
                    flush=True,
                )
        rows.append({"device": device, "impl": "pack_lengths_bfd", "n": n, "max_len": MAX_LEN, **pack_timing})
    by_key = {(r["device"], r.get("attention"), r["impl"]): r["median_ms"] for r in rows}
    for row in rows:
        for peer in ("python_reference", "hf_collator", "gather_torch"):
            other = by_key.get((row["device"], row.get("attention"), peer))
            row[f"speedup_vs_{peer}"] = other / row["median_ms"] if other else None
    return {
        "config": {
            "samples": f"N={n}, log-normal lengths mean {MEAN_LENGTH} sigma 1 clipped to [1, {MAX_LEN}], "
            f"random ids < {VOCAB}, labels with a random -100 prompt; seed {SEED}",
            "packing": f"pack_lengths(lengths, {MAX_LEN}, strategy='bfd') on the CPU, outside the timings",
            "torch_threads": torch.get_num_threads(),
            "timer": "time.perf_counter around each call, torch.cuda.synchronize after CUDA calls; quantiles "
            "0.5/0.2/0.8 over the runs",
            "ratios": "speedup_vs_X = median of X / median of this row (same device and attention mode)",
        },
        "rows": rows,
    }


# ================================================================================== pytest-benchmark

CASES = [
    pytest.param(device, attention, impl, id=f"{device}-{attention}-{impl}", marks=marks)
    for device, marks in [
        ("cpu", ()),
        ("cuda", pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
    ]
    for attention in ("pack", "sample")
    for impl in ("assemble_list", "assemble_jagged", "gather_op", "gather_torch", "hf_collator")
]


@pytest.fixture(scope="module")
def data_by_device():
    return {}


@pytest.mark.parametrize("device, attention, impl", CASES)
def test_assemble(benchmark, data_by_device, device, attention, impl):
    if device not in data_by_device:
        data_by_device[device] = make_data(N, device)
    samples, labels, packing = data_by_device[device]
    impls = implementations(samples, labels, packing, attention, device)
    if impl not in impls:
        pytest.skip(f"{impl} is not available here for attention={attention!r}")
    run = impls[impl]

    def call():
        result = run()
        if device == "cuda":
            torch.cuda.synchronize()
        return result

    benchmark.group = f"assemble {device} {attention} N={N}"
    benchmark.extra_info.update(device=device_name(device), n=N, num_tokens=packing.num_tokens)
    result = benchmark.pedantic(call, rounds=5, iterations=1, warmup_rounds=1)
    _check_same(result, impls["assemble_list"](), impl)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=N)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when available")
    parser.add_argument("--out-dir", default=None, help="default: benchmarks/results")
    args = parser.parse_args(argv)
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    payload = run_comparisons(args.n, devices, args.repeat)
    main_device = "cuda" if "cuda" in devices else "cpu"
    path = write_results("assemble", main_device, payload, out_dir=args.out_dir)
    print(f"wrote {path}")
    keys = ("device", "attention", "impl", "median_ms", "speedup_vs_hf_collator")
    print(json.dumps([{k: r.get(k) for k in keys} for r in payload["rows"]], indent=1))


if __name__ == "__main__":
    main()
