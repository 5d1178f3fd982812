"""Best fit decreasing (BFD) bin packing of item lengths, globally or inside windows: two implementations.

The definition (the tie rule and the numbering of the packs) is that of
:func:`tfp_kernels.packing.reference.best_fit_decreasing_reference`:

1. items by decreasing length, equal lengths by increasing index;
2. each item into the open pack with the smallest remaining capacity that fits it; among packs with that
   capacity, the one whose load changed most recently; a new pack when none fits;
3. packs numbered by their first item in input order; items inside a pack keep input order.

With a ``window``, items ``[0, W)``, ``[W, 2W)``, ... are packed separately, each window into new packs.

- ``torch.ops.tfp_kernels.best_fit_decreasing`` (C++, ``csrc/cpu/best_fit_cpu.cpp``): buckets of open packs
  by remaining capacity and a segment tree over capacities, O(N log max_len); ~0.5 s for 10^7 items on
  one CPU core. BFD is sequential, so there is no CUDA kernel: CUDA lengths are packed on a host copy
  (one device-to-host and one host-to-device copy of N int64 values).
- :func:`best_fit_decreasing_python`: the same buckets in Python (``bisect`` over the sorted capacities),
  the fallback when the extension is not built (~1-2 microseconds per item).
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Sequence
from typing import NamedTuple

import torch

from .._ext import has_extension, require_extension, warn_fallback

BACKENDS = ("auto", "op", "python")


class BestFit(NamedTuple):
    """What :func:`best_fit_decreasing` returns; all torch.int64 on the device of the lengths."""

    order: torch.Tensor  # (N,) item indices listed pack by pack, input order inside a pack
    pack_id: torch.Tensor  # (N,) pack of each listed item, non-decreasing from 0
    length: torch.Tensor  # (N,) length of each listed item, lengths[order]
    pack_offsets: torch.Tensor  # (P + 1,) token offsets of the packs


def best_fit_from_packs(lengths: torch.Tensor, order: torch.Tensor, pack_id: torch.Tensor) -> BestFit:
    """The :class:`BestFit` of a packing given as its items listed pack by pack.

    Args:
        lengths: (N,) torch.int64, CPU: the items' lengths.
        order: (N,) torch.int64, CPU: the items, pack by pack.
        pack_id: (N,) torch.int64, CPU: the pack of each listed item, non-decreasing from 0.

    Returns:
        ``BestFit(order, pack_id, length, pack_offsets)`` with the listed items' lengths and the (P + 1,)
        token offsets of the packs.
    """
    length = lengths.index_select(0, order)
    num_packs = int(pack_id[-1]) + 1 if pack_id.numel() else 0
    pack_offsets = torch.zeros(num_packs + 1, dtype=torch.int64)
    pack_offsets.index_add_(0, pack_id + 1, length)
    return BestFit(order, pack_id, length, torch.cumsum(pack_offsets, 0))


def best_fit_decreasing_python(
    lengths: Sequence[int], max_len: int, window: int | None = None
) -> tuple[list[int], list[int]]:
    """BFD (inside windows of ``window`` items when given) in plain Python, same result as the C++ op.

    Args:
        lengths: N item lengths, each in ``[1, max_len]`` (not checked here).
        max_len: capacity of a pack.
        window: items per window; ``None`` (or ``>= N``) packs all items together.

    Returns:
        ``(order, pack_id)``: N item indices listed pack by pack, and the pack of each listed item
        (non-decreasing from 0).
    """
    n = len(lengths)
    window = n if window is None or window >= n else window
    pack_of = [0] * n
    num_packs = 0
    for begin in range(0, n, max(window, 1)):
        end = min(n, begin + window)
        capacities: list[int] = []  # sorted remaining capacities that have open packs
        stacks: dict[int, list[int]] = {}  # capacity -> packs with it, the most recently changed last
        for item in sorted(range(begin, end), key=lambda i: (-lengths[i], i)):
            length = lengths[item]
            j = bisect_left(capacities, length)
            if j == len(capacities):
                pack, remaining = num_packs, max_len - length
                num_packs += 1
            else:
                capacity = capacities[j]
                stack = stacks[capacity]
                pack, remaining = stack.pop(), capacity - length
                if not stack:
                    del capacities[j], stacks[capacity]
            pack_of[item] = pack
            if remaining > 0:
                if remaining in stacks:
                    stacks[remaining].append(pack)
                else:
                    insort(capacities, remaining)
                    stacks[remaining] = [pack]
    new_id: dict[int, int] = {}
    members: list[list[int]] = []
    for item, pack in enumerate(pack_of):
        if pack not in new_id:
            new_id[pack] = len(members)
            members.append([])
        members[new_id[pack]].append(item)
    order = [item for items in members for item in items]
    pack_id = [pack for pack, items in enumerate(members) for _ in items]
    return order, pack_id


def best_fit_decreasing(
    lengths: torch.Tensor, max_len: int, *, window: int | None = None, backend: str = "auto"
) -> BestFit:
    """BFD of ``lengths`` (inside windows when ``window`` is given), by the C++ op or the Python fallback.

    Args:
        lengths: (N,), torch.int64, any device; every value in ``[1, max_len]``. Validated by the public
            :func:`~tfp_kernels.packing.pack_lengths`; here only the compiled op re-checks.
        max_len: capacity of a pack (Python int, ``>= 1``).
        window: items per window (``>= 1``); ``None`` packs all items together (global BFD).
        backend: ``"auto"`` (the compiled op when built, else :func:`best_fit_decreasing_python` with a
            warning), ``"op"`` (compiled op or an error) or ``"python"``.

    Returns:
        :class:`BestFit` ``(order, pack_id, length, pack_offsets)``, torch.int64 on the device of
        ``lengths``: the item indices listed pack by pack (items in input order inside a pack), the pack
        of each listed item (non-decreasing from 0, packs numbered by their first item), its length, and
        the (P + 1,) token offsets of the packs.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    n = lengths.numel()
    window = n if window is None else min(window, max(n, 1))
    device = lengths.device
    host = lengths.cpu()  # BFD is sequential: CUDA inputs are packed on a host copy
    if backend == "op" or (backend == "auto" and has_extension()):
        require_extension("best_fit_decreasing(backend='op')")
        result = BestFit(*torch.ops.tfp_kernels.best_fit_decreasing(host, max_len, max(window, 1)))
    else:
        if backend == "auto":
            warn_fallback("best-fit-decreasing bin packing")
        order_list, pack_list = best_fit_decreasing_python(host.tolist(), max_len, window)
        order = torch.tensor(order_list, dtype=torch.int64)
        pack_id = torch.tensor(pack_list, dtype=torch.int64)
        result = best_fit_from_packs(host, order, pack_id)
    if device.type != "cpu":
        result = BestFit(*(field.to(device) for field in result))
    return result


if has_extension():
    # Three outputs of the input's size, and the pack offsets, whose size (P + 1) depends on the data.
    @torch.library.register_fake("tfp_kernels::best_fit_decreasing")
    def _best_fit_decreasing_fake(lengths: torch.Tensor, max_len: int, window: int):
        torch._check(lengths.dim() == 1, lambda: f"lengths must be 1-D, got shape {tuple(lengths.shape)}")
        torch._check(lengths.dtype == torch.int64, lambda: f"lengths must be int64, got {lengths.dtype}")
        torch._check(max_len > 0, lambda: f"max_len must be positive, got {max_len}")
        torch._check(window > 0, lambda: f"window must be positive, got {window}")
        num_offsets = torch.library.get_ctx().new_dynamic_size(min=1)
        same = [lengths.new_empty(lengths.shape) for _ in range(3)]
        return (*same, lengths.new_empty(num_offsets))
