"""Plain-Python references for bin packing: the test oracle.

Loops over Python ints, no torch, written for clarity only (the best-fit references scan every open pack
for every item: O(N * P), use them on small inputs). The fast paths (:mod:`tfp_kernels.packing.binpack`,
the C++/CUDA ops ``torch.ops.tfp_kernels.next_fit_pack_ids`` and ``best_fit_decreasing``, the pure-torch
and pure-Python fallbacks) must agree with these exactly.

One function per strategy, each taking the pieces' lengths and returning a pack id per piece:

- :func:`next_fit_pack_ids_reference` (``"next_fit"``);
- :func:`best_fit_decreasing_reference` (``"bfd"``) and :func:`window_best_fit_reference`
  (``"window_best_fit"``);
- :func:`fill_in_order_reference` (``"fill_in_order"``);
- :func:`stream_reference` (``"stream"``) works on samples, since it cuts them itself.

:func:`pack_lengths_reference` composes them with the over-long policy (:func:`expand_overlong_reference`),
and :func:`select_packs_reference` reorders (or subsets) the packs of a result.
"""

from __future__ import annotations

from collections.abc import Sequence

OVERLONG_POLICIES = ("error", "truncate", "drop", "split")


def next_fit_pack_ids_reference(lengths: Sequence[int], max_len: int) -> list[int]:
    """Ordered next fit: items stay in order; a new pack opens when the next item does not fit.

    Args:
        lengths: N item lengths, each in ``[1, max_len]``.
        max_len: capacity of a pack.

    Returns:
        The pack id of each item (N ints), starting at 0 and increasing by at most 1 per item.
    """
    packs: list[list[int]] = []
    load = 0
    for item, length in enumerate(lengths):
        if not 1 <= length <= max_len:
            raise ValueError(f"lengths[{item}] = {length} is outside [1, max_len={max_len}]")
        if packs and load + length <= max_len:
            packs[-1].append(item)
            load += length
        else:
            packs.append([item])
            load = length
    pack_ids = [0] * len(lengths)
    for pack, items in enumerate(packs):
        for item in items:
            pack_ids[item] = pack
    return pack_ids


def expand_overlong_reference(lengths: Sequence[int], max_len: int, overlong: str) -> dict:
    """Turn samples into pieces of at most ``max_len`` tokens according to the over-long policy.

    Args:
        lengths: N sample lengths, each >= 1.
        max_len: capacity of a pack.
        overlong: ``"error" | "truncate" | "drop" | "split"`` for samples longer than ``max_len``.

    Returns:
        A dict of lists ``sample_index``, ``offset``, ``length`` (one entry per piece, in sample order)
        and ``dropped_index``, and of ints ``num_truncated``, ``num_dropped``, ``num_split``.
    """
    if overlong not in OVERLONG_POLICIES:
        raise ValueError(f"overlong must be one of {OVERLONG_POLICIES}, got {overlong!r}")
    out = {"sample_index": [], "offset": [], "length": [], "dropped_index": []}
    counts = {"num_truncated": 0, "num_dropped": 0, "num_split": 0}
    for sample, length in enumerate(lengths):
        if length < 1:
            raise ValueError(f"lengths[{sample}] = {length} is not positive")
        if length <= max_len:
            pieces = [(0, length)]
        elif overlong == "error":
            raise ValueError(f"lengths[{sample}] = {length} is longer than max_len={max_len}")
        elif overlong == "truncate":
            pieces = [(0, max_len)]
            counts["num_truncated"] += 1
        elif overlong == "drop":
            pieces = []
            out["dropped_index"].append(sample)
            counts["num_dropped"] += 1
        else:  # split
            pieces = []
            start = 0
            while start < length:
                pieces.append((start, min(max_len, length - start)))
                start += max_len
            counts["num_split"] += 1
        for offset, piece_length in pieces:
            out["sample_index"].append(sample)
            out["offset"].append(offset)
            out["length"].append(piece_length)
    out.update(counts)
    return out


