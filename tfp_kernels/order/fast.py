"""The fast exact TFP ordering: band lists, the C++ walk over them, exact scans where a list cannot decide.

:func:`fast_tfp_order` is the driver; it reads as the algorithm (docs/design.md, 'Why the path is exact' and
'Components of the engine'), for validated embeddings and a known threshold ``t``:

1. :class:`PreparedRows`: the rows in float64 and float32 (unit rows for cosine), their squared norms, the
   groups of exact duplicates, and the list rows (one per node, or per group);
2. a list builder (:class:`~tfp_kernels.order.builders.BandListBuilder`) lists, per list row, the K nearest
   nodes whose approximate squared distance is at least ``t^2`` minus its error bound (so no node at exact
   distance ``>= t`` is left out), lengthens the crowded lists, and the close sets where the cap could fire;
3. the walk (:class:`~tfp_kernels.order.walk_op.WalkOp`, the C++ op ``tfp_walk`` on host tables) takes each next
   node from the list of ``last``, deciding with exact double-precision distances, and stops where the list
   cannot prove the answer;
4. there a picker (:mod:`~tfp_kernels.order.pickers`) scans the unvisited nodes exactly, and the walk resumes;
   :func:`~tfp_kernels.order.schedule.run_walk` drives the two and rebuilds the lists of the unvisited nodes when
   the scans they would save reach a rebuild's price.

The result is the path of :func:`~tfp_kernels.order.reference.tfp_order_reference` up to floating-point ties
(both decide with float64 distances; only their rounding differs).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .band_precision import band_error_coef, resolve_band_backend, resolve_band_dtype
from .band_topk import band_topk_rows
from .builders import BandListBuilder, ListRows, ListTables, LongListBuilder, band_lists, cap_close_sets
from .distance import prepare
from .duplicates import DuplicateGroups, duplicate_groups
from .host_scan import half_scan_rows, no_host_scan, squared_norms64
from .list_length import auto_list_length
from .options import OrderOptions
from .pickers import CloseSetPicker, DeviceScanPicker, FusedScanPicker, PolicyPicker, Rule, WalkState
from .policy import near_duplicate_groups, walk_policy
from .scan_triton import triton_exact_pick
from .schedule import run_walk
from .stats import EngineCounters
from .threshold import squared_threshold
from .walk_op import WalkCounters, WalkOp, WalkTables, host_table

__all__ = ["Kernels", "PreparedRows", "fast_tfp_order", "resolve_fallback"]


@dataclass(frozen=True)
class Kernels:
    """The kernels the engine's components call, replaceable (a test hands a failing one in to see the engine
    fall back; a benchmark a counting one): ``band_lists`` (:func:`~tfp_kernels.order.builders.band_lists`),
    ``long_rows`` (the long lists' :func:`~tfp_kernels.order.band_topk.band_topk_rows`), ``fused_scan``
    (:func:`~tfp_kernels.order.scan_triton.triton_exact_pick`), ``close_sets``
    (:func:`~tfp_kernels.order.builders.cap_close_sets`)."""

    band_lists: Callable = band_lists
    long_rows: Callable = band_topk_rows
    fused_scan: Callable = triton_exact_pick
    close_sets: Callable = cap_close_sets


def resolve_fallback(fallback: str, device: torch.device, n: int, host_scan_max_nodes: int) -> str:
    """Where the exact scans run: ``"host"``, ``"device"`` or ``"triton"`` (checked), for ``fallback`` of
    :class:`~tfp_kernels.order.options.OrderOptions`.

    ``"auto"``: host for CPU tensors and for CUDA tensors up to ``host_scan_max_nodes`` nodes (the C++ host scan,
    one float16 pass over the unvisited rows, ~0.3 ms at N = 4,000 on 2 cores, beats the torch device scan, ~2 ms
    at N = 16,384 on an H200, launch- and sync-bound, on the buffers of a training loop), device beyond (the
    device's bandwidth wins)."""
    if fallback == "auto":
        return "host" if device.type == "cpu" or n <= host_scan_max_nodes else "device"
    if fallback == "triton":
        from .band_topk_triton import require_triton

        require_triton("fallback", device)
    return fallback


@dataclass(frozen=True)
class PreparedRows:
    """The rows every component reads, on the embeddings' device (host copies where named).

    Attributes:
        x64: (N, D) float64 prepared rows (unit rows for cosine); x32: (N, D) float32 of them; sq: (N,) float32 the
            float32 rows' squared norms, rounded once from float64; norm_sum: (N,) float64 ``sq + max(sq)``, the
            scale of every error bound; t2: the squared threshold.
        host: (N, D) the validated embeddings as a host table (float64 for float64 input, else float32): what the
            C++ walk measures exact distances on.
        groups: the exact-duplicate groups (host), or None (all rows distinct, or not grouped: with a cap, t = 0,
            N <= 2 or ``group_duplicates=False``).
        representatives: (R,) int64 on the device, the list rows (each group's lowest node), or None (R = N).
    """

    x64: torch.Tensor
    x32: torch.Tensor
    sq: torch.Tensor
    norm_sum: torch.Tensor
    t2: float
    host: torch.Tensor
    groups: DuplicateGroups | None
    representatives: torch.Tensor | None

    @classmethod
    def of(cls, embeddings: torch.Tensor, options: OrderOptions) -> PreparedRows:
        o = options
        x64 = prepare(embeddings, o.metric, torch.float64)
        x32 = x64.float()
        sq = squared_norms64(x32).float()  # the float32 rows' norms, rounded once (band_error_coef's rounded_norms)
        host = host_table(embeddings, torch.float64 if embeddings.dtype == torch.float64 else torch.float32,
                          min_bytes=o.settings.huge_page_min_bytes)
        groups = None
        if o.groups_duplicates(embeddings.shape[0]):
            groups = duplicate_groups(embeddings)  # (on the GPU for CUDA inputs: ~4 s of host sort at N = 1e6)
        reps = None if groups is None else groups.representatives.to(embeddings.device)
        return cls(x64, x32, sq, sq.double() + sq.max().double(), squared_threshold(o.threshold, o.metric), host,
                   groups, reps)

    def list_rows(self, *tables: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The list rows' rows of per-node ``tables``."""
        return tables if self.representatives is None else tuple(t.index_select(0, self.representatives)
                                                                 for t in tables)

    def walk_groups(self) -> tuple[torch.Tensor, ...] | None:
        """The op's duplicate-group tables (with a fresh ``next`` table), or None."""
        g = self.groups
        return None if g is None else (g.group_of, g.offsets, g.members, g.offsets[:-1].clone())


def list_builder(rows: PreparedRows, options: OrderOptions, dim: int, kernels: Kernels) -> tuple[BandListBuilder, int]:
    """The :class:`~tfp_kernels.order.builders.BandListBuilder` of the run and its lists' length K."""
    o, s = options, options.settings
    backend = resolve_band_backend(o.band_backend, rows.x32.device)
    x32, sq, norm_sum = rows.list_rows(rows.x32, rows.sq, rows.norm_sum)
    list_rows = ListRows.of(x32, sq, norm_sum, rows.t2, backend, resolve_band_dtype(o.band_dtype, backend))
    num_lists = x32.shape[0]
    k = auto_list_length(x32, sq, rows.t2, list_rows.slack, settings=s) if o.k == "auto" else o.k
    k = min(k, max(num_lists - 1, 1))
    long_k = min(s.long_list_factor * k, num_lists - 1)
    use_long = num_lists >= s.long_list_min_rows if o.long_lists == "auto" else bool(o.long_lists)
    long = None
    if use_long and o.max_rejections is None and rows.t2 > 0 and long_k > k:
        float64_rows = None if list_rows.dtype == torch.float32 else rows.list_rows(rows.x64)[0]
        long = LongListBuilder(list_rows, long_k, float64_rows=float64_rows, settings=s, rows_kernel=kernels.long_rows)
    return BandListBuilder(list_rows, k, long=long, settings=s, progress=o.progress, band_kernel=kernels.band_lists), k


def scan_picker(rows: PreparedRows, options: OrderOptions, fallback: str, state: WalkState, lists: ListTables,
                close, policy, kernels: Kernels):
    """The picker of the steps the lists cannot decide: the device scan, or the fused scan (with the device scan
    where the cap could fire), behind the close sets (with a cap) and the policy."""
    rule = Rule(options.metric, options.threshold, options.window, options.max_rejections)
    picker = DeviceScanPicker(rows.x64, state, rule)
    if fallback == "triton" and FusedScanPicker.usable(rule):
        picker = FusedScanPicker(rows.x64, rows.x32, rows.sq, rows.t2, state, rule, picker, kernel=kernels.fused_scan)
    if close is not None:
        picker = CloseSetPicker(picker, rows.x64, close, lists.index, lists.limit2, state, rule)
    return PolicyPicker(picker, policy, rows.x64, state)


def rebuild_lists(rows: PreparedRows, builder: BandListBuilder, lists: ListTables, state: WalkState):
    """``rebuild(step)`` of :func:`~tfp_kernels.order.schedule.run_walk`: the lists of the list rows with an
    unvisited node, among themselves."""

    def rebuild(step: int) -> None:
        if rows.groups is not None:  # the groups with an unvisited member
            alive = torch.zeros(lists.index.shape[0], dtype=torch.bool)
            alive[rows.groups.group_of[~state.visited].long()] = True
            rows_host = torch.nonzero(alive).flatten()
        else:
            rows_host = torch.nonzero(~state.visited).flatten()
        lists.install(rows_host, builder.build(rows_host.to(rows.x32.device)))

    return rebuild


def progress_bar(options: OrderOptions, n: int):
    """A tqdm bar over the walk's steps, or None."""
    if not options.progress:
        return None
    from tqdm.auto import tqdm

    bar = tqdm(total=n, initial=1, desc="tfp walk", unit="node")
    return None if bar.disable else bar


def fast_tfp_order(embeddings: torch.Tensor, options: OrderOptions, kernels: Kernels | None = None,
                   ) -> tuple[torch.Tensor, EngineCounters]:
    """Exact TFP path of validated ``embeddings`` (N, D) (any float dtype, CPU or CUDA) under ``options`` (a checked
    :class:`~tfp_kernels.order.options.OrderOptions` with a known threshold); ``kernels``: None for the defaults
    (:class:`Kernels`).

    Returns:
        path: (N,) int64 on the device of ``embeddings``; and the run's
        :class:`~tfp_kernels.order.stats.EngineCounters`.
    """
    o, s = options, options.settings
    kernels = Kernels() if kernels is None else kernels
    n, dim = embeddings.shape
    fallback = resolve_fallback(o.fallback, embeddings.device, n, s.host_scan_max_nodes)
    t0 = time.perf_counter()
    rows = PreparedRows.of(embeddings, o)
    builder, k = list_builder(rows, o, dim, kernels)
    time_setup = time.perf_counter() - t0

    t0 = time.perf_counter()
    lists = ListTables(builder.build_all(may_fall_back=o.band_backend == "auto"),
                       long_k=None if builder.long is None else builder.long.long_k)
    close = None  # the close sets of the nodes where the cap could fire (rows are nodes: no groups with a cap)
    if o.use_close_sets and o.max_rejections is not None and n - 1 > o.max_rejections and rows.groups is None:
        close = kernels.close_sets(rows.x32, rows.sq, lists.num_close, rows.t2, rows.norm_sum, k, o.max_rejections,
                               budget=s.close_set_budget)
    time_band = time.perf_counter() - t0
    t0 = time.perf_counter()
    policy = walk_policy(o.policy, threshold=o.threshold, metric=o.metric, n=n,
                         groups=lambda: near_duplicate_groups(rows.x64, threshold=o.threshold, metric=o.metric,
                                                              prepared=True, alone=lists.alone(rows.groups)))
    time_setup += time.perf_counter() - t0
    if o.progress:
        from tqdm.auto import tqdm

        tqdm.write(f"tfp band lists: {lists.index.shape[0]} rows, K = {k}, {builder.backend} "
                   f"{builder.rows.dtype}, {time_band:.2f} s (setup {time_setup:.2f} s)")

    t0 = time.perf_counter()
    state = WalkState(n, o.start, embeddings.device, o.window)
    counters = WalkCounters()
    norms = (torch.linalg.vector_norm(rows.host.double(), dim=1).contiguous() if o.metric == "cosine"
             else torch.empty(0, dtype=torch.float64))
    # the walk bounds the error of the lists' s2 by each node's bound (of the precision the lists were built in)
    slack = (band_error_coef(dim, builder.rows.dtype, builder.rows.backend) * rows.norm_sum).cpu().contiguous()
    walk = WalkOp(
        WalkTables(rows.host, norms, lists.index, lists.s2, lists.limit2, slack, lists.num_close, state.path,
                   state.visited, host_scan=half_scan_rows(rows.x32) if fallback == "host" else no_host_scan(),
                   groups=rows.walk_groups(), long_lists=lists.long, close_sets=close, policy=policy),
        threshold=o.threshold, window=o.window, max_rejections=o.max_rejections, cosine=o.metric == "cosine",
        counters=counters)
    picker = scan_picker(rows, o, fallback, state, lists, close, policy, kernels)
    bar = progress_bar(o, n)
    time_setup += time.perf_counter() - t0

    tally = run_walk(n, walk=walk, pick=picker.pick, rebuild=rebuild_lists(rows, builder, lists, state)
                     if o.rebuild == "auto" else None, path=state.path, visited=state.visited, counters=counters,
                     k=k, bar=bar, settings=s)
    if bar is not None:
        bar.close()
    return state.path.to(embeddings.device), engine_counters(rows, builder, lists, close, picker, counters, tally, k,
                                                             time_setup, time_band)


def engine_counters(rows: PreparedRows, builder: BandListBuilder, lists: ListTables, close, picker, counters,
                    tally, k: int, time_setup: float, time_band: float) -> EngineCounters:
    """The run's :class:`~tfp_kernels.order.stats.EngineCounters`, from its components."""
    picked = picker.counts()
    forced = picker.forced
    forced.add_walk_counter(counters.tensor)
    long = builder.long
    return EngineCounters(
        band_backend=builder.backend, band_dtype=str(builder.rows.dtype).replace("torch.", ""), k=k,
        num_fallbacks=tally.scans + counters.scans, num_rebuilds=tally.rebuilds,
        time_band_s=time_band + tally.band_s, time_walk_s=tally.walk_s, time_fallback_s=tally.fallback_s,
        time_setup_s=time_setup,
        num_groups=rows.x32.shape[0] if rows.groups is None else rows.groups.offsets.numel() - 1,
        scan_candidates=picked.get("scan_candidates", 0),
        num_long_lists=lists.num_long_lists, long_k=0 if long is None else long.long_k,
        time_long_s=0.0 if long is None else long.time_s,
        num_close_sets=0 if close is None else int((close[0].diff() > 0).sum()),
        num_cap_fallbacks=counters.cap_scans,
        num_close_set_scans=counters.close_set_scans + picked.get("num_close_set_scans", 0),
        num_forced_steps=forced.count, first_forced_step=forced.first,
    )
