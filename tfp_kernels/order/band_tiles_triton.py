"""Triton pieces shared by the band-list kernels: the row-block kernel (:mod:`~tfp_kernels.order.band_topk_triton`)
and the block-pair kernel (:mod:`~tfp_kernels.order.band_pairs_triton`).

Device functions (``@triton.jit``): :func:`tile_s2` (a tile of squared distances), :func:`append_candidates`,
:func:`merge_candidates`, :func:`list_cutoff` and :func:`store_lists` (each row's candidates and its sorted list
of K keys); host checks of a launch: :func:`check_split_chunk`, :func:`candidate_slots`. :data:`HAVE_TRITON`:
whether Triton imports here.
"""

from __future__ import annotations

from .band_topk import MIN_ACC_CHUNK

try:  # Triton is optional at import time (CPU-only torch builds do not ship it)
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised only without triton
    HAVE_TRITON = False

#: Longest chunk of products summed in one tensor-core accumulator with split inputs (BLOCK_D of every launch
#: setting): the ``acc_chunk`` of their error bound, :func:`~tfp_kernels.order.band_topk.squared_distance_error_coef`.
ACC_CHUNK = 64


if HAVE_TRITON:

    @triton.jit
    def tile_s2(
        x_ptr, x_lo_ptr, scale_ptr, stride_xn, stride_xd, a_desc, b_desc, a_lo_desc, b_lo_desc, sq_norms_ptr,
        rows64, row_ok, row_norm, row_scale, row0, cols, col_ok, col0, dim, opaque_zero,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        SPLIT: tl.constexpr, SCALED: tl.constexpr, DESCRIPTORS: tl.constexpr, STACKED: tl.constexpr,
    ):
        """(BLOCK_M, BLOCK_N) float32 squared distances ``max(|a|^2 + |b|^2 - 2 a.b, 0)`` of the rows ``rows64``
        (int64, valid where ``row_ok``; squared norms ``row_norm``, scales ``row_scale`` when ``SCALED``) against
        the columns ``cols`` (int32, valid where ``col_ok``; padding columns get an infinite norm: never close,
        never in the band). ``row0`` / ``col0``: the tiles' first row and column (``DESCRIPTORS`` loads);
        ``opaque_zero``: a float32 zero that Triton cannot prove constant (``STACKED``)."""
        offs_d = tl.arange(0, BLOCK_D)
        if STACKED:  # x holds, per BLOCK_D chunk, [lo | hi] (band_topk_triton's _stacked_rows): one product of 4 BLOCK_D entries
            offs_s = tl.arange(0, 4 * BLOCK_D)
            a_cols = (offs_s // (2 * BLOCK_D)) * BLOCK_D + offs_s % BLOCK_D  # the row tile [lo, lo, hi, hi]
            b_cols = offs_s % (2 * BLOCK_D)  # the column tile [lo; hi; lo; hi]
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for d0 in range(0, dim, BLOCK_D):
            if STACKED:
                # the products lo.lo' + lo.hi' + hi.lo' + hi.hi' of the chunk, in that order (small terms first,
                # the main one last, as the three dots below), as one tensor-core product: one wait per chunk
                # instead of one per product; chunks padded with zeros past D. (The zero is opaque: `dot(a, b, 0)
                # + acc` would be folded into one accumulator across the chunks, and the error bound needs a
                # fresh one per chunk.)
                a = tl.load(x_ptr + rows64[:, None] * stride_xn + (2 * d0 + a_cols)[None, :] * stride_xd,
                            mask=row_ok[:, None], other=0.0)
                b = tl.load(
                    x_ptr + cols.to(tl.int64)[None, :] * stride_xn + (2 * d0 + b_cols)[:, None] * stride_xd,
                    mask=col_ok[None, :], other=0.0)
                acc += tl.dot(a, b, tl.zeros((BLOCK_M, BLOCK_N), tl.float32) + opaque_zero)
            elif DESCRIPTORS:  # tensor-memory-accelerator tiles; rows and entries past the end read as 0
                a = a_desc.load([row0, d0])
                b = tl.trans(b_desc.load([col0, d0]))
                if SPLIT:
                    a_lo = a_lo_desc.load([row0, d0])
                    b_lo = tl.trans(b_lo_desc.load([col0, d0]))
            else:
                d_ok = (d0 + offs_d) < dim
                a_off = rows64[:, None] * stride_xn + (d0 + offs_d)[None, :] * stride_xd
                b_off = cols.to(tl.int64)[None, :] * stride_xn + (d0 + offs_d)[:, None] * stride_xd
                a_ok = row_ok[:, None] & d_ok[None, :]
                b_ok = col_ok[None, :] & d_ok[:, None]
                a = tl.load(x_ptr + a_off, mask=a_ok, other=0.0)
                b = tl.load(x_ptr + b_off, mask=b_ok, other=0.0)
                if SPLIT:
                    a_lo = tl.load(x_lo_ptr + a_off, mask=a_ok, other=0.0)
                    b_lo = tl.load(x_lo_ptr + b_off, mask=b_ok, other=0.0)
            if SPLIT and not STACKED:
                # rows as hi + lo: hi.hi' + hi.lo' + lo.hi' (lo.lo' is below the error bound), in a fresh
                # accumulator per BLOCK_D chunk, cross terms first, added to acc in float32: the accumulation
                # error grows with BLOCK_D, not with D (squared_distance_error_coef's acc_chunk). (acc is added to
                # a dot whose accumulator is not a zero tile: Triton folds `dot(a, b, 0) + acc` back into one
                # accumulator.)
                part = tl.dot(a, b_lo)
                part = tl.dot(a_lo, b, part)
                part = tl.dot(a, b, part)
                acc += part
            elif not STACKED:
                acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        col_norm = tl.load(sq_norms_ptr + cols, mask=col_ok, other=float("inf"))
        dot = acc
        if SCALED:  # two exact products by powers of two
            dot = acc * row_scale[:, None] * tl.load(scale_ptr + cols, mask=col_ok, other=1.0)[None, :]
        return tl.maximum(row_norm[:, None] + col_norm[None, :] - 2.0 * dot, 0.0)

    @triton.jit
    def merge_candidates(
        best_buf, cand_s2_buf, cand_col_buf, rows, count, K: tl.constexpr, BLOCK_M: tl.constexpr
    ):
        """Merge the ``count`` candidates of each row (their s2 and column at ``cand_*_buf[row, :count]``) into
        its sorted K best keys (``best_buf[row, :K]``); returns the new best (BLOCK_M, K) and stores it back.
        Self entries are dropped here."""
        offs_k = tl.arange(0, K)
        tl.debug_barrier()  # candidates stored by other threads of the program are visible
        best = tl.load(best_buf + offs_k[None, :])
        for c0 in range(0, tl.max(count, axis=0), K):  # a loop, not unrolled: one copy of the sorts to compile
            ok = (c0 + offs_k)[None, :] < count[:, None]
            s2 = tl.load(cand_s2_buf + c0 + offs_k[None, :], mask=ok, other=0.0)
            col = tl.load(cand_col_buf + c0 + offs_k[None, :], mask=ok, other=0)
            key = (s2.to(tl.int32, bitcast=True).to(tl.int64) << 32) | col.to(tl.int64)
            chunk = tl.where(ok & (col != rows[:, None]), key, 0x7FFFFFFFFFFFFFFF)
            best = tl.sort(tl.minimum(best, tl.sort(chunk, dim=1, descending=True)), dim=1)
        tl.store(best_buf + offs_k[None, :], best)
        tl.debug_barrier()  # every read of the slots is done before they are written again
        return best

    @triton.jit
    def list_cutoff(best):
        """The (cutoff, cutoff column) of sorted key lists ``best`` (BLOCK_M, K): the s2 and column of the K-th
        best key, or (+inf, -1) for a list not full yet."""
        worst = tl.max(best, axis=1)
        full = worst != 0x7FFFFFFFFFFFFFFF
        cutoff = tl.where(full, (worst >> 32).to(tl.int32).to(tl.float32, bitcast=True), float("inf"))
        return cutoff, tl.where(full, (worst & 0xFFFFFFFF).to(tl.int32), -1)

    @triton.jit
    def store_lists(best, rows64, row_ok, out_index_ptr, out_s2_ptr, K: tl.constexpr):
        """Write sorted key lists ``best`` (BLOCK_M, K) of the rows ``rows64`` (valid where ``row_ok``) as the
        (N, K) index (-1 padded) and s2 (+inf padded) outputs."""
        offs_k = tl.arange(0, K)
        found = best != 0x7FFFFFFFFFFFFFFF
        index = tl.where(found, (best & 0xFFFFFFFF).to(tl.int32), -1)
        s2 = tl.where(found, (best >> 32).to(tl.int32).to(tl.float32, bitcast=True), float("inf"))
        ok = row_ok[:, None] & (offs_k[None, :] < K)
        tl.store(out_index_ptr + rows64[:, None] * K + offs_k[None, :], index, mask=ok)
        tl.store(out_s2_ptr + rows64[:, None] * K + offs_k[None, :], s2, mask=ok)

    @triton.jit
    def append_candidates(s2, cols, lower, cutoff, cutoff_col, count, cand_s2_buf, cand_col_buf,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ANY_ORDER: tl.constexpr,
                          SINGLES: tl.constexpr):
        """Append the candidates of each row of the tile ``s2`` (BLOCK_M, BLOCK_N) (columns ``cols``): the entries
        at or above ``lower`` before the row's K-th best key ``(cutoff, cutoff_col)``, at slots ``count`` on of the
        rows' ``cand_*_buf`` ((BLOCK_M, 1) pointers). ``ANY_ORDER``: columns reach the rows in any order, so an
        entry tied with the cutoff's distance is compared by column (else they come in index order, after the
        cutoff's column: ``cutoff_col`` unused). Padding rows and columns must have ``s2 = +inf`` or ``lower =
        +inf``. Returns the new counts and the most candidates a row kept (a scalar).

        In a long sweep every tile holds some row's candidate (all 512 tiles of a 128-row block at N = 65,536,
        K = 64, clustered rows: the append runs at every tile, not rarely), but most rows keep none, and past a
        few thousand columns many tiles keep at most one per row (11% of the tiles at N = 65,536, K = 64; 37% at
        N = 262,144, K = 128). ``SINGLES``: such tiles take the row's one entry by two row reductions instead of
        a prefix sum and a scattered store per entry (the same candidates; compiled for sm_90 it spills more
        registers in the epilogue: a launch option until timed on a GPU)."""
        before = s2 < cutoff[:, None]
        if ANY_ORDER:
            before = before | ((s2 == cutoff[:, None]) & (cols[None, :] < cutoff_col[:, None]))
        keep = ((s2 >= lower[:, None]) & before).to(tl.int32)
        num_keep = tl.sum(keep, axis=1)
        most = tl.max(num_keep, axis=0)
        if most > (1 if SINGLES else 0):  # 32-bit stores only: no (BLOCK_M, BLOCK_N) int64 tile
            slot = count[:, None] + tl.cumsum(keep, axis=1) - keep
            tl.store(cand_s2_buf + slot, s2, mask=keep != 0)
            tl.store(cand_col_buf + slot, tl.broadcast_to(cols[None, :], (BLOCK_M, BLOCK_N)), mask=keep != 0)
        elif SINGLES and most == 1:  # the row's one entry (s2 >= 0: the kept value is the row's largest here)
            kept_s2 = tl.max(tl.where(keep != 0, s2, -1.0), axis=1)
            kept_col = tl.max(tl.where(keep != 0, cols[None, :], -1), axis=1)
            has = num_keep > 0
            tl.store(cand_s2_buf + count[:, None], kept_s2[:, None], mask=has[:, None])
            tl.store(cand_col_buf + count[:, None], kept_col[:, None], mask=has[:, None])
        return count + num_keep, most


def check_split_chunk(x_lo, block_d: int) -> None:
    """Split rows (``x_lo`` given) need chunks of ``block_d`` products within their error bound's accumulation
    chunk."""
    if x_lo is not None and not MIN_ACC_CHUNK <= block_d <= ACC_CHUNK:
        raise ValueError(f"split products need BLOCK_D in [{MIN_ACC_CHUNK}, {ACC_CHUNK}] (their error bound's "
                         f"accumulation chunk), got {block_d}")


def candidate_slots(config: dict, tile_cols: int, name: str, k_pad: int) -> int:
    """Candidate slots per row between merges: ``config``'s ``CAP`` (popped), a multiple of K at least a tile's
    ``tile_cols`` columns (``name`` in the error), default 4 tiles' worth rounded up to a multiple of K."""
    cap = config.pop("CAP", None) or triton.cdiv(max(4 * tile_cols, k_pad), k_pad) * k_pad
    if cap % k_pad or cap < tile_cols:
        raise ValueError(f"CAP must be a multiple of K = {k_pad} and at least {name}, got {cap}")
    return cap
