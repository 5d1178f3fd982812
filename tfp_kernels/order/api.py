"""Public entry point of the ordering layer: :func:`tfp_order`."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from .. import _ext
from . import _checks, inputs
from .policy import check_policy
from .reference import reference_walk
from .threshold import threshold_estimate


@dataclass(frozen=True)
class OrderStats:
    """What :func:`tfp_order` did.

    Attributes:
        threshold: the threshold ``t`` used (distance units of ``metric``).
        threshold_source: ``"given"``, ``"exact"`` (all pairs) or ``"sampled"``.
        backend: the implementation that computed the path: ``"fast"`` (band lists + C++ walk +
            exact fallback scans) or ``"reference"``.
        num_nodes: N.
        time_threshold_s: seconds spent estimating the threshold (0 when given).
        time_order_s: seconds spent computing the path (all phases).
        band_backend: ``"triton"`` or ``"torch"`` (fast backend only).
        band_dtype: what the band lists multiply: ``"float32"``, ``"float16x3"``, ``"bfloat16x3"`` or
            ``"bfloat16"`` (fast backend only).
        k: length K of the band lists (fast backend only).
        num_fallbacks: steps the band lists could not decide, settled by an exact scan.
        num_rebuilds: times the lists of the unvisited nodes were recomputed among the unvisited.
        time_band_s, time_walk_s, time_fallback_s: seconds per phase of the fast backend.
        num_groups: distinct rows (exact duplicates share one band list); N when all rows are distinct or
            duplicates are not grouped (with a cap, or t = 0).
        scan_candidates: rows the fused Triton scans (``fallback="triton"``) settled with float64 distances,
            summed over their scans: the rows their float16 pass left within its error bound of the answer.
        num_long_lists: band lists replaced by long lists (crowded near the threshold), over all builds;
        long_k: their length (0 when not used); time_long_s: seconds spent on them (within time_band_s).
        num_close_sets: nodes whose close set the walk counts (with a cap: where the cap could fire by the
            lists' counts; their time is in time_band_s); num_cap_fallbacks: the scans (among
            ``num_fallbacks``) at steps where the cap could fire; num_close_set_scans: the scans settled over
            the node's close set and band list instead of every unvisited node.
        policy: ``"paper"`` or ``"spread"`` (:mod:`~tfp_kernels.order.policy`).
        num_forced_steps: steps whose node lies closer than ``t`` to a node of the window: without the cap, the
            steps where the threshold ran out (no unvisited node was at distance ``>= t`` from the window, so the
            rule took ``c_0``, or with ``policy="spread"`` the node farthest from the window); with the cap, also
            the steps where the cap took a node closer than ``t``. Counted in the walk, with exact distances: by
            the reference at every step, by the fast backends at their exact scans (a band list's pick is valid);
            :func:`~tfp_kernels.order.policy.count_forced_steps` counts them for any order.
        first_forced_step: the first of them (an index into the path), None when there is none.
    """

    threshold: float
    threshold_source: str
    backend: str
    num_nodes: int
    time_threshold_s: float
    time_order_s: float
    band_backend: str = ""
    band_dtype: str = ""
    k: int = 0
    num_fallbacks: int = 0
    num_rebuilds: int = 0
    time_band_s: float = 0.0
    time_walk_s: float = 0.0
    time_fallback_s: float = 0.0
    num_groups: int = 0
    scan_candidates: int = 0
    num_long_lists: int = 0
    long_k: int = 0
    time_long_s: float = 0.0
    num_close_sets: int = 0
    num_cap_fallbacks: int = 0
    num_close_set_scans: int = 0
    policy: str = "paper"
    num_forced_steps: int = 0
    first_forced_step: int | None = None

    @property
    def fallback_rate(self) -> float:
        """Fraction of the N - 1 steps settled by an exact fallback scan."""
        return self.num_fallbacks / max(1, self.num_nodes - 1)


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
            :func:`~tfp_kernels.order.fast.cap_close_sets`.)
        start: the first node of the path (paper: 0).
        k: length K of the band lists (fast backend); larger K means fewer fallback scans, more memory
            (N x K x 8 bytes on the device and on the host). ``"auto"`` (default): 64, raised to 128
            where the rows' distances crowd around ``t`` so densely that K = 64 lists could seldom prove an
            answer (large N; estimated from 256 sampled rows, see
            :func:`~tfp_kernels.order.fast.auto_list_length`; with ``group`` counted over every rank's
            rows). Same path for every K.
        backend: ``"auto"`` (fast when the extension is built), ``"fast"`` or ``"reference"``.
        fallback: where the fast backend runs its exact fallback scans: ``"host"`` (in the C++ walk, on
            host copies), ``"device"`` (torch on the embeddings' device), ``"triton"`` (one fused Triton
            pass per scan, CUDA) or ``"auto"`` (host for CPU tensors and for up to 16,384 CUDA rows,
            device beyond). Same path in all.
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
            float64 beside 16-bit lists (fast backend; :func:`~tfp_kernels.order.fast.crowded_lists`). "auto":
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
        from ..distributed.order import tfp_order_sharded

        return tfp_order_sharded(
            embeddings, group=group, metric=metric, quantile=quantile, threshold=threshold, window=window,
            max_rejections=max_rejections, start=start, k=k, backend=backend, progress=progress,
            return_stats=return_stats, long_lists=long_lists, policy=policy,
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

        path, info = fast_tfp_order(
            embeddings, metric=metric, threshold=threshold, window=window, max_rejections=max_rejections,
            start=start, k=k, progress=progress, fallback=fallback, band_dtype=band_dtype, long_lists=long_lists,
            policy=policy,
        )
        extra = dataclasses.asdict(info)
        del extra["time_setup_s"]  # counted in time_order_s
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
    return path, OrderStats(threshold, source, backend, n, t1 - t0, t2 - t1, policy=policy, **extra)
