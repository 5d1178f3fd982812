"""``"fill_in_order"`` bin packing: next fit in input order, each pack topped up from the items ahead of it.

The definition is that of :func:`tfp_kernels.packing.reference.fill_in_order_reference`:

1. a pack opens with the first unplaced item ``s``;
2. while the next unplaced item fits the pack's room, it joins (next fit: the input order's neighbours
   stay together);
3. then, while some candidate (an unplaced item at positions ``[s, s + window)``) fits, the best one
   joins: without embeddings the longest (ties: the
   earliest); with embeddings the one of highest ``mean cosine similarity to the pack's items +
   fill_weight * length / room`` (ties: the earliest), and with ``min_distance`` a candidate closer than
   that to an item of the pack only when no other fits;
4. the pack closes when no candidate fits.

With ``keep_apart = K >= 1`` (embeddings and ``min_distance``), items closer than ``min_distance`` to an item
of the pack are kept out of it: step 2 passes over up to ``K`` of them per pack (they stay unplaced; the
``K + 1``-th joins anyway), step 3 never takes one. A passed-over item opens a pack within ``K`` packs at the
latest, so none is lost.

Packs are numbered by their first item and list their items in input order, as the best-fit strategies
do; an item that joins in step 3 lies within ``window`` positions of its pack's first item, and
``window=1`` gives next fit.

- ``torch.ops.tfp_kernels.fill_in_order`` (C++, ``csrc/cpu/fill_in_order_cpu.cpp``): without embeddings,
  candidates in buckets by length, O(N log_64 max_len): 10^7 long-tailed lengths at max_len 2048 in 0.7-1.0 s
  on a busy 2-core CPU, where the BFD op took 1.3-1.9 s; with embeddings, every top-up step scores the
  fitting candidates of the window, O(P * window * D) (10^5 items, D = 256: ~4 s); ``keep_apart`` adds the
  distances of the next-fit items to the pack's items, O(N * pack size * D). Sequential: CUDA lengths
  are packed on a host copy.
- :func:`fill_in_order_pack_python`: the length-only rule with the same buckets in Python (``bisect`` over
  the sorted lengths), the fallback when the extension is not built; with embeddings the fallback is the
  reference itself (plain Python, slow: small inputs only).
"""

from __future__ import annotations

from bisect import bisect_right, insort
from collections import deque
from collections.abc import Sequence

import torch

from .._ext import has_extension, require_extension, warn_fallback
from .best_fit import BestFit, best_fit_from_packs
from .reference import FILL_WEIGHT, fill_in_order_reference

BACKENDS = ("auto", "op", "python")
METRICS = ("l2", "cosine")


def fill_in_order_pack_python(lengths: Sequence[int], max_len: int, window: int) -> list[int]:
    """The length-only rule in plain Python with buckets by length; same packs as the C++ op.

    Args:
        lengths: N item lengths, each in ``[1, max_len]`` (not checked here).
        max_len: capacity of a pack.
        window: candidates per pack (``>= 1``).

    Returns:
        The pack id of each item (N ints), numbered in opening order (= by first item).
    """
    n = len(lengths)
    queues: dict[int, deque[int]] = {}  # length -> unplaced candidates of that length, in input order
    present: list[int] = []  # sorted lengths with a non-empty queue
    pack_of = [-1] * n

    def take_head(length: int) -> int:
        queue = queues[length]
        item = queue.popleft()
        if not queue:
            del queues[length]
            present.pop(bisect_right(present, length) - 1)
        return item

    added = 0  # items [0, added) have entered the queues (the unplaced ones)
    num_packs = 0
    s = 0
    while s < n:
        end = min(n, s + window)
        for item in range(added, end):
            if pack_of[item] >= 0:
                continue
            length = lengths[item]
            if length not in queues:
                queues[length] = deque()
                insort(present, length)
            queues[length].append(item)
        added = max(added, end)
        pack = num_packs
        num_packs += 1
        take_head(lengths[s])  # the first unplaced item heads its queue
        pack_of[s] = pack
        room = max_len - lengths[s]
        cursor = s + 1
        while room > 0:  # next fit
            while cursor < n and pack_of[cursor] >= 0:
                cursor += 1
            if cursor == n or lengths[cursor] > room:
                break
            if cursor < added:
                take_head(lengths[cursor])
            pack_of[cursor] = pack
            room -= lengths[cursor]
            cursor += 1
        while room > 0:  # top up: the longest candidate that fits, the earliest of that length
            j = bisect_right(present, room)
            if j == 0:
                break
            item = take_head(present[j - 1])
            pack_of[item] = pack
            room -= lengths[item]
        while s < n and pack_of[s] >= 0:
            s += 1
    return pack_of


