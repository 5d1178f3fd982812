"""Exact reference implementation of the TFP ordering (plain torch): the test oracle.

It implements docs/design.md's 'The rule' literally, step by step, with exact (difference-based, float64)
distances, and keeps memory at O(N * window): one row of distances per path node in the window,
never the N x N matrix. Time is O(N^2 * D). Every fast path is tested against it.
"""

from __future__ import annotations

import time

import torch

from . import _checks, inputs
from .distance import distances_from, prepare
from .policy import check_policy, near_duplicate_groups
from .stats import OrderStats
from .threshold import threshold_estimate


def _pick_next(
    d_last: torch.Tensor,
    valid: torch.Tensor,
    max_rejections: int | None,
) -> int:
    """Position (into the candidate list) of the node the TFP rule takes.

    Args:
        d_last: (U,) distances from the last path node to the unvisited nodes, in ascending node order.
        valid: (U,) bool, True where the node is >= t from every window node.
        max_rejections: the cap M, or None.
    """
    n_u = d_last.numel()
    capped = max_rejections is not None and n_u > max_rejections
    if bool(valid.any()):
        # The first valid candidate in the order (distance, index): argmin returns the first of equal
        # minima, i.e. the lowest node index, because candidates are in ascending node order.
        first_valid = int(torch.where(valid, d_last, torch.inf).argmin())
        if not capped:
            return first_valid
        dv = d_last[first_valid]
        ahead = d_last.lt(dv) | (d_last.eq(dv) & (torch.arange(n_u, device=d_last.device) < first_valid))
        if int(ahead.sum()) < max_rejections:
            return first_valid
    elif not capped:
        return int(d_last.argmin())  # no valid node and the cap cannot fire: c_0
    # The cap fires: c_M, the M-th candidate (0-based) in the order (distance, index).
    return int(torch.sort(d_last, stable=True).indices[max_rejections])


class _UrgentGroups:
    """The ``"spread"`` policy's urgent groups (:mod:`~tfp_kernels.order.policy`), in plain torch: the groups of
    near-duplicates (:func:`~tfp_kernels.order.policy.near_duplicate_groups`) and the unvisited members of each."""

    def __init__(self, group_of: torch.Tensor, counts: torch.Tensor, start: int):
        self.group_of = group_of
        self.remaining = counts.clone()
        self.remaining[self.group_of[start]] -= 1

    def taken(self, node: torch.Tensor) -> None:
        self.remaining[self.group_of[node]] -= 1

    def pick(self, unvisited: torch.Tensor, d_last: torch.Tensor, valid: torch.Tensor, window: int) -> int | None:
        """Position (into ``unvisited``) of the urgent member the policy takes, or None.

        Urgent: groups with m >= 2 unvisited members and ``m (window + 1) >= u`` (u = ``unvisited.numel()``). Each
        group offers its lowest unvisited member; of the urgent groups whose offered member is valid, the one with
        the largest m, ties by ``(d_last, node)`` of that member, which is taken.
        """
        u = unvisited.numel()
        group = self.group_of[unvisited]  # (U,)
        m = self.remaining[group]  # (U,) unvisited members of each node's group
        first = torch.full_like(self.remaining, u).scatter_reduce_(
            0, group, torch.arange(u, device=unvisited.device), reduce="amin")
        lowest = first[group] == torch.arange(u, device=unvisited.device)  # the group's lowest unvisited member
        urgent = (m >= 2) & (m * (window + 1) >= u) & lowest & valid
        if not bool(urgent.any()):
            return None
        urgent &= m == m[urgent].max()
        return int(torch.where(urgent, d_last, torch.inf).argmin())  # (the first of equal minima: the lower node)


def near_duplicate_groups_reference(embeddings: torch.Tensor, *, threshold: float, metric: str = "l2"):
    """Plain-torch reference of :func:`~tfp_kernels.order.policy.near_duplicate_groups` (same arguments and result):
    the full (N, N) float64 distance matrix of explicit differences, and one leader at a time. O(N^2) memory."""
    n = embeddings.shape[0]
    if threshold <= 0 or n < 2:
        return None
    x = prepare(embeddings, metric)
    l2 = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")
    near = (l2 if metric == "l2" else 0.5 * l2.square()) < threshold
    group_of = torch.full((n,), -1, dtype=torch.int64, device=x.device)
    num = 0
    for leader in range(n):
        if group_of[leader] < 0:
            group_of[near[leader] & (group_of < 0)] = num
            num += 1
    counts = torch.bincount(group_of, minlength=num)
    return None if int(counts.max()) < 2 else (group_of, counts)


