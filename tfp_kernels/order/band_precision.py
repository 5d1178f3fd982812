"""The band lists' precision: which kernel computes them (:func:`resolve_band_backend`), what it multiplies
(:func:`resolve_band_dtype`) and the error bound of the squared distances it gives (:func:`band_error_coef`)."""

from __future__ import annotations

import torch

from .band_topk import SPLIT_DTYPES, squared_distance_error_coef


def resolve_band_backend(backend: str, device: torch.device) -> str:
    """``"triton"`` or ``"torch"`` for ``backend`` (``"auto"``: Triton on CUDA when available)."""
    if backend == "auto":
        if device.type == "cuda":
            from .band_topk_triton import triton_available

            return "triton" if triton_available() else "torch"
        return "torch"
    if backend not in ("triton", "torch"):
        raise ValueError(f"band backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    return backend


#: Precisions of the band lists' products (``band_dtype``): see :func:`resolve_band_dtype`.
BAND_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "bfloat16x3": "bfloat16x3",
               "float16x3": "float16x3"}


def band_error_coef(dim: int, band_dtype, band_backend: str) -> float:
    """The band lists' error coefficient (:func:`~tfp_kernels.order.band_topk.squared_distance_error_coef`) for
    rows whose squared norms were rounded once from float64: split products are summed by chunks of
    :data:`~tfp_kernels.order.band_tiles_triton.ACC_CHUNK` in the Triton kernel, in one chain by the torch
    version."""
    chunk = None
    if band_backend == "triton" and band_dtype in SPLIT_DTYPES:
        from .band_tiles_triton import ACC_CHUNK

        chunk = ACC_CHUNK
    return squared_distance_error_coef(dim, band_dtype, acc_chunk=chunk, rounded_norms=True)


def resolve_band_dtype(band_dtype, band_backend: str):
    """What the band lists multiply (an ``input_dtype`` of the band top-k functions).

    ``"auto"``: ``"float16x3"`` with the Triton kernel (rows scaled per row by powers of two and split as
    float16 hi + lo, three tensor-core products summed by chunks: an error bound 1.2e-5 of the squared norms
    at D = 768, 4x below float32 products' and 32x below the unchunked bf16 split's, at the 16-bit rate),
    float32 with the torch backend (the split would cost three float32 products there). The bound is what
    the lists can decide: at N = 10^6 (the benchmark's clustered data, D = 768) about 240 nodes per row lie
    within the bf16 split's bound (3.7e-4) of the threshold, which filled every K = 64 list with nodes the
    exact distances then reject, against ~7 within the float16 split's. ``"bfloat16x3"`` (unscaled bf16
    split, bound 5.9e-5 chunked) and ``"bfloat16"`` (one bf16 product, bound ~0.8% of the squared norms:
    measured on the CPU, 10-190x more fallback scans than float32 at N = 16,000, D = 768) are allowed.
    """
    if band_dtype == "auto":
        return "float16x3" if band_backend == "triton" else torch.float32
    if isinstance(band_dtype, torch.dtype) and band_dtype in (torch.float32, torch.bfloat16):
        return band_dtype
    if isinstance(band_dtype, str) and band_dtype in BAND_DTYPES:
        return BAND_DTYPES[band_dtype]
    raise ValueError(
        f"band_dtype must be 'auto', 'float32', 'bfloat16', 'bfloat16x3' or 'float16x3', got {band_dtype!r}"
    )
