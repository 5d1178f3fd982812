"""Validation of the arguments of the ordering functions.

Every public ordering function checks its arguments here, where the input enters the API, so that a
bad value gets an error naming the argument and the problem instead of a failure deep in a kernel.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

METRICS = ("l2", "cosine")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_embeddings(embeddings, *, metric: str, name: str = "embeddings") -> torch.Tensor:
    """Return ``embeddings`` as a tensor after checking shape, dtype and values.

    Raises TypeError for a non-tensor or a non-floating dtype, ValueError for a shape that is not
    (N, D) with N, D >= 1, for NaN/inf values and (metric ``"cosine"``) for all-zero rows.
    """
    if isinstance(embeddings, np.ndarray):
        embeddings = torch.from_numpy(embeddings)
    if not isinstance(embeddings, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N, D), got {type(embeddings).__name__}")
    if embeddings.dim() != 2:
        raise ValueError(f"{name} must be 2-D with shape (N, D), got shape {tuple(embeddings.shape)}")
    n, d = embeddings.shape
    if n == 0:
        raise ValueError(f"{name} is empty: shape {tuple(embeddings.shape)} has no rows (N = 0)")
    if d == 0:
        raise ValueError(f"{name} has no columns: shape {tuple(embeddings.shape)} (D = 0)")
    if embeddings.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must have a floating dtype (float16, bfloat16, float32 or float64), got {embeddings.dtype}"
        )
    finite_rows = torch.isfinite(embeddings).all(dim=1)
    if not bool(finite_rows.all()):
        bad = torch.nonzero(~finite_rows).flatten()
        raise ValueError(
            f"{name} has NaN or inf values in {bad.numel()} row(s); first bad row: {int(bad[0])}"
        )
    if metric == "cosine":
        nonzero_rows = (embeddings != 0).any(dim=1)
        if not bool(nonzero_rows.all()):
            bad = torch.nonzero(~nonzero_rows).flatten()
            raise ValueError(
                f"{name} has {bad.numel()} all-zero row(s) (first: row {int(bad[0])}); the cosine distance "
                "is undefined for a zero vector: drop those rows or use metric='l2'"
            )
    return embeddings


def check_metric(metric) -> str:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    return metric


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_quantile(quantile) -> float:
    if not _is_real(quantile) or not (0.0 < float(quantile) < 1.0):
        raise ValueError(f"quantile must be a number strictly between 0 and 1, got {quantile!r}")
    return float(quantile)


def check_threshold(threshold) -> float | None:
    if threshold is None:
        return None
    if isinstance(threshold, torch.Tensor) and threshold.numel() == 1:
        threshold = threshold.item()
    if not _is_real(threshold) or not math.isfinite(float(threshold)) or float(threshold) < 0:
        raise ValueError(f"threshold must be a finite number >= 0 (or None to estimate it), got {threshold!r}")
    return float(threshold)


def check_window(window) -> int:
    if not _is_int(window) or window < 1:
        raise ValueError(f"window must be an integer >= 1 (the number of recent path nodes checked), got {window!r}")
    return int(window)


def check_max_rejections(max_rejections) -> int | None:
    if max_rejections is None:
        return None
    if not _is_int(max_rejections) or max_rejections < 0:
        raise ValueError(f"max_rejections must be None (no cap) or an integer >= 0, got {max_rejections!r}")
    return int(max_rejections)


def check_start(start, n: int) -> int:
    if not _is_int(start) or not (0 <= start < n):
        raise ValueError(f"start must be an integer in [0, N) = [0, {n}), got {start!r}")
    return int(start)


def check_positive_int(value, name: str) -> int:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_list_length(value) -> int | str:
    """``k`` of the orderings: ``"auto"`` or a positive integer."""
    if value == "auto" and isinstance(value, str):
        return value
    if not _is_int(value) or value < 1:
        raise ValueError(f"k must be 'auto' or a positive integer, got {value!r}")
    return int(value)


def check_long_lists(value) -> bool | str:
    """``long_lists`` of the orderings: ``"auto"``, True or False."""
    if not (isinstance(value, bool) or (isinstance(value, str) and value == "auto")):
        raise ValueError(f"long_lists must be 'auto', True or False, got {value!r}")
    return value


def check_tolerance(value, name: str) -> float:
    if not _is_real(value) or not math.isfinite(float(value)) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)
