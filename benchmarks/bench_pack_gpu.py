"""Benchmark of ``pack_gpu`` on a training-loop buffer, against a plain-torch composition of the same steps
and against transformers' ``DataCollatorWithFlattening`` (which does no ordering and no bin packing).

Data (issue 5): a buffer of N = 4096 samples (default), log-normal lengths (mean 512, sigma 1, clipped to
[1, 2048]), random token ids (vocabulary 128k), labels with a random -100 prompt; embeddings (N, 256) float32
of 32 Gaussian clusters. Tokens and embeddings live on the benchmarked device, the sample offsets on the CPU
(``Jagged`` input: what a data loader hands over).

Implementations (``impl``), all with ``max_len=2048``, ``strategy="next_fit"``, ``attention="pack"``, the
threshold estimated on the buffer (q = 0.02, window 4):

- ``pack_gpu``: ``pack_gpu(Jagged(values, offsets), embeddings=E, ...)`` end to end;
- ``pack_gpu_fixed_t``: the same with a fixed threshold (estimated once for the dataset, as a training loop
  would do): no per-buffer quantile;
- ``pack_gpu_hashed``: ``pack_gpu`` computing the embeddings itself with the default hashed embedder;
- ``pack_gpu_keep``: ``order="keep"``: packing + assembly only (the part after the ordering);
- ``plain_torch``: the same steps written in plain torch / Python: threshold with ``torch.quantile`` over the
  ``torch.pdist`` pair distances, the plain-torch reference walk (``tfp_order(backend="reference")``), the
  Python next-fit reference, the torch gather (``assemble`` with the pure-torch gather);
- ``hf_collator``: ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` on the samples in input
  order as lists of ints (its usual input; on CUDA its output is copied to the GPU).

``pack_gpu`` and ``plain_torch`` must give the same order and the same ``input_ids`` before anything is timed.
Run ``python benchmarks/bench_pack_gpu.py [--n 4096] [--device cpu|cuda] [--repeat 10]``: writes
``benchmarks/results/pack_gpu_<device-name>.json``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from tfp_kernels import Jagged, estimate_threshold, pack_gpu, tfp_order
from tfp_kernels.assembly import IGNORE_INDEX, assemble, assemble_pieces
from tfp_kernels.packing import Packing
from tfp_kernels.packing.reference import next_fit_pack_ids_reference
from tfp_kernels.testing import lognormal_lengths

try:  # run as `python benchmarks/bench_pack_gpu.py` or imported as benchmarks.bench_pack_gpu
    from benchmarks._harness import time_call, write_results
except ImportError:
    from _harness import time_call, write_results

N = 4096
D = 256
MAX_LEN = 2048
MEAN_LENGTH = 512.0
VOCAB = 128_000
CLUSTERS = 32
SEED = 0


def make_buffer(n: int, device: str):
    """values (T,) int64 and labels on ``device``, offsets (N + 1,) int64 CPU, embeddings (N, D) on ``device``."""
    lengths = lognormal_lengths(n, mean=MEAN_LENGTH, max_len=MAX_LEN, seed=SEED)
    g = torch.Generator().manual_seed(SEED)
    values = torch.randint(0, VOCAB, (int(lengths.sum()),), generator=g)
    offsets = torch.zeros(n + 1, dtype=torch.int64)
    offsets[1:] = lengths.cumsum(0)
    labels = values.clone()
    prompt = (torch.rand(n, generator=g) * lengths).long()
    start = offsets[:-1]
    mask = torch.arange(values.numel()) < torch.repeat_interleave(start + prompt, lengths)
    labels[mask] = IGNORE_INDEX
    centers = torch.randn(CLUSTERS, D, generator=g) * 2.0
    emb = centers[torch.randint(0, CLUSTERS, (n,), generator=g)] + torch.randn(n, D, generator=g)
    return values.to(device), labels.to(device), offsets, emb.to(device)


def plain_torch(values, labels, offsets, emb, *, max_len: int):
    """The same steps as pack_gpu in plain torch / Python (the baseline)."""
    n = emb.shape[0]
    dist = torch.pdist(emb.double())
    t = float(torch.quantile(dist, 0.02)) if dist.numel() <= 2**24 else estimate_threshold(emb)
    path = tfp_order(emb, threshold=t, window=4, backend="reference").cpu()
    lengths = torch.diff(offsets)
    ordered = lengths[path].tolist()
    pack_id = torch.tensor(next_fit_pack_ids_reference(ordered, max_len))
    piece_lengths = torch.tensor(ordered)
    pack_lengths = torch.zeros(int(pack_id[-1]) + 1, dtype=torch.int64).index_add_(0, pack_id, piece_lengths)
    pack_offsets = torch.cat([torch.zeros(1, dtype=torch.int64), pack_lengths.cumsum(0)])
    packing = Packing(
        pack_id=pack_id,
        sample_index=path,
        offset=torch.zeros(n, dtype=torch.int64),
        length=piece_lengths,
        pack_offsets=pack_offsets,
        max_len=max_len,
        num_packs=pack_lengths.numel(),
        sample_lengths=lengths,
    )
    # assemble() with the pure-torch gather (the op is bypassed by the module-level switch below)
    return path, _assemble_torch(values, labels, offsets, packing)


def _assemble_torch(values, labels, offsets, packing):
    """input_ids of the pack layout through the pure-torch gather of tfp_kernels.assembly."""
    m = packing.num_pieces
    src = offsets[:-1].index_select(0, packing.sample_index) + packing.offset
    dst = torch.cumsum(packing.length, 0) - packing.length
    first = dst - packing.pack_offsets.index_select(0, packing.pack_id)
    table = torch.stack([src, dst, packing.length, first]).to(values.device)
    num_tokens = int(packing.pack_offsets[-1])
    assert table.shape == (4, m)
    input_ids, _, _ = assemble_pieces(values, labels, table, num_tokens, backend="torch")
    return input_ids


def _hf_collator(values, labels, offsets, device):
    try:
        from transformers import DataCollatorWithFlattening
    except ImportError:
        return None
    collator = DataCollatorWithFlattening(return_flash_attn_kwargs=True)
    v, lab = values.cpu(), labels.cpu()
    bounds = offsets.tolist()
    features = [
        {"input_ids": v[a:b].tolist(), "labels": lab[a:b].tolist()} for a, b in zip(bounds[:-1], bounds[1:])
    ]

    def run():
        out = collator(features, return_tensors="pt")
        return {k: (x.to(device) if isinstance(x, torch.Tensor) else x) for k, x in out.items()}

    return run


def run_comparison(n: int, device: str, repeat: int) -> dict:
    values, labels, offsets, emb = make_buffer(n, device)
    jagged = Jagged(values, offsets)
    kwargs = dict(max_len=MAX_LEN, labels=labels, strategy="next_fit", attention="pack")
    t_fixed = estimate_threshold(emb)

    # agreement before timing
    batch = pack_gpu(jagged, embeddings=emb, **kwargs)
    path, input_ids = plain_torch(values, labels, offsets, emb, max_len=MAX_LEN)
    same_order = torch.equal(batch.order.cpu(), path)
    same_tokens = torch.equal(batch.input_ids[0].cpu(), input_ids.cpu())
    print(f"pack_gpu vs plain_torch: same order {same_order}, same input_ids {same_tokens}", flush=True)
    if not (same_order and same_tokens):
        raise AssertionError("pack_gpu and the plain-torch composition disagree: nothing is timed")

    impls = {
        "pack_gpu": lambda: pack_gpu(jagged, embeddings=emb, **kwargs),
        "pack_gpu_fixed_t": lambda: pack_gpu(jagged, embeddings=emb, threshold=t_fixed, **kwargs),
        "pack_gpu_keep": lambda: pack_gpu(jagged, order="keep", **kwargs),
        "plain_torch": lambda: plain_torch(values, labels, offsets, emb, max_len=MAX_LEN),
    }
    try:
        from tfp_kernels.embed import HashedEmbedder  # noqa: F401

        impls["pack_gpu_hashed"] = lambda: pack_gpu(jagged, **kwargs)
    except ImportError:
        print("tfp_kernels.embed not available: pack_gpu_hashed skipped", flush=True)
    collator = _hf_collator(values, labels, offsets, device)
    if collator is not None:
        impls["hf_collator"] = collator

    rows = []
    for impl, run in impls.items():
        slow = impl in ("plain_torch", "hf_collator")
        timing = time_call(run, device=device, warmup=1, repeat=3 if slow else repeat, max_seconds=60)
        row = {"device": device, "impl": impl, "n": n, "d": D, "max_len": MAX_LEN, **timing}
        rows.append(row)
        print(f"{device:5s} {impl:18s} median {timing['median_ms']:10.2f} ms ({timing['runs']} runs)", flush=True)
    # where pack_gpu's time goes (one run, phases from the order stats)
    start = time.perf_counter()
    batch = pack_gpu(jagged, embeddings=emb, **kwargs)
    total = time.perf_counter() - start
    stats = batch.order_stats
    phases = {
        "total_s": total,
        "threshold_s": stats.time_threshold_s,
        "order_s": stats.time_order_s,
        "band_s": stats.time_band_s,
        "walk_s": stats.time_walk_s,
        "fallback_s": stats.time_fallback_s,
        "num_fallbacks": stats.num_fallbacks,
        "pack_and_assemble_s": total - stats.time_threshold_s - stats.time_order_s,
    }
    by_impl = {r["impl"]: r["median_ms"] for r in rows}
    for row in rows:
        for peer in ("plain_torch", "hf_collator"):
            other = by_impl.get(peer)
            row[f"speedup_vs_{peer}"] = other / row["median_ms"] if other else None
    return {
        "config": {
            "buffer": f"N={n}, log-normal lengths mean {MEAN_LENGTH} sigma 1 clipped to [1, {MAX_LEN}], random "
            f"ids < {VOCAB}, labels with a random -100 prompt, embeddings ({n}, {D}) float32 of {CLUSTERS} "
            f"Gaussian clusters; seed {SEED}",
            "pack_gpu": f"max_len={MAX_LEN}, strategy next_fit, attention pack, q=0.02, window 4, k=64",
            "num_tokens": int(offsets[-1]),
            "num_packs": batch.num_packs,
            "fill_ratio": batch.fill_ratio,
            "same_order_as_plain_torch": same_order,
            "torch_threads": torch.get_num_threads(),
            "ratios": "speedup_vs_X = median of X / median of this row",
        },
        "phases_pack_gpu": phases,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=N)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out-dir", default=None, help="default: benchmarks/results")
    args = parser.parse_args(argv)
    payload = run_comparison(args.n, args.device, args.repeat)
    path = write_results("pack_gpu", args.device, payload, out_dir=args.out_dir)
    print(f"wrote {path}")
    print(json.dumps(payload["phases_pack_gpu"], indent=1))


if __name__ == "__main__":
    main()
