"""Fused Triton kernel of the exact fallback scan: one pass over the unvisited rows for ``last`` and its window.

The walk's fallback (:func:`~tfp_kernels.order.scan.exact_pick`) needs, among the unvisited nodes ``u``, the
nearest one to ``last`` that is at distance ``>= t`` from every window node (``last`` included). The kernel
reads each unvisited row once (through the index list: the rows are never gathered into a copy) and
computes, in IEEE float32, its squared distances to the ``W`` query rows (``last`` first, then the other
window nodes): ``s2 = |x_u|^2 + |q|^2 - 2 x_u.q``. It writes ``s2`` to ``last`` and a status per row:

- ``2`` (surely valid): every ``s2 >= upper_w`` (``upper_w = t^2 + slack_w``, the float32 error bound of
  :func:`~tfp_kernels.order.band_topk.squared_distance_error_coef`), so every exact distance is ``>= t``;
- ``0`` (surely invalid): some ``s2 < lower_w`` (``t^2 - slack_w``), so some exact distance is ``< t``;
- ``1``: undecided in float32.

:func:`triton_exact_pick` then settles the pick exactly: the best surely-valid row bounds the answer, and
only rows whose float32 distance to ``last`` is within twice the error bound of it are recomputed in float64
(few rows), with the rule of the reference. Without the rejection cap only (with a cap, the caller uses
:func:`~tfp_kernels.order.scan.exact_pick`).

The pass is bandwidth-bound; the ordering runs it over float16 copies of the rows (``half``: each row
divided by a power of two into float16's normal range, :func:`~tfp_kernels.order.float16_rows.half_rows`),
half the bytes of float32, with the wider bound of :func:`~tfp_kernels.order.host_scan.half_scan_slack`,
and with ``tensor_cores``: the query rows scaled alike and split as float16 hi + lo, two exact products per
chunk on tensor cores instead of IEEE float32 multiply-adds over query rows padded to 16.
"""

from __future__ import annotations

import torch

