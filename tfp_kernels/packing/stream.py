"""The paper's packer: concatenate the pieces in order and cut the token stream every ``max_len`` tokens.

Two implementations of one function, plus the plain-Python definition
(:func:`tfp_kernels.packing.reference.stream_reference`):

- ``torch.ops.tfp_kernels.stream_pack`` (C++, ``csrc/cpu/stream_cpu.cpp``): two sequential passes on CPU
  tensors (~50 ms for 10^7 items);
- :func:`stream_pack_torch`: vectorised torch ops (cumsum, repeat_interleave, gathers) on any device, with
  one host sync for the number of pieces. The cut is embarrassingly parallel, so CUDA tensors use this
  (a handful of kernels) instead of a custom kernel; it is also the fallback without the extension.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._ext import has_extension, require_extension, warn_fallback

BACKENDS = ("auto", "op", "torch")


class StreamCut(NamedTuple):
    """What :func:`stream_pack` returns: one entry per piece in stream order, all (M,) torch.int64."""

    item: torch.Tensor  # index of the item the piece comes from
    offset: torch.Tensor  # first token of the piece within its item
    length: torch.Tensor  # tokens in the piece, in [1, max_len]
    pack_id: torch.Tensor  # pack of the piece, non-decreasing from 0


def stream_pack_torch(lengths: torch.Tensor, max_len: int) -> StreamCut:
    """The stream cut in vectorised torch ops, on the device of ``lengths``.

    Args:
        lengths: (N,), torch.int64, any device; every value ``>= 1`` (may exceed ``max_len``; not checked).
        max_len: capacity of a pack (Python int ``>= 1``).

    Returns:
        :class:`StreamCut`; pack ``p`` is the token range ``[p * max_len, (p + 1) * max_len)`` of the
        concatenated items, every pack but the last holds exactly ``max_len`` tokens.
    """
    device = lengths.device
    n = lengths.numel()
    if n == 0:
        empty = torch.empty(0, dtype=torch.int64, device=device)
        return StreamCut(empty, empty, empty, empty)
    lengths = lengths.contiguous()
    ends = torch.cumsum(lengths, 0)
    starts = ends - lengths
    # min(max_len, total tokens) cuts the same packs and keeps the products below from overflowing int64
    capacity = torch.clamp(ends[-1:], max=max_len)
    first_pack = torch.div(starts, capacity, rounding_mode="floor")
    count = torch.div(ends - 1, capacity, rounding_mode="floor") - first_pack + 1  # packs touched per item
    num_out = int(count.sum())  # the one host sync
    index = torch.arange(n, dtype=torch.int64, device=device)
    if num_out == n:  # no item crosses a cut
        return StreamCut(index, torch.zeros_like(lengths), lengths, first_pack)
    item = torch.repeat_interleave(index, count, output_size=num_out)
    first_out = torch.cumsum(count, 0) - count
    rank = torch.arange(num_out, dtype=torch.int64, device=device) - first_out.index_select(0, item)
    pack_id = first_pack.index_select(0, item) + rank
    item_start = starts.index_select(0, item)
    cut = pack_id * capacity
    low = torch.maximum(item_start, cut)
    high = torch.minimum(ends.index_select(0, item), cut + capacity)
    return StreamCut(item, low - item_start, high - low, pack_id)


def stream_pack(lengths: torch.Tensor, max_len: int, *, backend: str = "auto") -> StreamCut:
    """The stream cut of ``lengths``, by the C++ op (CPU tensors) or :func:`stream_pack_torch`.

    Args:
        lengths: (N,), torch.int64, any device; every value ``>= 1``.
        max_len: capacity of a pack (Python int ``>= 1``).
        backend: ``"auto"`` (the C++ op for CPU tensors when built, else :func:`stream_pack_torch`;
            a warning when a CPU tensor falls back), ``"op"`` (C++ op on a host copy, or an error) or
            ``"torch"``.

    Returns:
        :class:`StreamCut`, on the device of ``lengths``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return stream_pack_torch(lengths, max_len)
    if backend == "op":
        require_extension("stream_pack(backend='op')")
        cut = StreamCut(*torch.ops.tfp_kernels.stream_pack(lengths.cpu(), max_len))
        return StreamCut(*(field.to(lengths.device) for field in cut))
    if lengths.device.type == "cpu":
        if has_extension():
            return StreamCut(*torch.ops.tfp_kernels.stream_pack(lengths, max_len))
        warn_fallback("stream packing")
    return stream_pack_torch(lengths, max_len)


if has_extension():
    # Every output has the data-dependent number of pieces M >= N.
    @torch.library.register_fake("tfp_kernels::stream_pack")
    def _stream_pack_fake(lengths: torch.Tensor, max_len: int):
        torch._check(lengths.dim() == 1, lambda: f"lengths must be 1-D, got shape {tuple(lengths.shape)}")
        torch._check(lengths.dtype == torch.int64, lambda: f"lengths must be int64, got {lengths.dtype}")
        torch._check(max_len > 0, lambda: f"max_len must be positive, got {max_len}")
        num_pieces = torch.library.get_ctx().new_dynamic_size()
        return tuple(lengths.new_empty(num_pieces) for _ in range(4))
