"""Where the threshold runs out: the walk's policies, and the count of forced steps.

The TFP rule takes the nearest unvisited node that lies at distance ``>= t`` from each of the last ``window``
path nodes (it is *valid*). A step where no unvisited node is valid is *forced*: the paper's rule then takes
the nearest node, ``c_0``, a near-duplicate of the window. On data where many records share one text (an SFT
set where 600 of 3,000 records have the instruction "Summarize the following text.") or one template, the walk
keeps taking other nodes while valid ones exist, and ends with hundreds of near-duplicates in a row: the packs it
hands over then hold more near-duplicate pairs than random order's.

Two policies (``policy=`` of :func:`~tfp_kernels.tfp_order`):

- ``"paper"``: the rule of the paper, unchanged (and what :func:`~tfp_kernels.tfp_order_reference` computes by
  default);
- ``"spread"``: the same rule, plus two decisions where the threshold runs out or is about to:

  1. *urgent groups*: the nodes fall into groups of near-duplicates (:func:`near_duplicate_groups`: each group's
     leader and the nodes closer than ``t`` to it; equal rows share a group). A group with ``m`` unvisited
     members among ``u`` unvisited nodes would need ``(m - 1) (window + 1) + 1`` positions to keep its members
     apart were they all closer than ``t`` to each other. When ``m >= 2`` and ``m (window + 1) >= u`` (``t > 0``),
     the group is urgent, and its lowest unvisited member is taken as soon as it is valid, ahead of the rule's
     pick (of several urgent groups with a valid lowest member: the one with the most unvisited members; ties in
     the rule's order ``(D[last, j], j)``). It becomes urgent with ``window`` positions to spare, and from then on
     it gets one member every ``window + 1`` steps wherever no other near-duplicate in the window holds it back:
     a group that the window can separate is not left to the end;
  2. *forced steps* take the unvisited node farthest from the window (largest ``min_p D[j, p]`` over the window's
     nodes ``p``; ties: lower index) instead of the nearest.

  Everything else is the paper's rule; with ``t = 0`` both policies give the same path. It takes no rejection
  cap (the cap takes nodes unchecked, which is what this policy avoids).

A step's node that lies closer than ``t`` to a window node is counted as a *forced step*
(:func:`count_forced_steps`): without the cap, these are exactly the steps where no unvisited node was valid,
under either policy; with the paper's cap they also include the steps where the cap took an invalid ``c_M``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .distance import BLOCK_ELEMENTS, pair_distances, prepare
from .inputs import prepare_rows

POLICIES = ("paper", "spread")


def check_policy(policy, max_rejections: int | None = None) -> str:
    """``policy`` checked: ``"paper"`` or ``"spread"``, the latter only without a rejection cap."""
    if not isinstance(policy, str) or policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if policy == "spread" and max_rejections is not None:
        raise ValueError(
            f"policy='spread' takes no rejection cap (got max_rejections={max_rejections}): the cap takes the "
            "(M+1)-th nearest node unchecked, which is what the policy keeps from happening; pass "
            "max_rejections=None, or policy='paper' for the paper's capped rule"
        )
    return policy


@dataclass(frozen=True)
class WalkPolicy:
    """A policy as the fast walks (single-process and sharded) apply it: the C++ walk's arguments, and the settling
    of the picks of the scans that run outside that walk.

    Attributes:
        name: ``"paper"`` or ``"spread"``.
        groups: the urgent groups' tables (:func:`urgent_group_tables`), or None (paper; or no duplicates; or t = 0).
        threshold, metric: of the walk.
    """

    name: str = "paper"
    groups: tuple[torch.Tensor, ...] | None = None
    threshold: float = 0.0
    metric: str = "l2"

    @property
    def op_args(self) -> tuple:
        """The op ``tfp_walk``'s ``policy`` and ``policy_groups``."""
        return self.name, self.groups

    def settle(self, node: int, x: torch.Tensor, window_nodes: list[int], unvisited, *,
               prepared: bool = True) -> tuple[int, bool]:
        """A scan's pick ``node`` (the rule's: ``c_0`` where no node is valid, or with the cap ``c_M``) under this
        policy, and whether the step is forced (the node taken lies closer than t to a window node): ``node``
        for "paper"; for "spread", ``node`` where it is valid, else the node farthest from the window
        (:func:`farthest_pick`; ``unvisited``: a callable giving its (U,) nodes, called only at forced steps)."""
        valid = is_valid(x, node, window_nodes, threshold=self.threshold, metric=self.metric, prepared=prepared)
        if valid or self.name != "spread":
            return node, not valid
        return farthest_pick(x, unvisited(), window_nodes, metric=self.metric, prepared=prepared), True


