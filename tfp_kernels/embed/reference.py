"""Plain-Python reference of the hashed token-bag embedding: the test oracle and the specification.

Loops and a dict per sample, Python ints, no torch. The fast path
(:func:`tfp_kernels.embed.hashed_embed`, vectorised torch on the flat token buffer, CPU or CUDA) must give
bit-identical float32 rows.

The hash (all arithmetic on non-negative Python ints below 2^64, so the torch version computes it in
int64 without ever overflowing):

- ``mix32(x)``, for ``0 <= x < 2^32``: ``x = ((x >> 16) ^ x) * 0x45D9F3B mod 2^32``, twice, then
  ``x = (x >> 16) ^ x`` (a multiply-xorshift finaliser; the multiplier is below 2^27, so ``x * K`` stays
  below 2^59).
- seed key: ``s = mix32(fold(seed mod 2^64) ^ 0x9E3779B9)``.
- token key: ``u(id) = mix32(fold(id) ^ s)`` where ``fold(id) = (id ^ (id >> 32)) mod 2^32`` (ids below 2^32
  are kept as they are; larger int64 ids are folded to 32 bits).
- n-gram key, ids ``a_1 .. a_n`` (consecutive inside one sample): ``g_1 = u(a_1)``,
  ``g_k = mix32((g_{k-1} * 0x01000193 + u(a_k)) mod 2^32)``.
- bucket ``(g_n & 0x7FFFFFFF) mod dim``, sign ``+1`` when bit 31 of ``g_n`` is 0, else ``-1``.

A sample's vector is the sum of the signs of all its n-grams of orders ``min_ngram .. ngram`` (default
``1 .. ngram``) in their buckets
(signed counts; n-grams never cross sample boundaries), divided by its L2 norm when ``normalize`` (an
empty sample stays a zero row). The division is done in float64 and rounded once to float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

MASK32 = 0xFFFFFFFF
MIX_MULTIPLIER = 0x45D9F3B
NGRAM_MULTIPLIER = 0x01000193
SEED_SALT = 0x9E3779B9


def mix32(x: int) -> int:
    """The 32-bit multiply-xorshift finaliser, ``0 <= x < 2^32`` -> ``[0, 2^32)``."""
    x = (((x >> 16) ^ x) * MIX_MULTIPLIER) & MASK32
    x = (((x >> 16) ^ x) * MIX_MULTIPLIER) & MASK32
    return (x >> 16) ^ x


def fold(token_id: int) -> int:
    """A non-negative id (< 2^64) folded to 32 bits: itself when below 2^32."""
    return (token_id ^ (token_id >> 32)) & MASK32


def seed_key(seed: int) -> int:
    """The 32-bit key of an integer seed (any sign, taken mod 2^64)."""
    return mix32(fold(seed & 0xFFFFFFFFFFFFFFFF) ^ SEED_SALT)


def token_key(token_id: int, key: int) -> int:
    """``u(id)``: the 32-bit key of one token id under the seed key ``key``."""
    return mix32(fold(token_id) ^ key)


def ngram_hash(ids: Sequence[int], key: int) -> int:
    """``g_n`` of the n-gram ``ids`` (n = len(ids) >= 1)."""
    g = token_key(ids[0], key)
    for token_id in ids[1:]:
        g = mix32((g * NGRAM_MULTIPLIER + token_key(token_id, key)) & MASK32)
    return g


def bucket_and_sign(g: int, dim: int) -> tuple[int, int]:
    """The bucket in ``[0, dim)`` and the sign (+1 / -1) of a 32-bit n-gram hash."""
    return (g & 0x7FFFFFFF) % dim, (-1 if g >> 31 else 1)


def hashed_counts_reference(
    tokens: Sequence[int], *, dim: int = 256, ngram: int = 2, seed: int = 0, min_ngram: int = 1
) -> dict[int, int]:
    """The signed counts of one sample's n-grams of orders ``min_ngram .. ngram``, ``{bucket: count}``
    (zero counts may be present)."""
    key = seed_key(seed)
    counts: dict[int, int] = {}
    for n in range(min_ngram, ngram + 1):
        for start in range(len(tokens) - n + 1):
            bucket, sign = bucket_and_sign(ngram_hash(tokens[start : start + n], key), dim)
            counts[bucket] = counts.get(bucket, 0) + sign
    return counts


def hashed_embed_reference(
    samples: Sequence[Sequence[int]],
    *,
    dim: int = 256,
    ngram: int = 2,
    seed: int = 0,
    normalize: bool = True,
    min_ngram: int = 1,
) -> list[list[float]]:
    """The hashed embedding of ``samples`` (N lists of non-negative token ids), one sample at a time.

    Returns:
        N rows of ``dim`` Python floats (float64 values; round them to float32 to compare with the fast path).
    """
    rows = []
    for sample in samples:
        counts = hashed_counts_reference(list(sample), dim=dim, ngram=ngram, seed=seed, min_ngram=min_ngram)
        row = [0.0] * dim
        norm = math.sqrt(sum(c * c for c in counts.values())) if normalize else 1.0
        for bucket, count in counts.items():
            row[bucket] = count / norm if norm > 0 else 0.0
        rows.append(row)
    return rows
