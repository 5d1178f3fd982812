"""Distances of the TFP ordering, computed exactly and blockwise (plain torch).

Two metrics, on embeddings ``E`` of shape (N, D):

- ``"l2"``: ``D[i, j] = ||E_i - E_j||_2`` (the paper's choice);
- ``"cosine"``: ``D[i, j] = 1 - cos(E_i, E_j)``, computed as ``0.5 * ||e_i - e_j||^2`` on the
  unit-normalised rows ``e = E / ||E||``. The two are equal in exact arithmetic; the second gives
  exactly 0 for duplicate rows (``1 - e_i . e_j`` leaves rounding residue), so duplicates are
  recognised as zero-distance pairs by both metrics.

The exact helpers (:func:`distances_from`, :func:`pair_distances`) form differences explicitly
(``torch.cdist`` without the matrix-product shortcut), in float64 by default: they are the
numerical ground truth of the reference implementation. :func:`gemm_distances` uses the
``|a|^2 + |b|^2 - 2 a.b`` expansion (a matrix product: fast, but it cancels badly for close pairs) and
is what the path validator uses on large inputs, with a tolerance.
"""

from __future__ import annotations

import contextlib

import torch

# Elements of a temporary (rows x N) block; keeps every helper at O(N * block) memory.
BLOCK_ELEMENTS = 1 << 22


@contextlib.contextmanager
def ieee_fp32_matmul():
    """Full float32 matrix products (no TF32) inside the block; the error bound assumes it."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def prepare(embeddings: torch.Tensor, metric: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Upcast embeddings to ``dtype`` and, for ``"cosine"``, normalise the rows.

    Args:
        embeddings: (N, D), floating dtype, any device; rows must be non-zero for ``"cosine"``.
        metric: ``"l2"`` or ``"cosine"``.
        dtype: compute dtype (float32 or float64).

    Returns:
        (N, D) tensor of ``dtype`` on the device of ``embeddings``, contiguous.
    """
    x = embeddings.to(dtype).contiguous()
    if metric == "cosine":
        x = x / torch.linalg.vector_norm(x, dim=1, keepdim=True)
    return x


def _finish(l2: torch.Tensor, metric: str) -> torch.Tensor:
    return l2 if metric == "l2" else 0.5 * l2.square()


def distances_from(
    x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor | None, metric: str
) -> torch.Tensor:
    """Exact distances from ``x[rows]`` to ``x[cols]``.

    Args:
        x: (N, D) prepared embeddings (see :func:`prepare`).
        rows: (R,) int64 row indices, same device as ``x``.
        cols: (C,) int64 column indices, or None for all N rows.
        metric: ``"l2"`` or ``"cosine"``.

    Returns:
        (R, C) (or (R, N)) distances in the dtype of ``x``.
    """
    b = x if cols is None else x.index_select(0, cols)
    return distances_between(x.index_select(0, rows), b, metric)


def distances_between(a: torch.Tensor, b: torch.Tensor, metric: str) -> torch.Tensor:
    """Exact distances between the rows of two arrays of prepared rows: (R, D) ``a`` and (C, D) ``b`` (same dtype
    and device) give (R, C), the entries :func:`distances_from` gives for the same rows (it calls this: the
    ``torch.cdist`` kernel, a sum of squared differences, then one square root)."""
    return _finish(torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist"), metric)


def pair_distances(x: torch.Tensor, i: torch.Tensor, j: torch.Tensor, metric: str,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """Exact distances ``D[i[k], j[k]]`` for a list of pairs, computed in blocks.

    Args:
        x: (N, D) prepared embeddings; or, with ``dtype`` and ``metric="l2"``, the embeddings themselves
            (any floating dtype: each block's rows are converted to ``dtype`` after the gather, the values
            :func:`prepare` would give, at a fraction of the memory traffic for 16- or 32-bit rows).
        i, j: (P,) int64 indices, same device as ``x``.
        dtype: see ``x``; None: the dtype of ``x``.

    Returns:
        (P,) distances in ``dtype`` (default: that of ``x``), bit for bit the entries :func:`distances_from`
        gives for the same pairs of the prepared rows (the same ``torch.cdist`` kernel, batched over the pairs).
    """
    if dtype is not None and metric != "l2":
        raise ValueError("pair_distances: dtype= converts the rows after the gather, for metric='l2' only (cosine "
                         "rows are normalised by prepare first)")
    dtype = x.dtype if dtype is None else dtype
    out = torch.empty(i.numel(), dtype=dtype, device=x.device)
    step = max(1, BLOCK_ELEMENTS // max(1, x.shape[1]))
    for s in range(0, i.numel(), step):
        a = x.index_select(0, i[s : s + step]).to(dtype).unsqueeze(1)
        b = x.index_select(0, j[s : s + step]).to(dtype).unsqueeze(1)
        l2 = torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist").reshape(-1)
        out[s : s + step] = _finish(l2, metric)
    return out


def gemm_distances(x: torch.Tensor, sq_norms: torch.Tensor, rows: torch.Tensor, metric: str) -> torch.Tensor:
    """Distances from ``x[rows]`` to every row of ``x`` through one matrix product.

    Args:
        x: (N, D) prepared embeddings.
        sq_norms: (N,) squared row norms of ``x`` (same dtype and device).
        rows: (R,) int64 row indices.

    Returns:
        (R, N) distances in the dtype of ``x``; squared distances are clamped at 0 before the
        square root, so duplicates come out as 0 or as a rounding residue near 0.
    """
    a = x.index_select(0, rows)
    sq = (sq_norms.index_select(0, rows)[:, None] + sq_norms[None, :]) - 2.0 * (a @ x.T)
    sq.clamp_(min=0)
    return sq.sqrt_() if metric == "l2" else sq.mul_(0.5)