def walk_policy(policy: str, *, threshold: float, metric: str, n: int, groups) -> WalkPolicy:
    """The :class:`WalkPolicy` of a checked ``policy`` for a walk over ``n`` nodes.

    Args:
        groups: a callable giving the near-duplicate groups of the rows (:func:`near_duplicate_groups`:
            ``(group_of (N,), counts (G,))``, or None when no group has two members); called only for "spread" with
            ``threshold > 0`` and ``n > 2`` (below, no step has a choice that urgency could change).
    """
    tables = None
    if policy == "spread" and threshold > 0 and n > 2:
        found = groups()
        tables = None if found is None else urgent_group_tables(*found)
    return WalkPolicy(policy, tables, threshold, metric)


def urgent_group_tables(group_of: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """The groups of two or more equal rows, as the walk's urgent groups read them (op ``tfp_walk``'s
    ``policy_groups``), or None when every row is distinct.

    Args:
        group_of: (N,) integer group of each node (e.g. the ``inverse`` of ``torch.unique(rows, dim=0)``), any
            device; counts: (G,) the groups' sizes.

    Returns:
        host tensors ``group_of`` (N,) int32 (-1 for the nodes without a duplicate), ``offsets`` (G2 + 1,) int64,
        ``members`` (M,) int64: the G2 groups of two or more nodes numbered by decreasing size (ties: lower
        first member first), the members of group ``g`` in increasing order at ``offsets[g]:offsets[g + 1]``.
    """
    group_of, counts = group_of.cpu().long(), counts.cpu().long()
    multi = torch.nonzero(counts >= 2).flatten()
    if multi.numel() == 0:
        return None
    in_multi = counts[group_of] >= 2
    nodes = torch.nonzero(in_multi).flatten()  # increasing
    # rank the groups by (decreasing size, first member)
    first = torch.full((counts.numel(),), group_of.numel(), dtype=torch.int64)
    first.scatter_reduce_(0, group_of[nodes], nodes, reduce="amin")
    key = -counts[multi] * (group_of.numel() + 1) + first[multi]
    ranked = multi[torch.argsort(key)]
    rank_of = torch.full((counts.numel(),), -1, dtype=torch.int64)
    rank_of[ranked] = torch.arange(ranked.numel())
    new_group = rank_of[group_of]  # (N,), -1 outside the groups
    members = nodes[torch.argsort(new_group[nodes], stable=True)]
    offsets = torch.zeros(ranked.numel() + 1, dtype=torch.int64)
    torch.cumsum(counts[ranked], 0, out=offsets[1:])
    return new_group.to(torch.int32).contiguous(), offsets, members.contiguous()


def near_duplicate_groups(x: torch.Tensor, *, threshold: float, metric: str, prepared: bool = False,
                          alone: torch.Tensor | None = None, block_elements: int = BLOCK_ELEMENTS,
                          ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The ``"spread"`` policy's groups of near-duplicates: leaders in index order, each with the nodes closer than
    ``threshold`` to it.

    Node 0 leads the first group, which takes every node at exact distance ``< threshold`` from it; the lowest node
    not yet in a group leads the next, which takes every node not yet in a group closer than ``threshold`` to it;
    and so on. Equal rows always share a group (they are at the same distance from every leader). Distances are
    exact: a float64 product screens the pairs with a bound on its rounding, and the pairs the bound cannot decide
    are measured as explicit differences in float64 on the host (the same arithmetic on every device), with the
    reference's ``torch.cdist`` kernel (:func:`~tfp_kernels.order.distance.pair_distances`).

    Args:
        x: (N, D) float64 prepared rows (``prepared=True``, :func:`~tfp_kernels.order.distance.prepare`), or the
            embeddings themselves (any floating dtype); any device (the screening runs there).
        threshold: t, in the units of ``x``; metric: ``"l2"`` or ``"cosine"``.
        alone: (N,) bool, any device, or None: nodes known to have no other node closer than ``threshold`` (e.g.
            a band list that counts no row within its error bound of t); each is its own group, with no product
            computed for it. The groups are the same with or without it, as long as it is true.

    Returns:
        ``(group_of (N,) int64, counts (G,) int64)`` on the device of ``x``, groups numbered by their leaders; or
        None when ``threshold <= 0`` or no group has two members.
    """
    n = x.shape[0]
    if threshold <= 0 or n < 2:
        return None
    x = x if prepared else prepare(x, metric)
    sq = x.square().sum(dim=1)
    t2 = threshold * threshold if metric == "l2" else 2.0 * threshold
    # |s2 of the product - s2| <= (D + 4) eps (|a|^2 + |b|^2): the dot product's rounding, with room to spare
    coef = 8.0 * (x.shape[1] + 4) * torch.finfo(torch.float64).eps
    group_of = torch.full((n,), -1, dtype=torch.int64, device=x.device)
    if alone is not None:
        group_of[alone.to(x.device)] = -2  # (never free: numbered below)
    num = 0
    start = 0
    while start < n:
        free = torch.nonzero(group_of[start:] == -1).flatten() + start  # (U,) not in a group, increasing
        if free.numel() == 0:
            break
        cand = free[: max(1, min(free.numel(), block_elements // free.numel()))]  # the next leaders, maybe
        near = _near_pairs(x, sq, cand, free, t2, coef, threshold, metric)  # (C, U) bool
        taken = torch.zeros(free.numel(), dtype=torch.bool, device=x.device)
        for r in range(cand.numel()):
            if bool(taken[r]):  # (cand[r] == free[r]: joined an earlier leader of this block)
                continue
            members = near[r] & ~taken
            taken |= members
            group_of[free[members]] = num
            num += 1
        start = int(cand[-1]) + 1
    if alone is not None:  # each alone node its own group; then the groups numbered by their leaders again
        lone = torch.nonzero(group_of == -2).flatten()
        group_of[lone] = num + torch.arange(lone.numel(), device=x.device)
        num += lone.numel()
        leader = torch.full((num,), n, dtype=torch.int64, device=x.device)
        leader.scatter_reduce_(0, group_of, torch.arange(n, device=x.device), reduce="amin")
        rank = torch.empty_like(leader)
        rank[torch.argsort(leader)] = torch.arange(num, device=x.device)
        group_of = rank[group_of]
    counts = torch.bincount(group_of, minlength=num)
    return None if int(counts.max()) < 2 else (group_of, counts)


def _near_pairs(x, sq, rows, cols, t2: float, coef: float, threshold: float, metric: str) -> torch.Tensor:
    """(R, C) bool: whether node ``rows[i]`` lies at exact distance ``< threshold`` from node ``cols[j]``
    (:func:`near_duplicate_groups`)."""
    a, b = x.index_select(0, rows), x.index_select(0, cols)
    sa, sb = sq.index_select(0, rows)[:, None], sq.index_select(0, cols)[None, :]
    s2 = (sa + sb).addmm_(a, b.T, alpha=-2.0)
    bound = coef * (sa + sb) + 4.0 * torch.finfo(torch.float64).eps * t2
    near = s2 < t2 - bound
    unsure = torch.nonzero((s2 - t2).abs_() <= bound)
    if unsure.numel():
        # the undecided pairs' rows only, to the host (the same arithmetic on every device), measured with the
        # reference's kernel (as near_duplicate_groups_reference and the walks measure: a pair at exactly t falls
        # on the same side)
        u = unsure.shape[0]
        pair_rows = torch.cat([x.index_select(0, rows[unsure[:, 0]]), x.index_select(0, cols[unsure[:, 1]])]).cpu()
        d = pair_distances(pair_rows, torch.arange(u), torch.arange(u, 2 * u), metric)
        near[unsure[:, 0], unsure[:, 1]] = (d < threshold).to(near.device)
    return near


def _window_min(x: torch.Tensor, cols: torch.Tensor, window_nodes: torch.Tensor, metric: str,
                prepared: bool) -> torch.Tensor:
    """(C,) float64 exact distance from each of ``x[cols]`` to its nearest node of ``window_nodes``, in blocks
    (the reference's arithmetic: ``torch.cdist`` of explicit differences, float64)."""
    win = x.index_select(0, window_nodes)
    win = win.double() if prepared else prepare(win, metric)
    out = torch.empty(cols.numel(), dtype=torch.float64, device=x.device)
    block = max(1, BLOCK_ELEMENTS // max(1, x.shape[1]))
    for s in range(0, cols.numel(), block):
        rows = x.index_select(0, cols[s : s + block])
        rows = rows.double() if prepared else prepare(rows, metric)
        l2 = torch.cdist(rows, win, compute_mode="donot_use_mm_for_euclid_dist")
        d = l2 if metric == "l2" else 0.5 * l2.square()
        out[s : s + block] = d.min(dim=1).values
    return out


def farthest_pick(x: torch.Tensor, unvisited: torch.Tensor, window_nodes: list[int], *, metric: str,
                  prepared: bool = True) -> int:
    """The ``"spread"`` policy's pick at a forced step: the unvisited node farthest from the window.

    Args:
        x: (N, D) prepared rows in float64 (``prepared=True``, :func:`~tfp_kernels.order.distance.prepare`) or the
            embeddings themselves (``prepared=False``: each block of rows is prepared here, any floating dtype).
        unvisited: (U,) int64 unvisited nodes in increasing order, U >= 1, on the device of ``x``.
        window_nodes: the window's nodes (``last`` included).

    Returns:
        the node with the largest exact distance to its nearest window node; ties: the lower index.
    """
    win = torch.tensor(window_nodes, dtype=torch.int64, device=x.device)
    nearest = _window_min(x, unvisited, win, metric, prepared)
    return int(unvisited[int(torch.argmax(nearest))])  # (argmax: the first of equal maxima, the lowest node)


def is_valid(x: torch.Tensor, node: int, window_nodes: list[int], *, threshold: float, metric: str,
             prepared: bool = True) -> bool:
    """Whether ``node`` lies at exact distance ``>= threshold`` from every window node (``x`` as in
    :func:`farthest_pick`)."""
    win = torch.tensor(window_nodes, dtype=torch.int64, device=x.device)
    one = torch.tensor([node], dtype=torch.int64, device=x.device)
    return bool(_window_min(x, one, win, metric, prepared)[0] >= threshold)


class ForcedSteps:
    """The forced steps of a walk, as its scans find them (the band lists' picks are valid by construction):
    their count and the first of them (None while there is none)."""

    def __init__(self):
        self.count, self.first = 0, None

    def note(self, step: int, forced: bool = True) -> None:
        if forced:
            self.count += 1
            self.first = step if self.first is None else min(self.first, step)

    def add_walk_counter(self, counter: torch.Tensor) -> None:
        """Add those the C++ walk's own scans found: slots [4] and [5] of its (6,) counter (op ``tfp_walk``)."""
        count, first = int(counter[4]), int(counter[5])
        self.count += count
        if count:
            self.first = first if self.first is None else min(self.first, first)


def exact_pair_distances(embeddings: torch.Tensor, i: torch.Tensor, j: torch.Tensor, metric: str) -> torch.Tensor:
    """(P,) float64 exact distances ``D[i[k], j[k]]`` of the rows of ``embeddings`` (N, D) (any floating dtype and
    device; ``i``, ``j`` (P,) int64 on its device), in blocks: each block's rows prepared
    (:func:`~tfp_kernels.order.distance.prepare`), their explicit differences' norms in float64. (Not
    ``torch.cdist`` of (P, 1, D) batches as the reference's rows: the same values up to the summation order, at
    50x its speed.)"""
    out = torch.empty(i.numel(), dtype=torch.float64, device=embeddings.device)
    block = max(1, BLOCK_ELEMENTS // max(1, embeddings.shape[1]))
    for s in range(0, i.numel(), block):
        a = prepare(embeddings.index_select(0, i[s : s + block]), metric)
        b = prepare(embeddings.index_select(0, j[s : s + block]), metric)
        l2 = (a - b).square_().sum(dim=1).sqrt_()
        out[s : s + block] = l2 if metric == "l2" else 0.5 * l2.square()
    return out


def count_forced_steps(embeddings: torch.Tensor, path: torch.Tensor, *, threshold: float, window: int,
                       metric: str) -> tuple[int, int | None]:
    """Forced steps of a path: steps ``s`` whose node ``path[s]`` lies at exact distance ``< threshold`` from one
    of the window's nodes ``path[s - window : s]``.

    Without a rejection cap these are the steps where no unvisited node was at distance ``>= threshold`` from the
    window (the rule takes a valid node whenever one exists, under either policy); with the paper's cap, also
    the steps where the cap took an invalid node. Of any order (e.g. a random one: how often it puts a
    near-duplicate within ``window`` positions of a sample). O(N window D) exact float64 distances, in blocks.

    Args:
        embeddings: (N, D) floating, any device; path: (N,) integer permutation, any device.

    Returns:
        ``(num_forced_steps, first_forced_step)``: the count and the first such step (None when there is none).
    """
    path = path.to(embeddings.device, torch.int64)
    n = path.numel()
    if threshold <= 0:  # (no distance is below 0)
        return 0, None
    scaled = prepare_rows(embeddings, metric)  # rows scaled by 2**k (exact), and t with them: no underflow
    embeddings, threshold = scaled.rows, scaled.to_rows_units(threshold)
    too_close = torch.zeros(n, dtype=torch.bool, device=embeddings.device)
    for lag in range(1, min(window, n - 1) + 1):
        too_close[lag:] |= exact_pair_distances(embeddings, path[lag:], path[:-lag], metric) < threshold
    forced = torch.nonzero(too_close).flatten()
    return int(forced.numel()), (int(forced[0]) if forced.numel() else None)