from .band_tiles_triton import HAVE_TRITON
from .band_topk import band_bounds
from .distance import ieee_fp32_matmul, pair_distances
from .threshold import squared_threshold

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _masked_scan_kernel(
        out_s2_ptr,
        out_status_ptr,
        x_ptr,
        stride_xn,
        stride_xd,
        sq_norms_ptr,
        rows_ptr,
        n_rows,
        visited_ptr,
        query_ptr,
        lower_ptr,
        upper_ptr,
        n_query,
        dim,
        xh_ptr,
        stride_hn,
        stride_hd,
        scale_ptr,
        BLOCK_U: tl.constexpr,
        BLOCK_W: tl.constexpr,
        BLOCK_D: tl.constexpr,
        HAS_VISITED: tl.constexpr,
        HALF_ROWS: tl.constexpr,
        TENSOR_CORES: tl.constexpr,
        best_ptr,
        HAS_BEST: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK_U + tl.arange(0, BLOCK_U)
        in_range = offs < n_rows
        rows = tl.load(rows_ptr + offs, mask=in_range, other=0).to(tl.int64)
        row_ok = in_range
        if HAS_VISITED:  # listed rows visited since the list was made: never read, never picked
            row_ok = in_range & (tl.load(visited_ptr + rows, mask=in_range, other=1) == 0)
        w = tl.arange(0, BLOCK_W)
        w_ok = w < n_query
        queries = tl.load(query_ptr + w, mask=w_ok, other=0).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        acc = tl.zeros((BLOCK_U, BLOCK_W), tl.float32)
        if TENSOR_CORES:  # the query rows get the scanned rows' scaling (powers of two)
            query_scale = tl.load(scale_ptr + queries, mask=w_ok, other=1.0)
            query_multiplier = 1.0 / query_scale  # (exact)
        for d0 in range(0, dim, BLOCK_D):
            d_ok = (d0 + offs_d) < dim
            if TENSOR_CORES:
                # float16 rows times the query rows split as float16 hi + lo (scaled: x / scale): two exact
                # products per chunk on tensor cores, lo first, in a fresh accumulator added to acc in float32
                # (half_scan_error_coef's tensor_core_chunk = BLOCK_D). (acc is added to a dot whose
                # accumulator is not a zero tile: Triton folds `dot(a, b, 0) + acc` into one accumulator.)
                a = tl.load(
                    xh_ptr + rows[:, None] * stride_hn + (d0 + offs_d)[None, :] * stride_hd,
                    mask=row_ok[:, None] & d_ok[None, :],
                    other=0.0,
                )
                q = tl.load(
                    x_ptr + queries[None, :] * stride_xn + (d0 + offs_d)[:, None] * stride_xd,
                    mask=w_ok[None, :] & d_ok[:, None],
                    other=0.0,
                ) * query_multiplier[None, :]
                q_hi = q.to(tl.float16)
                q_lo = (q - q_hi.to(tl.float32)).to(tl.float16)
                part = tl.dot(a, q_lo)
                part = tl.dot(a, q_hi, part)
                acc += part
            elif HALF_ROWS:  # the scanned rows as float16 / scale (half the bytes), exact in float32
                a = tl.load(
                    xh_ptr + rows[:, None] * stride_hn + (d0 + offs_d)[None, :] * stride_hd,
                    mask=row_ok[:, None] & d_ok[None, :],
                    other=0.0,
                ).to(tl.float32)
            else:
                a = tl.load(
                    x_ptr + rows[:, None] * stride_xn + (d0 + offs_d)[None, :] * stride_xd,
                    mask=row_ok[:, None] & d_ok[None, :],
                    other=0.0,
                )
            if not TENSOR_CORES:
                b = tl.load(
                    x_ptr + queries[None, :] * stride_xn + (d0 + offs_d)[:, None] * stride_xd,
                    mask=w_ok[None, :] & d_ok[:, None],
                    other=0.0,
                )
                acc = tl.dot(a, b, acc, input_precision="ieee")
        if HALF_ROWS:
            acc = acc * tl.load(scale_ptr + rows, mask=row_ok, other=1.0)[:, None]
        if TENSOR_CORES:
            acc = acc * query_scale[None, :]
        row_norm = tl.load(sq_norms_ptr + rows, mask=row_ok, other=0.0)
        query_norm = tl.load(sq_norms_ptr + queries, mask=w_ok, other=0.0)
        s2 = tl.maximum(row_norm[:, None] + query_norm[None, :] - 2.0 * acc, 0.0)
        lower = tl.load(lower_ptr + w, mask=w_ok, other=0.0)
        upper = tl.load(upper_ptr + w, mask=w_ok, other=0.0)
        below = tl.sum((w_ok[None, :] & (s2 < lower[None, :])).to(tl.int32), axis=1)
        unsure = tl.sum((w_ok[None, :] & (s2 < upper[None, :])).to(tl.int32), axis=1)
        status = tl.where(row_ok & (below == 0), tl.where(unsure > 0, 1, 2), 0).to(tl.int8)
        s2_last = tl.where(row_ok, tl.sum(tl.where(w[None, :] == 0, s2, 0.0), axis=1), float("inf"))
        tl.store(out_s2_ptr + offs, s2_last, mask=in_range)
        tl.store(out_status_ptr + offs, status, mask=in_range)
        if HAS_BEST:  # the least s2_last of a surely valid row (>= 0: its float32 bits order like its value)
            sure_min = tl.min(tl.where(status == 2, s2_last, float("inf")), axis=0)
            tl.atomic_min(best_ptr, sure_min.to(tl.int32, bitcast=True))

    @triton.jit
    def _settle_kernel(
        prog_d_ptr,
        prog_node_ptr,
        count_ptr,
        s2_ptr,
        status_ptr,
        rows_ptr,
        n_rows,
        best_ptr,
        threshold_ptr,
        slack_ptr,
        x_ptr,
        stride_xn,
        stride_xd,
        query_ptr,
        n_query,
        dim,
        COSINE: tl.constexpr,
        BLOCK_U: tl.constexpr,
        BLOCK_W: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # the rows a fused scan could not decide near its answer (undecided or surely valid, s2_last within
        # twice the bound of the best surely valid row), settled with float64 distances to the W queries; per
        # program the nearest valid one (ties: lowest node)
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK_U + tl.arange(0, BLOCK_U)
        in_range = offs < n_rows
        s2 = tl.load(s2_ptr + offs, mask=in_range, other=float("inf")).to(tl.float64)
        status = tl.load(status_ptr + offs, mask=in_range, other=0)
        best = tl.load(best_ptr).to(tl.float32, bitcast=True).to(tl.float64)
        threshold = tl.load(threshold_ptr)
        two_slack = 2.0 * tl.load(slack_ptr + tl.load(query_ptr))  # last's bound, twice
        limit = tl.where(best < float("inf"), best + two_slack, float("inf"))
        cand = in_range & (status >= 1) & (s2 <= limit)
        n_cand = tl.sum(cand.to(tl.int32), axis=0)
        d_best = tl.full((), float("inf"), tl.float64)
        node_best = tl.full((), 0x7FFFFFFFFFFFFFFF, tl.int64)
        if n_cand > 0:
            tl.atomic_add(count_ptr, n_cand.to(tl.int64))
            rows = tl.load(rows_ptr + offs, mask=cand, other=0).to(tl.int64)
            w = tl.arange(0, BLOCK_W)
            w_ok = w < n_query
            queries = tl.load(query_ptr + w, mask=w_ok, other=0).to(tl.int64)
            offs_d = tl.arange(0, BLOCK_D)
            acc = tl.zeros((BLOCK_U, BLOCK_W), tl.float64)
            for d0 in range(0, dim, BLOCK_D):
                d_ok = (d0 + offs_d) < dim
                a = tl.load(x_ptr + rows[:, None] * stride_xn + (d0 + offs_d)[None, :] * stride_xd,
                            mask=cand[:, None] & d_ok[None, :], other=0.0)
                q = tl.load(x_ptr + queries[:, None] * stride_xn + (d0 + offs_d)[None, :] * stride_xd,
                            mask=w_ok[:, None] & d_ok[None, :], other=0.0)
                diff = a[:, None, :] - q[None, :, :]
                acc += tl.sum(diff * diff, axis=2)
            d = tl.sqrt(acc)  # the l2 distance (float64: the correctly rounded sqrt.rn.f64, as torch.cdist's)
            if COSINE:
                d = 0.5 * (d * d)  # 1 - cos of unit rows, as distance._finish
            too_close = tl.sum((w_ok[None, :] & (d < threshold)).to(tl.int32), axis=1)
            valid = cand & (too_close == 0)
            d_last = tl.sum(tl.where(w[None, :] == 0, d, 0.0), axis=1)
            key = tl.where(valid, d_last, float("inf"))
            d_best = tl.min(key, axis=0)
            node_best = tl.min(tl.where(valid & (key == d_best), rows, 0x7FFFFFFFFFFFFFFF), axis=0)
        tl.store(prog_d_ptr + pid, d_best)
        tl.store(prog_node_ptr + pid, node_best)

    @triton.jit
    def _settle_reduce_kernel(out_ptr, prog_d_ptr, prog_node_ptr, n_prog, count_ptr, BLOCK: tl.constexpr):
        # one program: the nearest valid node over the settle programs' answers (ties: lowest node) ->
        # out = [found, node, settled rows]
        offs = tl.arange(0, BLOCK)
        d_best = tl.full((BLOCK,), float("inf"), tl.float64)
        node_best = tl.full((BLOCK,), 0x7FFFFFFFFFFFFFFF, tl.int64)
        for p0 in range(0, n_prog, BLOCK):
            ok = (p0 + offs) < n_prog
            d = tl.load(prog_d_ptr + p0 + offs, mask=ok, other=float("inf"))
            node = tl.load(prog_node_ptr + p0 + offs, mask=ok, other=0x7FFFFFFFFFFFFFFF)
            better = (d < d_best) | ((d == d_best) & (node < node_best))
            d_best = tl.where(better, d, d_best)
            node_best = tl.where(better, node, node_best)
        d_min = tl.min(d_best, axis=0)
        node_min = tl.min(tl.where(d_best == d_min, node_best, 0x7FFFFFFFFFFFFFFF), axis=0)
        found = d_min < float("inf")
        tl.store(out_ptr, found.to(tl.int64))
        tl.store(out_ptr + 1, tl.where(found, node_min, -1))
        tl.store(out_ptr + 2, tl.load(count_ptr))


#: Largest window the kernel takes (query rows padded to a power of two >= 16 for ``tl.dot``).
MAX_SCAN_WINDOW = 64
#: Entries per chunk of the scan (BLOCK_D): with ``tensor_cores``, the chunk of its error bound
#: (:func:`~tfp_kernels.order.host_scan.half_scan_error_coef`'s ``tensor_core_chunk``).
SCAN_CHUNK = 32


def masked_scan_triton(
    x32: torch.Tensor,
    sq_norms: torch.Tensor,
    rows: torch.Tensor,
    queries: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
    visited: torch.Tensor | None = None,
    half: tuple[torch.Tensor, torch.Tensor] | None = None,
    tensor_cores: bool = False,
    best: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared float32 distances of ``rows`` to ``queries[0]`` and their status against all queries.

    Args:
        x32: (N, D) float32 prepared rows, CUDA (or CPU under ``TRITON_INTERPRET=1``).
        sq_norms: (N,) float32 squared norms of ``x32``.
        rows: (U,) int64 node indices to scan (the unvisited nodes), U >= 1.
        queries: (W,) int64 node indices, ``last`` first; 1 <= W <= :data:`MAX_SCAN_WINDOW`.
        lower, upper: (W,) float32 squared-domain bounds ``t^2 -/+ slack`` of each query.
        visited: None, or (N,) bool: listed rows marked visited are skipped (status 0, ``s2_last`` +inf), so
            that a list of unvisited nodes can serve several scans.
        half: None, or ``(rows16, scale)`` of :func:`~tfp_kernels.order.float16_rows.half_rows` (same device):
            the scanned rows are read as float16 (half the bytes of this bandwidth-bound pass) against the
            float32 query rows; ``lower``/``upper`` must then come from
            :func:`~tfp_kernels.order.host_scan.half_scan_slack` with ``float32_norms=True``.
        tensor_cores: with ``half``: the products on tensor cores, the query rows split as float16 hi + lo
            (scaled as the rows), two exact products per chunk of :data:`SCAN_CHUNK` entries summed in a fresh
            accumulator; the bounds then from ``half_scan_slack(..., float32_norms=True,
            tensor_core_chunk=SCAN_CHUNK)``. Without it, IEEE float32 products on the CUDA cores, the query
            rows padded to 16 columns (``tl.dot``'s least): 4x the multiply-adds of a window of 4.
        best: None, or a (1,) int32 tensor on the device holding the bits of a float32 (``+inf`` to start):
            lowered (atomically) to the least ``s2_last`` of a surely valid row, for :func:`settle_pick`.

    Returns:
        ``s2_last`` (U,) float32 and ``status`` (U,) int8 (0 surely invalid, 1 undecided, 2 surely valid),
        on the device of ``x32``.
    """
    if not HAVE_TRITON:  # pragma: no cover - exercised only without triton
        raise RuntimeError("masked_scan_triton needs Triton")
    n_rows, n_query = rows.numel(), queries.numel()
    if not 1 <= n_query <= MAX_SCAN_WINDOW:
        raise ValueError(f"masked_scan_triton: 1 <= W <= {MAX_SCAN_WINDOW} query rows, got {n_query}")
    if tensor_cores and half is None:
        raise ValueError("masked_scan_triton: tensor_cores needs the float16 rows (half)")
    out_s2 = torch.empty(n_rows, dtype=torch.float32, device=x32.device)
    out_status = torch.empty(n_rows, dtype=torch.int8, device=x32.device)
    if n_rows == 0:
        return out_s2, out_status
    block_w = max(16, triton.next_power_of_2(n_query))
    block_u = 128
    block_d = SCAN_CHUNK
    grid = (triton.cdiv(n_rows, block_u),)
    _masked_scan_kernel[grid](
        out_s2,
        out_status,
        x32,
        x32.stride(0),
        x32.stride(1),
        sq_norms,
        rows.contiguous(),
        n_rows,
        rows if visited is None else visited.contiguous().view(torch.uint8),
        queries.contiguous(),
        lower.float().contiguous(),
        upper.float().contiguous(),
        n_query,
        x32.shape[1],
        x32 if half is None else half[0],
        x32.stride(0) if half is None else half[0].stride(0),
        x32.stride(1) if half is None else half[0].stride(1),
        sq_norms if half is None else half[1].float().contiguous(),
        BLOCK_U=block_u,
        BLOCK_W=block_w,
        BLOCK_D=block_d,
        HAS_VISITED=visited is not None,
        HALF_ROWS=half is not None,
        TENSOR_CORES=bool(tensor_cores),
        best_ptr=out_s2 if best is None else best,
        HAS_BEST=best is not None,
    )
    return out_s2, out_status


def masked_scan_torch(
    x32: torch.Tensor,
    sq_norms: torch.Tensor,
    rows: torch.Tensor,
    queries: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
    visited: torch.Tensor | None = None,
    half: tuple[torch.Tensor, torch.Tensor] | None = None,
    tensor_cores: bool = False,
    best: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch version of :func:`masked_scan_triton` (same arguments and results; float32 matrix products
    may sum in another order, so values near a bound can get another status — both are within the bound).
    ``tensor_cores``: the products of the Triton kernel's tensor-core path, the query rows split as float16
    hi + lo, each part's product summed in float32 here. ``best``: lowered as the kernel does."""
    with ieee_fp32_matmul():
        if half is None:
            dots = x32.index_select(0, rows) @ x32.index_select(0, queries).T
        else:
            rows16, scale = half
            q = x32.index_select(0, queries)
            if tensor_cores:
                q_scale = scale.float().index_select(0, queries)
                q = q / q_scale[:, None]  # (exact: powers of two)
                q_hi = q.half().float()
                q_lo = (q - q_hi).half().float()
                a = rows16.index_select(0, rows).float()
                dots = (a @ q_lo.T + a @ q_hi.T) * q_scale[None, :]
            else:
                dots = rows16.index_select(0, rows).float() @ q.T
            dots = dots * scale.float().index_select(0, rows)[:, None]
    s2 = sq_norms.index_select(0, rows)[:, None] + sq_norms.index_select(0, queries)[None, :] - 2.0 * dots
    s2 = s2.clamp_(min=0)
    below = (s2 < lower.float()[None, :]).any(dim=1)
    unsure = (s2 < upper.float()[None, :]).any(dim=1)
    status = torch.where(below, 0, torch.where(unsure, 1, 2)).to(torch.int8)
    s2_last = s2[:, 0].contiguous()
    if visited is not None:
        skip = visited.index_select(0, rows)
        status.masked_fill_(skip, 0)
        s2_last.masked_fill_(skip, torch.inf)
    if best is not None:
        sure = torch.where(status == 2, s2_last, torch.inf).min() if s2_last.numel() else s2_last.new_tensor(torch.inf)
        best.copy_(torch.minimum(best, sure.view(1).view(torch.int32)))
    return s2_last, status


#: float32 +inf as int32 bits: the start of :func:`masked_scan_triton`'s ``best``.
_INF_BITS = 0x7F800000
#: Rows per program of the settle kernel (each a (rows, W, chunk) float64 block of differences).
_SETTLE_ROWS = 32


def settle_pick(
    x64: torch.Tensor,
    s2_last: torch.Tensor,
    status: torch.Tensor,
    unvisited: torch.Tensor,
    queries: torch.Tensor,
    best: torch.Tensor,
    slack: torch.Tensor,
    threshold: torch.Tensor,
    *,
    metric: str,
) -> tuple[bool, int, int]:
    """The exact pick of a fused scan, settled on the device in two Triton launches and one host read.

    The rows that can be the answer (undecided or surely valid, ``s2_last`` within twice the bound of the best
    surely valid row; all undecided rows when none is surely valid) get float64 distances to every query row
    (``|x_u - x_q|`` summed in float64 and rounded once by the square root, as ``torch.cdist``; ``1 - cos`` as
    :func:`~tfp_kernels.order.distance.pair_distances`), and the nearest valid one by (distance, node) is
    returned. The same rows and the same rule as :func:`triton_exact_pick`'s torch settling, which gathers
    every candidate row once per query and takes a dozen launches and two host syncs.

    Args:
        x64: (N, D) float64 prepared rows; s2_last, status: (U,) of :func:`masked_scan_triton` for
            ``unvisited`` (U,) int64 and ``queries`` (W,) int64 (``last`` first); best: its (1,) int32 ``best``.
        slack: (N,) float64 the scan's bounds (``last``'s, doubled, sets how far from the best surely valid row
            a row can be the answer); threshold: (1,) float64 on the device, the threshold in the metric.

    Returns:
        ``(found, node, settled)``: whether a valid row exists, the node (-1 if not), the rows settled.
    """
    n_rows, n_query = unvisited.numel(), queries.numel()
    block_w = triton.next_power_of_2(n_query)
    block_d = max(1, min(32, 2048 // (_SETTLE_ROWS * block_w)))
    grid = triton.cdiv(n_rows, _SETTLE_ROWS)
    prog_d = torch.empty(grid, dtype=torch.float64, device=x64.device)
    prog_node = torch.empty(grid, dtype=torch.int64, device=x64.device)
    out = torch.zeros(4, dtype=torch.int64, device=x64.device)  # found, node, settled rows; [3] the count
    _settle_kernel[(grid,)](
        prog_d, prog_node, out[3:], s2_last, status, unvisited, n_rows, best, threshold, slack, x64, x64.stride(0),
        x64.stride(1), queries, n_query, x64.shape[1], COSINE=metric == "cosine", BLOCK_U=_SETTLE_ROWS,
        BLOCK_W=block_w, BLOCK_D=block_d,
    )
    _settle_reduce_kernel[(1,)](out, prog_d, prog_node, grid, out[3:], BLOCK=1024)
    found, node, settled, _ = out.tolist()
    return bool(found), int(node), int(settled)


def _exact_metric(x64: torch.Tensor, rows: torch.Tensor, node: int, metric: str) -> torch.Tensor:
    # the reference's float64 values: the cdist kernel of distance.distances_from, one pair per batch
    return pair_distances(x64, rows, torch.full_like(rows, node), metric)


def triton_exact_pick(
    x64: torch.Tensor,
    x32: torch.Tensor,
    sq_norms: torch.Tensor,
    slack: torch.Tensor,
    unvisited: torch.Tensor,
    last: int,
    window_nodes: list[int],
    *,
    threshold: float,
    metric: str,
    scan=masked_scan_triton,
    visited: torch.Tensor | None = None,
    half: tuple[torch.Tensor, torch.Tensor] | None = None,
    tally: list[int] | None = None,
    tensor_cores: bool = False,
    fused_settle: bool = False,
    bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> int:
    """The node the TFP rule (without the rejection cap) takes after ``last``, exactly, from one fused scan.

    Args:
        x64: (N, D) float64 prepared rows; x32: the same in float32; sq_norms: (N,) float32 ``|x32_i|^2``.
        slack: (N,) float64, ``slack[i]`` bounds ``|s2_fp32 - s2_exact|`` for every pair (i, j) (with ``half``:
            the bound of the float16 pass, :func:`~tfp_kernels.order.host_scan.half_scan_slack`).
        unvisited: (U,) int64 nodes in ascending order, same device: the unvisited nodes, or a superset of
            them when ``visited`` (N,) bool is given (listed nodes marked there are skipped).
        last, window_nodes: the newest path node and the other window nodes (older first or any order).
        threshold, metric: the TFP rule.
        scan: the scan implementation (:func:`masked_scan_triton` or :func:`masked_scan_torch`).
        visited: see ``unvisited``.
        half: None, or the float16 rows and scales read by the scan (see :func:`masked_scan_triton`).
        tally: None, or a one-element list: the rows settled in float64 (those the pass could not decide near
            the answer) are added to ``tally[0]`` (no extra device sync: their count is read anyway).
        tensor_cores: the scan's products (see :func:`masked_scan_triton`; ``slack`` must match).
        fused_settle: settle the candidates with :func:`settle_pick` (Triton kernels) instead of torch
            gathers.
        bounds: None, or ``band_bounds(t^2, slack)`` of every node, computed once by the caller (each scan
            then selects its queries' instead of rounding them anew).

    Returns:
        The node index (Python int): the same as :func:`~tfp_kernels.order.scan.exact_pick` with
        ``max_rejections=None``.
    """
    device = x64.device
    # (non-blocking from the host: a blocking copy would wait for the device's queue; one sync per scan is
    # enough, where the candidates are read)
    queries = torch.tensor([last, *window_nodes], dtype=torch.int64).to(device, non_blocking=True)
    t2 = squared_threshold(threshold, metric)
    q_slack = slack.index_select(0, queries)
    if bounds is None:
        lower, upper = band_bounds(t2, q_slack)
    else:
        lower, upper = (b.index_select(0, queries) for b in bounds)
    two_slack = 2.0 * q_slack[0]
    if fused_settle:
        best = torch.full((1,), _INF_BITS, dtype=torch.int32, device=device)
        s2_last, status = scan(x32, sq_norms, unvisited, queries, lower, upper, visited, half, tensor_cores,
                               best=best)
        found, node, settled = settle_pick(x64, s2_last, status, unvisited, queries, best, slack,
                                           x64.new_full((1,), threshold), metric=metric)
        if tally is not None:
            tally[0] += settled
        if found:
            return node
    else:
        s2_last, status = scan(x32, sq_norms, unvisited, queries, lower, upper, visited, half, tensor_cores)
        # everything below stays on the device up to one nonzero and one final read (each a host sync: on a
        # GPU they, not the arithmetic, set the cost of a scan)
        best_sure = torch.where(status == 2, s2_last, torch.inf).min()
        # the answer is valid and exactly no farther than the best surely valid row (all undecided rows when
        # no row is surely valid)
        limit = torch.where(torch.isfinite(best_sure), best_sure + two_slack, torch.inf)
        cand = unvisited[(status >= 1) & (s2_last <= limit)]
        if tally is not None:
            tally[0] += cand.numel()
        if cand.numel():
            w = queries.numel()
            # exact distances of every candidate to last and the window nodes, in one batch of pairs
            d = pair_distances(x64, cand.repeat_interleave(w), queries.repeat(cand.numel()), metric).view(-1, w)
            valid = (d >= threshold).all(dim=1)
            # first valid in the order (distance, index): cand is ascending, argmin takes the first minimum
            node = cand[torch.where(valid, d[:, 0], torch.inf).argmin()]
            found, node = torch.stack([valid.any().long(), node]).tolist()
            if found:
                return int(node)
    # no valid node anywhere: c_0, the nearest unvisited node (ties by index)
    cand = unvisited[s2_last <= s2_last.min() + two_slack]
    d_last = _exact_metric(x64, cand, last, metric)
    return int(cand[d_last.argmin()])
