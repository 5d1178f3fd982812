"""Public entry point of the ordering layer: :func:`tfp_order`."""

from __future__ import annotations

import dataclasses
import time

import torch

from .. import _ext
from . import _checks, inputs
from .options import OrderOptions, check_settings
from .policy import check_policy
from .reference import reference_walk
from .stats import OrderStats
from .threshold import threshold_estimate

#: The driver of ``tfp_order(shard, ..., group=g)``: :func:`tfp_kernels.distributed.tfp_order_sharded`,
#: registered by :mod:`tfp_kernels.distributed` when it is imported (the ordering layer never imports it).
_sharded_order = None


def register_sharded_driver(driver) -> None:
    """Set the function that ``tfp_order(shard, ..., group=g)`` hands its arguments to (keyword arguments
    as :func:`tfp_kernels.distributed.tfp_order_sharded`'s). Called by :mod:`tfp_kernels.distributed.order`
    when it is imported."""
    global _sharded_order
    if not callable(driver):
        raise TypeError(f"the sharded driver must be callable, got {type(driver).__name__}")
    _sharded_order = driver


def sharded_driver():
    """The registered driver of ``tfp_order(..., group=g)``; RuntimeError when none is
    (``tfp_kernels.distributed`` not imported, or its import failed)."""
    if _sharded_order is None:
        raise RuntimeError(
            "tfp_order(group=...) needs the sharded driver of tfp_kernels.distributed, which is not "
            "registered: import tfp_kernels.distributed (its import registers tfp_order_sharded) and check "
            "that it imports"
        )
    return _sharded_order


