"""Band top-k with each pair's product computed once: the Triton kernel over pairs of row blocks, in rounds.

The squared distances are symmetric, so the (N, N) products hold every pair twice. :mod:`band_topk_triton`'s
kernel streams all N columns past every row block (N^2 D products); this one computes each *unordered* pair
once (N^2 D / 2) and selects its value for both of its rows, as the CPU does block by block
(:func:`~tfp_kernels.order.band_topk._band_topk_pairs`). The difficulty on a GPU is ownership: a tile of
(rows of block I) x (rows of block J) updates the running lists of both blocks, and many programs run at once.

Schedule: the rows are cut into ``B`` *super blocks* of ``SUPER`` rows. Each launch is a *round* in which the
super blocks are matched in disjoint pairs (a round-robin tournament, :func:`pair_rounds`: ``B - 1`` rounds of
``B / 2`` pairs, ``B`` rounded up to even, plus one round of the ``(I, I)`` pairs), so that within a round every
row's list belongs to exactly one program and no atomics are needed; launches run in order, so one round
sees the lists the previous one left. A program computes its pair's ``(SUPER, SUPER)`` products tile by tile
(``BLOCK`` x ``BLOCK``, :func:`~tfp_kernels.order.band_tiles_triton.tile_s2`: the same products as the row-block
kernel, any input precision but the stacked and descriptor variants) and per tile

1. for the tile's rows (block I), as the row-block kernel: counts the entries below ``upper``, keeps the
   candidates (at or above ``lower`` and before the row's current K-th best entry) in the row's scratch;
2. for the tile's columns (block J; not in the tiles on the diagonal of an ``(I, I)`` pair, whose rows are
   its columns), the same on the transposed tile, with their state loaded from and stored back to memory.

A row's candidates are merged into its K best (``(float32 bits << 32) | column`` keys, sorted;
:func:`~tfp_kernels.order.band_tiles_triton.merge_candidates`) when its scratch could overflow, and once at the
end (:func:`_band_pairs_finish_kernel`).

Why this is exact: every unordered pair ``{i, j}``, ``i != j``, is in exactly one tile of one round, which
selects its value for ``i`` and for ``j``. Columns reach a row in no particular order here, so the filter
compares whole keys: an entry passes when its ``(s2, column)`` is below the row's current K-th best
``(cutoff, cutoff column)``; entries that failed it could never enter (the K-th best only decreases).

Memory: O(N K) plus a scratch per row of K int64 keys and CAP (s2, column) pairs, and four (N,) state
vectors (unlike the row-block kernel's scratch per program): at 10^6 rows, K = 64 (CAP = 512) 0.5 GB + 4.1 GB,
K = 128 (64-row tiles, CAP = 256) 1 GB + 2 GB. The lists equal those of the row-block kernel up to the
rounding of each product (the pair's one value stands for both of its rows: within the same error bound).
"""

from __future__ import annotations

import torch

