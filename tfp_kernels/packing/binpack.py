"""Bin packing of sample lengths into packs of at most ``max_len`` tokens: :func:`pack_lengths`.

Shape letters: ``N`` samples, ``M`` pieces, ``P`` packs, ``T`` tokens (see :mod:`tfp_kernels.packing.types`).

The work is done in three steps, each vectorised over all samples (no Python loop per sample):

1. validate ``lengths`` and ``max_len`` (one host sync for a few statistics of ``lengths``);
2. turn samples into pieces of at most ``max_len`` tokens with the over-long policy (:func:`expand_overlong`);
3. assign the pieces to packs with the chosen strategy (``STRATEGIES``), then derive the pack offsets
   (one host sync to read the number of packs).

A strategy is a function ``(pieces: Pieces, max_len: int, *, window: int, pieces_are_samples: bool) ->
(pieces in pack order, pack_id)``; new ones are added to ``STRATEGIES``. ``pieces_are_samples`` says that
piece ``i`` is sample ``i`` from offset 0 (no drop, no split), which lets a strategy skip two gathers.
``"fill_in_order"`` also takes the keywords ``embeddings``, ``min_distance``, ``metric`` and ``keep_apart``
(``"next_fit"`` with ``keep_apart`` is ``"fill_in_order"`` with ``window=1``).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch

from .best_fit import best_fit_decreasing
from .fill_in_order import METRICS, fill_in_order_pack
from .next_fit import next_fit_pack_ids
from .stream import stream_pack
from .types import Packing

OVERLONG_POLICIES = ("error", "truncate", "drop", "split")
DEFAULT_WINDOW = 1024

_INTEGER_DTYPES = frozenset(
    {torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32, torch.uint64}
)
_INT64_MAX = 2**63 - 1


class Pieces(NamedTuple):
    """Pieces of samples, one entry per piece; all (M,), torch.int64, on one device."""

    sample_index: torch.Tensor
    offset: torch.Tensor
    length: torch.Tensor


class OverlongResult(NamedTuple):
    """What :func:`expand_overlong` returns: the pieces plus what the over-long policy did."""

    pieces: Pieces
    num_truncated: int
    num_dropped: int
    num_split: int
    dropped_index: torch.Tensor  # (num_dropped,), torch.int64, increasing


# ---------------------------------------------------------------------------------------- strategies


class Assignment(NamedTuple):
    """What a strategy returns: the pieces in pack order, their packs, and (when known) the pack offsets."""

    pieces: Pieces
    pack_id: torch.Tensor  # (M,) torch.int64, non-decreasing from 0, every pack non-empty
    pack_offsets: torch.Tensor | None = None  # (P + 1,) torch.int64; derived from the pieces when None


def _next_fit(pieces: Pieces, max_len: int, *, window: int, pieces_are_samples: bool) -> Assignment:
    """Ordered next fit: pieces keep their order; a new pack when the next piece does not fit."""
    return Assignment(pieces, next_fit_pack_ids(pieces.length, max_len))


def _stream(pieces: Pieces, max_len: int, *, window: int, pieces_are_samples: bool) -> Assignment:
    """The paper's packer: the token stream of the pieces (all at offset 0), cut every ``max_len`` tokens."""
    cut = stream_pack(pieces.length, max_len)
    sample_index = cut.item if pieces_are_samples else pieces.sample_index.index_select(0, cut.item)
    num_packs = int(cut.pack_id[-1]) + 1 if cut.pack_id.numel() > 0 else 0
    # pack p starts at p * max_len (< total tokens, no overflow); the last one ends at the total
    starts = torch.arange(num_packs, dtype=torch.int64, device=cut.length.device) * max_len
    pack_offsets = torch.cat([starts, pieces.length.sum().reshape(1)])
    return Assignment(Pieces(sample_index, cut.offset, cut.length), cut.pack_id, pack_offsets)


