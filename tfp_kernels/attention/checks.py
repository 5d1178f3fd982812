"""Validation of the varlen-attention contract (flash-attention's ``cu_seqlens`` / ``max_seqlen``).

A bad ``cu_seqlens`` or a too-small ``max_seqlen`` does not fail cleanly inside flash-attention: it reads
out of bounds (an illegal memory access that kills the CUDA context) or leaves tokens outside every segment
as garbage. :func:`check_cu_seqlens` checks the whole contract on the host and raises a ``TypeError`` /
``ValueError`` that names the problem and shows the bad value instead.

Cost: the checks of the values run on a CPU copy of ``cu_seqlens`` (``S + 1`` int32 numbers). Pass that
copy as ``cu_seqlens_cpu`` (a :class:`~tfp_kernels.PackedBatch` carries one) and nothing is copied; else
``cu_seqlens`` is copied to the host once, which on CUDA is one device synchronisation.
"""

from __future__ import annotations

import operator
from typing import NamedTuple

import torch

_INT32_MAX = 2**31 - 1


class SeqlensCheck(NamedTuple):
    """What :func:`check_cu_seqlens` found.

    Attributes:
        cu_seqlens_cpu: (S + 1,), torch.int32, CPU: a host copy of the checked ``cu_seqlens``.
        max_seqlen: the ``max_seqlen`` to use (the given one, or the longest segment when none was given).
        longest: the longest segment (Python int).
        num_segments: ``S``.
        num_empty: how many segments have length 0.
    """

    cu_seqlens_cpu: torch.Tensor
    max_seqlen: int
    longest: int
    num_segments: int
    num_empty: int


