"""The default embedder: a hashed bag of token ids and n-grams, no model, no download.

Every n-gram (orders ``min_ngram .. ngram``, default 1 .. 2, inside one sample) hashes to a bucket in
``[0, dim)`` and a sign; a sample's vector is its signed bucket counts, optionally L2-normalised. The
hash is a fixed 32-bit multiply-xorshift computed in int64 without overflow (specified in
:mod:`tfp_kernels.embed.reference`), so CPU and CUDA give the same buckets; the counts are integers and
the normalisation is one float64 division rounded to float32, so CPU and CUDA give bit-identical rows,
and the same input always the same output.

The fast path works on the flat token buffer of all samples at once (per-token sample ids, one
``index_add_`` of integer counts): no Python loop over samples, the same code on CPU and CUDA.

Texts (:meth:`HashedEmbedder.embed_texts`) go through the same path with their UTF-8 bytes as ids, but
count byte n-grams of orders 2..3 by default (``text_ngram``): single bytes mostly measure letter
frequencies, which all texts of a language share. Measured on 20 short instructions in 5 topics (the
fraction of (same-topic pair, cross-topic pair) comparisons where the same-topic pair has the higher
cosine, d = 256): byte orders 1..2: 0.90, 2..2: 0.97, 2..3: 0.97, 3..5: 0.95; WordPiece token ids, orders
1..1: 0.95, 1..2: 0.92.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import numpy as np
import torch

from . import reference as _ref
from ._inputs import FlatTokens, check_texts, read_tokens, texts_to_bytes, validate
from .unique import unique_texts

_MASK31 = 0x7FFFFFFF
_TABLE_MIN_TOKENS = 1 << 16
_TABLE_RATIO = 4  # a table of token keys when there are at least 4 tokens per possible id


def _as_ngram_range(min_ngram, ngram, names: str = "min_ngram, ngram") -> tuple[int, int]:
    low_name, high_name = names.split(", ")
    low, high = _as_int(min_ngram, low_name, 1), _as_int(ngram, high_name, 1)
    if low > high:
        raise ValueError(f"{low_name}={low} is more than {high_name}={high}: no n-gram order to count")
    return low, high


def _as_int(value, name: str, minimum: int | None = None) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError as err:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from err
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    """:func:`tfp_kernels.embed.reference.mix32` in place on an int64 tensor of values in ``[0, 2^32)``."""
    for _ in range(2):
        x.bitwise_xor_(x >> 16).mul_(_ref.MIX_MULTIPLIER).bitwise_and_(_ref.MASK32)
    return x.bitwise_xor_(x >> 16)


def _token_keys(values: torch.Tensor, key: int) -> torch.Tensor:
    """``u(id)`` of every id of ``values`` (T,) integer -> (T,) int64 in ``[0, 2^32)``, same device.

    On the CPU, when the ids are few compared with the tokens (a vocabulary), ``u`` is computed once per id
    ``0 .. max`` and gathered (the same values, a third of the time); elsewhere it is computed per token.
    """
    if values.device.type == "cpu" and values.numel() >= _TABLE_MIN_TOKENS:
        low, high = torch.aminmax(values)
        if int(low) >= 0 and (int(high) + 1) * _TABLE_RATIO <= values.numel():
            table = _token_keys_direct(torch.arange(int(high) + 1, dtype=torch.int64), key)
            return table.index_select(0, values.to(torch.int64) if values.dtype != torch.int64 else values)
    return _token_keys_direct(values, key)


def _token_keys_direct(values: torch.Tensor, key: int) -> torch.Tensor:
    x = values.to(torch.int64)
    x = (x >> 32).bitwise_xor_(x).bitwise_and_(_ref.MASK32)  # fold; a new tensor, values is untouched
    return _mix32_(x.bitwise_xor_(key))


def hashed_counts(flat: FlatTokens, *, dim: int, ngram: int, seed: int, min_ngram: int = 1) -> torch.Tensor:
    """The signed bucket counts of the n-grams of orders ``min_ngram .. ngram`` of the samples of ``flat``.

    Returns:
        (N, dim), torch.int64, on ``flat.device``: exact integers, independent of the order of additions.
    """
    n, total, device = flat.num_samples, flat.values.numel(), flat.device
    size_out = n * dim
    counts = torch.zeros(size_out + 1, dtype=torch.int64, device=device)  # + a slot for non-n-grams
    if total < min_ngram:
        return counts[:size_out].view(n, dim)
    keys = _token_keys(flat.values, _ref.seed_key(seed))
    base = flat.segment * dim
    pow2 = dim & (dim - 1) == 0
    g = keys
    for order in range(1, min(ngram, total) + 1):
        size = total - order + 1
        if order > 1:  # g_k = mix32(g_{k-1} * P + u(a_k)) over the starts that still have an n-gram
            g = _mix32_(g[:size].mul(_ref.NGRAM_MULTIPLIER).add_(keys[order - 1 :]).bitwise_and_(_ref.MASK32))
        if order < min_ngram:
            continue
        bucket = g.bitwise_and(dim - 1) if pow2 else g.bitwise_and(_MASK31).remainder_(dim)
        sign = torch.where(g >= 1 << 31, -1, 1)  # from bit 31
        # starts without a whole n-gram of this order inside their sample count in the spare slot
        index = torch.where(flat.room[:size] >= order, bucket.add_(base[:size]), size_out)
        counts.index_add_(0, index, sign)
    return counts[:size_out].view(n, dim)


def _normalise(counts: torch.Tensor, normalize: bool) -> torch.Tensor:
    """(N, dim) int64 counts -> (N, dim) float32 rows, L2-normalised (in float64, rounded once) or not."""
    if not normalize:
        return counts.to(torch.float32)
    norm = counts.square().sum(1, keepdim=True).to(torch.float64).sqrt_().clamp_min_(1.0)
    return counts.to(torch.float64).div_(norm).to(torch.float32)


def hashed_embed(
    tokens,
    *,
    dim: int = 256,
    ngram: int = 2,
    seed: int = 0,
    normalize: bool = True,
    min_ngram: int = 1,
    check: bool = True,
) -> torch.Tensor:
    """Hashed bag-of-n-grams embedding of N tokenised samples (no model; deterministic on CPU and CUDA).

    Each sample's n-grams of orders ``min_ngram .. ngram`` (consecutive token ids inside the sample; never
    across two samples) hash to a bucket in ``[0, dim)`` and a sign +-1; the sample's row is the sum of
    those signs per bucket, divided by its L2 norm when ``normalize`` (a sample without n-grams is a zero
    row). The hash is fixed and documented in :mod:`tfp_kernels.embed.reference`. Samples that share
    tokens and phrases get close rows; with ``normalize``, cosine and L2 orderings agree.

    Args:
        tokens: N samples of non-negative token ids (any integer dtype, all on one device), as one of: a
            list of N 1-D tensors; ``Jagged(values, offsets)`` (sample i is ``values[offsets[i]:offsets[i +
            1]]``, offsets (N + 1,) on the CPU or the values' device); ``Padded(tokens, lengths)`` (sample i
            is ``tokens[i, :lengths[i]]``, tokens (B, L), lengths (B,) on the CPU or the tokens' device;
            the padding may hold any value); a plain 2-tuple of tensors (``Jagged`` when the first is 1-D,
            ``Padded`` when 2-D). Ids at or above 2^32 are folded to 32 bits first.
        dim: D, number of buckets (>= 1).
        ngram: longest n-gram counted (>= 1; 1 is a plain bag of tokens).
        seed: any int; a different seed gives a different (equally good) hash.
        normalize: divide each row by its L2 norm.
        min_ngram: shortest n-gram counted (1 <= min_ngram <= ngram).
        check: look for negative ids among the samples' tokens, and check offsets/lengths that live on the
            GPU (one host read on CUDA; pass False in a training loop to avoid the sync: negative ids then
            hash like any other value, and bad device offsets give meaningless rows, never a crash).

    Returns:
        (N, dim), torch.float32, on the tokens' device. Bit-identical for the same input and arguments, on
        the CPU and on CUDA.

    Raises:
        TypeError: tokens of an unknown kind or not integer tensors; ``dim``/``ngram``/``seed`` not ints.
        ValueError: no samples (N = 0); negative ids (with ``check``); samples on different devices;
            offsets/lengths inconsistent with the tokens; ``dim`` or ``ngram`` < 1, ``min_ngram > ngram``.

    Examples::

        >>> import torch
        >>> from tfp_kernels.embed import hashed_embed
        >>> samples = [torch.tensor([5, 6, 7]), torch.tensor([5, 6, 7]), torch.tensor([], dtype=torch.long)]
        >>> e = hashed_embed(samples, dim=16)
        >>> e.shape, e.dtype
        (torch.Size([3, 16]), torch.float32)
        >>> torch.equal(e[0], e[1]), e[2].abs().sum().item(), round(e[0].norm().item(), 6)
        (True, 0.0, 1.0)
        >>> raw = hashed_embed(samples, dim=16, normalize=False)  # signed counts
        >>> raw[0].abs().sum().item() <= 5  # 3 unigrams + 2 bigrams (collisions may cancel)
        True
    """
    dim = _as_int(dim, "dim", 1)
    min_ngram, ngram = _as_ngram_range(min_ngram, ngram)
    seed = _as_int(seed, "seed")
    flat = read_tokens(tokens, "hashed_embed")
    if check:
        validate(flat)
    counts = hashed_counts(flat, dim=dim, ngram=ngram, seed=seed, min_ngram=min_ngram)
    return _normalise(counts, bool(normalize))


class HashedEmbedder:
    """The default embedder of :func:`tfp_kernels.pack_gpu` and the CLI: :func:`hashed_embed` with fixed
    settings, for token ids (``embed_tokens``) or texts (``embed_texts``, UTF-8 bytes as ids).

    Args:
        dim: D, number of buckets.
        ngram: longest n-gram of token ids counted by :meth:`embed_tokens` (orders ``min_ngram .. ngram``).
        seed: hash seed.
        normalize: L2-normalise the rows.
        min_ngram: shortest n-gram of token ids counted.
        text_ngram: ``(shortest, longest)`` byte n-grams counted by :meth:`embed_texts` (default (2, 3):
            single bytes mostly measure letter frequencies, see the module notes).
        check: look for negative ids (one host read on CUDA), see :func:`hashed_embed`.

    Examples::

        >>> import torch
        >>> from tfp_kernels.embed import HashedEmbedder
        >>> embedder = HashedEmbedder(dim=64)
        >>> embedder([torch.tensor([1, 2, 3]), torch.tensor([4, 5])]).shape
        torch.Size([2, 64])
        >>> e = embedder(["the cat sat on the mat", "the cat sat on a mat", "stock prices fell sharply"])
        >>> bool(e[0] @ e[1] > e[0] @ e[2])
        True
    """

    def __init__(
        self,
        dim: int = 256,
        ngram: int = 2,
        seed: int = 0,
        normalize: bool = True,
        *,
        min_ngram: int = 1,
        text_ngram: tuple[int, int] = (2, 3),
        check: bool = True,
    ):
        self.dim = _as_int(dim, "dim", 1)
        self.min_ngram, self.ngram = _as_ngram_range(min_ngram, ngram)
        self.seed = _as_int(seed, "seed")
        self.normalize = bool(normalize)
        try:
            low, high = text_ngram
        except (TypeError, ValueError) as err:
            raise TypeError(f"text_ngram must be a pair (shortest, longest), got {text_ngram!r}") from err
        self.text_ngram = _as_ngram_range(low, high, "text_ngram[0], text_ngram[1]")
        self.check = bool(check)

    def embed_tokens(self, tokens) -> torch.Tensor:
        """:func:`hashed_embed` of ``tokens`` (any container it takes) -> (N, dim) float32 on their device."""
        return hashed_embed(
            tokens,
            dim=self.dim,
            ngram=self.ngram,
            seed=self.seed,
            normalize=self.normalize,
            min_ngram=self.min_ngram,
            check=self.check,
        )

    def embed_texts(self, texts: Sequence[str], *, device: str | torch.device = "cpu") -> torch.Tensor:
        """Embed N texts through their UTF-8 bytes (ids 0..255, byte n-grams of orders ``text_ngram``).

        Each distinct text is hashed once and its row copied to every copy of it (:func:`unique_texts`).

        Args:
            texts: N str (N >= 1); an empty text gives a zero row.
            device: where the bytes go and the result lives.

        Returns:
            (N, dim), torch.float32, on ``device``.

        Examples::

            >>> from tfp_kernels.embed import HashedEmbedder
            >>> HashedEmbedder(dim=8).embed_texts(["héllo", ""]).shape
            torch.Size([2, 8])
        """
        distinct = unique_texts(check_texts(texts, "HashedEmbedder.embed_texts"))
        flat = read_tokens(texts_to_bytes(distinct.texts, device), "HashedEmbedder.embed_texts")
        low, high = self.text_ngram
        counts = hashed_counts(flat, dim=self.dim, ngram=high, seed=self.seed, min_ngram=low)
        return distinct.gather(_normalise(counts, self.normalize))

    def __call__(self, x) -> torch.Tensor:
        """Texts (a list/tuple with a str in it) -> :meth:`embed_texts`; else :meth:`embed_tokens`."""
        if isinstance(x, str) or (isinstance(x, (list, tuple)) and any(isinstance(t, str) for t in x)):
            return self.embed_texts(x)
        return self.embed_tokens(x)

    def __repr__(self) -> str:
        extra = "" if self.min_ngram == 1 else f", min_ngram={self.min_ngram}"
        extra += "" if self.text_ngram == (2, 3) else f", text_ngram={self.text_ngram}"
        return (
            f"HashedEmbedder(dim={self.dim}, ngram={self.ngram}, seed={self.seed}, "
            f"normalize={self.normalize}{extra})"
        )
