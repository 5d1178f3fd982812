"""Float16 copies of float32 rows, each divided by a power of two into float16's normal range.

The host scan reads them (:mod:`~tfp_kernels.order.host_scan`, half the bytes of float32), and the split
products of ``"float16x3"`` take them as their high part (:func:`~tfp_kernels.order.band_topk.split_rows`).
"""

from __future__ import annotations

import torch

#: Rows whose largest entry is below 2^MIN_EXPONENT keep the scale of that bound (float32 multipliers
#: stay finite); their entries may fall in float16's subnormal range (covered by the absolute term).
_MIN_EXPONENT = -100
#: Rows converted at a time (bounds the temporaries to ~100 MB at D = 768).
_CHUNK_ROWS = 32_768


def half_rows(x32: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, scale)``: (N, D) float16 ``x32 / scale`` and (N,) float32 powers of two ``scale`` (each row's
    largest entry brought to [2^14, 2^15)), on the device of ``x32`` (N, D) float32. Empty rows (all zeros)
    get ``scale = 2^-15`` and zero entries."""
    n, dim = x32.shape
    amax = x32.abs().amax(dim=1) if dim else x32.new_zeros(n)
    exponent = torch.frexp(amax).exponent.clamp(min=_MIN_EXPONENT + 1)  # 2^(e-1) <= amax < 2^e
    shift = (15 - exponent).float()  # entries * 2^shift: largest in [2^14, 2^15)
    multiplier = torch.pow(2.0, shift)
    rows = torch.empty(n, dim, dtype=torch.float16, device=x32.device)
    for r0 in range(0, n, _CHUNK_ROWS):  # (no (N, D) float32 temporary)
        rows[r0 : r0 + _CHUNK_ROWS] = x32[r0 : r0 + _CHUNK_ROWS] * multiplier[r0 : r0 + _CHUNK_ROWS, None]
    return rows, torch.pow(2.0, -shift)