def fill_in_order_pack(
    lengths: torch.Tensor,
    max_len: int,
    *,
    window: int,
    rows: torch.Tensor | None = None,
    fill_weight: float = FILL_WEIGHT,
    min_distance: float = 0.0,
    metric: str = "l2",
    keep_apart: int = 0,
    backend: str = "auto",
) -> BestFit:
    """``"fill_in_order"`` packing of ``lengths`` by the C++ op or the Python fallback.

    Args:
        lengths: (N,), torch.int64, any device; every value in ``[1, max_len]``. Validated by the public
            :func:`~tfp_kernels.packing.pack_lengths`; here only the compiled op re-checks.
        max_len: capacity of a pack (Python int, ``>= 1``).
        window: candidates per pack (Python int, ``>= 1``).
        rows: (N, D) torch.float32, CPU, contiguous, finite non-zero rows (one embedding per item), or
            None for the length-only rule.
        fill_weight: weight of ``length / room`` against the mean cosine similarity (with ``rows``).
        min_distance: candidates closer than this to an item of the pack join only when no other fits
            (with ``rows``; ``0`` turns it off).
        metric: distance of ``min_distance``: ``"l2"`` or ``"cosine"`` (``1 - cos``).
        keep_apart: with ``rows``, items closer than ``min_distance`` to the pack that its next fit may
            pass over (close candidates then never join in the top-up); ``0``: off.
        backend: ``"auto"`` (the compiled op when built, else the Python fallback with a warning),
            ``"op"`` (compiled op or an error) or ``"python"``.

    Returns:
        :class:`~tfp_kernels.packing.best_fit.BestFit` ``(order, pack_id, length, pack_offsets)``,
        torch.int64 on the device of ``lengths``: the items listed pack by pack (input order inside a
        pack), the pack of each listed item (non-decreasing from 0), its length, the (P + 1,) token
        offsets of the packs.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    n = lengths.numel()
    window = min(window, max(n, 1))
    device = lengths.device
    host = lengths.cpu()  # sequential: CUDA inputs are packed on a host copy
    if backend == "op" or (backend == "auto" and has_extension()):
        require_extension("fill_in_order_pack(backend='op')")
        result = BestFit(
            *torch.ops.tfp_kernels.fill_in_order(
                host,
                max_len,
                window,
                rows,
                float(fill_weight),
                float(min_distance),
                metric == "cosine",
                int(keep_apart),
            )
        )
    else:
        if backend == "auto":
            warn_fallback("fill_in_order bin packing")
        if rows is None:
            pack_list = fill_in_order_pack_python(host.tolist(), max_len, window)
        else:
            pack_list = fill_in_order_reference(
                host.tolist(),
                max_len,
                window,
                rows.tolist(),
                fill_weight=fill_weight,
                min_distance=min_distance,
                metric=metric,
                keep_apart=keep_apart,
            )
        pack_of = torch.tensor(pack_list, dtype=torch.int64)
        # items by pack, input order inside a pack (a stable sort of the pack ids)
        pack_id, order = torch.sort(pack_of, stable=True)
        result = best_fit_from_packs(host, order, pack_id)
    if device.type != "cpu":
        result = BestFit(*(field.to(device) for field in result))
    return result


if has_extension():
    # Three outputs of the input's size, and the pack offsets, whose size (P + 1) depends on the data.
    @torch.library.register_fake("tfp_kernels::fill_in_order")
    def _fill_in_order_fake(
        lengths: torch.Tensor,
        max_len: int,
        window: int,
        rows: torch.Tensor | None = None,
        fill_weight: float = FILL_WEIGHT,
        min_distance: float = 0.0,
        cosine: bool = False,
        keep_apart: int = 0,
    ):
        torch._check(lengths.dim() == 1, lambda: f"lengths must be 1-D, got shape {tuple(lengths.shape)}")
        torch._check(lengths.dtype == torch.int64, lambda: f"lengths must be int64, got {lengths.dtype}")
        torch._check(max_len > 0, lambda: f"max_len must be positive, got {max_len}")
        torch._check(window > 0, lambda: f"window must be positive, got {window}")
        num_offsets = torch.library.get_ctx().new_dynamic_size(min=1)
        same = [lengths.new_empty(lengths.shape) for _ in range(3)]
        return (*same, lengths.new_empty(num_offsets))
