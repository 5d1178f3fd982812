"""Exact-duplicate rows, grouped: :func:`duplicate_groups`. The walk lists one band list per group (its members have
identical distances to everything, so the rule always takes the group's lowest unvisited member)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class DuplicateGroups(NamedTuple):
    """Exact-duplicate rows, as the C++ walk takes them (host tensors).

    group_of: (N,) int32 group of each node; offsets: (U + 1,) int64; members: (N,) int64, the nodes of group
    ``g`` in increasing order at ``offsets[g]:offsets[g + 1]``; representatives: (U,) int64, each group's
    lowest node.
    """

    group_of: torch.Tensor
    offsets: torch.Tensor
    members: torch.Tensor
    representatives: torch.Tensor


def duplicate_groups(rows: torch.Tensor) -> DuplicateGroups | None:
    """Groups of equal rows of ``rows`` (N, D) (any device: the sort runs there), or None when all rows are
    distinct; the groups are returned as host tensors."""
    unique, inverse, counts = torch.unique(rows, dim=0, return_inverse=True, return_counts=True)
    num_groups = unique.shape[0]
    if num_groups == rows.shape[0]:
        return None
    inverse, counts = inverse.cpu(), counts.cpu()
    members = torch.argsort(inverse, stable=True)
    offsets = torch.zeros(num_groups + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=offsets[1:])
    return DuplicateGroups(
        inverse.to(torch.int32).contiguous(),
        offsets,
        members.contiguous(),
        members.index_select(0, offsets[:-1]),
    )