def tfp_order(
    embeddings: torch.Tensor,
    *,
    metric: str = "l2",
    quantile: float = 0.02,
    threshold: float | None = None,
    window: int = 4,
    max_rejections: int | None = None,
    start: int = 0,
    k: int | str = "auto",
    backend: str = "auto",
    fallback: str = "auto",
    band_dtype: str = "auto",
    long_lists: bool | str = "auto",
    progress: bool = False,
    return_stats: bool = False,
    group=None,
    policy: str = "paper",
    settings=None,
):
    """Order samples by Threshold Filtering Packing (docs/design.md, 'The rule').

    Neighbours in the returned order are related (close in embedding space) but not near-duplicates:
    each next sample is the nearest unvisited one that is at distance ``>= t`` from each of the last
    ``window`` samples of the path. Feed the order to :func:`~tfp_kernels.pack_lengths`.

    How (``backend="fast"``, the default when the compiled extension is present): band top-k lists
    (the K nearest nodes at distance ``>= t`` of every node; a Triton kernel on CUDA, blockwise matrix
    products on the CPU; O(N K) memory, never N x N), a C++ walk over them that decides every step with
    exact float64 distances, and an exact scan of the unvisited nodes where a list cannot prove its
    answer. The path equals :func:`tfp_order_reference`'s up to floating-point ties.
    ``backend="reference"`` runs the plain-torch reference walk instead (O(N^2 D)).

    Every backend sees the rows scaled by a power of two into a safe range (when their largest entry is
    outside ``[2**-20, 2**20]``), and ``threshold`` with them: exact, so the path of ``E * 2**k`` is that of
    ``E`` (subnormal rows give the reference's path) and the threshold is in the units of ``embeddings``
    (:mod:`~tfp_kernels.order.inputs`).

    Args:
        embeddings: (N, D), float16/bfloat16/float32/float64, CPU or CUDA; finite; N >= 1; ``requires_grad``
            allowed (detached: the order has no gradient).
        metric: ``"l2"`` (the paper) or ``"cosine"`` (``1 - cos``).
        quantile: q in (0, 1) for the threshold when ``threshold`` is None (paper: 0.02).
        threshold: the threshold ``t`` >= 0; None estimates it (:func:`~tfp_kernels.estimate_threshold`).
        window: the number of recent path nodes a candidate must be ``>= t`` from (paper: 4); a Python or
            numpy int; ``N - 1`` or more gives the path of ``N - 1`` (it is capped there).
        max_rejections: None (default: no cap, the threshold is always honoured when it can be) or the
            paper's cap ``M`` (paper: 10000): after ``M`` rejected candidates the next one is taken
            unchecked (``N - 1`` or more never fires: capped there). At large N the cap fires constantly and
            the rule becomes "the (M+1)-th nearest node" (docs/design.md, 'The rule'). (Fast backend: nodes
            where the lists' counts of close nodes let the cap fire get close sets, at most 4 N K int32
            entries, so that the walk counts the still unvisited ones:
            :func:`~tfp_kernels.order.builders.cap_close_sets`.)
        start: the first node of the path (paper: 0).
        k: length K of the band lists (fast backend); larger K means fewer fallback scans, more memory
            (N x K x 8 bytes on the device and on the host). ``"auto"`` (default): 64, raised to 128
            where the rows' distances crowd around ``t`` so densely that K = 64 lists could seldom prove an
            answer (large N; estimated from 256 sampled rows, see
            :func:`~tfp_kernels.order.list_length.auto_list_length`; with ``group`` counted over every rank's
            rows). Same path for every K.
        backend: ``"auto"`` (fast when the extension is built), ``"fast"`` or ``"reference"``.
        fallback: where the fast backend runs its exact fallback scans: ``"host"`` (in the C++ walk, on
            host copies), ``"device"`` (torch on the embeddings' device), ``"triton"`` (one fused Triton
            pass per scan, CUDA) or ``"auto"`` (host for CPU tensors and for up to 16,384 CUDA rows,
            device beyond). Same path in all. With ``group``: ``"auto"``, ``"device"`` or ``"triton"``
            (:func:`tfp_kernels.distributed.tfp_order_sharded`'s ``fallback``).
        band_dtype: what the band lists multiply (fast backend): ``"auto"`` (``"float16x3"`` with the
            Triton kernel on CUDA: rows scaled per row and split as float16 hi + lo, three tensor-core
            products summed by chunks, an error bound 4x below float32 products'; float32 on the CPU),
            ``"float32"``, ``"float16x3"``, ``"bfloat16x3"`` (unscaled bf16 split, a 5x wider bound) or
            ``"bfloat16"`` (one bf16 product; its error bound makes many more fallback scans at D in the
            hundreds). Same path in all: every decision is taken on exact distances; the bound only sets how
            much the lists can prove (at N = 10^6 it decides whether K = 64 lists can prove anything).
            Ignored with ``group`` (the sharded lists are float32).
        long_lists: ``"auto"`` (default), True or False: the band lists that sit within their error bound of
            ``t`` (they could prove almost nothing) replaced by 4K-entry lists of those rows, computed in
            float64 beside 16-bit lists (fast backend; :func:`~tfp_kernels.order.builders.crowded_lists`). "auto":
            from 65,536 list rows; never with a cap or ``t = 0``. Same path either way. With ``group``, every
            rank lists its own rows for them and rank 0 merges.
        progress: show a progress bar (tqdm) of the walk.
        return_stats: also return an :class:`OrderStats`.
        group: None (default: this process orders all of ``embeddings``) or an initialised
            ``torch.distributed`` process group (e.g. ``torch.distributed.group.WORLD``): then every rank of
            the group calls ``tfp_order`` with its contiguous block of the rows (in rank order, as
            ``torch.arange(N).tensor_split(world_size)`` splits them; empty blocks allowed) and gets the same
            global (N,) path, that of the single-process call on all rows;
            see :func:`tfp_kernels.distributed.tfp_order_sharded` (stats: a ``ShardedOrderStats``).
        policy: what the walk does where the threshold runs out (:mod:`~tfp_kernels.order.policy`): ``"paper"``
            (default: the paper's rule, which then takes the nearest node) or ``"spread"`` (no cap): a group of
            exact duplicates that the window can barely still keep apart (``m`` unvisited members among ``u``
            unvisited nodes, ``m (window + 1) >= u``) has its members taken as soon as they are valid, and a step
            where no node is valid takes the node farthest from the window. On data where many records share one
            text, "paper" ends the order with those records in a row; "spread" keeps them ``window + 1`` apart
            where the data allows it. Same path from every backend; see ``stats.num_forced_steps``.
        settings: None (the defaults) or an :class:`~tfp_kernels.order.options.EngineSettings`: the fast engine's
            tuning constants (list lengths of ``k="auto"``, long lists, close sets, rebuilds, the Triton band
            schedule). Same path for any.

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
    if group is not None:
        return sharded_driver()(
            embeddings, group=group, metric=metric, quantile=quantile, threshold=threshold, window=window,
            max_rejections=max_rejections, start=start, k=k, backend=backend, progress=progress,
            return_stats=return_stats, long_lists=long_lists, policy=policy, settings=settings, fallback=fallback,
        )
    metric = _checks.check_metric(metric)
    embeddings = _checks.check_embeddings(embeddings, metric=metric)
    n = embeddings.shape[0]
    quantile = _checks.check_quantile(quantile)
    threshold = _checks.check_threshold(threshold)
    window = inputs.check_window(window, n)
    max_rejections = inputs.check_max_rejections(max_rejections, n)
    policy = check_policy(policy, max_rejections)
    k = _checks.check_list_length(k)
    long_lists = _checks.check_long_lists(long_lists)
    start = _checks.check_start(start, n)
    settings = check_settings(settings)
    scaled = inputs.prepare_rows(embeddings, metric)  # detached, scaled by 2**k: the engines see only these
    embeddings, given_threshold, threshold = scaled.rows, threshold, scaled.to_rows_units(threshold)
    t0 = time.perf_counter()
    if threshold is not None:
        source = "given"
    elif n == 1:
        threshold, source = 0.0, "given"
    else:
        est = threshold_estimate(embeddings, metric=metric, quantile=quantile)
        threshold, source = est.value, ("exact" if est.exact else "sampled")
    t1 = time.perf_counter()
    extra = {}
    if backend == "fast" or (backend == "auto" and n > 1):
        if backend == "auto" and not _ext.has_extension():
            _ext.warn_fallback("tfp_order (the C++ walk)")
            backend = "reference"
        else:
            _ext.require_extension("tfp_order(backend='fast')")
            backend = "fast"
    if backend == "fast":
        from .fast import fast_tfp_order

        path, counters = fast_tfp_order(embeddings, OrderOptions(
            metric=metric, threshold=threshold, window=window, max_rejections=max_rejections, start=start,
            policy=policy, k=k, band_dtype=band_dtype, fallback=fallback, long_lists=long_lists, progress=progress,
            settings=settings,
        ))
        extra = dataclasses.asdict(counters)
    elif backend in ("reference", "auto"):
        backend = "reference"
        path, forced = reference_walk(
            embeddings, metric=metric, threshold=threshold, window=window, max_rejections=max_rejections,
            start=start, policy=policy, return_forced=True,
        )
        forced = torch.nonzero(forced).flatten()
        extra = {"num_forced_steps": int(forced.numel()),
                 "first_forced_step": int(forced[0]) if forced.numel() else None}
    else:
        raise ValueError(f"backend must be 'auto', 'fast' or 'reference', got {backend!r}")
    t2 = time.perf_counter()
    if not return_stats:
        return path
    threshold = scaled.to_user_units(threshold) if given_threshold is None else given_threshold  # (user units)
    return path, OrderStats(threshold=threshold, threshold_source=source, backend=backend, num_nodes=n,
                            time_threshold_s=t1 - t0, time_order_s=t2 - t1, policy=policy, **extra)