from .band_tiles_triton import HAVE_TRITON, candidate_slots, check_split_chunk

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .band_tiles_triton import append_candidates, list_cutoff, merge_candidates, store_lists, tile_s2

    @triton.jit
    def _band_pairs_kernel(
        pairs_ptr,
        x_ptr, x_lo_ptr, scale_ptr, stride_xn, stride_xd,
        sq_norms_ptr, lower_ptr, upper_ptr,
        best_ptr, cand_s2_ptr, cand_col_ptr, count_ptr, cutoff_ptr, cutoff_col_ptr, close_ptr,
        n_rows, dim,
        K: tl.constexpr, CAP: tl.constexpr, SUPER: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
        INPUT_PRECISION: tl.constexpr, SPLIT: tl.constexpr, SCALED: tl.constexpr, SINGLES: tl.constexpr,
    ):
        pid = tl.program_id(0)
        first = tl.load(pairs_ptr + 2 * pid)
        second = tl.load(pairs_ptr + 2 * pid + 1)
        same = first == second
        offs = tl.arange(0, BLOCK)
        opaque_zero = n_rows.to(tl.float32) * 0.0  # (unused: no stacked products here)
        row_end = tl.minimum((first + 1) * SUPER, n_rows)
        col_end = tl.minimum((second + 1) * SUPER, n_rows)
        for row0 in range(first * SUPER, row_end, BLOCK):
            rows = row0 + offs
            row_ok = rows < n_rows
            rows64 = rows.to(tl.int64)
            # padding rows: an infinite norm (never close to, never a candidate of, a column); their own state
            # (the scratch has SUPER-padded rows) is never used
            row_norm = tl.load(sq_norms_ptr + rows, mask=row_ok, other=float("inf"))
            row_scale = row_norm  # (unused unless SCALED)
            if SCALED:  # rows stored as x / scale (powers of two)
                row_scale = tl.load(scale_ptr + rows, mask=row_ok, other=1.0)
            lower = tl.load(lower_ptr + rows, mask=row_ok, other=float("inf"))
            upper = tl.load(upper_ptr + rows, mask=row_ok, other=0.0)
            tl.debug_barrier()  # the rows' state as this program left it as columns of earlier tiles
            cutoff = tl.load(cutoff_ptr + rows64)
            cutoff_col = tl.load(cutoff_col_ptr + rows64)
            count = tl.load(count_ptr + rows64)
            close = tl.zeros((BLOCK,), tl.int32)
            cand_s2_rows = cand_s2_ptr + rows64[:, None] * CAP
            cand_col_rows = cand_col_ptr + rows64[:, None] * CAP
            col_start = tl.where(same, row0, second * SUPER)  # (I, I): the tiles on and above the diagonal
            for col0 in range(col_start, col_end, BLOCK):
                cols = col0 + offs
                col_ok = cols < n_rows
                cols64 = cols.to(tl.int64)
                s2 = tile_s2(
                    x_ptr, x_lo_ptr, scale_ptr, stride_xn, stride_xd, x_ptr, x_ptr, x_ptr, x_ptr, sq_norms_ptr,
                    rows64, row_ok, row_norm, row_scale, row0, cols, col_ok, col0, dim, opaque_zero,
                    BLOCK, BLOCK, BLOCK_D, INPUT_PRECISION, SPLIT, SCALED, False, False,
                )
                diagonal = col0 == row0  # (only in (I, I) pairs): its rows are its columns
                below = s2 < upper[:, None]
                if diagonal:
                    below = below & (cols[None, :] != rows[:, None])
                close += tl.sum(below.to(tl.int32), axis=1)
                count, _ = append_candidates(s2, cols, lower, cutoff, cutoff_col, count, cand_s2_rows, cand_col_rows,
                                             BLOCK, BLOCK, True, SINGLES)
                # the columns' side, on the transposed tile (nothing kept or counted on the diagonal)
                tl.debug_barrier()  # their state as the last tile of this program stored it
                col_lower = tl.load(lower_ptr + cols, mask=col_ok & ~diagonal, other=float("inf"))
                col_upper = tl.load(upper_ptr + cols, mask=col_ok & ~diagonal, other=0.0)
                col_cutoff = tl.load(cutoff_ptr + cols64)
                col_cutoff_col = tl.load(cutoff_col_ptr + cols64)
                col_count = tl.load(count_ptr + cols64)
                s2t = tl.trans(s2)
                col_close = tl.sum((s2t < col_upper[:, None]).to(tl.int32), axis=1)
                col_count, _ = append_candidates(s2t, rows, col_lower, col_cutoff, col_cutoff_col, col_count,
                                                 cand_s2_ptr + cols64[:, None] * CAP,
                                                 cand_col_ptr + cols64[:, None] * CAP, BLOCK, BLOCK, True,
                                                 SINGLES)
                # merge the scratch of the rows, then of the columns, that could overflow at the next tile (one
                # copy of the merge's sorts in the code: a loop over the two sides)
                if (tl.max(count, axis=0) > CAP - BLOCK) | (tl.max(col_count, axis=0) > CAP - BLOCK):
                    for side in range(2):
                        on_cols = side == 1
                        owners = tl.where(on_cols, cols, rows)
                        owners64 = owners.to(tl.int64)
                        owner_count = tl.where(on_cols, col_count, count)
                        if tl.max(owner_count, axis=0) > CAP - BLOCK:
                            best = merge_candidates(best_ptr + owners64[:, None] * K,
                                                    cand_s2_ptr + owners64[:, None] * CAP,
                                                    cand_col_ptr + owners64[:, None] * CAP, owners, owner_count,
                                                    K, BLOCK)
                            new_cutoff, new_cutoff_col = list_cutoff(best)
                            cutoff = tl.where(on_cols, cutoff, new_cutoff)
                            cutoff_col = tl.where(on_cols, cutoff_col, new_cutoff_col)
                            count = tl.where(on_cols, count, 0)
                            col_cutoff = tl.where(on_cols, new_cutoff, col_cutoff)
                            col_cutoff_col = tl.where(on_cols, new_cutoff_col, col_cutoff_col)
                            col_count = tl.where(on_cols, 0, col_count)
                # (not on the diagonal, whose columns are the rows: their state is the registers' until the row
                # block's end, and a store of the stale one there could land after that)
                off_diagonal = (cols >= 0) & ~diagonal
                tl.store(cutoff_ptr + cols64, col_cutoff, mask=off_diagonal)
                tl.store(cutoff_col_ptr + cols64, col_cutoff_col, mask=off_diagonal)
                tl.store(count_ptr + cols64, col_count, mask=off_diagonal)
                tl.store(close_ptr + cols64, tl.load(close_ptr + cols64) + col_close, mask=off_diagonal)
            tl.debug_barrier()  # (every read of the rows' state in memory is done)
            tl.store(cutoff_ptr + rows64, cutoff)
            tl.store(cutoff_col_ptr + rows64, cutoff_col)
            tl.store(count_ptr + rows64, count)
            tl.store(close_ptr + rows64, tl.load(close_ptr + rows64) + close)

    @triton.jit
    def _band_pairs_finish_kernel(
        out_index_ptr, out_s2_ptr, best_ptr, cand_s2_ptr, cand_col_ptr, count_ptr, n_rows,
        K: tl.constexpr, CAP: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """Merge each row's last candidates into its K best and write the lists."""
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        rows64 = rows.to(tl.int64)
        count = tl.load(count_ptr + rows64)
        best = merge_candidates(best_ptr + rows64[:, None] * K, cand_s2_ptr + rows64[:, None] * CAP,
                                cand_col_ptr + rows64[:, None] * CAP, rows, count, K, BLOCK)
        store_lists(best, rows64, rows < n_rows, out_index_ptr, out_s2_ptr, K)


def pair_rounds(num_blocks: int) -> list[torch.Tensor]:
    """The rounds of :func:`_band_pairs_kernel`: every unordered pair of ``num_blocks`` super blocks (and every
    block with itself) exactly once, no block twice in a round.

    Round 0 holds the ``(I, I)`` pairs; then the circle method: blocks ``0 .. M-2`` on a circle and ``M - 1``
    in its centre (``M``: ``num_blocks`` rounded up to even; with an odd count, block ``M - 1`` does not exist and
    its pairs are left out), round ``r`` pairs ``M - 1`` with ``r`` and ``(r + i) mod (M - 1)`` with
    ``(r - i) mod (M - 1)`` for ``i = 1 .. M/2 - 1``.

    Returns:
        a list of (P_r, 2) int32 CPU tensors, the pairs of each round (smaller block first).
    """
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
    blocks = torch.arange(num_blocks, dtype=torch.int32)
    rounds = [torch.stack([blocks, blocks], dim=1)]
    m = num_blocks + num_blocks % 2
    if m < 2 or num_blocks < 2:
        return rounds
    circle = m - 1
    i = torch.arange(1, m // 2)
    for r in range(circle):
        a = torch.cat([torch.tensor([r]), (r + i) % circle])
        b = torch.cat([torch.tensor([m - 1]), (r - i) % circle])
        keep = (a < num_blocks) & (b < num_blocks)
        pair = torch.stack([torch.minimum(a, b), torch.maximum(a, b)], dim=1)[keep]
        rounds.append(pair.to(torch.int32))
    return rounds


def super_block_rows(n: int, block: int, num_sms: int) -> int:
    """Rows per super block for ``n`` rows: the largest power-of-two multiple of ``block`` (at most 8 tiles a side)
    that still gives each round at least two pairs per SM (``num_sms`` 0: off the GPU, one tile)."""
    if num_sms <= 0:
        return block
    rows = block
    while rows < 8 * block and n // (4 * rows) >= 2 * num_sms:  # (the doubled blocks' pairs per round)
        rows *= 2
    return rows


def launch_pairs(config: dict, x, x_lo, scale, sq_norms, lower, upper, k_pad: int, precision: str, num_sms: int):
    """The rounds of :func:`_band_pairs_kernel` and the finish kernel (the arguments as
    :func:`~tfp_kernels.order.band_topk_triton._launch`'s). ``config``: BLOCK_M (the tiles' side), BLOCK_D,
    num_warps, num_stages; optional ``SUPER`` (rows per super block, a multiple of BLOCK_M; default
    :func:`super_block_rows`) and ``CAP`` (candidate slots per row, a multiple of K and at least BLOCK_M;
    default 4 BLOCK_M rounded up to a multiple of K), ``SINGLES`` (see ``_launch``). Returns (index, s2, close)
    as ``_launch``."""
    config = dict(config)
    n, dim = x.shape
    block = config.pop("BLOCK_M")
    config.pop("BLOCK_N", None)
    if config.pop("DESCRIPTORS", False) or config.pop("STACKED", False):
        raise ValueError("the pairs kernel reads its tiles with pointer loads: no DESCRIPTORS or STACKED")
    check_split_chunk(x_lo, config["BLOCK_D"])
    super_rows = config.pop("SUPER", None) or super_block_rows(n, block, num_sms)
    if super_rows % block:
        raise ValueError(f"SUPER must be a multiple of BLOCK_M = {block}, got {super_rows}")
    cap = candidate_slots(config, block, "BLOCK_M", k_pad)
    config.pop("programs", None)
    singles = bool(config.pop("SINGLES", False))
    num_blocks = triton.cdiv(n, super_rows)
    rows_pad = num_blocks * super_rows  # (every row of every tile has its scratch and state)
    dev = x.device
    best = torch.full((rows_pad, k_pad), 0x7FFFFFFFFFFFFFFF, dtype=torch.int64, device=dev)
    cand_s2 = torch.empty(rows_pad, cap, dtype=torch.float32, device=dev)
    cand_col = torch.empty(rows_pad, cap, dtype=torch.int32, device=dev)
    count = torch.zeros(rows_pad, dtype=torch.int32, device=dev)
    cutoff = torch.full((rows_pad,), torch.inf, dtype=torch.float32, device=dev)
    cutoff_col = torch.full((rows_pad,), -1, dtype=torch.int32, device=dev)
    close = torch.zeros(rows_pad, dtype=torch.int32, device=dev)
    x_lo_arg = x if x_lo is None else x_lo
    scale_arg = sq_norms if scale is None else scale
    rounds = pair_rounds(num_blocks)
    all_pairs = torch.cat(rounds).to(dev)  # (one copy to the device; each round launches on a view)
    start = 0
    for size in (r.shape[0] for r in rounds):
        pairs = all_pairs[start : start + size]
        start += size
        _band_pairs_kernel[(size,)](
            pairs, x, x_lo_arg, scale_arg, x.stride(0), x.stride(1), sq_norms, lower, upper,
            best, cand_s2, cand_col, count, cutoff, cutoff_col, close, n, dim,
            K=k_pad, CAP=cap, SUPER=super_rows, BLOCK=block, INPUT_PRECISION=precision, SPLIT=x_lo is not None,
            SCALED=scale is not None, SINGLES=singles, **config,
        )
    index = torch.empty(n, k_pad, dtype=torch.int32, device=dev)
    s2 = torch.empty(n, k_pad, dtype=torch.float32, device=dev)
    _band_pairs_finish_kernel[(triton.cdiv(n, block),)](
        index, s2, best, cand_s2, cand_col, count, n, K=k_pad, CAP=cap, BLOCK=block,
        num_warps=config.get("num_warps", 4),
    )
    return index, s2, close[:n]
