"""Inputs of the C++ walk's host fallback scan (``FallbackScan`` in ``csrc/cpu/walk_cpu.cpp``).

The scan makes one pass of dot products over the unvisited rows against ``last`` and the other window
nodes, then settles the few rows its error bound leaves open with exact double-precision distances. The
pass is memory-bound (16 GB/s over float32 rows on the 2-core CI machine), so it reads a float16 copy of
the prepared rows: half the bytes. Each row is divided by a power of two (``scale``) that brings its largest
entry to [2^14, 2^15), inside float16's normal range, so every entry keeps float16's relative precision
(2^-11) whatever the magnitude of the embeddings; the query rows stay in float32.

Error bound (:func:`half_scan_error_coef`): with ``x`` an exact prepared row, ``xh = scale * float16(x32 /
scale)`` its copy and ``q = float32(y)`` a query row,

- ``|xh_k - x_k| <= e |x_k| + a`` with ``e = u16 (1 + u) + u`` (``u = 2^-24``: the float32 rows; ``u16 =
  2^-11``) and ``a <= 2^-25 scale``, the half-ulp of float16's subnormals, for entries below 2^-14 scale;
  since ``scale <= 2^-14 max|x32_k|`` (or ``2^-114`` for rows below ``2^-100``), ``a <= 2^-39 |x|`` (or
  ``2^-139``);
- the float32 accumulation of the D products (any order, fused or not) adds ``gamma_D sum |xh_k q_k|``;
- ``s2 = |x32|^2 + |y32|^2 - 2 scale dot`` in double, with the squared norms of the float32 rows in double.

With ``2 |x| |y| <= |x|^2 + |y|^2`` this gives ``|s2_pass - s2| <= c (|x|^2 + |y|^2) + abs`` with
``c = e (1 + u) + u + gamma_D (1 + e)(1 + u) + 2^-39 sqrt(D) (1 + u) + 2.01 u + (D + 8) 2^-53`` (the last two:
the norms of the float32 rows and the double arithmetic) and ``abs = 2^-138 sqrt(D) max|y|`` (also covering float32 subnormals). At D = 768,
``c = 5.4e-4``, 5.8x the float32 pass's bound; the walk's settle computes the rows within a few bounds of
the answer exactly.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .float16_rows import half_rows

_U32 = 2.0**-24
_U16 = 2.0**-11
#: Rows converted at a time (bounds the temporaries to ~100 MB at D = 768).
_CHUNK_ROWS = 32_768


class HalfScanRows(NamedTuple):
    """The host scan's copy of the prepared rows (host tensors, the ``scan_*`` arguments of ``tfp_walk``).

    rows: (N, D) float16, the float32 prepared rows divided by ``scale``; scale: (N,) float64 powers of two;
    sq_norms: (N,) float64 squared norms of the float32 prepared rows; slack: (N,) float64, bound of
    ``|s2_pass - s2_exact|`` for every pair of each row.
    """

    rows: torch.Tensor
    scale: torch.Tensor
    sq_norms: torch.Tensor
    slack: torch.Tensor


def half_scan_error_coef(dim: int, *, float32_norms: bool = False, tensor_core_chunk: int | None = None) -> float:
    """The coefficient ``c`` of the module docstring's bound, for rows of ``dim`` entries.

    ``float32_norms``: the bound of the Triton scan (:mod:`~tfp_kernels.order.scan_triton` with float16 rows),
    which forms ``s2`` in float32 from float32 squared norms: plus ``gamma_D + 6 u`` (the norms' accumulation
    and the final operations, as in the float32 bound).

    ``tensor_core_chunk`` (with ``float32_norms``): the Triton scan's tensor-core products. The query rows are
    scaled like the scanned ones and split as float16 ``hi + lo`` (as
    :func:`~tfp_kernels.order.band_topk.split_rows`: residual ``u16^2 |q'| + 2^-24`` in scaled units, at most
    ``u16^2 |q_k| + 2^-38 |q|`` unscaled), the products ``row16 . lo`` and ``row16 . hi`` are exact in float32
    and summed on tensor cores by chunks of at most ``tensor_core_chunk`` entries, each in a fresh accumulator,
    the chunks added in float32 (:func:`~tfp_kernels.order.band_topk.chunked_accumulation_coef`), in place of
    the float32 accumulation's ``gamma_D``: plus ``u16^2 + 2^-38 sqrt(D)`` for the split.
    """
    u = _U32
    gamma = dim * u / (1.0 - dim * u)
    e = _U16 * (1.0 + u) + u
    if tensor_core_chunk is None:
        products = gamma * (1.0 + e) * (1.0 + u)
    else:
        if not float32_norms:
            raise ValueError("tensor_core_chunk is the Triton scan's (float32_norms=True)")
        from .band_topk import chunked_accumulation_coef

        accumulation = chunked_accumulation_coef(dim, tensor_core_chunk, _U16)
        products = (accumulation + _U16 * _U16 + 2.0**-38 * math.sqrt(dim)) * (1.0 + e) * (1.0 + u)
    coef = (
        e * (1.0 + u) + u + products + 2.0**-39 * math.sqrt(dim) * (1.0 + u) + 2.01 * u
        + (dim + 8) * 2.0**-53
    )
    return coef + gamma + 6.0 * u if float32_norms else coef


def half_scan_slack(sq_norms: torch.Tensor, dim: int, *, float32_norms: bool = False,
                    tensor_core_chunk: int | None = None) -> torch.Tensor:
    """(N,) float64 bound of the scan's ``|s2_pass - s2_exact|`` for every pair of each row, from the (N,)
    squared norms of the float32 prepared rows (any float dtype and device); ``float32_norms`` and
    ``tensor_core_chunk``: as in :func:`half_scan_error_coef`."""
    sq = sq_norms.double()
    max_sq = float(sq.max()) if sq.numel() else 0.0
    coef = half_scan_error_coef(dim, float32_norms=float32_norms, tensor_core_chunk=tensor_core_chunk)
    slack = coef * (sq + max_sq) * (1.0 + 1e-6)
    slack = slack + 2.0**-138 * math.sqrt(dim * max_sq)
    return slack + 2.0**-120 if float32_norms else slack  # (float32 underflow of the scaled products)


def squared_norms64(x32: torch.Tensor) -> torch.Tensor:
    """(N,) float64 squared norms of the float32 rows, by chunks of rows (no (N, D) float64 temporary)."""
    return torch.cat([x32[r0 : r0 + _CHUNK_ROWS].double().square().sum(dim=1)
                      for r0 in range(0, x32.shape[0], _CHUNK_ROWS)] or [x32.new_zeros(0, dtype=torch.float64)])


def half_scan_rows(x32: torch.Tensor) -> HalfScanRows:
    """The host scan's inputs for ``x32`` (N, D) float32 prepared rows (any device; returned on the host)."""
    host = torch.device("cpu")
    dim = x32.shape[1]
    rows, scale = half_rows(x32)
    sq_norms = squared_norms64(x32)
    slack = half_scan_slack(sq_norms, dim)
    return HalfScanRows(*(t.to(host).contiguous() for t in (rows, scale.double(), sq_norms, slack)))


def no_host_scan() -> HalfScanRows:
    """Empty inputs: the C++ walk then returns at each step that needs a scan, for the caller to run it."""
    empty = torch.empty(0, dtype=torch.float64)
    return HalfScanRows(torch.empty(0, dtype=torch.float16), empty, empty, empty)