def _bfd(pieces: Pieces, max_len: int, *, window: int, pieces_are_samples: bool) -> Assignment:
    """Global best fit decreasing (C++ op; on a host copy for CUDA pieces)."""
    return _best_fit(pieces, best_fit_decreasing(pieces.length, max_len), pieces_are_samples)


def _window_best_fit(pieces: Pieces, max_len: int, *, window: int, pieces_are_samples: bool) -> Assignment:
    """Best fit decreasing inside consecutive windows of ``window`` pieces; windows keep their order."""
    return _best_fit(pieces, best_fit_decreasing(pieces.length, max_len, window=window), pieces_are_samples)


def _best_fit(pieces: Pieces, result, pieces_are_samples: bool) -> Assignment:
    """``pieces[order]``; when piece i is sample i at offset 0, the sample indices are ``order`` itself."""
    order = result.order
    if pieces_are_samples:
        listed = Pieces(order, torch.zeros_like(order), result.length)
    else:
        listed = Pieces(
            pieces.sample_index.index_select(0, order), pieces.offset.index_select(0, order), result.length
        )
    return Assignment(listed, result.pack_id, result.pack_offsets)


def _fill_in_order(
    pieces: Pieces,
    max_len: int,
    *,
    window: int,
    pieces_are_samples: bool,
    embeddings: torch.Tensor | None = None,
    min_distance: float = 0.0,
    metric: str = "l2",
    keep_apart: int = 0,
) -> Assignment:
    """Next fit in order, each pack topped up from the next ``window`` pieces (C++ op; host copy for CUDA).

    ``embeddings``: (N, D) float32 CPU rows of the samples (validated), or None for the length-only rule.
    """
    rows = None
    if embeddings is not None:
        rows = embeddings if pieces_are_samples else embeddings.index_select(0, pieces.sample_index.cpu())
    result = fill_in_order_pack(
        pieces.length,
        max_len,
        window=window,
        rows=rows,
        min_distance=min_distance,
        metric=metric,
        keep_apart=keep_apart,
    )
    return _best_fit(pieces, result, pieces_are_samples)


def _next_fit_apart(pieces: Pieces, max_len: int, *, window: int, pieces_are_samples: bool, **similarity):
    """``"next_fit"`` with ``keep_apart``: ``"fill_in_order"`` with ``window=1`` (no top-up)."""
    return _fill_in_order(pieces, max_len, window=1, pieces_are_samples=pieces_are_samples, **similarity)


Strategy = Callable[..., Assignment]

STRATEGIES: dict[str, Strategy] = {
    "stream": _stream,
    "next_fit": _next_fit,
    "window_best_fit": _window_best_fit,
    "bfd": _bfd,
    "fill_in_order": _fill_in_order,
}


# ---------------------------------------------------------------------------------------- validation


def _as_lengths_tensor(lengths) -> torch.Tensor:
    """``lengths`` as a 1-D, non-empty, contiguous torch.int64 tensor on its own device (CPU for lists)."""
    if not isinstance(lengths, torch.Tensor):
        if isinstance(lengths, np.ndarray) and (lengths.dtype == np.bool_ or lengths.dtype.kind not in "iu"):
            raise TypeError(f"lengths must hold integers, got a numpy array of dtype {lengths.dtype}")
        try:
            lengths = torch.as_tensor(lengths)
        except (TypeError, ValueError, RuntimeError, OverflowError) as err:
            raise TypeError(
                f"lengths must be a 1-D integer tensor, numpy array or sequence of ints, got "
                f"{type(lengths).__name__} ({err})"
            ) from err
        if lengths.numel() == 0 and lengths.dim() == 1:
            raise ValueError("lengths is empty: pack_lengths needs at least one sample")
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be 1-D (one length per sample), got shape {tuple(lengths.shape)}")
    if lengths.numel() == 0:
        raise ValueError("lengths is empty: pack_lengths needs at least one sample")
    if lengths.dtype not in _INTEGER_DTYPES:
        raise TypeError(f"lengths must have an integer dtype, got {lengths.dtype}")
    return lengths.to(torch.int64).contiguous()