def best_fit_decreasing_reference(lengths: Sequence[int], max_len: int) -> list[int]:
    """Best fit decreasing (BFD), the definition the fast paths reproduce.

    1. Items are taken by decreasing length; equal lengths by increasing index.
    2. Each item goes into the open pack with the *smallest* remaining capacity that still fits it. Among
       packs with that same remaining capacity, the one whose load changed most recently (last got an
       item) wins. When no pack fits, a new pack opens.
    3. Packs are numbered by their first item in input order (the pack holding item 0 is pack 0, the
       pack of the first item not in pack 0 is pack 1, ...), and inside a pack items keep input order.

    The tie rule of step 2 does not change the number of packs (packs with equal remaining capacity are
    interchangeable for the items that follow); it only fixes which items share a pack, so that the
    result is deterministic.

    Args:
        lengths: N item lengths, each in ``[1, max_len]``.
        max_len: capacity of a pack.

    Returns:
        The pack id of each item (N ints), numbered as in step 3.
    """
    for item, length in enumerate(lengths):
        if not 1 <= length <= max_len:
            raise ValueError(f"lengths[{item}] = {length} is outside [1, max_len={max_len}]")
    remaining: list[int] = []  # per pack, in order of opening
    last_change: list[int] = []  # step at which each pack last got an item
    pack_of = [0] * len(lengths)
    by_decreasing_length = sorted(range(len(lengths)), key=lambda item: (-lengths[item], item))
    for step, item in enumerate(by_decreasing_length):
        length = lengths[item]
        fitting = [pack for pack in range(len(remaining)) if remaining[pack] >= length]
        if fitting:
            pack = min(fitting, key=lambda p: (remaining[p], -last_change[p]))
        else:
            pack = len(remaining)
            remaining.append(max_len)
            last_change.append(step)
        remaining[pack] -= length
        last_change[pack] = step
        pack_of[item] = pack
    return _number_packs_by_first_item(pack_of)