def check_max_seqlen(max_seqlen, name: str = "max_seqlen") -> int:
    """``max_seqlen`` as a Python int >= 0; TypeError for a tensor, a bool, a float or anything else."""
    if isinstance(max_seqlen, torch.Tensor):
        raise TypeError(
            f"{name} must be a Python int (flash-attention's max_seqlen), got a tensor; pass "
            f"int({name}) (computed once on the host, e.g. PackedBatch.max_seqlen)"
        )
    if isinstance(max_seqlen, bool):
        raise TypeError(f"{name} must be a Python int, got a bool ({max_seqlen})")
    try:
        value = operator.index(max_seqlen)
    except TypeError:
        raise TypeError(
            f"{name} must be a Python int, got {type(max_seqlen).__name__} ({max_seqlen!r})"
        ) from None
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def check_cu_seqlens(
    cu_seqlens,
    num_tokens: int,
    *,
    device,
    max_seqlen=None,
    cu_seqlens_cpu: torch.Tensor | None = None,
    allow_empty: bool = True,
    name: str = "cu_seqlens",
) -> SeqlensCheck:
    """Check ``cu_seqlens`` / ``max_seqlen`` against flash-attention's varlen contract.

    The contract (``flash_attn_varlen_func``'s ``cu_seqlens_q/k``, ``max_seqlen_q/k``):

    - ``cu_seqlens``: a torch.Tensor, dtype torch.int32, 1-D with ``S + 1 >= 2`` entries, contiguous, on
      ``device`` (the device of q/k/v);
    - ``cu_seqlens[0] == 0``, ``cu_seqlens[-1] == num_tokens`` (every token lies in a segment), and
      non-decreasing;
    - zero-length segments (two equal consecutive entries) are allowed when ``allow_empty`` (the default;
      :func:`~tfp_kernels.attention.varlen_attention` removes them before calling a fused kernel, so no
      kernel ever sees one), else a ValueError;
    - ``max_seqlen``: a Python int (not a tensor, not a bool) ``>=`` the longest segment. A larger value is
      allowed (flash-attention only sizes its grid with it); a smaller one is what makes flash-attention
      read out of bounds.

    Args:
        cu_seqlens: the segment boundaries to check, (S + 1,), torch.int32, on ``device``.
        num_tokens: ``T``, the number of tokens (rows of q/k/v).
        device: the device of q/k/v (a ``torch.device`` or a string).
        max_seqlen: None (computed: the longest segment) or the value to check.
        cu_seqlens_cpu: an optional CPU copy of ``cu_seqlens`` (same values; e.g.
            ``PackedBatch.cu_seqlens_cpu``): the value checks run on it and nothing is copied from the device.
            It is trusted to equal ``cu_seqlens`` (comparing them would cost the copy it saves).
        allow_empty: allow zero-length segments.
        name: the argument name used in the error messages.

    Returns:
        :class:`SeqlensCheck` ``(cu_seqlens_cpu, max_seqlen, longest, num_segments, num_empty)``.

    Raises:
        TypeError: ``cu_seqlens`` not a tensor or not int32; ``max_seqlen`` not a Python int.
        ValueError: ``cu_seqlens`` not 1-D, fewer than 2 entries, not contiguous, on another device, not
            starting at 0, not ending at ``num_tokens``, decreasing somewhere, or with a zero-length segment
            when ``allow_empty=False``; more than 2^31 - 1 tokens; ``max_seqlen`` smaller than the longest
            segment.

    Host syncs: one (the copy of ``cu_seqlens`` to the CPU) on CUDA when ``cu_seqlens_cpu`` is not given.

    Examples::

        >>> import torch
        >>> from tfp_kernels.attention import check_cu_seqlens
        >>> cu = torch.tensor([0, 3, 5, 9], dtype=torch.int32)
        >>> check_cu_seqlens(cu, 9, device="cpu").max_seqlen
        4
        >>> check_cu_seqlens(cu, 9, device="cpu", max_seqlen=3)
        Traceback (most recent call last):
        ...
        ValueError: max_seqlen = 3 is smaller than the longest segment of cu_seqlens (4 tokens, segment 2): flash-attention would read out of bounds; pass max_seqlen >= 4 (or None to compute it)
    """
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of dtype int32, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(
            f"{name} must have dtype torch.int32 (flash-attention's contract), got {cu_seqlens.dtype}; "
            f"convert it with {name}.to(torch.int32)"
        )
    if cu_seqlens.dim() != 1:
        raise ValueError(f"{name} must be 1-D with S + 1 entries, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.numel() < 2:
        raise ValueError(
            f"{name} must have at least 2 entries (one segment), got {cu_seqlens.numel()}: {cu_seqlens.tolist()}"
        )
    if not cu_seqlens.is_contiguous():
        raise ValueError(
            f"{name} must be contiguous (stride {cu_seqlens.stride()}); pass {name}.contiguous()"
        )
    device = torch.device(device)
    if cu_seqlens.device != device and not (device.type == cu_seqlens.device.type and device.index is None):
        raise ValueError(f"{name} is on {cu_seqlens.device} but the queries are on {device}: move it there")
    num_tokens = operator.index(num_tokens)
    if num_tokens > _INT32_MAX:
        raise ValueError(f"{num_tokens} tokens do not fit int32 {name} (at most {_INT32_MAX})")

    if cu_seqlens_cpu is None:
        host = cu_seqlens.cpu()  # the one host copy (a sync on CUDA)
    else:
        if not isinstance(cu_seqlens_cpu, torch.Tensor) or cu_seqlens_cpu.device.type != "cpu":
            raise TypeError(f"{name}_cpu must be a CPU tensor (the host copy of {name})")
        if cu_seqlens_cpu.shape != cu_seqlens.shape:
            raise ValueError(
                f"{name}_cpu has shape {tuple(cu_seqlens_cpu.shape)} but {name} has {tuple(cu_seqlens.shape)}"
            )
        host = cu_seqlens_cpu.to(torch.int32)
    first, last = int(host[0]), int(host[-1])
    if first != 0:
        raise ValueError(f"{name}[0] must be 0, got {first}")
    lengths = host[1:] - host[:-1]
    negative = lengths < 0
    if bool(negative.any()):
        i = int(torch.nonzero(negative)[0])
        raise ValueError(
            f"{name} must be non-decreasing: {name}[{i + 1}] = {int(host[i + 1])} < {name}[{i}] = {int(host[i])}"
        )
    if last != num_tokens:
        what = (
            "tokens after it would be left out of every segment" if last < num_tokens else "it runs past them"
        )
        raise ValueError(f"{name}[-1] = {last} must equal the number of tokens ({num_tokens}): {what}")
    empty = lengths == 0
    num_empty = int(empty.sum())
    if num_empty and not allow_empty:
        i = int(torch.nonzero(empty)[0])
        raise ValueError(
            f"{name} has {num_empty} zero-length segment(s) (first: segment {i}, {name}[{i}] == {name}[{i + 1}] "
            f"== {int(host[i])}); drop the repeated entries"
        )
    longest_index = int(torch.argmax(lengths))
    longest = int(lengths[longest_index])
    if max_seqlen is None:
        max_seqlen = longest
    else:
        max_seqlen = check_max_seqlen(max_seqlen)
        if max_seqlen < longest:
            raise ValueError(
                f"max_seqlen = {max_seqlen} is smaller than the longest segment of {name} ({longest} tokens, "
                f"segment {longest_index}): flash-attention would read out of bounds; pass max_seqlen >= "
                f"{longest} (or None to compute it)"
            )
    return SeqlensCheck(host, max_seqlen, longest, lengths.numel(), num_empty)