def _as_max_len(max_len) -> int:
    return _as_positive_int(max_len, "max_len")


def _as_positive_int(value, name: str) -> int:
    """``value`` as a Python int in ``[1, 2**63 - 1]``; bools and floats are refused."""
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    try:
        result = operator.index(value)
    except TypeError as err:
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}") from err
    if result < 1:
        raise ValueError(f"{name} must be a positive int, got {result}")
    if result > _INT64_MAX:
        raise ValueError(f"{name} must fit in int64, got {result}")
    return result


def _as_embedding_rows(embeddings, num_samples: int) -> torch.Tensor:
    """``embeddings`` as (N, D) contiguous torch.float32 CPU rows, each finite and non-zero."""
    if not isinstance(embeddings, torch.Tensor):
        raise TypeError(f"embeddings must be a torch.Tensor of shape (N, D), got {type(embeddings).__name__}")
    if embeddings.dim() != 2 or embeddings.shape[0] != num_samples or embeddings.shape[1] < 1:
        raise ValueError(
            f"embeddings must have shape (N, D) = ({num_samples}, D >= 1), one row per sample, got "
            f"{tuple(embeddings.shape)}"
        )
    if not embeddings.is_floating_point():
        raise TypeError(f"embeddings must have a floating dtype, got {embeddings.dtype}")
    rows = embeddings.detach().to("cpu", torch.float32).contiguous()
    bad = ~torch.isfinite(rows).all(1)
    if bad.any():
        first = _first_index(bad)
        raise ValueError(
            f"embeddings[{first}] is not finite in float32 ({int(bad.sum())} of {num_samples} rows are not)"
        )
    zero = ~(rows != 0).any(1)
    if zero.any():
        first = _first_index(zero)
        raise ValueError(
            f"embeddings[{first}] is all zeros in float32 ({int(zero.sum())} of {num_samples} rows are); the "
            "cosine similarity of fill_in_order needs non-zero rows"
        )
    return rows


def _as_keep_apart(value) -> int:
    """``value`` as a Python int ``>= 0``; bools and floats are refused."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"keep_apart must be an int >= 0, got {value!r}")
    try:
        result = operator.index(value)
    except TypeError as err:
        raise TypeError(f"keep_apart must be an int >= 0, got {type(value).__name__} {value!r}") from err
    if not 0 <= result <= _INT64_MAX:
        raise ValueError(f"keep_apart must be an int in [0, 2**63 - 1], got {result}")
    return result


def _as_min_distance(value) -> float:
    """``value`` as a finite float ``>= 0``; bools and non-numbers refused."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"min_distance must be a non-negative number, got {type(value).__name__} {value!r}")
    result = float(value)
    if not np.isfinite(result) or result < 0:
        raise ValueError(f"min_distance must be a finite number >= 0, got {value!r}")
    return result


def _first_index(mask: torch.Tensor) -> int:
    return int(torch.argmax(mask.to(torch.uint8)))  # first True (mask has one)


# ---------------------------------------------------------------------------------------- over-long policy