def _pick_farthest(rows: torch.Tensor, unvisited: torch.Tensor, slots: list[int]) -> int:
    """Position (into ``unvisited``) of the node farthest from the window: the largest min distance over the
    window's rows ``rows[slots]`` (distances to the unvisited nodes); ties: the lower node."""
    nearest = rows[slots][:, unvisited].min(dim=0).values
    return int(torch.argmax(nearest))  # (the first of equal maxima: unvisited is increasing)


def tfp_order_reference(
    embeddings: torch.Tensor,
    *,
    metric: str = "l2",
    quantile: float = 0.02,
    threshold: float | None = None,
    window: int = 4,
    max_rejections: int | None = None,
    start: int = 0,
    policy: str = "paper",
    return_stats: bool = False,
):
    """Threshold Filtering Packing order, computed exactly (docs/design.md, 'The rule').

    The path starts at ``start``. At each step, with ``last`` the newest path node, the unvisited
    nodes are listed by ascending ``D[last, j]`` (ties: lower index first) as ``c_0, c_1, ...``; ``c_k``
    is valid when ``D[c_k, p] >= t`` for each ``p`` among the last ``window`` path nodes (``last``
    included). The first valid ``c_k`` is taken. With a cap ``M = max_rejections``: if the first ``M``
    candidates are all invalid and a candidate ``c_M`` exists, ``c_M`` is taken unchecked (the paper's
    cap). If no candidate is valid (and the cap cannot fire), ``c_0`` is taken.

    ``policy="spread"`` (:mod:`~tfp_kernels.order.policy`; no cap) adds, at each step, before the rule: a group of
    near-duplicates (:func:`~tfp_kernels.order.policy.near_duplicate_groups`: the nodes closer than ``t`` to the
    group's leader; equal rows share a group) with ``m >= 2`` unvisited members among ``u`` unvisited nodes is
    *urgent* when ``m (window + 1) >= u`` and ``t > 0``; if the lowest unvisited member of an urgent group is valid,
    it is taken (of several such groups: the one with the largest ``m``; ties: the first of those members in the
    order ``(D[last, j], j)``). If no urgent member is valid and no candidate is valid, the node with the largest
    ``min_p D[j, p]`` over the window's nodes ``p`` is taken (ties: the lowest index) instead of ``c_0``.
    Otherwise it is the rule above.

    Distances are computed in float64 from explicit differences (:mod:`tfp_kernels.order.distance`);
    the threshold is compared in float64. The rows are first scaled by a power of two into a safe range, with
    the threshold (exact: the same comparisons; float64 rows at 1e-300 no longer underflow), detached, and
    ``window`` / ``max_rejections`` of ``N - 1`` or more are taken as ``N - 1`` (the same path; no (window x N)
    table): :mod:`~tfp_kernels.order.inputs`.

    Args:
        embeddings: (N, D), float16/bfloat16/float32/float64, CPU or CUDA; finite, N >= 1.
        metric: ``"l2"`` (the paper) or ``"cosine"`` (``1 - cos``).
        quantile: q in (0, 1) for the threshold when ``threshold`` is None (paper: 0.02).
        threshold: the distance threshold ``t`` (>= 0); None estimates it with
            :func:`~tfp_kernels.estimate_threshold` (``metric``, ``quantile``, default sampling).
        window: number of most recent path nodes a candidate must be ``>= t`` from (paper: 4).
        max_rejections: the cap ``M`` (paper: 10000), or None for no cap.
        start: first node of the path (paper: 0).
        policy: ``"paper"`` (default) or ``"spread"`` (see above).
        return_stats: also return an :class:`~tfp_kernels.OrderStats` (backend ``"reference"``) with the forced
            steps, counted in the walk: the steps whose node is closer than ``t`` to a node of the window.

    Returns:
        path: (N,) int64 on the device of ``embeddings``, a permutation of ``0..N-1``; with
        ``return_stats=True``, ``(path, stats)``.

    Examples::

        >>> import torch
        >>> from tfp_kernels.order.reference import tfp_order_reference
        >>> emb = torch.tensor([[0.0], [0.1], [1.0], [1.1], [5.0]])
        >>> tfp_order_reference(emb, threshold=0.5, window=2).tolist()
        [0, 2, 4, 1, 3]
    """
    metric = _checks.check_metric(metric)
    embeddings = _checks.check_embeddings(embeddings, metric=metric)
    quantile = _checks.check_quantile(quantile)
    threshold = _checks.check_threshold(threshold)
    n = embeddings.shape[0]
    window = inputs.check_window(window, n)
    max_rejections = inputs.check_max_rejections(max_rejections, n)
    policy = check_policy(policy, max_rejections)
    start = _checks.check_start(start, n)
    scaled = inputs.prepare_rows(embeddings, metric)  # detached, scaled by 2**k (exact; float64 distances stay normal)
    embeddings, given_threshold, threshold = scaled.rows, threshold, scaled.to_rows_units(threshold)
    t0 = time.perf_counter()
    source = "given"
    if threshold is None and n > 1:
        est = threshold_estimate(embeddings, metric=metric, quantile=quantile)  # (estimate_threshold's value)
        threshold, source = est.value, ("exact" if est.exact else "sampled")
    threshold = 0.0 if threshold is None else threshold
    t1 = time.perf_counter()
    path, forced = reference_walk(embeddings, metric=metric, threshold=threshold, window=window,
                                  max_rejections=max_rejections, start=start, policy=policy, return_forced=True)
    if not return_stats:
        return path
    forced_steps = torch.nonzero(forced).flatten()
    threshold = scaled.to_user_units(threshold) if given_threshold is None else given_threshold  # (user units)
    return path, OrderStats(
        threshold=threshold, threshold_source=source, backend="reference", num_nodes=n, time_threshold_s=t1 - t0,
        time_order_s=time.perf_counter() - t1, policy=policy,
        num_forced_steps=int(forced_steps.numel()),
        first_forced_step=int(forced_steps[0]) if forced_steps.numel() else None,
    )


