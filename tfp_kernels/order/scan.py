"""Exact fallback scan of the TFP walk: the rule's next node among all unvisited nodes.

Used when the band list of ``last`` cannot prove the answer (its nodes were visited, or the answer
may lie beyond it, or the rejection cap may fire). The scan is exact (float64 distances from explicit
differences, as the reference) but touches few full rows: candidates are taken in the order of a
*lower bound* of their distance to ``last``, the distance between their projections on an
orthonormal basis (``||P^T (a - b)|| <= ||a - b||``; PCA of a sample of rows, r = 64 dims), and only
as many are checked exactly as needed to prove the pick.
"""

from __future__ import annotations

import torch

#: Dimensions of the projection used for lower bounds.
PROJECTION_DIM = 64
#: Rows sampled to compute the projection basis.
PROJECTION_SAMPLE = 1024
#: Relative safety factor applied to the float64 projected distances (rounding of ~1e-15 relative).
LB_SAFETY = 1.0 - 1e-12


def projection_basis(x64: torch.Tensor, *, dim: int = PROJECTION_DIM, sample: int = PROJECTION_SAMPLE,
                     seed: int = 0) -> torch.Tensor:
    """Orthonormal (D, r) basis of the top principal directions of a sample of rows (identity if D <= r).

    Args:
        x64: (N, D) float64 prepared rows.
    """
    n, d = x64.shape
    if d <= dim:
        return torch.eye(d, dtype=x64.dtype, device=x64.device)
    if x64.device.type == "cpu":
        # the small QR/SVD calls below are fastest on one thread; with several, LAPACK's threads can spin
        # against other busy threads (measured: 0.2 s per 256 x 72 QR on 2 loaded cores vs 1 ms on one)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return _projection_basis(x64, dim, sample, seed)
        finally:
            torch.set_num_threads(threads)
    return _projection_basis(x64, dim, sample, seed)


def _projection_basis(x64: torch.Tensor, dim: int, sample: int, seed: int) -> torch.Tensor:
    n, d = x64.shape
    if n <= dim:
        # few rows: an orthonormal basis of the span of their differences keeps every distance exactly
        # (and costs one small QR instead of a randomized SVD)
        q, _ = torch.linalg.qr((x64 - x64[:1]).T)
        return q
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randperm(n, generator=gen)[:sample].to(x64.device)
    sample_rows = x64.index_select(0, rows)
    sample_rows = sample_rows - sample_rows.mean(dim=0, keepdim=True)
    # top right singular vectors by a seeded randomized SVD (any orthonormal basis keeps the bound
    # valid; a better one only makes it tighter)
    with torch.random.fork_rng(devices=[x64.device] if x64.is_cuda else []):
        torch.manual_seed(seed)
        _, _, v = torch.svd_lowrank(sample_rows, q=min(d, dim + 8), niter=2)
    # re-orthonormalise in float64 so that the contraction bound holds to rounding
    q, _ = torch.linalg.qr(v[:, :dim])
    return q


def _metric(s2: torch.Tensor, metric: str) -> torch.Tensor:
    l2 = s2.sqrt()
    return l2 if metric == "l2" else 0.5 * l2.square()


def exact_pick(
    x64: torch.Tensor,
    y64: torch.Tensor,
    unvisited: torch.Tensor,
    last: int,
    window_nodes: list[int],
    *,
    threshold: float,
    max_rejections: int | None,
    metric: str,
    first_batch: int = 256,
) -> int:
    """The node the TFP rule takes after ``last``, computed exactly over the unvisited nodes.

    Args:
        x64: (N, D) float64 prepared rows (see :func:`~tfp_kernels.order.distance.prepare`).
        y64: (N, r) float64 projections ``x64 @ P`` of the rows on an orthonormal basis.
        unvisited: (U,) int64 indices of the unvisited nodes in ascending order, U >= 1, same device.
        last: the newest path node; ``window_nodes``: the other nodes of the window (older path nodes).
        threshold, max_rejections, metric: the TFP rule.
        first_batch: number of candidates checked exactly in the first round (then x4 per round).

    Returns:
        The node index (Python int).
    """
    n_u = unvisited.numel()
    capped = max_rejections is not None and n_u > max_rejections
    lb2 = (y64.index_select(0, unvisited) - y64[last]).square_().sum(dim=1).mul_(LB_SAFETY)
    batch = min(n_u, first_batch)
    while True:
        if batch >= n_u:
            cand = unvisited
            bound = torch.inf  # every node is a candidate: nothing lies outside
        else:
            vals, pos = torch.topk(lb2, batch + 1, largest=False, sorted=True)
            bound = float(vals[batch])  # lower bound of s2 for every node outside the batch
            cand = unvisited.index_select(0, pos[:batch])
        node = pick_among(x64, cand, bound, last, window_nodes, threshold=threshold,
                          max_rejections=max_rejections if capped else None, metric=metric,
                          nearest_if_none=not capped and batch >= n_u)
        if node is not None:
            return node
        batch = min(n_u, batch * 4)


def pick_among(
    x64: torch.Tensor,
    cand: torch.Tensor,
    bound: float,
    last: int,
    window_nodes: list[int],
    *,
    threshold: float,
    max_rejections: int | None,
    metric: str,
    nearest_if_none: bool = False,
) -> int | None:
    """The rule's pick after ``last`` when the candidates decide it, else None.

    Args:
        x64: (N, D) float64 prepared rows; cand: (C,) int64 unvisited nodes, among them every unvisited node
            whose squared distance to ``last`` lies below ``bound`` (a lower bound of the others' exact squared
            distances; ``inf``: every unvisited node), same device.
        max_rejections: the cap where it applies (more unvisited nodes than it), else None.
        nearest_if_none: the candidates are every unvisited node and no cap applies: with no valid one, ``c_0``.

    Returns:
        The first valid candidate in exact (distance, index) order, or with the cap ``c_M`` when the first M
        are all invalid, where that lies below ``bound`` (no node outside can precede it); else ``c_0`` with
        ``nearest_if_none``, None otherwise.
    """
    cand = cand.sort().values  # index order first, so that the stable sort below breaks ties by index
    rows = x64.index_select(0, cand)
    s2 = (rows - x64[last]).square_().sum(dim=1)
    order = torch.argsort(_metric(s2, metric), stable=True)
    cand, s2 = cand[order], s2[order]
    rows = rows.index_select(0, order)
    valid = _metric(s2, metric) >= threshold
    for p in window_nodes:
        valid &= _metric((rows - x64[p]).square_().sum(dim=1), metric) >= threshold
    # candidates in exact order whose distance is certainly below every outside node's: a prefix
    n_sure = int((s2 < bound).sum())
    valid_pos = torch.nonzero(valid).flatten()
    first_valid = int(valid_pos[0]) if valid_pos.numel() else None
    capped = max_rejections is not None
    limit = min(n_sure, max_rejections) if capped else n_sure
    if first_valid is not None and first_valid < limit:
        return int(cand[first_valid])
    if capped and n_sure > max_rejections:
        return int(cand[max_rejections])  # the first M candidates are all invalid: c_M
    return int(cand[0]) if nearest_if_none else None  # (nothing valid anywhere: c_0)