def _indices_where(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Increasing indices of the ``count`` True entries of ``mask`` (count known: no host sync)."""
    return torch.nonzero_static(mask, size=count).reshape(-1)


def expand_overlong(
    lengths: torch.Tensor,
    max_len: int,
    overlong: str,
    *,
    num_overlong: int | None = None,
    num_pieces: int | None = None,
) -> OverlongResult:
    """Cut samples into pieces of at most ``max_len`` tokens according to the over-long policy.

    Args:
        lengths: (N,), torch.int64, any device; every value ``>= 1`` (validated by the caller).
        max_len: capacity of a pack (Python int ``>= 1``).
        overlong: ``"truncate"`` (keep the first ``max_len`` tokens), ``"drop"`` (no piece) or ``"split"``
            (pieces of ``max_len`` tokens, then the remainder); ``"error"`` is handled by the caller and
            here only accepted when no sample is over-long.
        num_overlong: number of samples longer than ``max_len``; computed here (a host sync on CUDA) when
            None. :func:`pack_lengths` passes it from the host sync of its checks.
        num_pieces: with ``"split"``, the number of pieces ``sum(ceil(lengths / max_len))``; computed here
            when None.

    Returns:
        :class:`OverlongResult`: pieces (M,) in sample order, on the device of ``lengths``, and the counts.
    """
    n = lengths.numel()
    device = lengths.device
    all_samples = torch.arange(n, dtype=torch.int64, device=device)
    no_drop = torch.empty(0, dtype=torch.int64, device=device)
    if overlong not in OVERLONG_POLICIES:
        raise ValueError(f"overlong must be one of {list(OVERLONG_POLICIES)}, got {overlong!r}")
    if num_overlong is None:
        num_overlong = int((lengths > max_len).sum())
    if num_overlong == 0:
        return OverlongResult(Pieces(all_samples, torch.zeros_like(lengths), lengths), 0, 0, 0, no_drop)
    if overlong == "truncate":
        pieces = Pieces(all_samples, torch.zeros_like(lengths), torch.clamp(lengths, max=max_len))
        return OverlongResult(pieces, num_overlong, 0, 0, no_drop)
    if overlong == "drop":
        is_overlong = lengths > max_len
        kept = _indices_where(~is_overlong, n - num_overlong)
        dropped = _indices_where(is_overlong, num_overlong)
        pieces = Pieces(kept, torch.zeros_like(kept), lengths.index_select(0, kept))
        return OverlongResult(pieces, 0, num_overlong, 0, dropped)
    if overlong == "split":
        pieces_per_sample = _pieces_per_sample(lengths, max_len)
        if num_pieces is None:
            num_pieces = int(pieces_per_sample.sum())
        return OverlongResult(
            _split_pieces(lengths, max_len, pieces_per_sample, num_pieces), 0, 0, num_overlong, no_drop
        )
    raise ValueError(f"lengths has {num_overlong} samples longer than max_len={max_len} and overlong='error'")


def _pieces_per_sample(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(N,) int64: ``ceil(lengths / max_len)`` for lengths >= 1, without overflow."""
    return torch.div(lengths - 1, max_len, rounding_mode="floor") + 1


def _split_pieces(
    lengths: torch.Tensor, max_len: int, pieces_per_sample: torch.Tensor, num_pieces: int
) -> Pieces:
    device = lengths.device
    samples = torch.arange(lengths.numel(), dtype=torch.int64, device=device)
    sample_index = torch.repeat_interleave(samples, pieces_per_sample, output_size=num_pieces)
    first_piece = (
        torch.cumsum(pieces_per_sample, 0) - pieces_per_sample
    )  # (N,) index of each sample's first piece
    rank = torch.arange(num_pieces, dtype=torch.int64, device=device) - first_piece.index_select(
        0, sample_index
    )
    offset = rank * max_len
    length = torch.clamp(lengths.index_select(0, sample_index) - offset, max=max_len)
    return Pieces(sample_index, offset, length)


# ---------------------------------------------------------------------------------------- token totals


def _packed_total_parts(
    lengths: torch.Tensor, max_len: int, overlong: str, is_overlong: torch.Tensor
) -> list[torch.Tensor]:
    """Two int64 scalars ``(hi, lo)`` on the device of ``lengths`` with ``hi * 2**32 + lo`` the number of tokens
    the packs will hold (after ``overlong``), exactly: sums of the high and low 32 bits of the lengths, which
    cannot wrap for N < 2**31 (an int64 ``lengths.sum()`` silently wraps past 2**63 - 1).

    Args:
        lengths: (N,) int64, any device (non-positive values are refused by the caller, which reads these in
            the same host sync); max_len: Python int; is_overlong: (N,) bool, ``lengths > max_len``.
    """
    if overlong == "truncate":
        packed = torch.clamp(lengths, max=max_len)
    elif overlong == "drop":
        packed = lengths.masked_fill(is_overlong, 0)
    else:
        packed = lengths
    return [(packed >> 32).sum(), (packed & 0xFFFFFFFF).sum()]


def _check_packed_total(total_hi: int, total_lo: int, n: int) -> None:
    """Raise ``ValueError`` when the packed tokens (``total_hi * 2**32 + total_lo``) overflow int64: the pack
    offsets (cumulative token counts, int64) would wrap to negative values."""
    total = total_hi * 2**32 + total_lo
    if total > torch.iinfo(torch.int64).max:
        raise ValueError(
            f"the {n} samples hold {total} tokens in all, more than int64 can count (2**63 - 1): the pack offsets "
            "would overflow; pack fewer samples at a time"
        )


# ---------------------------------------------------------------------------------------- public API


def pack_lengths(
    lengths: torch.Tensor | Sequence[int] | np.ndarray,
    max_len: int,
    *,
    strategy: str = "next_fit",
    overlong: str = "error",
    window: int = DEFAULT_WINDOW,
    embeddings: torch.Tensor | None = None,
    min_distance: float | None = None,
    metric: str = "l2",
    keep_apart: int = 0,
) -> Packing:
    """Assign samples of the given lengths to packs of at most ``max_len`` tokens.

    Every token of every sample appears exactly once, in one piece: samples are whole, cut
    (``overlong="truncate"``: the cut-off tokens are counted in ``num_truncated``; ``"split"``, or by the
    ``"stream"`` strategy: several pieces) or listed in ``dropped_index`` (``overlong="drop"``).

    Strategies (``strategy=``):

    ===================== ============ ============== ====================================================
    strategy              keeps order  splits samples notes
    ===================== ============ ============== ====================================================
    ``"stream"``          yes          yes            the TFP paper's packer: concatenate, cut every
                                                      ``max_len`` tokens; every pack full but the last
    ``"next_fit"``        yes          no             a new pack when the next piece does not fit
    ``"fill_in_order"``   nearly       no             next fit, then each pack topped up from the next
                                                      ``window`` pieces: near-BFD fill, neighbours stay
                                                      together, top-ups come from at most ``window``
                                                      positions ahead
    ``"window_best_fit"`` per window   no             BFD inside consecutive windows of ``window`` pieces:
                                                      near-BFD fill, neighbours stay together
    ``"bfd"``             no           no             global best fit decreasing (as TRL, OLMo-core)
    ===================== ============ ============== ====================================================

    - ``"next_fit"``: CPU tensors use a sequential C++ loop, CUDA tensors a pointer-jumping kernel;
      without the compiled extension a pure-torch version of the pointer jumping runs (with a warning).
    - ``"stream"``: a C++ loop for CPU tensors, vectorised torch ops for CUDA tensors (the pure-torch
      version is also the fallback without the extension). A sample crossing a cut becomes one piece per
      pack it touches. Over-long samples follow ``overlong`` as with the other strategies; with
      ``overlong="split"`` the stream cuts them like any other sample (their pieces need not start at
      multiples of ``max_len``).
    - ``"bfd"`` and ``"window_best_fit"``: pieces by decreasing length, each into the open pack with the
      smallest remaining capacity that fits it (ties: the pack whose load changed last), in C++ with a
      segment tree over the remaining capacities, O(M log max_len). Packs are numbered by their first
      piece in input order, and pieces inside a pack keep input order, so the result is deterministic.
      BFD is sequential: CUDA lengths are packed on a host copy. Without the extension a pure-Python
      version runs (with a warning). ``"window_best_fit"`` packs pieces ``[0, window)``, then
      ``[window, 2 * window)``, ... each into new packs; ``window >= M`` gives ``"bfd"``.
    - ``"fill_in_order"``: a pack opens with the first unplaced piece ``s`` and takes the following
      unplaced pieces in order while they fit (next fit); then, while one of the unplaced pieces at
      positions ``[s, s + window)`` fits, the best one joins (``window=1``: next fit): the longest
      (ties: the earliest), or, with ``embeddings``, the one of highest ``mean cosine similarity to the
      pack's samples + 2 * length / room`` (ties: the earliest), which keeps related samples together;
      with ``min_distance`` (e.g. the TFP threshold t), a candidate closer than that to a sample of the
      pack (``metric``) joins only when no other fits. Packs are numbered by their first piece, pieces
      inside a pack keep input order. C++ op, O(M log max_len) without embeddings, O(P * window * D)
      with; CUDA lengths are packed on a host copy; without the extension a pure-Python version runs
      (with a warning).
    - ``keep_apart=K`` (``"fill_in_order"`` and ``"next_fit"``, with ``embeddings`` and ``min_distance``,
      e.g. the TFP threshold t): keeps samples closer than ``min_distance`` to each other out of one pack
      where it can. The next fit passes over a sample closer than that to a sample of the open pack (it
      stays unplaced), up to ``K`` per pack (the ``K + 1``-th joins anyway); the top-up never takes one. A
      passed-over sample opens a pack within ``K`` packs at the latest: held back, never lost. ``"next_fit"``
      with ``keep_apart`` is ``"fill_in_order"`` with ``window=1``. The distances are against the open
      pack's samples only, O(N * pack size * D) on top of the strategy's cost.

    Args:
        lengths: (N,) token count of each sample, any integer dtype (not bool), CPU or CUDA; a Python
            sequence of ints or a numpy integer array is taken as a CPU tensor. Every value ``>= 1``.
        max_len: capacity of a pack in tokens, a positive Python int.
        strategy: packing strategy, see above.
        window: pieces per window of ``"window_best_fit"``, candidates per pack of ``"fill_in_order"`` (a
            positive int, default 1024); checked but unused by the other strategies.
        overlong: what to do with a sample longer than ``max_len``:
            ``"error"`` (default): raise ``ValueError`` naming the first such sample and their count;
            ``"truncate"``: keep its first ``max_len`` tokens (one piece, offset 0);
            ``"drop"``: leave it out and record its index in ``dropped_index``;
            ``"split"``: cut it into consecutive pieces of ``max_len`` tokens and a remainder, at offsets
            ``0, max_len, 2 * max_len, ...``; next fit places them in that order (``"stream"``: see above).
        embeddings: (N, D) floating, any device, one finite non-zero row per sample (compared as float32
            values), or None; ``"fill_in_order"`` only, or ``"next_fit"`` with ``keep_apart`` (another
            strategy raises ``ValueError``).
        min_distance: with ``embeddings``, a finite number ``>= 0``: ``"fill_in_order"`` tops a pack up
            with a sample closer than this to one of its samples only when no other fits (never, with
            ``keep_apart``); None or 0: off.
        metric: the distance of ``min_distance``: ``"l2"`` or ``"cosine"`` (``1 - cos``).
        keep_apart: samples closer than ``min_distance`` to a pack that its next fit may pass over (see
            above), an int ``>= 0``; 0 (default): off. Needs ``embeddings`` and ``min_distance``.

    Returns:
        :class:`~tfp_kernels.packing.Packing`, all tensors int64 on the device of ``lengths``:
        ``pack_id``, ``sample_index``, ``offset``, ``length`` (M,) per piece in pack order;
        ``pack_offsets`` (P + 1,); ``dropped_index`` (num_dropped,); ``sample_lengths`` (N,), the lengths
        packed; ints ``num_packs``, ``num_truncated``, ``num_dropped``, ``num_split``, ``max_len``.

    Raises:
        ValueError: ``lengths`` empty, not 1-D, or holding a value ``<= 0``; lengths whose total (of the tokens
            packed, after ``overlong``) exceeds ``2**63 - 1``, which int64 pack offsets cannot hold; a sample
            longer than ``max_len`` with ``overlong="error"``; ``max_len < 1`` or ``window < 1``; an unknown
            ``strategy``, ``overlong`` or ``metric``; ``embeddings`` not of shape (N, D), with a non-finite
            or all-zero row, or given to a strategy other than ``"fill_in_order"`` (or ``"next_fit"`` with
            ``keep_apart``); ``min_distance`` negative or not finite, or given without ``embeddings``;
            ``keep_apart`` negative, or positive without ``embeddings`` and ``min_distance`` or with another
            strategy.
        TypeError: ``lengths`` not of an integer dtype (bool and floats included); ``max_len``,
            ``window`` or ``keep_apart`` not an int; ``embeddings`` not a floating tensor; ``min_distance``
            not a number.

    Host syncs (CUDA): one to check ``lengths`` (and count split pieces), one to read ``P``; the
    compiled next-fit op and ``"stream"`` add one each; ``"bfd"``/``"window_best_fit"`` copy the
    piece lengths to the host and the result back.

    Examples::

        >>> from tfp_kernels.packing import pack_lengths
        >>> packing = pack_lengths([3, 4, 5, 1, 9, 2], max_len=10)
        >>> packing.pack_id
        tensor([0, 0, 1, 1, 2, 3])
        >>> packing.pack_offsets
        tensor([ 0,  7, 13, 22, 24])
        >>> packing = pack_lengths([3, 25, 4], max_len=10, overlong="split")
        >>> packing.sample_index, packing.offset, packing.length
        (tensor([0, 1, 1, 1, 2]), tensor([ 0,  0, 10, 20,  0]), tensor([ 3, 10, 10,  5,  4]))
        >>> packing.pack_id, packing.num_split
        (tensor([0, 1, 2, 3, 3]), 1)
        >>> packing = pack_lengths([3, 4, 5, 1, 9, 2], max_len=10, strategy="bfd")
        >>> packing.pack_id, packing.sample_index  # 3+2 | 4+5+1 | 9
        (tensor([0, 0, 1, 1, 1, 2]), tensor([0, 5, 1, 2, 3, 4]))
        >>> packing.pack_offsets
        tensor([ 0,  5, 15, 24])
        >>> packing = pack_lengths([3, 4, 5, 1, 9, 2], max_len=10, strategy="stream")
        >>> packing.sample_index
        tensor([0, 1, 2, 2, 3, 4, 4, 5])
        >>> packing.offset, packing.length
        (tensor([0, 0, 0, 3, 0, 0, 7, 0]), tensor([3, 4, 3, 2, 1, 7, 2, 2]))
        >>> packing.pack_offsets
        tensor([ 0, 10, 20, 24])
        >>> packing = pack_lengths([3, 4, 5, 1, 9, 2], max_len=10, strategy="fill_in_order")
        >>> packing.pack_id, packing.sample_index  # 3+4 (next fit), topped up with 2, then 1 | 5 | 9
        (tensor([0, 0, 0, 0, 1, 2]), tensor([0, 1, 3, 5, 2, 4]))
    """
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
    if not isinstance(overlong, str) or overlong not in OVERLONG_POLICIES:
        raise ValueError(f"overlong must be one of {list(OVERLONG_POLICIES)}, got {overlong!r}")
    if not isinstance(metric, str) or metric not in METRICS:
        raise ValueError(f"metric must be one of {list(METRICS)}, got {metric!r}")
    lengths = _as_lengths_tensor(lengths)
    max_len = _as_max_len(max_len)
    window = _as_positive_int(window, "window")
    keep_apart = _as_keep_apart(keep_apart)
    if keep_apart:
        if strategy not in ("fill_in_order", "next_fit"):
            raise ValueError(
                "keep_apart= is used by strategy='fill_in_order' and 'next_fit' only, got "
                f"strategy={strategy!r}"
            )
        if embeddings is None or min_distance is None:
            raise ValueError(
                "keep_apart= needs embeddings= and min_distance= (samples closer than min_distance are kept "
                "apart)"
            )
    similarity = {}
    if embeddings is not None:
        if strategy != "fill_in_order" and not (strategy == "next_fit" and keep_apart):
            raise ValueError(
                "embeddings= is used by strategy='fill_in_order' only (or 'next_fit' with keep_apart=), got "
                f"strategy={strategy!r}"
            )
        similarity["embeddings"] = _as_embedding_rows(embeddings, lengths.numel())
    if min_distance is not None:
        if embeddings is None:
            raise ValueError("min_distance= needs embeddings= (the distances are between their rows)")
        similarity["min_distance"] = _as_min_distance(min_distance)
        similarity["metric"] = metric
    if keep_apart:
        similarity["keep_apart"] = keep_apart

    # One host sync for the checks: smallest length, number of over-long samples (and of split pieces).
    is_overlong = lengths > max_len
    stats = [lengths.min(), is_overlong.sum(), *_packed_total_parts(lengths, max_len, overlong, is_overlong)]
    if overlong == "split":
        stats.append(_pieces_per_sample(lengths, max_len).sum())
    min_length, num_overlong, total_hi, total_lo, *num_pieces = torch.stack(stats).tolist()
    if min_length < 1:
        not_positive = lengths < 1
        first = _first_index(not_positive)
        raise ValueError(
            f"lengths[{first}] = {int(lengths[first])} is not positive ({int(not_positive.sum())} of "
            f"{lengths.numel()} samples have length <= 0); every sample needs at least one token"
        )
    if num_overlong > 0 and overlong == "error":
        first = _first_index(is_overlong)
        raise ValueError(
            f"lengths[{first}] = {int(lengths[first])} is longer than max_len={max_len} ({num_overlong} of "
            f"{lengths.numel()} samples are over-long); pass overlong='truncate', 'drop' or 'split' to handle them"
        )

    _check_packed_total(total_hi, total_lo, lengths.numel())

    if strategy == "stream" and overlong == "split":
        # the stream cuts every sample where the packs end: the over-long ones stay whole until then
        expanded = expand_overlong(lengths, max_len, "split", num_overlong=0)._replace(num_split=num_overlong)
    else:
        expanded = expand_overlong(
            lengths,
            max_len,
            overlong,
            num_overlong=num_overlong,
            num_pieces=num_pieces[0] if num_pieces else None,
        )
    pieces_are_samples = (
        num_overlong == 0 or overlong == "truncate" or (strategy == "stream" and overlong == "split")
    )
    pack = _next_fit_apart if strategy == "next_fit" and keep_apart else STRATEGIES[strategy]
    assignment = pack(
        expanded.pieces, max_len, window=window, pieces_are_samples=pieces_are_samples, **similarity
    )
    return _make_packing(assignment, max_len, expanded, lengths)


def _make_packing(
    assignment: Assignment, max_len: int, expanded: OverlongResult, lengths: torch.Tensor
) -> Packing:
    """The :class:`Packing` of a strategy's result; pack offsets derived from the pieces when not given."""
    pieces, pack_id = assignment.pieces, assignment.pack_id
    pack_offsets = assignment.pack_offsets
    if pack_offsets is None:
        device = pack_id.device
        num_pieces = pack_id.numel()
        num_packs = int(pack_id[-1]) + 1 if num_pieces > 0 else 0  # the one host sync for P
        piece_offsets = torch.zeros(num_pieces + 1, dtype=torch.int64, device=device)
        torch.cumsum(pieces.length, 0, out=piece_offsets[1:])
        # first piece of each pack (pack ids are non-decreasing), then M: O(M), no binary search
        is_first = torch.ones(num_pieces + 1, dtype=torch.bool, device=device)
        torch.ne(pack_id[1:], pack_id[:-1], out=is_first[1:num_pieces])
        pack_offsets = piece_offsets.index_select(0, _indices_where(is_first, num_packs + 1))
    return Packing(
        pack_id=pack_id,
        sample_index=pieces.sample_index,
        offset=pieces.offset,
        length=pieces.length,
        pack_offsets=pack_offsets,
        max_len=max_len,
        num_packs=pack_offsets.numel() - 1,
        num_truncated=expanded.num_truncated,
        num_dropped=expanded.num_dropped,
        num_split=expanded.num_split,
        dropped_index=expanded.dropped_index,
        sample_lengths=lengths,
    )
