"""Plain-Python first-fit-decreasing (FFD): the baseline a Python user would write, for the benchmarks only.

Items by decreasing length (ties: lower index first), each into the *first* (lowest-numbered) pack that
still has room, found with a max-segment-tree over the remaining capacity of the packs: O(N log N) Python
steps (~5 microseconds per item). Written here from the textbook definition; not part of the package
(the package's best-fit strategies live in tfp_kernels.packing).
"""

from __future__ import annotations

from collections.abc import Sequence


def first_fit_decreasing(lengths: Sequence[int], max_len: int) -> list[int]:
    """Pack id of every item under FFD (packs numbered in opening order).

    Args:
        lengths: N item lengths, each in ``[1, max_len]``.
        max_len: capacity of a pack.

    Returns:
        N pack ids.
    """
    n = len(lengths)
    size = 1
    while size < max(n, 1):
        size *= 2
    # leaves: remaining capacity of pack j (packs not opened yet are empty: max_len); inner nodes: max of children
    tree = [max_len] * (2 * size)
    pack_of = [0] * n
    for item in sorted(range(n), key=lambda i: -lengths[i]):
        length = lengths[item]
        node = 1
        while node < size:  # leftmost leaf with room for the item
            node = 2 * node if tree[2 * node] >= length else 2 * node + 1
        pack_of[item] = node - size
        tree[node] -= length
        node //= 2
        while node:
            left, right = tree[2 * node], tree[2 * node + 1]
            tree[node] = left if left >= right else right  # noqa: FURB136 (faster than max())
            node //= 2
    return pack_of
