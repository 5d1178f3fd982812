"""Plain-Python references for bin packing: the test oracle.

Loops over Python ints, no torch, written for clarity only (about a microsecond per sample). The fast
paths (:mod:`tfp_kernels.packing.binpack`, the C++/CUDA op ``torch.ops.tfp_kernels.next_fit_pack_ids``
and :func:`tfp_kernels.packing.next_fit.next_fit_pack_ids_torch`) must agree with these exactly.
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


def pack_lengths_reference(lengths: Sequence[int], max_len: int, *, overlong: str = "error") -> dict:
    """Reference of :func:`tfp_kernels.packing.pack_lengths` with ``strategy="next_fit"``.

    Returns:
        A dict with the fields of :class:`~tfp_kernels.packing.Packing` as Python lists / ints:
        ``pack_id``, ``sample_index``, ``offset``, ``length``, ``pack_offsets``, ``dropped_index``,
        ``num_packs``, ``num_truncated``, ``num_dropped``, ``num_split``.
    """
    result = expand_overlong_reference(lengths, max_len, overlong)
    pack_ids = next_fit_pack_ids_reference(result["length"], max_len)
    num_packs = pack_ids[-1] + 1 if pack_ids else 0
    pack_offsets = [0] * (num_packs + 1)
    for pack, length in zip(pack_ids, result["length"]):
        pack_offsets[pack + 1] += length
    for pack in range(num_packs):
        pack_offsets[pack + 1] += pack_offsets[pack]
    result.update(pack_id=pack_ids, pack_offsets=pack_offsets, num_packs=num_packs)
    return result
