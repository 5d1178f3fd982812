"""Public entry point of the ordering layer: :func:`tfp_order`."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from . import _checks
from .reference import reference_walk
from .threshold import threshold_estimate


@dataclass(frozen=True)
class OrderStats:
    """What :func:`tfp_order` did.

    Attributes:
        threshold: the threshold ``t`` used (distance units of ``metric``).
        threshold_source: ``"given"``, ``"exact"`` (all pairs) or ``"sampled"``.
        backend: the implementation that computed the path (``"reference"`` for now).
        num_nodes: N.
        time_threshold_s: seconds spent estimating the threshold (0 when given).
        time_order_s: seconds spent computing the path.
    """

    threshold: float
    threshold_source: str
    backend: str
    num_nodes: int
    time_threshold_s: float
    time_order_s: float


def tfp_order(
    embeddings: torch.Tensor,
    *,
    metric: str = "l2",
    quantile: float = 0.02,
    threshold: float | None = None,
    window: int = 4,
    max_rejections: int | None = None,
    start: int = 0,
    return_stats: bool = False,
):
    """Order samples by Threshold Filtering Packing (DESIGN.md 1.1).

    Neighbours in the returned order are related (close in embedding space) but not near-duplicates:
    each next sample is the nearest unvisited one that is at distance ``>= t`` from each of the last
    ``window`` samples of the path. Feed the order to :func:`~tfp_kernels.pack_lengths`.

    This release computes the path with the exact reference walk (as :func:`tfp_order_reference`:
    O(N^2 D) time, O(N * window) memory); the blockwise band top-k fast path replaces it behind
    this same signature.

    Args:
        embeddings: (N, D), float16/bfloat16/float32/float64, CPU or CUDA; finite; N >= 1.
        metric: ``"l2"`` (the paper) or ``"cosine"`` (``1 - cos``).
        quantile: q in (0, 1) for the threshold when ``threshold`` is None (paper: 0.02).
        threshold: the threshold ``t`` >= 0; None estimates it (:func:`~tfp_kernels.estimate_threshold`).
        window: the number of recent path nodes a candidate must be ``>= t`` from (paper: 4).
        max_rejections: None (default: no cap, the threshold is always honoured when it can be) or the
            paper's cap ``M`` (paper: 10000): after ``M`` rejected candidates the next one is taken
            unchecked. At large N the cap fires constantly and the rule becomes "the (M+1)-th
            nearest node"; see DESIGN.md 1.1.
        start: the first node of the path (paper: 0).
        return_stats: also return an :class:`OrderStats`.

    Returns:
        path: (N,) int64 on the device of ``embeddings``, a permutation of ``0..N-1``;
        with ``return_stats=True``, ``(path, stats)``.

    Examples::

        >>> import torch, tfp_kernels
        >>> emb = torch.randn(100, 16)
        >>> path = tfp_kernels.tfp_order(emb)
        >>> path.shape, path.dtype, bool((path.sort().values == torch.arange(100)).all())
        (torch.Size([100]), torch.int64, True)
    """
    metric = _checks.check_metric(metric)
    embeddings = _checks.check_embeddings(embeddings, metric=metric)
    quantile = _checks.check_quantile(quantile)
    threshold = _checks.check_threshold(threshold)
    window = _checks.check_window(window)
    max_rejections = _checks.check_max_rejections(max_rejections)
    n = embeddings.shape[0]
    start = _checks.check_start(start, n)
    t0 = time.perf_counter()
    if threshold is not None:
        source = "given"
    elif n == 1:
        threshold, source = 0.0, "given"
    else:
        est = threshold_estimate(embeddings, metric=metric, quantile=quantile)
        threshold, source = est.value, ("exact" if est.exact else "sampled")
    t1 = time.perf_counter()
    path = reference_walk(
        embeddings, metric=metric, threshold=threshold, window=window, max_rejections=max_rejections, start=start
    )
    t2 = time.perf_counter()
    if not return_stats:
        return path
    return path, OrderStats(threshold, source, "reference", n, t1 - t0, t2 - t1)
