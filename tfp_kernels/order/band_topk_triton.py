"""Fused Triton kernel: blockwise squared distances + threshold band + running top-k per row.

One program owns ``BLOCK_M`` rows. It streams the column blocks of ``x`` (``BLOCK_N = K`` columns at a
time), computes the (BLOCK_M, BLOCK_N) tile of squared distances ``|a|^2 + |b|^2 - 2 a.b`` with
``tl.dot`` (tensor cores for bf16/fp16, TF32 or IEEE float32 for float32; float32 accumulation),
counts the entries below ``upper`` and merges the entries at or above ``lower`` into a running
sorted list of the K smallest. Entries are packed into int64 keys ``(float32 bits << 32) | column`` so
that one integer sort orders them by (distance, index); squared distances are >= 0, so their bit
patterns order like the values. The merge of a sorted-ascending list with a sorted-descending tile
by elementwise minimum keeps the K smallest of both (a bitonic half-cleaner); one more sort restores
the order. Tiles that cannot improve any row of the program are skipped. Never materialises N x N;
memory O(N K). Semantics: :mod:`tfp_kernels.order.band_topk`.
"""

from __future__ import annotations

import os

import torch

from .band_topk import BandLists

try:  # Triton is optional at import time (CPU-only torch builds do not ship it)
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised only without triton
    _HAVE_TRITON = False

_MAX_KEY = 0x7FFFFFFFFFFFFFFF


def triton_available() -> bool:
    """Whether the Triton kernel can run here (Triton importable and a CUDA device, or the interpreter)."""
    if not _HAVE_TRITON:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1"


if _HAVE_TRITON:

    @triton.jit
    def _band_topk_kernel(
        out_index_ptr, out_s2_ptr, out_close_ptr,
        x_ptr, stride_xn, stride_xd,
        sq_norms_ptr, lower_ptr, upper_ptr,
        n_rows, dim,
        K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        row_norm = tl.load(sq_norms_ptr + rows, mask=row_ok, other=0.0)
        lower = tl.load(lower_ptr + rows, mask=row_ok, other=0.0)
        upper = tl.load(upper_ptr + rows, mask=row_ok, other=0.0)
        max_key = tl.full((BLOCK_M, BLOCK_N), 0x7FFFFFFFFFFFFFFF, tl.int64)
        best = max_key  # (BLOCK_M, K) ascending keys; BLOCK_N == K
        close = tl.zeros((BLOCK_M,), tl.int32)
        offs_d = tl.arange(0, BLOCK_D)
        for col0 in range(0, n_rows, BLOCK_N):
            cols = col0 + tl.arange(0, BLOCK_N)
            col_ok = cols < n_rows
            acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            for d0 in range(0, dim, BLOCK_D):
                d_ok = (d0 + offs_d) < dim
                a = tl.load(x_ptr + rows[:, None] * stride_xn + (d0 + offs_d)[None, :] * stride_xd,
                            mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                b = tl.load(x_ptr + cols[None, :] * stride_xn + (d0 + offs_d)[:, None] * stride_xd,
                            mask=col_ok[None, :] & d_ok[:, None], other=0.0)
                acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
            col_norm = tl.load(sq_norms_ptr + cols, mask=col_ok, other=0.0)
            s2 = tl.maximum(row_norm[:, None] + col_norm[None, :] - 2.0 * acc, 0.0)
            real = row_ok[:, None] & col_ok[None, :] & (rows[:, None] != cols[None, :])
            close += tl.sum((real & (s2 < upper[:, None])).to(tl.int32), axis=1)
            keep = real & (s2 >= lower[:, None])
            keys = (s2.to(tl.int32, bitcast=True).to(tl.int64) << 32) | cols[None, :].to(tl.int64)
            keys = tl.where(keep, keys, max_key)
            worst = tl.max(best, axis=1)
            improves = tl.sum((tl.min(keys, axis=1) < worst).to(tl.int32), axis=0)
            if improves > 0:
                tile = tl.sort(keys, dim=1, descending=True)
                best = tl.sort(tl.minimum(best, tile), dim=1)
        out_cols = tl.arange(0, BLOCK_N)
        out_ok = row_ok[:, None] & (out_cols[None, :] < K)
        found = best != max_key
        index = tl.where(found, (best & 0xFFFFFFFF).to(tl.int32), -1)
        s2_out = tl.where(found, (best >> 32).to(tl.int32).to(tl.float32, bitcast=True), float("inf"))
        tl.store(out_index_ptr + rows[:, None] * K + out_cols[None, :], index, mask=out_ok)
        tl.store(out_s2_ptr + rows[:, None] * K + out_cols[None, :], s2_out, mask=out_ok)
        tl.store(out_close_ptr + rows, close, mask=row_ok)


def _block_config(k_pad: int, device_type: str) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_D, num_warps) for K = k_pad columns per tile."""
    if device_type != "cuda":  # interpreter: small tiles
        return 16, 16, 4
    block_m = 64 if k_pad <= 64 else 32
    return block_m, 64, 4 if k_pad <= 64 else 8


def band_topk_triton(
    x: torch.Tensor, sq_norms: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, k: int,
    *, input_dtype: torch.dtype | None = None,
) -> BandLists:
    """Band top-k lists with the fused Triton kernel.

    Args:
        x: (N, D) prepared rows, float32 (or bf16/fp16), CUDA (or CPU under ``TRITON_INTERPRET=1``).
        sq_norms: (N,) float32 squared norms of the float32 rows.
        lower, upper: (N,) float32 bounds in the squared domain.
        k: K in [1, 1024]; the kernel works with the next power of two >= 16 and returns K columns.
        input_dtype: dtype fed to ``tl.dot``: float32 (IEEE float32 products, the default, matching the
            error bound the ordering uses), ``torch.bfloat16`` or ``torch.float16`` (tensor cores; the
            caller must widen its error bound accordingly).

    Returns:
        :class:`~tfp_kernels.order.band_topk.BandLists` on the device of ``x``.
    """
    if not _HAVE_TRITON:
        raise ImportError("band_topk_triton needs triton (pip install triton)")
    n, dim = x.shape
    if n >= 2**31:
        raise ValueError(f"band_topk_triton supports N < 2^31 rows, got {n}")
    if not 1 <= k <= 1024:
        raise ValueError(f"k must lie in [1, 1024], got {k}")
    input_dtype = input_dtype or torch.float32
    xin = x.to(input_dtype).contiguous()
    k_pad = max(16, triton.next_power_of_2(k))
    block_m, block_d, num_warps = _block_config(k_pad, x.device.type)
    index = torch.empty(n, k_pad, dtype=torch.int32, device=x.device)
    s2 = torch.empty(n, k_pad, dtype=torch.float32, device=x.device)
    close = torch.empty(n, dtype=torch.int32, device=x.device)
    precision = "ieee" if input_dtype == torch.float32 else "tf32"
    grid = (triton.cdiv(n, block_m),)
    _band_topk_kernel[grid](
        index, s2, close, xin, xin.stride(0), xin.stride(1),
        sq_norms.float().contiguous(), lower.float().contiguous(), upper.float().contiguous(), n, dim,
        K=k_pad, BLOCK_M=block_m, BLOCK_N=k_pad, BLOCK_D=block_d, INPUT_PRECISION=precision,
        num_warps=num_warps,
    )
    return BandLists(index[:, :k].contiguous(), s2[:, :k].contiguous(), close)
