"""Band top-k: per row, the K nearest rows whose squared distance lies at or above a lower bound.

All functions here work in the *squared L2 domain of prepared rows* (:func:`~tfp_kernels.order.distance.prepare`):
``s2[i, j] = ||x_i - x_j||^2``. For ``metric="l2"`` the TFP band ``D >= t`` is ``s2 >= t^2``; for
``metric="cosine"`` (unit rows, ``D = 0.5 * s2``) it is ``s2 >= 2 t``. The ordering layer widens the
bounds by the arithmetic error of the fast paths (:func:`squared_distance_error_coef`) and settles
every borderline case with exact distances.

For every row ``i`` the result holds

- ``index[i]``: (K,) int32, the K rows ``j != i`` with the smallest ``s2[i, j] >= lower[i]``, sorted by
  (``s2``, ``j``); ``-1`` after the last one when fewer than K qualify;
- ``s2[i]``: (K,) float32, their squared distances (``+inf`` where ``index`` is ``-1``);
- ``num_close[i]``: int32, the number of rows ``j != i`` with ``s2[i, j] < upper[i]``.

Implementations: :func:`band_topk_reference` (float64, one block of rows at a time, the test
oracle), :func:`band_topk_torch` (blockwise matrix products in float32 + ``torch.topk``; CPU and CUDA; on
the CPU with the extension, each pair's product once, :func:`_band_topk_pairs`) and the fused Triton kernel
in :mod:`tfp_kernels.order.band_topk_triton` (CUDA). Memory: O(N * K) plus one (block x N) tile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .distance import BLOCK_ELEMENTS, ieee_fp32_matmul
from .float16_rows import half_rows

UNIT_ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    "tf32": 2.0**-10,  # (the tensor cores may truncate float32 operands to tf32: 2^-10, not 2^-11)
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
}


@dataclass(frozen=True)
class BandLists:
    """Band top-k lists of N rows (see the module docstring).

    Attributes:
        index: (N, K) int32, same device as the embeddings; -1 padding.
        s2: (N, K) float32 squared distances of the entries; +inf padding.
        num_close: (N,) int32, rows closer than ``upper`` (``s2 < upper``), self excluded.
    """

    index: torch.Tensor
    s2: torch.Tensor
    num_close: torch.Tensor

    @property
    def k(self) -> int:
        return self.index.shape[1]


def list_limits(index: torch.Tensor, s2: torch.Tensor, slack: torch.Tensor) -> torch.Tensor:
    """(R,) float64 limits of band lists, the walk's ``band_limit2``: the exact s2 of any node outside a full list
    (among the nodes listed from) is at least its last entry's s2 minus the lists' bound; +inf for a list that
    is not full (it holds every node of the band).

    Args:
        index: (R, K) int32 lists (-1 padded); s2: (R, K) float32 their squared distances; slack: (R,) float64
            the bound of those s2; same device.
    """
    return torch.where(index[:, -1] >= 0, s2[:, -1].double() - slack, torch.full_like(slack, torch.inf))


#: Split precisions: rows as ``hi + lo`` in a 16-bit dtype, products ``hi.hi' + hi.lo' + lo.hi'`` on tensor
#: cores (three MMAs): about float32 accuracy (see :func:`squared_distance_error_coef`) at the 16-bit rate.
SPLIT_DTYPES = {"bfloat16x3": torch.bfloat16, "float16x3": torch.float16}

#: Unit roundoff assumed for tensor-core float32 accumulation (bf16/fp16 inputs): NVIDIA's accumulators
#: are documented to truncate rather than round, so one bit more than IEEE round-to-nearest's 2^-24.
TENSOR_CORE_ACC_ROUNDOFF = 2.0**-23


class SplitRows(NamedTuple):
    """Rows as ``scale * (hi + lo)`` (:func:`split_rows`).

    hi, lo: (N, D) contiguous tensors of the split's 16-bit dtype; scale: (N,) float32 powers of two (float16
    split), or None (bfloat16 split: the rows themselves, bf16 having float32's exponent range).
    """

    hi: torch.Tensor
    lo: torch.Tensor
    scale: torch.Tensor | None


#: Rows split at a time (bounds the float32 temporaries to ~100 MB at D = 768).
_SPLIT_CHUNK_ROWS = 32_768


def split_rows(x: torch.Tensor, input_dtype: str) -> SplitRows:
    """``x = scale * (hi + lo) + r``: ``hi`` the (scaled) rows rounded to the split's 16-bit dtype, ``lo`` the
    rest rounded to it.

    ``"float16x3"``: ``hi`` is the host scan's float16 copy (:func:`~tfp_kernels.order.float16_rows.half_rows`:
    each row divided by the power of two that brings its largest entry to [2^14, 2^15)), so that the split
    keeps float16's precision whatever the magnitude of the rows: ``|x' - hi - lo| <= u^2 |x'| + 2^-24`` elementwise for the
    scaled row ``x' = x / scale`` (``u = 2^-11``; the 2^-24: float16's subnormals, below 2^-38 of the row's
    largest entry). ``"bfloat16x3"``: unscaled (``scale`` None), ``|x - hi - lo| <= u^2 |x|`` (``u = 2^-8``).

    Args:
        x: (N, D) float32 rows, any device; input_dtype: a key of :data:`SPLIT_DTYPES`.

    Returns:
        :class:`SplitRows` on the device of ``x``.
    """
    dtype = SPLIT_DTYPES[input_dtype]
    if dtype == torch.bfloat16:
        hi = x.to(dtype)
        lo = (x - hi.float()).to(dtype)  # x - hi is exact in float32
        return SplitRows(hi.contiguous(), lo.contiguous(), None)
    hi, scale = half_rows(x)  # the host scan's float16 rows: fp16(x / scale)
    multiplier = scale.reciprocal()  # (exact: powers of two)
    lo = torch.empty_like(hi)
    for r0 in range(0, x.shape[0], _SPLIT_CHUNK_ROWS):
        scaled = x[r0 : r0 + _SPLIT_CHUNK_ROWS] * multiplier[r0 : r0 + _SPLIT_CHUNK_ROWS, None]  # exact
        lo[r0 : r0 + _SPLIT_CHUNK_ROWS] = scaled - hi[r0 : r0 + _SPLIT_CHUNK_ROWS].float()  # exact, then rounded
    return SplitRows(hi, lo, scale)


#: Shortest products a tensor-core chunk can hold: Triton's ``tl.dot`` needs an inner dimension of 16 or more,
#: so a kernel that sums its chunks in float32 adds at most ``ceil(D / 16)`` of them.
MIN_ACC_CHUNK = 16


def _gamma(n: int, unit: float) -> float:
    return n * unit / (1.0 - n * unit)


def chunked_accumulation_coef(dim: int, acc_chunk: int, u_in: float) -> float:
    """Relative error (of ``sum_k |x_k y_k|``) of ``dim`` exact products of split rows summed on tensor cores by
    chunks of at most ``acc_chunk``: each chunk in a fresh accumulator that takes the small cross products
    (at most ``2 u_in`` of the main one, ``u_in`` the unit roundoff of the split's 16-bit dtype) first and the
    main product last, the chunks added in float32.

    Each tensor-core addition errs by at most :data:`TENSOR_CORE_ACC_ROUNDOFF` of a partial sum bounded by
    about the chunk's ``sum |x_k y_k|``: ``(1 + 8.1 u_in) gamma'_m`` for a chunk of ``m = min(acc_chunk, D)``
    products, plus ``gamma_{ceil(D / 16)}`` for the float32 sum of the chunks (:data:`MIN_ACC_CHUNK`).
    """
    if acc_chunk < MIN_ACC_CHUNK:
        raise ValueError(f"acc_chunk must be at least {MIN_ACC_CHUNK}, got {acc_chunk}")
    chunk = _gamma(min(acc_chunk, dim), TENSOR_CORE_ACC_ROUNDOFF)
    sums = _gamma(-(-dim // MIN_ACC_CHUNK), UNIT_ROUNDOFF[torch.float32])
    return (1.0 + 8.1 * u_in) * chunk + (1.0 + 4.1 * u_in) * (1.0 + chunk) * sums


def squared_distance_error_coef(dim: int, input_dtype, *, acc_chunk: int | None = None,
                                rounded_norms: bool = False) -> float:
    """Bound ``c`` with ``|s2_fast - s2_exact| <= c * (|x_i|^2 + |x_j|^2)`` for the fast paths.

    ``s2_fast = |x_i|^2 + |x_j|^2 - 2 <x_i', x_j'>`` with float32 squared norms of the float32 rows and
    float32 accumulation of the products over ``dim`` terms. ``input_dtype``:

    - ``torch.float32``: IEEE float32 products; bound ``gamma_D + gamma_D + 6 u`` (``gamma_D = D u / (1 -
      D u)``, ``u = 2^-24``: the norms' and the product's accumulation, and the final additions);
    - a 16-bit dtype (or ``"tf32"``): the rows rounded to it (``u_in``), accumulated on tensor cores
      (:data:`TENSOR_CORE_ACC_ROUNDOFF`): ``gamma_D + gamma'_D + 2.01 u_in + 6 u``;
    - ``"bfloat16x3"`` / ``"float16x3"`` (:func:`split_rows`): the three products of the split leave out
      terms of at most ``3.1 u_in^2 |x_i,k x_j,k|`` (plus float16's subnormals, ``2^-35 sqrt(D)``) and
      accumulate ``3 D`` terms on tensor cores: ``gamma_D + 1.02 gamma'_{3D} + 3.1 u_in^2 + 6 u``.

    ``acc_chunk`` (split dtypes): the products are summed in chunks of at most ``acc_chunk`` entries, each chunk
    in a fresh tensor-core accumulator that takes the two cross products ``hi.lo' + lo.hi'`` first and the
    main product ``hi.hi'`` last, and the chunks are added in float32 (the Triton kernel). Then each
    addition's error is relative to a partial sum that is at most about the chunk's ``sum |x_k y_k|``
    (the cross terms are ``2 u_in`` of it): ``(1 + 8.1 u_in) gamma'_m`` for the chunk, ``m = min(acc_chunk,
    D)``, plus ``gamma_{ceil(D / 16)}`` for the float32 sum of the chunks (:data:`MIN_ACC_CHUNK`), instead of
    ``gamma'_{3D}``: at D = 768, chunks of 64 and float16 splits, 1.05e-5 instead of 2.8e-4.

    ``rounded_norms``: the squared norms are those of the float32 rows computed in float64 and rounded to
    float32 (error ``u`` each) rather than float32 sums (``gamma_D``).

    Worst-case (not statistical) bounds, using ``sum_k |a_k b_k| <= (|a|^2 + |b|^2) / 2``; plus the float32
    rounding of the rows themselves (``2 u``) when the embeddings came in float64; for norms above float32's
    subnormal range.
    """
    u = UNIT_ROUNDOFF[torch.float32]
    gamma = _gamma
    norms = 2.0 * u if rounded_norms else gamma(dim, u)
    if input_dtype == torch.float32:
        return norms + gamma(dim, u) + 6.0 * u
    u_acc = TENSOR_CORE_ACC_ROUNDOFF
    if input_dtype in SPLIT_DTYPES:
        u_in = UNIT_ROUNDOFF[SPLIT_DTYPES[input_dtype]]
        dropped = 3.1 * u_in * u_in
        if SPLIT_DTYPES[input_dtype] == torch.float16:
            dropped += 2.0**-35 * math.sqrt(dim)  # float16 subnormals of the scaled rows (split_rows)
        if acc_chunk is None:
            accumulation = 1.02 * gamma(3 * dim, u_acc)
        else:
            accumulation = chunked_accumulation_coef(dim, acc_chunk, u_in)
        return norms + accumulation + dropped + 6.0 * u
    return norms + gamma(dim, u_acc) + 2.01 * UNIT_ROUNDOFF[input_dtype] + 6.0 * u


def band_bounds(t2: float, slack: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``(lower, upper)`` bounds of the threshold band in the squared domain: ``t^2 -/+ slack``, each
    rounded one float32 step outward so that the rounding to float32 never narrows the band.

    Args:
        t2: the squared threshold; slack: (R,) float64 error bounds of the fast squared distances, any device.
    """
    lower = (t2 - slack).float()
    upper = (t2 + slack).float()
    # (the limits made on the device: a tensor copied from the host would wait for the device's queue)
    lower = torch.nextafter(lower, lower.new_full((), -torch.inf))
    upper = torch.nextafter(upper, upper.new_full((), torch.inf))
    return lower, upper


def _finish_block(s2: torch.Tensor, rows: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, k: int):
    """Band top-k of one (B, N) block of squared distances (modified in place); ``rows``: the block's rows as
    columns (each left out of its own list), or None (the columns are other rows).

    The K smallest are selected by (value, column), so that ties at the K-th place go to the lower
    column, as in the Triton kernel: float32 values are packed with their column into int64 keys
    (non-negative float bits order like the values); float64 blocks (the reference) use a stable sort.
    """
    b, n = s2.shape
    if rows is not None:
        s2[torch.arange(b, device=s2.device), rows] = torch.inf  # self
    num_close = (s2 < upper[:, None]).sum(dim=1, dtype=torch.int32)
    s2.masked_fill_(s2 < lower[:, None], torch.inf)
    kk = min(k, n)
    if s2.dtype == torch.float32:
        cols = torch.arange(n, device=s2.device, dtype=torch.int64)
        keys = (s2.view(torch.int32).to(torch.int64) << 32) | cols
        keys = torch.topk(keys, kk, dim=1, largest=False, sorted=True).values
        idx = keys & 0xFFFFFFFF
        vals = (keys >> 32).to(torch.int32).view(torch.float32)
    else:
        vals, idx = torch.sort(s2, dim=1, stable=True)
        vals, idx = vals[:, :kk], idx[:, :kk]
    idx = idx.to(torch.int32).masked_fill_(torch.isinf(vals), -1)
    if kk < k:
        vals = torch.cat([vals, vals.new_full((b, k - kk), torch.inf)], dim=1)
        idx = torch.cat([idx, idx.new_full((b, k - kk), -1)], dim=1)
    return idx, vals.float(), num_close


def _check_bounds(x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, k: int):
    n = x.shape[0]
    if lower.shape != (n,) or upper.shape != (n,):
        raise ValueError(f"lower and upper must have shape ({n},), got {tuple(lower.shape)} and {tuple(upper.shape)}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")


def band_topk_reference(x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, k: int,
                        columns: torch.Tensor | None = None) -> BandLists:
    """Band top-k with exact float64 squared distances (explicit differences), blockwise.

    Args:
        x: (N, D) prepared rows, any float dtype, CPU or CUDA.
        lower, upper: (N,) bounds in the squared domain (any float dtype, same device).
        k: K >= 1.
        columns: None (each row against the other rows of ``x``), or (C, D) other rows (same device): each row
            against them (no row is left out), the lists' indices into ``columns``.

    Returns:
        :class:`BandLists` on the device of ``x`` (``s2`` rounded to float32 for the output).
    """
    _check_bounds(x, lower, upper, k)
    x64 = x.double()
    cols64 = x64 if columns is None else columns.double()
    n = x64.shape[0]
    block = max(1, BLOCK_ELEMENTS // max(1, cols64.shape[0]))
    parts = []
    for r0 in range(0, n, block):
        rows = torch.arange(r0, min(n, r0 + block), device=x.device)
        s2 = torch.cdist(x64[rows], cols64, compute_mode="donot_use_mm_for_euclid_dist").square_()
        parts.append(_finish_block(s2, rows if columns is None else None, lower[rows].double(),
                                   upper[rows].double(), k))
    index, s2, num_close = (torch.cat(p) for p in zip(*parts))
    return BandLists(index, s2, num_close)


#: Rows (and columns) of the square blocks of :func:`_band_topk_pairs`.
PAIR_BLOCK_ROWS = 1024
_KEY_PAD = torch.iinfo(torch.int64).max


def _band_topk_pairs(
    x: torch.Tensor, sq_norms: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, k: int, bar=None,
    block_rows: int = PAIR_BLOCK_ROWS,
) -> BandLists:
    """Band top-k on the CPU with each pair's product computed once: square blocks on and above the
    diagonal, each block's products selected for its rows and (off the diagonal) for its columns by the C++
    op ``band_select_pairs``, which keeps every row's K best keys in (N, K) heaps across blocks. Half the
    matrix-product work of the row blocks against all columns (the selection work is the same). Each pair's
    value is formed as the row's own epilogue forms it, from the one product of the pair, so the lists are
    those of the float32 products in that rounding (within the same error bound as any other order).

    Args: as :func:`band_topk_torch` (``x`` (N, D) float32 on the CPU); bar: a tqdm bar over the rows, or None.
    """
    n = x.shape[0]
    keys = torch.full((n, k), _KEY_PAD, dtype=torch.int64)
    sizes = torch.zeros(n, dtype=torch.int32)
    num_close = torch.zeros(n, dtype=torch.int32)
    sq, lo, hi = (t.float().contiguous() for t in (sq_norms, lower, upper))
    block_rows = max(1, min(block_rows, n))
    buffer = torch.empty(block_rows * block_rows, dtype=torch.float32)  # reused: no page faults per block
    op = torch.ops.tfp_kernels.band_select_pairs
    # the bar counts rows, advanced by the share of the pairs each block holds (the row blocks' work shrinks
    # from the first to the last: per row block, the ETA would be off by up to 2x)
    rows_per_pair, done = n / (n * (n + 1) / 2), 0.0
    with ieee_fp32_matmul():
        for r0 in range(0, n, block_rows):
            r1 = min(n, r0 + block_rows)
            for c0 in range(r0, n, block_rows):
                c1 = min(n, c0 + block_rows)
                dot = torch.matmul(x[r0:r1], x[c0:c1].T, out=buffer[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0))
                op(dot, r0, c0, sq, lo, hi, keys, sizes, num_close)
                if bar is not None:  # the block's pairs (the diagonal block: its upper triangle), in whole rows
                    pairs = (r1 - r0) * (r1 - r0 + 1) / 2 if c0 == r0 else (r1 - r0) * (c1 - c0)
                    bar.update(round(done + pairs * rows_per_pair) - round(done))
                    done += pairs * rows_per_pair
    keys = torch.sort(keys, dim=1).values  # unfilled places (the largest key) go last
    pad = keys == _KEY_PAD
    index = (keys & 0xFFFFFFFF).to(torch.int32).masked_fill_(pad, -1)
    s2 = (keys >> 32).to(torch.int32).view(torch.float32).masked_fill_(pad, torch.inf)
    return BandLists(index, s2, num_close)


def band_topk_torch(
    x: torch.Tensor, sq_norms: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, k: int,
    *, block_elements: int = 1 << 24, use_extension: bool = True, input_dtype: torch.dtype | None = None,
    progress: str | None = None,
) -> BandLists:
    """Band top-k through blockwise float32 matrix products (``|a|^2 + |b|^2 - 2 a.b``) and ``torch.topk``.

    Args:
        x: (N, D) prepared rows, float32 (other dtypes are upcast), CPU or CUDA.
        sq_norms: (N,) float32 squared norms of ``x``.
        lower, upper: (N,) float32 bounds in the squared domain.
        k: K >= 1.
        block_elements: size of the (rows x N) tile computed at once (not with the pair blocks below).
        use_extension: on CPU tensors, when the extension is built: float32 products of each pair once,
            selected by the C++ op ``band_select_pairs`` (:func:`_band_topk_pairs`), or, for split
            products, row blocks selected by ``band_select``; else torch ops on row blocks (the same lists,
            up to the rounding of each pair's product).
        input_dtype: the products are those of the rows rounded to this dtype (float32 accumulation), as
            the Triton kernel's tensor-core products are, or of a split (``"bfloat16x3"``: three float32
            products of :func:`split_rows`' parts); None or float32: the float32 rows. For tests and for
            measuring how a precision changes the walk: on the CPU only float32 is worth its cost.
        progress: None (default: quiet), or the label of a progress bar (tqdm) over the rows.

    Returns:
        :class:`BandLists` on the device of ``x``; error per entry within
        :func:`squared_distance_error_coef` ``(D, input_dtype) * (|x_i|^2 + |x_j|^2)``.
    """
    _check_bounds(x, lower, upper, k)
    x = x.float()
    split = None
    if input_dtype in SPLIT_DTYPES:
        pieces = split_rows(x, input_dtype)  # (scaled back: products by powers of two are exact)
        split = [p.float() if pieces.scale is None else p.float() * pieces.scale[:, None] for p in pieces[:2]]
    elif input_dtype not in (None, torch.float32):
        x = x.to(input_dtype).float()
    n = x.shape[0]
    block = max(1, block_elements // n)
    parts = []
    select_op = None
    if use_extension and x.device.type == "cpu":
        from .._ext import has_extension

        select_op = torch.ops.tfp_kernels.band_select if has_extension() else None
    bar = None
    if progress is not None:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc=progress, unit="row")
    if select_op is not None and split is None:
        try:
            return _band_topk_pairs(x, sq_norms, lower, upper, k, bar)
        finally:
            if bar is not None:
                bar.close()
    # one (block, N) buffer for every block's products: a fresh 64 MB tensor per block costs page faults
    # (measured on the 2-core CPU at N = 30,000: the products took 5.1 s with fresh tensors, 4.0 s with one)
    buffer = torch.empty(min(block, n), n, dtype=torch.float32, device=x.device) if select_op is not None else None
    with ieee_fp32_matmul():
        for r0 in range(0, n, block):
            r1 = min(n, r0 + block)
            if bar is not None:
                bar.update(r1 - r0)
            out = None if buffer is None else buffer[: r1 - r0]
            if split is None:
                dot = torch.matmul(x[r0:r1], x.T, out=out)
            else:  # hi.hi' + hi.lo' + lo.hi', the three tensor-core products
                hi, lo = split
                dot = torch.matmul(hi[r0:r1], hi.T, out=out)
                dot.addmm_(hi[r0:r1], lo.T).addmm_(lo[r0:r1], hi.T)
            if select_op is not None:  # the C++ op forms s2 from the dot products as it reads them
                parts.append(select_op(dot, r0, lower[r0:r1].float(), upper[r0:r1].float(), k,
                                       sq_norms[r0:r1].float(), sq_norms.float()))
            else:
                s2 = dot.mul_(-2.0).add_(sq_norms[None, :]).add_(sq_norms[r0:r1, None]).clamp_(min=0)
                rows = torch.arange(r0, r1, device=x.device)
                parts.append(_finish_block(s2, rows, lower[r0:r1], upper[r0:r1], k))
    if bar is not None:
        bar.close()
    index, s2, num_close = (torch.cat(p) for p in zip(*parts))
    return BandLists(index, s2, num_close)


def float64_error_coef(dim: int) -> float:
    """Bound ``c`` with ``|s2 - s2_exact| <= c * (|x_i|^2 + |x_j|^2)`` for :func:`band_topk_rows`' float64
    distances of float64 rows, *as stored in float32* (the lists' ``s2``): ``2 gamma_D + 6 u`` in float64
    (norms, product, final additions; ``u = 2^-53``) plus the rounding to float32 of a value at most
    ``2 (|x_i|^2 + |x_j|^2)`` (``2^-23``)."""
    u = UNIT_ROUNDOFF[torch.float64]
    return 2.0 * _gamma(dim, u) + 6.0 * u + 2.0**-23


def select_smallest(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the ``k`` smallest entries by (value, column), sorted that way.

    ``torch.topk`` leaves ties open, so its set is taken where it is {values <= the k-th value} (no tie at the
    k-th place left out: the usual case, one pass to check) or where that value is +inf (the rest of such a row
    is +inf: padding); other rows take the columns below the k-th value, then the lowest ones equal to it.

    Args:
        values: (B, C) float tensor (+inf: absent), any device; k: 1 <= k <= C.

    Returns:
        (values (B, k), columns (B, k) int64).
    """
    vals, idx = torch.topk(values, k, dim=1, largest=False, sorted=True)
    kth = vals[:, -1:]
    tie_rows = torch.nonzero(((values <= kth).sum(dim=1) != k) & torch.isfinite(kth[:, 0])).flatten()
    if tie_rows.numel():
        sub, sub_kth = values[tie_rows], kth[tie_rows]
        tied = sub == sub_kth
        wanted = k - (sub < sub_kth).sum(dim=1, keepdim=True)
        chosen = (sub < sub_kth) | (tied & (torch.cumsum(tied, dim=1, dtype=torch.int32) <= wanted))
        idx[tie_rows] = torch.nonzero(chosen)[:, 1].view(-1, k)  # (row-major: increasing columns)
        vals[tie_rows] = sub.gather(1, idx[tie_rows])
    by_index = torch.argsort(idx, dim=1)  # (value, column) order: by column, then stably by value
    vals, idx = vals.gather(1, by_index), idx.gather(1, by_index)
    by_value = torch.sort(vals, dim=1, stable=True).indices
    return vals.gather(1, by_value), idx.gather(1, by_value)


def _row_blocks(x: torch.Tensor, sq_norms: torch.Tensor, rows: torch.Tensor, block_elements: int | None):
    """Blocks ``(q0, r, s2)`` of the (Q, N) squared distances of ``x[rows]`` to every row of ``x``: ``r``
    = ``rows[q0 : q0 + B]`` (int64), ``s2`` (B, N) in the dtype of ``x``, ``max(|x_i|^2 + |x_j|^2 - 2 x_i.x_j,
    0)`` with IEEE float32 products for float32 rows (``block_elements``: see :func:`band_topk_rows`)."""
    n = x.shape[0]
    if block_elements is None:
        block_elements = 1 << (27 if x.device.type == "cuda" else 24)
    block = max(1, block_elements // max(n, 1))
    sq = sq_norms.to(x.dtype)
    for q0 in range(0, rows.numel(), block):
        r = rows[q0 : q0 + block].long()
        with ieee_fp32_matmul():
            dots = torch.matmul(x[r], x.T)
        yield q0, r, dots.mul_(-2.0).add_(sq[None, :]).add_(sq[r, None]).clamp_(min=0)


def band_topk_rows(
    x: torch.Tensor, sq_norms: torch.Tensor, rows: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, k: int,
    *, block_elements: int | None = None,
) -> BandLists:
    """Band top-k lists of some rows of ``x`` against all of its rows, with torch matrix products in the
    precision of ``x`` (float32: IEEE products, the bound of :func:`squared_distance_error_coef` ``(D,
    float32)``, as :func:`band_topk_torch`; float64: :func:`float64_error_coef`). For the long lists of the
    rows whose band list is crowded near the threshold (:mod:`~tfp_kernels.order.builders`).

    Args:
        x: (N, D) float32 or float64 prepared rows, CPU or CUDA.
        sq_norms: (N,) squared norms of ``x`` (float32 ones for float32 rows, as the band lists use them).
        rows: (Q,) int64 row ids (distinct), same device.
        lower, upper: (Q,) bounds of those rows in the squared domain.
        k: K >= 1.
        block_elements: size of a (rows x N) block of products (default 2^24 on the CPU, 2^27 on a GPU).

    Returns:
        :class:`BandLists` of the Q rows, sorted by (s2, index) (ties at the K-th place go to the lower
        index), on the device of ``x``.
    """
    if x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"band_topk_rows: x must be float32 or float64, got {x.dtype}")
    if rows.dim() != 1 or lower.shape != rows.shape or upper.shape != rows.shape:
        raise ValueError(f"band_topk_rows: rows, lower and upper must be (Q,), got {tuple(rows.shape)}, "
                         f"{tuple(lower.shape)}, {tuple(upper.shape)}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    n = x.shape[0]
    kk = min(k, n)
    parts = []
    for q0, r, s2 in _row_blocks(x, sq_norms, rows, block_elements):
        b = r.numel()
        lo, hi = lower[q0 : q0 + b].to(x.dtype), upper[q0 : q0 + b].to(x.dtype)
        if x.dtype == torch.float32:  # (value, column) keys: ties at the K-th place to the lower column
            parts.append(_finish_block(s2, r, lo, hi, k))
            continue
        s2[torch.arange(b, device=x.device), r] = torch.inf  # self
        num_close = (s2 < hi[:, None]).sum(dim=1, dtype=torch.int32)
        s2.masked_fill_(s2 < lo[:, None], torch.inf)
        vals, idx = select_smallest(s2, kk)
        idx = idx.to(torch.int32).masked_fill_(torch.isinf(vals), -1)
        vals = vals.float()
        if kk < k:
            vals = torch.cat([vals, vals.new_full((b, k - kk), torch.inf)], dim=1)
            idx = torch.cat([idx, idx.new_full((b, k - kk), -1)], dim=1)
        parts.append((idx, vals, num_close))
    if not parts:
        return BandLists(torch.empty(0, k, dtype=torch.int32, device=x.device),
                         torch.empty(0, k, dtype=torch.float32, device=x.device),
                         torch.empty(0, dtype=torch.int32, device=x.device))
    index, s2, num_close = (torch.cat(p) for p in zip(*parts))
    return BandLists(index, s2, num_close)


def close_sets(
    x: torch.Tensor, sq_norms: torch.Tensor, rows: torch.Tensor, upper: torch.Tensor,
    *, block_elements: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The nodes whose fast squared distance to each of some rows lies below the row's ``upper`` (the row
    itself left out): with ``upper = t^2 +`` the products' error bound, a superset of the nodes closer than
    ``t``. The walk counts their unvisited members where the rejection cap could fire
    (:mod:`~tfp_kernels.order.builders`). Same products as :func:`band_topk_rows` (its ``num_close`` are the sets'
    sizes).

    Args:
        x: (N, D) float32 or float64 prepared rows, CPU or CUDA; sq_norms: (N,) their squared norms.
        rows: (Q,) int64 row ids, same device; upper: (Q,) bounds in the squared domain.
        block_elements: as :func:`band_topk_rows`.

    Returns:
        ``(offsets (Q + 1,) int64, members (S,) int32)`` on the device of ``x``: the set of ``rows[q]`` is
        ``members[offsets[q] : offsets[q + 1]]``, in increasing order.
    """
    if x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"close_sets: x must be float32 or float64, got {x.dtype}")
    if rows.dim() != 1 or upper.shape != rows.shape:
        raise ValueError(f"close_sets: rows and upper must be (Q,), got {tuple(rows.shape)}, {tuple(upper.shape)}")
    sizes, members = [], []
    for q0, r, s2 in _row_blocks(x, sq_norms, rows, block_elements):
        close = s2 < upper[q0 : q0 + r.numel(), None].to(x.dtype)
        close[torch.arange(r.numel(), device=x.device), r] = False  # self
        sizes.append(close.sum(dim=1))
        members.append(torch.nonzero(close)[:, 1].to(torch.int32))  # (row-major: by row, then column)
    offsets = torch.zeros(rows.numel() + 1, dtype=torch.int64, device=x.device)
    if sizes:
        torch.cumsum(torch.cat(sizes), dim=0, out=offsets[1:])
    members = torch.cat(members) if members else torch.empty(0, dtype=torch.int32, device=x.device)
    return offsets, members