def window_best_fit_reference(lengths: Sequence[int], max_len: int, window: int) -> list[int]:
    """Best fit decreasing inside consecutive windows of ``window`` items; packs never span windows.

    Items ``[0, window)`` are packed by :func:`best_fit_decreasing_reference`, then items
    ``[window, 2 * window)`` into new packs, and so on; the packs of a window come after those of the
    windows before it. ``window >= N`` gives plain BFD.

    Returns:
        The pack id of each item (N ints), packs numbered by their first item in input order.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    pack_ids: list[int] = []
    num_packs = 0
    for start in range(0, len(lengths), window):
        local = best_fit_decreasing_reference(lengths[start : start + window], max_len)
        pack_ids += [num_packs + pack for pack in local]
        num_packs += max(local) + 1
    return pack_ids


FILL_WEIGHT = 2.0


def fill_in_order_reference(
    lengths: Sequence[int],
    max_len: int,
    window: int,
    rows: Sequence[Sequence[float]] | None = None,
    *,
    fill_weight: float = FILL_WEIGHT,
    min_distance: float = 0.0,
    metric: str = "l2",
    keep_apart: int = 0,
) -> list[int]:
    """Next fit in input order, each pack topped up from the items ahead of it (``"fill_in_order"``).

    1. A pack opens with the first unplaced item ``s``.
    2. While the next unplaced item (in input order) fits the pack's room, it joins (next fit).
    3. Then, while some candidate fits, the best one joins; the candidates are the unplaced items at
       positions ``[s, s + window)``. Without ``rows``: the longest, ties to the
       earliest. With ``rows`` (one embedding per item): the highest
       ``score = mean cosine similarity to the pack's items + fill_weight * length / room``, ties to the
       earliest; with ``min_distance > 0``, a candidate closer than ``min_distance`` to an item of the
       pack (``metric``: ``"l2"``, or ``"cosine"`` for ``1 - cos``) joins only when no other fits.
    4. The pack closes when no candidate fits; the next opens with the first unplaced item.

    Packs are numbered in opening order, which is the order of their first items. An item that joins in
    step 3 lies within ``window`` positions of the pack's first item; ``window=1`` gives next fit.

    With ``keep_apart = K >= 1`` (needs ``rows``; "close" means closer than ``min_distance``):

    - in step 2, an item close to an item of the pack is passed over (it stays unplaced and the next
      fit goes on with the item after it), up to ``K`` items per pack; the ``K + 1``-th close item joins
      anyway (a forced join: the one way two close items end up in one pack);
    - in step 3, a close candidate never joins.

    A passed-over item is placed at the latest when it is the first unplaced item, which happens within
    ``K`` packs: it is held back, never dropped. ``window=1`` with ``keep_apart`` is next fit that holds
    close items back.

    The arithmetic of step 3 is that of the C++ op, operation by operation, so that both give the same
    packs: rows as float32 values in double arithmetic, dot products as four partial sums over
    ``d % 4`` combined as ``(s0 + s1) + (s2 + s3)`` (:func:`_dot4`), norms ``sqrt(dot4(x, x))``, the
    pack's sum of ``x / |x|`` accumulated item by item in join order; similarity
    ``dot4(x, sum) / |x| / k`` for a pack of ``k`` items.

    Args:
        lengths: N item lengths, each in ``[1, max_len]``.
        max_len: capacity of a pack.
        window: candidates per pack (``>= 1``).
        rows: N rows of D floats (float32 values), each finite and non-zero; None for the length-only rule.
        fill_weight, min_distance, metric: see step 3 (used with ``rows`` only).
        keep_apart: items passed over per pack in step 2 (see above); 0: off.

    Returns:
        The pack id of each item (N ints), numbered in opening order.
    """
    import math

    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if metric not in ("l2", "cosine"):
        raise ValueError(f"metric must be 'l2' or 'cosine', got {metric!r}")
    if keep_apart < 0:
        raise ValueError(f"keep_apart must be >= 0, got {keep_apart}")
    if keep_apart and rows is None:
        raise ValueError("keep_apart needs rows (the distances are between them)")
    n = len(lengths)
    for item, length in enumerate(lengths):
        if not 1 <= length <= max_len:
            raise ValueError(f"lengths[{item}] = {length} is outside [1, max_len={max_len}]")
    if rows is not None:
        rows = [[float(v) for v in row] for row in rows]
        if len(rows) != n:
            raise ValueError(f"rows has {len(rows)} rows for {n} items")
        norms = [math.sqrt(_dot4(row, row)) for row in rows]
        if not all(math.isfinite(v) and v > 0 for v in norms):
            raise ValueError("every row must be finite and non-zero")

    def distance(a: int, b: int) -> float:
        if metric == "cosine":
            return 1.0 - _dot4(rows[a], rows[b]) / norms[a] / norms[b]
        return math.sqrt(sum4([(x - y) * (x - y) for x, y in zip(rows[a], rows[b])]))

    pack_of = [-1] * n
    num_packs = 0
    for s in range(n):
        if pack_of[s] >= 0:
            continue
        pack = num_packs
        num_packs += 1
        end = min(n, s + window)
        members = [s]
        pack_of[s] = pack
        room = max_len - lengths[s]
        held = 0  # items passed over by this pack's next fit (keep_apart)
        for q in range(s + 1, n):  # 2. next fit over the unplaced items, in order
            if pack_of[q] >= 0:
                continue
            if lengths[q] > room:
                break
            if held < keep_apart and any(distance(q, m) < min_distance for m in members):
                held += 1
                continue
            members.append(q)
            pack_of[q] = pack
            room -= lengths[q]
        while True:  # 3. top up
            fitting = [q for q in range(s + 1, end) if pack_of[q] < 0 and lengths[q] <= room]
            if not fitting:
                break
            if rows is None:
                best = max(fitting, key=lambda q: (lengths[q], -q))
            else:
                unit_sum = [0.0] * len(rows[s])
                for m in members:
                    for d, value in enumerate(rows[m]):
                        unit_sum[d] += value / norms[m]
                scores = {
                    q: _dot4(rows[q], unit_sum) / norms[q] / float(len(members))
                    + fill_weight * (float(lengths[q]) / float(room))
                    for q in fitting
                }
                far = [
                    q
                    for q in fitting
                    if min_distance <= 0 or all(distance(q, m) >= min_distance for m in members)
                ]
                if keep_apart and not far:
                    break  # only close candidates fit: they never join
                best = max(far or fitting, key=lambda q: (scores[q], -q))
            members.append(best)
            pack_of[best] = pack
            room -= lengths[best]
    return pack_of


def sum4(values: Sequence[float]) -> float:
    """Sum of ``values`` as four partial sums over ``index % 4``, combined ``(s0 + s1) + (s2 + s3)``."""
    partial = [0.0, 0.0, 0.0, 0.0]
    for index, value in enumerate(values):
        partial[index % 4] += value
    return (partial[0] + partial[1]) + (partial[2] + partial[3])


def _dot4(a: Sequence[float], b: Sequence[float]) -> float:
    return sum4([x * y for x, y in zip(a, b)])


def _number_packs_by_first_item(pack_of: list[int]) -> list[int]:
    new_id: dict[int, int] = {}
    for pack in pack_of:
        new_id.setdefault(pack, len(new_id))
    return [new_id[pack] for pack in pack_of]


def stream_reference(lengths: Sequence[int], max_len: int) -> dict:
    """The paper's packer: concatenate the samples in order and cut the stream every ``max_len`` tokens.

    A sample that crosses a cut becomes several pieces (one per pack it touches); samples may be longer
    than ``max_len``. Every pack but the last holds exactly ``max_len`` tokens.

    Args:
        lengths: N sample lengths, each >= 1.
        max_len: capacity of a pack.

    Returns:
        A dict of lists, one entry per piece in pack order: ``pack_id``, ``item`` (index into ``lengths``),
        ``offset`` (first token of the piece within its sample) and ``length``.
    """
    out = {"pack_id": [], "item": [], "offset": [], "length": []}
    pack, used = 0, 0
    for item, length in enumerate(lengths):
        if length < 1:
            raise ValueError(f"lengths[{item}] = {length} is not positive")
        offset = 0
        while offset < length:
            if used == max_len:
                pack, used = pack + 1, 0
            take = min(length - offset, max_len - used)
            out["pack_id"].append(pack)
            out["item"].append(item)
            out["offset"].append(offset)
            out["length"].append(take)
            used += take
            offset += take
    return out


STRATEGY_NAMES = ("next_fit", "stream", "window_best_fit", "bfd", "fill_in_order")


def pack_lengths_reference(
    lengths: Sequence[int],
    max_len: int,
    *,
    strategy: str = "next_fit",
    overlong: str = "error",
    window: int = 1024,
    embeddings: Sequence[Sequence[float]] | None = None,
    min_distance: float | None = None,
    metric: str = "l2",
    keep_apart: int = 0,
) -> dict:
    """Reference of :func:`tfp_kernels.packing.pack_lengths`.

    The over-long policy runs first (:func:`expand_overlong_reference`). With ``"stream"`` and
    ``overlong="split"`` the over-long samples stay whole at that point: the stream cuts them where the
    packs end (so their pieces need not start at multiples of ``max_len``); ``num_split`` still counts them.
    The other strategies pack the pieces; their pieces inside a pack keep input order. ``"fill_in_order"``
    gives each piece the row of its sample in ``embeddings`` (N rows of float32 values, or None).
    ``keep_apart`` (``"fill_in_order"``, or ``"next_fit"``: then ``"fill_in_order"`` with ``window=1``) is
    that of :func:`fill_in_order_reference`.

    Returns:
        A dict with the fields of :class:`~tfp_kernels.packing.Packing` as Python lists / ints:
        ``pack_id``, ``sample_index``, ``offset``, ``length``, ``pack_offsets``, ``dropped_index``,
        ``sample_lengths``, ``num_packs``, ``num_truncated``, ``num_dropped``, ``num_split``.
    """
    if strategy not in STRATEGY_NAMES:
        raise ValueError(f"strategy must be one of {STRATEGY_NAMES}, got {strategy!r}")
    if strategy == "stream" and overlong == "split":  # whole samples; the stream cuts them
        result = expand_overlong_reference(lengths, max_len=max(lengths, default=1), overlong="error")
        result["num_split"] = sum(1 for length in lengths if length > max_len)
    else:
        result = expand_overlong_reference(lengths, max_len, overlong)
    piece_lengths = result["length"]
    if strategy == "next_fit" and keep_apart:
        strategy, window = "fill_in_order", 1
    if strategy == "next_fit":
        pack_ids, order = next_fit_pack_ids_reference(piece_lengths, max_len), None
    elif strategy == "bfd":
        pack_ids = best_fit_decreasing_reference(piece_lengths, max_len)
        order = sorted(range(len(pack_ids)), key=lambda piece: (pack_ids[piece], piece))
    elif strategy == "window_best_fit":
        pack_ids = window_best_fit_reference(piece_lengths, max_len, window)
        order = sorted(range(len(pack_ids)), key=lambda piece: (pack_ids[piece], piece))
    elif strategy == "fill_in_order":
        rows = None if embeddings is None else [embeddings[sample] for sample in result["sample_index"]]
        pack_ids = fill_in_order_reference(
            piece_lengths,
            max_len,
            window,
            rows,
            min_distance=min_distance or 0.0,
            metric=metric,
            keep_apart=keep_apart,
        )
        order = sorted(range(len(pack_ids)), key=lambda piece: (pack_ids[piece], piece))
    else:  # stream
        streamed = stream_reference(piece_lengths, max_len)
        pieces = streamed["item"]
        result["sample_index"] = [result["sample_index"][p] for p in pieces]
        result["offset"] = [result["offset"][p] + o for p, o in zip(pieces, streamed["offset"])]
        result["length"] = streamed["length"]
        pack_ids, order = streamed["pack_id"], None
    if order is not None:
        for field in ("sample_index", "offset", "length"):
            result[field] = [result[field][piece] for piece in order]
        pack_ids = [pack_ids[piece] for piece in order]
    result.update(_pack_fields(pack_ids, result["length"]), sample_lengths=list(lengths))
    return result


def _pack_fields(pack_ids: list[int], piece_lengths: list[int]) -> dict:
    num_packs = pack_ids[-1] + 1 if pack_ids else 0
    pack_offsets = [0] * (num_packs + 1)
    for pack, length in zip(pack_ids, piece_lengths):
        pack_offsets[pack + 1] += length
    for pack in range(num_packs):
        pack_offsets[pack + 1] += pack_offsets[pack]
    return {"pack_id": pack_ids, "pack_offsets": pack_offsets, "num_packs": num_packs}


def select_packs_reference(packing: dict, packs: Sequence[int]) -> dict:
    """The packs ``packs`` of a packing (a dict as returned by :func:`pack_lengths_reference`), in that order.

    Pack ``packs[j]`` becomes pack ``j``; its pieces keep their order. The per-sample fields
    (``sample_lengths``, ``dropped_index``, the counts) are those of the whole packing.
    """
    out = {key: value for key, value in packing.items() if key not in _PIECE_FIELDS}
    for field in _PIECE_FIELDS:
        out[field] = []
    for new_pack, old_pack in enumerate(packs):
        if not 0 <= old_pack < packing["num_packs"]:
            raise ValueError(f"packs holds {old_pack}, outside [0, {packing['num_packs']})")
        for piece, pack in enumerate(packing["pack_id"]):
            if pack == old_pack:
                out["pack_id"].append(new_pack)
                for field in ("sample_index", "offset", "length"):
                    out[field].append(packing[field][piece])
    out.update(_pack_fields(out["pack_id"], out["length"]))
    return out


_PIECE_FIELDS = ("pack_id", "sample_index", "offset", "length")