def reference_walk(
    embeddings: torch.Tensor, *, metric: str, threshold: float, window: int, max_rejections: int | None, start: int,
    policy: str = "paper", return_forced: bool = False,
):
    """The walk of :func:`tfp_order_reference` on already validated arguments and a known threshold.

    Args:
        embeddings: (N, D) checked embeddings (N >= 1), CPU or CUDA.
        Others: as in :func:`tfp_order_reference`, validated; ``threshold`` a float.
        return_forced: also return (N,) bool on the device of ``embeddings``, True at the steps whose node the
            walk took although it is closer than ``t`` to a node of the window (no valid node was left, or the
            cap took an invalid one).

    Returns:
        path: (N,) int64 on the device of ``embeddings``; with ``return_forced``, ``(path, forced)``.
    """
    n = embeddings.shape[0]
    device = embeddings.device
    path = torch.empty(n, dtype=torch.long, device=device)
    path[0] = start
    forced = torch.zeros(n, dtype=torch.bool, device=device)
    if n == 1:
        return (path, forced) if return_forced else path
    x = prepare(embeddings, metric)
    spread = policy == "spread"
    found = near_duplicate_groups(embeddings, threshold=threshold, metric=metric) if spread else None
    urgent = None if found is None else _UrgentGroups(*found, start)  # (None: no group of two, or t = 0)
    # rows[s % window] holds D[path[s], j] for the nodes j still unvisited when path[s] was appended.
    rows = torch.empty(window, n, dtype=x.dtype, device=device)
    unvisited = torch.cat([torch.arange(start, device=device), torch.arange(start + 1, n, device=device)])
    rows[0, unvisited] = distances_from(x, path[:1], unvisited, metric)[0]
    for step in range(1, n):
        d_last = rows[(step - 1) % window, unvisited]
        valid = d_last >= threshold
        for back in range(2, min(window, step) + 1):
            valid &= rows[(step - back) % window, unvisited] >= threshold
        pos = None if urgent is None else urgent.pick(unvisited, d_last, valid, window)
        if pos is None and spread and not bool(valid.any()):
            pos = _pick_farthest(rows, unvisited, [(step - back) % window for back in range(1, min(window, step) + 1)])
        if pos is None:
            pos = _pick_next(d_last, valid, max_rejections)
        forced[step] = not bool(valid[pos])
        node = unvisited[pos]
        path[step] = node
        if urgent is not None:
            urgent.taken(node)
        unvisited = torch.cat([unvisited[:pos], unvisited[pos + 1 :]])
        if unvisited.numel():
            rows[step % window, unvisited] = distances_from(x, node.view(1), unvisited, metric)[0]
    return (path, forced) if return_forced else path
