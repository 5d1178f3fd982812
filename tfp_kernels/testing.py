"""Helpers shared by the tests and benchmarks of tfp_kernels (shipped with the package).

- ``devices``: ``["cpu"]``, plus ``"cuda"`` when a CUDA device is available, so CPU CI and the GPU box run
  the same parametrised tests (``torch.cuda.is_available()`` does not create a CUDA context).
- ``int_dtypes`` / ``non_int_dtypes``: dtypes that length inputs accept / reject.
- ``lognormal_lengths``: long-tailed sample lengths like those of an SFT data set.
- ``assert_equal``: exact tensor equality whose failure message says where the tensors differ.
"""

from __future__ import annotations

import torch

devices: list[str] = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

int_dtypes: list[torch.dtype] = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]
"""Integer dtypes with full torch operator support (uint16/32/64 are accepted too, but barely usable)."""

non_int_dtypes: list[torch.dtype] = [torch.bool, torch.float16, torch.bfloat16, torch.float32, torch.float64]

float_dtypes: list[torch.dtype] = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def lognormal_lengths(
    n: int,
    *,
    mean: float = 512.0,
    sigma: float = 1.0,
    max_len: int = 2048,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Long-tailed sample lengths: log-normal with the given mean, rounded and clipped to ``[1, max_len]``.

    Args:
        n: number of samples N.
        mean: mean of the log-normal before clipping (the clipped mean is a little lower).
        sigma: standard deviation of the underlying normal (1.0: heavy tail, ~5% above 4x the mean).
        max_len: upper clip.
        seed: seed of a private CPU generator (the same lengths on every device).
        device: where the result goes.

    Returns:
        (N,), torch.int64, on ``device``.
    """
    generator = torch.Generator().manual_seed(seed)
    mu = (
        torch.log(torch.tensor(mean, dtype=torch.float64)) - sigma**2 / 2
    )  # E[exp(X)] = exp(mu + sigma^2 / 2)
    normal = torch.randn(n, generator=generator, dtype=torch.float64)
    lengths = torch.exp(mu + sigma * normal).round().clamp_(1, max_len).to(torch.int64)
    return lengths.to(device)


def assert_equal(actual: torch.Tensor, expected: torch.Tensor, name: str = "tensor") -> None:
    """Assert ``torch.equal(actual, expected)`` (same shape, dtype, values); on failure, say where they differ."""
    assert isinstance(actual, torch.Tensor), f"{name}: expected a tensor, got {type(actual).__name__}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != expected {expected.dtype}"
    assert actual.shape == expected.shape, (
        f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    )
    if torch.equal(actual, expected.to(actual.device)):
        return
    actual_cpu, expected_cpu = actual.cpu(), expected.cpu()
    mismatch = (actual_cpu != expected_cpu).reshape(-1).nonzero().reshape(-1)
    first = int(mismatch[0])
    window = slice(max(0, first - 3), first + 4)
    raise AssertionError(
        f"{name}: {mismatch.numel()} of {actual_cpu.numel()} elements differ; first at flat index {first}: "
        f"actual {actual_cpu.reshape(-1)[first].item()} != expected {expected_cpu.reshape(-1)[first].item()}; "
        f"actual[{window.start}:{window.stop}] = {actual_cpu.reshape(-1)[window].tolist()}, "
        f"expected = {expected_cpu.reshape(-1)[window].tolist()}"
    )


def check_packing_invariants(packing, lengths: list[int], max_len: int, overlong: str, *, strategy: str) -> None:
    """Assert every structural property a :class:`~tfp_kernels.packing.Packing` of ``lengths`` must have.

    Pack ids start at 0 and grow by 0 or 1; pack offsets run from 0 to the total tokens with every
    pack non-empty and within ``max_len``; every token of every sample appears exactly once across the
    pieces (only its first ``max_len`` tokens under ``"truncate"``, none for a dropped sample); the
    over-long counts match; and the order rules of ``strategy``: ``"stream"``/``"next_fit"`` keep the
    input order (next fit opens a pack only when the next piece does not fit; stream fills every pack
    but the last), best-fit strategies number packs by their first piece and keep the input order
    inside a pack. Plain Python on lists, for small inputs (tests and property tests).
    """
    import itertools

    pack_id = packing.pack_id.tolist()
    sample_index = packing.sample_index.tolist()
    offset = packing.offset.tolist()
    piece_length = packing.length.tolist()
    pack_offsets = packing.pack_offsets.tolist()
    num_packs = packing.num_packs
    if pack_id:
        assert pack_id[0] == 0 and pack_id[-1] == num_packs - 1
        assert all(b - a in (0, 1) for a, b in itertools.pairwise(pack_id))
    total = sum(piece_length)
    assert pack_offsets[0] == 0 and pack_offsets[-1] == total and len(pack_offsets) == num_packs + 1
    assert all(0 < b - a <= max_len for a, b in itertools.pairwise(pack_offsets))
    per_pack = [0] * num_packs
    for p, length in zip(pack_id, piece_length):
        per_pack[p] += length
    assert per_pack == [b - a for a, b in itertools.pairwise(pack_offsets)]
    assert all(1 <= length <= max_len for length in piece_length)
    assert all(0 <= o and o + n <= lengths[s] for s, o, n in zip(sample_index, offset, piece_length))
    # every token of every sample exactly once across the pieces (or max_len of them, or none)
    covered = [[] for _ in lengths]
    for s, o, n in zip(sample_index, offset, piece_length):
        covered[s].append((o, n))
    for s, length in enumerate(lengths):
        if overlong == "drop" and length > max_len:
            assert covered[s] == []
            continue
        kept = min(length, max_len) if overlong == "truncate" else length
        tokens = [t for o, n in sorted(covered[s]) for t in range(o, o + n)]
        assert tokens == list(range(kept)), f"sample {s}: tokens {tokens} != 0..{kept - 1}"
    overlong_samples = [i for i, length in enumerate(lengths) if length > max_len]
    counts = {
        "error": (0, 0, 0),
        "truncate": (len(overlong_samples), 0, 0),
        "drop": (0, len(overlong_samples), 0),
        "split": (0, 0, len(overlong_samples)),
    }[overlong]
    assert (packing.num_truncated, packing.num_dropped, packing.num_split) == counts
    assert packing.dropped_index.tolist() == (overlong_samples if overlong == "drop" else [])
    keys = list(zip(sample_index, offset))  # input order of the pieces
    if strategy in ("stream", "next_fit"):
        assert keys == sorted(keys)  # order kept
    else:
        first_key = {}
        for p, key in zip(pack_id, keys):
            first_key.setdefault(p, key)
        assert list(first_key.values()) == sorted(first_key.values())  # packs numbered by first piece
        for p in range(num_packs):
            inside = [key for q, key in zip(pack_id, keys) if q == p]
            assert inside == sorted(inside)  # input order inside a pack
    if strategy == "next_fit":  # a pack opens only when its first piece did not fit into the previous one
        first_piece = {}
        for i, p in enumerate(pack_id):
            first_piece.setdefault(p, i)
        assert all(per_pack[p - 1] + piece_length[first_piece[p]] > max_len for p in range(1, num_packs))
    if strategy == "stream":
        assert all(b - a == max_len for a, b in itertools.pairwise(pack_offsets[:-1]))


LENGTH_KINDS = ["uniform", "lognormal", "all-max-len", "all-ones", "mostly-small", "small", "bimodal"]


def make_lengths(kind: str, n: int, max_len: int, seed: int) -> torch.Tensor:
    """(n,) int64 sample lengths in [1, max_len] of one of :data:`LENGTH_KINDS`, seeded.

    ``"mostly-small"``: many items per pack with 1% of max_len items (long chains inside a pack);
    ``"small"``: the same without the max_len items; ``"bimodal"``: many exact-fit pairs (tie rules).
    """
    generator = torch.Generator().manual_seed(seed)
    i64 = torch.int64
    if kind == "uniform":
        return torch.randint(1, max_len + 1, (n,), generator=generator, dtype=i64)
    if kind == "lognormal":
        return lognormal_lengths(n, mean=max_len / 4, max_len=max_len, seed=seed)
    if kind == "all-max-len":
        return torch.full((n,), max_len, dtype=i64)
    if kind == "all-ones":
        return torch.ones(n, dtype=i64)
    if kind in ("mostly-small", "small"):
        small = torch.randint(1, max(2, max_len // 50) + 1, (n,), generator=generator, dtype=i64).clamp_(max=max_len)
        if kind == "small":
            return small
        return torch.where(torch.rand(n, generator=generator) < 0.01, torch.full_like(small, max_len), small)
    if kind == "bimodal":
        big = torch.randint(max_len // 2, max_len + 1, (n,), generator=generator, dtype=i64)
        return torch.where(torch.rand(n, generator=generator) < 0.5, big, (max_len - big).clamp_(min=1))
    raise ValueError(f"unknown length kind {kind!r}; known: {LENGTH_KINDS}")
