"""Sharded TFP ordering over a ``torch.distributed`` process group (issue 7, part 1).

Every rank of the group passes its contiguous block of the N rows (rank ``r`` holds the global rows
``offset_r .. offset_r + n_r - 1`` with ``offset_r = n_0 + ... + n_{r-1}``; :func:`shard_bounds` gives the
usual split, ``torch.arange(N).tensor_split(world_size)``; empty shards are allowed). Every rank returns
the same (N,) int64 path of global indices, equal to single-process :func:`~tfp_kernels.tfp_order` on the
concatenated rows (up to floating-point ties: both decide every step with float64 distances).

Phases (all ranks take part in each; the transport is ``torch.distributed``: gloo on CPU, NCCL on GPU):

1. **Validation**: one ``all_gather_object`` of each rank's shard shape, dtype, device type, arguments,
   engine settings and local error; every rank raises the same error when any rank's input is bad or the
   ranks disagree.
2. **Threshold**: the value single-process :func:`~tfp_kernels.estimate_threshold` gives. Exact (N <= 5,793:
   all pairs) -> the rows are gathered to rank 0, which computes it. Sampled (larger N) -> every rank draws
   the same seeded global pairs, rank 0 gathers only the rows those pairs touch (at most 2 x 2^20 rows) and
   computes the same distances. Rank 0 broadcasts the value. ``threshold=`` skips this phase.
3. **Rows to rank 0** (the walking rank), as a host copy: the C++ walk checks every list entry and window
   with exact float64 distances, which needs the rows of arbitrary nodes, and asking their owners per step
   would cost a round trip per step. Rank 0 finds the groups of exact duplicates among them
   (:func:`~tfp_kernels.order.duplicates.duplicate_groups`, as one process: not with a cap, nor with
   ``t = 0``), numbers them by their lowest member, and broadcasts which rows are *list rows*: every row, or
   each group's lowest member (one band list per group, its entries group ids; a group's members have the
   same distance to everything, and the walk takes its lowest unvisited one). List rows are numbered in rank
   order, so each rank holds a contiguous block of them.
4. **List phase** (ring, :class:`RingListBuilder`): each rank lists its list rows
   (docs/design.md, 'The band lists') against every rank's block of list rows; the blocks travel around the
   ring (``isend`` to ``r + 1``, ``irecv`` from ``r - 1``, the next block's transfer overlapping the current
   block's products), so a rank holds its own rows and at most two column blocks, never all embeddings.
   Blockwise float32 products (IEEE, no TF32) with the same error bound and the same band as the
   single-process lists: torch tiles (on the CPU selected by the C++ op), or on CUDA one launch of the fused
   Triton band kernel per column block (``band_backend``; the rank's own block square, another rank's as
   columns); per row the running K best are merged by (squared distance, global list-row id).
   The lists are gathered to rank 0.
5. **Walk** on rank 0: the single-process driver (:func:`~tfp_kernels.order.schedule.run_walk`) over the same
   components: the C++ walk (:class:`~tfp_kernels.order.walk_op.WalkOp` on
   :class:`~tfp_kernels.order.builders.ListTables`), the ring builder for the rebuilds, and a sharded picker
   (:class:`ShardedScanPicker`, behind the policy's :class:`~tfp_kernels.order.pickers.PolicyPicker`). The other
   ranks serve commands that rank 0 broadcasts (:func:`_serve`), each with the nodes visited since the last:
   *scan* (where a list cannot prove its answer): rank 0 broadcasts the step and the window rows; each rank
   scans its own unvisited rows exactly, the single-process scan's rule with float64 distances from the
   reference's kernel, ties broken by global index. Where the cap cannot fire (and the window has at most 64
   nodes): a *masked scan* (:class:`_MaskedScan`, ``fallback``): one float32 pass over the rank's rows against
   the window's rows (torch ops, or the Triton scan kernel on CUDA) marks each row surely valid, surely
   invalid or undecided; each rank measures in float64 only its rows that can still beat its best surely
   valid row (and those nearest ``last``), and one ``all_gather`` of every rank's best valid row and nearest
   row gives the pick. Elsewhere: candidates in the order of a projection lower bound
   (:func:`_sharded_pick`), an ``all_gather`` of per-rank summaries per round (more rounds only when a rank
   must look further, and for the rejection cap a count and, when the cap fires, a gather of each rank's
   M + 1 nearest). *rebuild*: the lists
   of the list rows with an unvisited node, recomputed among themselves with the same ring (rank 0 broadcasts
   which). *long*: long lists for the crowded lists of a build (``long_lists``, see
   :func:`~tfp_kernels.order.builders.crowded_lists`; :class:`RingLongListBuilder`): rank 0 broadcasts those
   rows in float64, each rank lists the build's list rows it holds for them in float64 and rank 0 merges the
   ranks' best by (distance, id). *done*: rank 0 broadcasts the path, then its counters.

Memory per rank (n_r rows of dimension D, K list length, N total rows, ``b`` = ``block_elements``):

- list phase, every rank: the shard (n_r D in its dtype) + float32 rows (4 n_r D) + two column blocks in
  flight (8 max_r(n_r) D) + running lists and their merge (24 n_r K) + one (rows x columns) float32 tile
  (4 b bytes, 64 MiB by default): O((N / ranks) (D + K)).
- scans, every rank: float32 prepared rows with room for the window's (4 (n_r + window) D) for the masked
  scans, float64 projections of its rows (8 n_r r, r <= 64) for the others + a visited mask.
- rank 0 from the list phase on: the N x D embeddings as a host copy (float32, or float64 for float64 input:
  4 N D bytes) + the host lists (N (8 K + 20) bytes) + path/visited (9 N): O(N (D + K)). This is the
  price of an exact walk with one round trip per fallback instead of per step; see benchmarks/README.md
  for N = 10^8 (rank 0 then needs ~360 GB of host memory).
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

from .. import _ext
from ..order import _checks, inputs
from ..order.api import register_sharded_driver
from ..order.band_topk import (
    band_bounds,
    float64_error_coef,
    list_limits,
    select_smallest,
    squared_distance_error_coef,
)
from ..order.builders import BuiltLists, ListTables, LongLists, cap_close_sets, crowded_lists
from ..order.distance import distances_between, ieee_fp32_matmul, pair_distances, prepare
from ..order import list_length
from ..order.duplicates import DuplicateGroups, duplicate_groups
from ..order.failures import kernel_failure
from ..order.fast import progress_bar
from ..order.host_scan import no_host_scan, squared_norms64
from ..order.options import EngineSettings, OrderOptions, check_settings
from ..order.pickers import PolicyPicker, Rule, WalkState
from ..order.policy import check_policy, near_duplicate_groups, walk_policy
from ..order.scan import LB_SAFETY, PROJECTION_DIM, PROJECTION_SAMPLE, projection_basis
from ..order.scan_triton import MAX_SCAN_WINDOW, masked_scan_torch, masked_scan_triton
from ..order.schedule import run_walk
from ..order.stats import EngineCounters, OrderStats
from ..order.walk_op import WalkCounters, WalkOp, WalkTables
from ..order.threshold import (
    DEFAULT_SAMPLE_PAIRS,
    MAX_EXACT_PAIRS,
    quantile_linear,
    squared_threshold,
    threshold_estimate,
)

__all__ = ["ShardedOrderStats", "shard_bounds", "shard_rows", "tfp_order_sharded"]

_MAX_KEY = 0x7FFFFFFFFFFFFFFF
_ROOT = 0  # group rank of the walking rank
# commands broadcast by the walking rank
_DONE, _SCAN, _REBUILD, _BASIS, _LONG = 0, 1, 2, 3, 4
# bytes per message when rows are gathered to rank 0
_CHUNK_BYTES = 1 << 28


@dataclass(frozen=True)
class ShardedOrderStats(OrderStats):
    """:class:`~tfp_kernels.OrderStats` of a sharded run, plus what the distribution cost.

    ``backend`` is ``"sharded"`` and ``band_backend`` ``"torch-ring"``. The counters (``num_fallbacks``,
    ``num_rebuilds``, ``num_groups``, ...) are rank 0's, the same on every rank. Times are this rank's: on rank
    0 the walk's; on the others ``time_band_s`` / ``time_long_s`` their part of the lists, ``time_fallback_s``
    their part of the scans, ``time_walk_s`` 0.

    Attributes (besides OrderStats'):
        world_size: ranks in the group.
        rank: this rank (group rank).
        num_rows: n_r, the rows of this rank's shard.
        time_lists_s: seconds of the first list phase on this rank (the ring; ``time_band_s`` adds rebuilds).
        time_gather_s: seconds spent gathering embeddings and lists to rank 0 (this rank's side).
        bytes_ring: bytes this rank sent around the ring in the list phase (first build only).
        bytes_to_root: bytes this rank sent to rank 0 (threshold rows + rows + the lists of every build).
    """

    world_size: int = 1
    rank: int = 0
    num_rows: int = 0
    time_lists_s: float = 0.0
    time_gather_s: float = 0.0
    bytes_ring: int = 0
    bytes_to_root: int = 0


def shard_bounds(n: int, world_size: int) -> list[tuple[int, int]]:
    """``[(start, stop)]`` per rank of the split ``torch.arange(n).tensor_split(world_size)``.

    The first ``n % world_size`` ranks get one row more; with ``n < world_size`` the last ranks get none.

    Examples::

        >>> shard_bounds(10, 4)
        [(0, 3), (3, 6), (6, 8), (8, 10)]
        >>> shard_bounds(2, 3)
        [(0, 1), (1, 2), (2, 2)]
    """
    if not isinstance(n, int) or n < 0 or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"need n >= 0 and world_size >= 1, got n = {n!r}, world_size = {world_size!r}")
    base, extra = divmod(n, world_size)
    out, s = [], 0
    for r in range(world_size):
        e = s + base + (r < extra)
        out.append((s, e))
        s = e
    return out


def shard_rows(embeddings: torch.Tensor, group=None) -> torch.Tensor:
    """This rank's block of a full (N, D) tensor under :func:`shard_bounds` (a view, no copy)."""
    world = dist.get_world_size(group)
    s, e = shard_bounds(embeddings.shape[0], world)[dist.get_rank(group)]
    return embeddings[s:e]


class _Comm:
    """The process group, this rank, and the device collectives run on (CUDA for NCCL, else CPU)."""

    def __init__(self, group):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "tfp_order(group=...) needs an initialised torch.distributed process group "
                "(torch.distributed.init_process_group)"
            )
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world = dist.get_world_size(self.group)
        if self.rank < 0:
            raise RuntimeError(
                "tfp_order(group=...) was called on a process that is not a member of the group"
            )
        backend = str(dist.get_backend(self.group)).lower()
        if "nccl" in backend:
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")

    def bcast(self, tensor: torch.Tensor, src: int = _ROOT) -> torch.Tensor:
        """Broadcast from group rank ``src``; returns the received tensor on ``tensor``'s device."""
        buf = tensor.to(self.device).contiguous()
        if self.world > 1:
            dist.broadcast(buf, group=self.group, group_src=src)
        return buf.to(tensor.device)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """(world, *tensor.shape): every rank's ``tensor`` (same shape on all ranks)."""
        buf = tensor.to(self.device).contiguous()
        if self.world == 1:
            return buf[None].to(tensor.device)
        out = [torch.empty_like(buf) for _ in range(self.world)]
        dist.all_gather(out, buf, group=self.group)
        return torch.stack(out).to(tensor.device)

    def all_max(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return float(t)


def _local_errors(embeddings, *, metric, args: dict) -> tuple[dict, torch.Tensor | None]:
    """Check this rank's shard and arguments; return a summary for the other ranks (never raises)."""
    info = {
        "error": None,
        "n": -1,
        "d": -1,
        "dtype": None,
        "device_type": None,
        "args": args,
        "extension": _ext.has_extension(),
    }
    try:
        if isinstance(embeddings, torch.Tensor) and embeddings.dim() == 2 and embeddings.shape[0] == 0:
            if embeddings.dtype not in _checks.FLOAT_DTYPES:
                raise TypeError(f"embeddings must have a floating dtype, got {embeddings.dtype}")
            if embeddings.shape[1] == 0:
                raise ValueError(f"embeddings has no columns: shape {tuple(embeddings.shape)} (D = 0)")
        else:
            embeddings = _checks.check_embeddings(embeddings, metric=metric)
        info.update(
            n=int(embeddings.shape[0]),
            d=int(embeddings.shape[1]),
            dtype=str(embeddings.dtype),
            device_type=embeddings.device.type,
        )
    except (TypeError, ValueError) as err:
        info["error"] = (type(err).__name__, str(err))
        embeddings = None
    return info, embeddings


class _Request(NamedTuple):
    """The checked arguments of a sharded run (:func:`_validate`), the same on every rank; ``shard``: this rank's
    validated rows, ``sizes``: the rows of every rank."""

    shard: torch.Tensor
    sizes: list[int]
    metric: str
    quantile: float
    threshold: float | None
    window: int
    max_rejections: int | None
    start: int
    k: int | str
    rebuild: str | None
    long_lists: bool | str
    policy: str
    settings: EngineSettings
    band_backend: str = "torch"
    fallback: str = "device"


def _sharded_backends(device: torch.device, band_backend, fallback, window: int) -> tuple[str, str]:
    """``band_backend`` ("auto", "torch", "triton") and ``fallback`` ("auto", "device", "triton") of a sharded run
    on ``device``, resolved (ValueError for a bad value, or "triton" where Triton cannot run)."""
    from ..order.band_topk_triton import require_triton, triton_runs_on

    if band_backend not in ("auto", "torch", "triton"):
        raise ValueError(f"band_backend must be 'auto', 'torch' or 'triton', got {band_backend!r}")
    if fallback not in ("auto", "device", "triton"):
        raise ValueError(f"fallback must be 'auto', 'device' or 'triton' with a process group, got {fallback!r}")
    triton_here = device.type == "cuda" and triton_runs_on(device)
    for name, value in (("band_backend", band_backend), ("fallback", fallback)):
        if value == "triton":
            require_triton(name, device)
    if band_backend == "auto":
        band_backend = "triton" if triton_here else "torch"
    if fallback == "auto":
        fallback = "triton" if triton_here and window <= MAX_SCAN_WINDOW else "device"
    elif fallback == "triton" and window > MAX_SCAN_WINDOW:
        raise ValueError(f"fallback='triton' scans windows of at most {MAX_SCAN_WINDOW} nodes, got window={window}")
    return band_backend, fallback


def _validate(
    comm: _Comm, embeddings, *, metric, quantile, threshold, window, max_rejections, start, k, backend,
    rebuild="auto", long_lists="auto", policy="paper", settings=None, band_backend="auto", fallback="auto",
) -> _Request:
    """Collective validation: every rank raises the same error when any rank's input is bad."""
    arg_error = None
    try:
        metric = _checks.check_metric(metric)
        quantile = _checks.check_quantile(quantile)
        threshold = _checks.check_threshold(threshold)
        window = _checks.check_window(window)
        max_rejections = _checks.check_max_rejections(max_rejections)
        policy = check_policy(policy, max_rejections)
        k = _checks.check_list_length(k)
        if not (isinstance(start, int) and not isinstance(start, bool)):
            raise ValueError(f"start must be an integer in [0, N), got {start!r}")  # noqa: TRY004 (as tfp_order)
        if backend not in ("auto", "fast"):
            raise ValueError(f"backend must be 'auto' or 'fast' with a process group, got {backend!r}")
        if rebuild not in ("auto", None):
            raise ValueError(f"rebuild must be 'auto' or None, got {rebuild!r}")
        long_lists = _checks.check_long_lists(long_lists)
        settings = check_settings(settings)
        if isinstance(embeddings, torch.Tensor) and isinstance(window, int):
            band_backend, fallback = _sharded_backends(embeddings.device, band_backend, fallback, window)
    except (TypeError, ValueError) as err:
        arg_error = (type(err).__name__, str(err))
    args = {
        "metric": metric,
        "quantile": quantile,
        "threshold": threshold,
        "window": window,
        "max_rejections": max_rejections,
        "start": start,
        "k": k,
        "rebuild": rebuild,
        "long_lists": long_lists,
        "policy": policy,
        "band_backend": band_backend,
        "fallback": fallback,
    }
    info, checked = _local_errors(embeddings, metric=metric if arg_error is None else "l2", args=args)
    info["settings"] = settings if arg_error is None else None
    if arg_error is not None:
        info["error"] = arg_error
    infos: list = [None] * comm.world
    if comm.world > 1:
        dist.all_gather_object(infos, info, group=comm.group)
    else:
        infos = [info]
    bad = [(r, i["error"]) for r, i in enumerate(infos) if i["error"] is not None]
    if bad:
        r, (kind, msg) = bad[0]
        more = f" (and {len(bad) - 1} other rank(s))" if len(bad) > 1 else ""
        exc = TypeError if kind == "TypeError" else ValueError
        raise exc(f"tfp_order(group=...): bad input on rank {r}{more}: {msg}")
    for key, what in (
        ("d", "D (the embedding dimension)"),
        ("dtype", "dtype"),
        ("device_type", "device type"),
        ("args", "arguments"),
        ("settings", "engine settings"),
    ):
        values = [i[key] for i in infos]
        if any(v != values[0] for v in values):
            listing = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            raise ValueError(
                f"tfp_order(group=...): the ranks' embedding shards disagree on {what}: {listing}; every rank "
                "must pass (n_r, D) rows with the same D, dtype and device type, and the same arguments and "
                "settings"
            )
    if not infos[_ROOT]["extension"]:
        raise RuntimeError(
            "tfp_order(group=...) needs the compiled extension on rank 0 (the C++ walk); "
            "see tfp_kernels.has_extension()"
        )
    sizes = [i["n"] for i in infos]
    n = sum(sizes)
    if n == 0:
        raise ValueError("tfp_order(group=...): every rank's embedding shard is empty (N = 0)")
    return _Request(checked, sizes, metric, quantile, threshold, inputs.check_window(window, n),
                    inputs.check_max_rejections(max_rejections, n), _checks.check_start(start, n), k, rebuild,
                    long_lists, policy, settings, band_backend, fallback)


def _gather_rows(comm: _Comm, local: torch.Tensor, counts: list[int], *, out_device, out_dtype=None):
    """Rows of every rank, concatenated in rank order, on rank 0 (``None`` elsewhere). Sent in chunks."""
    rest = tuple(local.shape[1:])
    row_bytes = max(1, local.element_size() * math.prod(rest))
    chunk = max(1, _CHUNK_BYTES // row_bytes)
    sent = 0
    if comm.rank != _ROOT:
        for s in range(0, local.shape[0], chunk):
            part = local[s : s + chunk].to(comm.device).contiguous()
            dist.send(part, group=comm.group, group_dst=_ROOT)
            sent += part.numel() * part.element_size()
        return None, sent
    out = torch.empty((sum(counts), *rest), dtype=out_dtype or local.dtype, device=out_device)
    offset = 0
    for r, m in enumerate(counts):
        if r == _ROOT:
            out[offset : offset + m] = local
        else:
            for s in range(0, m, chunk):
                e = min(m, s + chunk)
                buf = torch.empty((e - s, *rest), dtype=local.dtype, device=comm.device)
                dist.recv(buf, group=comm.group, group_src=r)
                out[offset + s : offset + e] = buf
        offset += m
    return out, sent


def _sampled_pairs(n: int, num: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs of :func:`~tfp_kernels.estimate_threshold`'s sample (same generator, same draws)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    i = torch.randint(0, n, (num,), generator=gen)
    j = torch.randint(0, n - 1, (num,), generator=gen)
    j += (j >= i).long()
    return i, j


def _sharded_threshold(comm, shard, sizes, offset, *, metric, quantile, sample_pairs, seed):
    """The single-process threshold estimate (value, source, bytes sent to rank 0)."""
    n = sum(sizes)
    total = n * (n - 1) // 2
    exact = total <= (MAX_EXACT_PAIRS if sample_pairs is None else sample_pairs)
    if exact:
        rows, counts = shard, sizes
    else:
        num = DEFAULT_SAMPLE_PAIRS if sample_pairs is None else sample_pairs
        i, j = _sampled_pairs(n, num, seed)
        needed = torch.unique(torch.cat([i, j]))  # sorted: rank order = ascending global index
        lo, hi = offset, offset + shard.shape[0]
        mine = needed[(needed >= lo) & (needed < hi)] - lo
        rows = shard.index_select(0, mine.to(shard.device))
        counts = [int((needed < e).sum() - (needed < s).sum()) for s, e in _bounds(sizes)]
    gathered, sent = _gather_rows(comm, rows, counts, out_device=shard.device)
    value = torch.zeros(1, dtype=torch.float64)
    if comm.rank == _ROOT:
        if exact:
            est = threshold_estimate(
                gathered, metric=metric, quantile=quantile, sample_pairs=sample_pairs, seed=seed
            )
            value[0] = est.value
        else:
            x = prepare(gathered, metric)
            ii = torch.searchsorted(needed, i).to(x.device)
            jj = torch.searchsorted(needed, j).to(x.device)
            d = pair_distances(x, ii, jj, metric)
            positive = d[d > 0]
            if positive.numel() == 0:
                warnings.warn(
                    f"all {num} sampled pairs of embeddings are at distance 0 (identical rows); the threshold "
                    "is set to 0.0, which disables the filtering",
                    UserWarning,
                    stacklevel=4,
                )
            else:
                value[0] = quantile_linear(positive, quantile)
        del gathered
    value = comm.bcast(value)
    return float(value[0]), ("exact" if exact else "sampled"), sent


def _bounds(sizes: list[int]) -> list[tuple[int, int]]:
    out, s = [], 0
    for m in sizes:
        out.append((s, s + m))
        s += m
    return out


class _Shard:
    """This rank's rows and what the sharded phases keep about them.

    Attributes:
        x: (m, D) this rank's rows (scaled, on its device); offset: the global node id of its first row; sizes:
            the rows of every rank; metric.
        visited: (m,) bool its rows visited so far (marked from rank 0's commands).
        basis, y: the scans' (D, r) float64 orthonormal basis, the same on every rank (set before the first
            scan), and this rank's (m, r) float64 projections on it.
        list_rows: (u,) int64 local positions of this rank's list rows, ascending (all rows, or each duplicate
            group's lowest member); list_offset: the global list-row id of the first (list rows are numbered in
            rank order); list_sizes: the list rows of every rank.
        slack, lower, upper: (u,) float64 / float32 / float32 its list rows' bound of the lists' fast squared
            distances and their band (:func:`~tfp_kernels.order.band_topk.band_bounds`).
    """

    def __init__(self, shard: torch.Tensor, offset: int, sizes: list[int], metric: str):
        self.x = shard
        self.offset = offset
        self.sizes = sizes
        self.metric = metric
        self.m = shard.shape[0]
        self.visited = torch.zeros(self.m, dtype=torch.bool, device=shard.device)
        self.basis = self.y = None
        self.list_rows = torch.arange(self.m, device=shard.device)
        self.list_offset, self.list_sizes = offset, list(sizes)
        self.slack = self.lower = self.upper = None

    def mark(self, nodes: torch.Tensor) -> None:
        """Mark the global ``nodes`` (int64, any device) that lie in this shard as visited."""
        local = nodes.to(self.x.device) - self.offset
        local = local[(local >= 0) & (local < self.m)]
        self.visited[local] = True

    def set_list_rows(self, is_list_row: torch.Tensor | None) -> None:
        """The list rows from ``is_list_row`` ((N,) uint8 over the global nodes, the same on every rank), or every
        row (None)."""
        if is_list_row is None:
            return
        mine = is_list_row[self.offset : self.offset + self.m].bool()
        self.list_rows = torch.nonzero(mine).flatten().to(self.x.device)
        self.list_offset = int(is_list_row[: self.offset].sum())
        self.list_sizes = [int(is_list_row[s:e].sum()) for s, e in _bounds(self.sizes)]


def _numbered_by_first_member(groups: DuplicateGroups) -> DuplicateGroups:
    """The same groups numbered by their lowest member (so that each rank's list rows are a block of consecutive
    group ids, in rank order)."""
    order = torch.argsort(groups.representatives)  # new group g is old group order[g]
    renumber = torch.empty_like(order)
    renumber[order] = torch.arange(order.numel())
    group_of = renumber[groups.group_of.long()]
    offsets = torch.zeros_like(groups.offsets)
    torch.cumsum(groups.offsets.diff()[order], 0, out=offsets[1:])
    members = torch.argsort(group_of, stable=True)  # (by group, then by node)
    return DuplicateGroups(group_of.to(torch.int32).contiguous(), offsets, members.contiguous(),
                           groups.representatives[order].contiguous())


def _share_groups(comm: _Comm, sh: _Shard, emb_host: torch.Tensor | None, options: OrderOptions,
                  ) -> DuplicateGroups | None:
    """Rank 0 finds the exact-duplicate groups of the gathered rows ``emb_host`` (as one process: not with a cap,
    nor with t = 0, nor for N <= 2) and tells every rank which of its rows are list rows (collective; sets
    ``sh``'s list rows). Returns the groups, numbered by their lowest member, on rank 0 (None elsewhere, or when
    every row is distinct or they are not grouped)."""
    o, n = options, sum(sh.sizes)
    groups = None
    if comm.rank == _ROOT and o.groups_duplicates(n):
        found = duplicate_groups(emb_host)
        groups = None if found is None else _numbered_by_first_member(found)
    num_groups = torch.tensor([n if groups is None else groups.representatives.numel()], dtype=torch.int64)
    if int(comm.bcast(num_groups)[0]) == n:
        return groups
    is_list_row = torch.zeros(n, dtype=torch.uint8)
    if groups is not None:
        is_list_row[groups.representatives] = 1
    sh.set_list_rows(comm.bcast(is_list_row))
    return groups


def _set_list_bounds(comm: _Comm, sh: _Shard, t2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The band of every list row (collective): the single-process bounds of float32 products (the global max of
    the squared norms). Returns this rank's list rows' float32 prepared rows and their squared norms."""
    x32 = _prepared32(sh.x, sh.metric, sh.list_rows)
    sq_norms = squared_norms64(x32).float()
    max_sq = comm.all_max(float(sq_norms.max()) if sq_norms.numel() else 0.0)
    coef = squared_distance_error_coef(sh.x.shape[1], torch.float32, rounded_norms=True)  # (as the ring forms s2)
    sh.slack = coef * (sq_norms.double() + max_sq)
    sh.lower, sh.upper = band_bounds(t2, sh.slack)
    return x32, sq_norms


def _auto_list_length(comm: _Comm, sh: _Shard, x32: torch.Tensor, sq: torch.Tensor, t2: float,
                      settings: EngineSettings) -> int:
    """``k="auto"`` over the ranks (collective): :func:`~tfp_kernels.order.list_length.auto_list_length`'s sampled
    list rows, sent by their owners to every rank, counted by each rank against its own list rows (``x32`` (u, D)
    float32 prepared, ``sq`` their squared norms), the counts summed: the single-process counts (up to float32
    rounding at the bounds' edges), the same K on every rank."""
    num_lists = sum(sh.list_sizes)
    if num_lists < settings.auto_k_min_rows or t2 <= 0:
        return settings.auto_k_base
    pick = list_length.auto_sample_rows(num_lists, settings.auto_k_sample_rows).to(x32.device)
    mine = (pick >= sh.list_offset) & (pick < sh.list_offset + x32.shape[0])
    local = (pick - sh.list_offset)[mine]
    q = torch.zeros(pick.numel(), x32.shape[1], dtype=torch.float32, device=x32.device)
    q_sq = torch.zeros(pick.numel(), dtype=torch.float32, device=x32.device)
    q_slack = torch.zeros(pick.numel(), dtype=torch.float64, device=x32.device)
    q[mine], q_sq[mine], q_slack[mine] = x32[local], sq[local], sh.slack[local]
    # every sampled row from its owner (the other ranks add zeros: exact)
    q, q_sq, q_slack = (comm.all_gather(t).sum(dim=0) for t in (q, q_sq, q_slack))
    counts = list_length.band_counts(q, q_sq, q_slack, x32, sq, t2)
    k = list_length.list_length_for_counts(comm.all_gather(counts).sum(dim=0), settings)
    return int(comm.all_max(float(k)))  # (the same on every rank by construction; the ring needs it to be)


def _prepared32(shard: torch.Tensor, metric: str, rows: torch.Tensor | None = None, step: int = 1 << 16):
    """float32 prepared rows (``prepare`` in float64, then rounded), in chunks of rows."""
    src = shard if rows is None else shard.index_select(0, rows)
    out = torch.empty(src.shape, dtype=torch.float32, device=src.device)
    for s in range(0, src.shape[0], step):
        out[s : s + step] = prepare(src[s : s + step], metric, torch.float64).float()
    return out


def _block_keys(s2, cols_ids, lower, upper, k, self_offset, select_op):
    """Band selection of one (b, c) tile of squared distances: (b, k) int64 keys, (b,) int32 counts.

    Keys are ``(float32 bits << 32) | global column`` (max key where there is no entry); ``self_offset``:
    the tile column of the tile's first row when the tile holds the rows themselves, else None.
    """
    b, c = s2.shape
    if select_op is not None:
        idx, vals, close = select_op(s2, c if self_offset is None else self_offset, lower, upper, k)
        have = idx >= 0
        gid = cols_ids.index_select(0, idx.clamp(min=0).long().flatten()).view(b, k)
        keys = (vals.view(torch.int32).to(torch.int64) << 32) | gid
        return keys.masked_fill_(~have, _MAX_KEY), close
    if self_offset is not None:
        r = torch.arange(b, device=s2.device)
        s2[r, r + self_offset] = torch.inf
    close = (s2 < upper[:, None]).sum(dim=1, dtype=torch.int32)
    s2.masked_fill_(s2 < lower[:, None], torch.inf)
    keys = (s2.view(torch.int32).to(torch.int64) << 32) | cols_ids[None, :]
    keys.masked_fill_(torch.isinf(s2), _MAX_KEY)
    keys = torch.topk(keys, min(k, c), dim=1, largest=False, sorted=True).values
    return keys, close


def _triton_block_keys(x32, sq, cols_x, cols_ids, lower, upper, k: int, own: bool):
    """The band lists of the rows ``x32`` (their squared norms ``sq``) against one column block (``cols_x``, global
    ids ``cols_ids`` ascending; ``own``: the rows themselves, each left out of its list) by the fused Triton
    kernel, as :func:`_block_keys`' (m, k) int64 keys and (m,) int32 counts."""
    from ..order.band_topk_triton import band_topk_triton

    if own:
        lists = band_topk_triton(x32, sq, lower, upper, k)
    else:
        lists = band_topk_triton(x32, sq, lower, upper, k, columns=(cols_x, squared_norms64(cols_x).float()))
    have = lists.index >= 0
    gid = cols_ids.index_select(0, lists.index.clamp(min=0).long().flatten()).view(lists.index.shape)
    keys = (lists.s2.view(torch.int32).to(torch.int64) << 32) | gid
    return keys.masked_fill_(~have, _MAX_KEY), lists.num_close


def _ring_band_lists(
    comm: _Comm,
    x32,
    ids,
    lower,
    upper,
    k: int,
    counts: list[int],
    *,
    block_elements: int,
    use_extension: bool = True,
    backend: str = "torch",
):
    """Band top-k lists of this rank's rows against the rows of every rank, blocks passed around the ring.

    Args:
        x32: (m, D) float32 prepared rows of this rank; ids: (m,) int64 their global list-row ids, ascending.
        lower, upper: (m,) float32 band bounds (squared domain); k: K.
        counts: rows per rank (the m of every rank).
        block_elements: the torch tiles' (rows x columns) elements.
        use_extension: torch on CPU tensors: select with the C++ op ``band_select`` when built.
        backend: ``"torch"`` (float32 tiles, :func:`_block_keys`) or ``"triton"`` (one launch of the fused
            kernel per column block: :func:`~tfp_kernels.order.band_topk_triton.band_topk_triton`, its own block
            square, the others with ``columns=``; IEEE float32 products, the same error bound).

    Returns:
        index (m, K) int32 global ids (-1 padding), s2 (m, K) float32 (+inf padding), num_close (m,) int32,
        and the bytes this rank sent.
    """
    m, dim = x32.shape
    dev = x32.device
    best = torch.full((m, k), _MAX_KEY, dtype=torch.int64, device=dev)
    close = torch.zeros(m, dtype=torch.int32, device=dev)
    sq = squared_norms64(x32).float()  # rounded once: the bound's rounded_norms
    select_op = None
    if use_extension and dev.type == "cpu" and _ext.has_extension():
        select_op = torch.ops.tfp_kernels.band_select
    cur_x, cur_ids = x32.to(comm.device), ids.to(comm.device)
    sent = 0
    nxt, prv = (comm.rank + 1) % comm.world, (comm.rank - 1) % comm.world
    for s in range(comm.world):
        owner = (comm.rank - s) % comm.world
        incoming = (comm.rank - s - 1) % comm.world
        works, recv_x, recv_ids = [], None, None
        if s < comm.world - 1:
            ops = []
            if counts[owner] > 0:
                ops += [
                    dist.P2POp(dist.isend, cur_x, group=comm.group, group_peer=nxt, tag=2 * s),
                    dist.P2POp(dist.isend, cur_ids, group=comm.group, group_peer=nxt, tag=2 * s + 1),
                ]
                sent += cur_x.numel() * 4 + cur_ids.numel() * 8
            if counts[incoming] > 0:
                recv_x = torch.empty((counts[incoming], dim), dtype=torch.float32, device=comm.device)
                recv_ids = torch.empty(counts[incoming], dtype=torch.int64, device=comm.device)
                ops += [
                    dist.P2POp(dist.irecv, recv_x, group=comm.group, group_peer=prv, tag=2 * s),
                    dist.P2POp(dist.irecv, recv_ids, group=comm.group, group_peer=prv, tag=2 * s + 1),
                ]
            if ops:
                works = dist.batch_isend_irecv(ops)
        c = counts[owner]
        if c > 0 and m > 0 and backend == "triton":
            cols_x, cols_ids = cur_x.to(dev), cur_ids.to(dev)
            keys, cl = _triton_block_keys(x32, sq, cols_x, cols_ids, lower, upper, k, owner == comm.rank)
            best = torch.topk(torch.cat([best, keys], dim=1), k, dim=1, largest=False, sorted=True).values
            close += cl
        elif c > 0 and m > 0:
            cols_x, cols_ids = cur_x.to(dev), cur_ids.to(dev)
            cols_sq = squared_norms64(cols_x).float()
            rows_per_tile = max(1, block_elements // c)
            with ieee_fp32_matmul():
                for r0 in range(0, m, rows_per_tile):
                    r1 = min(m, r0 + rows_per_tile)
                    s2 = torch.addmm(cols_sq[None, :], x32[r0:r1], cols_x.T, alpha=-2.0)
                    s2.add_(sq[r0:r1, None]).clamp_(min=0)
                    keys, cl = _block_keys(
                        s2,
                        cols_ids,
                        lower[r0:r1],
                        upper[r0:r1],
                        k,
                        r0 if owner == comm.rank else None,
                        select_op,
                    )
                    merged = torch.cat([best[r0:r1], keys], dim=1)
                    best[r0:r1] = torch.topk(merged, k, dim=1, largest=False, sorted=True).values
                    close[r0:r1] += cl
        for w in works:
            w.wait()
        cur_x, cur_ids = recv_x, recv_ids
    empty = best == _MAX_KEY
    index = (best & 0xFFFFFFFF).to(torch.int32).masked_fill_(empty, -1)
    s2 = (best >> 32).to(torch.int32).view(torch.float32).masked_fill(empty, torch.inf)
    return index, s2, close, sent


def _pack_lists(index, s2, limit2, num_close, slack) -> torch.Tensor:
    """(m, 8K + 20) uint8 rows: index | s2 | limit2 | num_close | slack (one message per chunk)."""
    parts = [index, s2, limit2[:, None], num_close[:, None], slack[:, None]]
    return torch.cat(
        [p.contiguous().view(torch.uint8).view(p.shape[0], p.shape[1] * p.element_size()) for p in parts],
        dim=1,
    )


def _unpack_lists(packed: torch.Tensor, k: int):
    """The tables of :func:`_pack_lists`' rows ``packed`` (Q, 8K + 20) uint8, Q >= 0, each copied out (a slice of a
    one-row tensor counts as contiguous and keeps its row stride and byte offset, which a dtype view refuses)."""
    widths = [(torch.int32, k), (torch.float32, k), (torch.float64, 1), (torch.int32, 1), (torch.float64, 1)]
    out, col = [], 0
    for dtype, count in widths:
        nbytes = count * torch.empty(0, dtype=dtype).element_size()
        part = torch.empty((packed.shape[0], nbytes), dtype=torch.uint8).copy_(packed[:, col : col + nbytes])
        out.append(part.view(dtype))
        col += nbytes
    index, s2, limit2, num_close, slack = out
    return index, s2, limit2.flatten(), num_close.flatten(), slack.flatten()


def _lex_sorted(d: torch.Tensor, ids: torch.Tensor):
    """Sort keys by (d, id)."""
    order = torch.argsort(ids)
    d, ids = d[order], ids[order]
    order = torch.argsort(d, stable=True)
    return d[order], ids[order]


def _select_mth(comm: _Comm, d: torch.Tensor, ids: torch.Tensor, m_th: int) -> int:
    """The ``m_th`` (0-based) smallest key (d, id) of the union over ranks of the local keys."""
    d, ids = _lex_sorted(d.cpu(), ids.cpu())
    d, ids = d[: m_th + 1], ids[: m_th + 1]
    counts = comm.all_gather(torch.tensor([d.numel()], dtype=torch.int64)).flatten()
    width = max(1, int(counts.max()))
    buf = torch.full((width, 2), torch.inf, dtype=torch.float64)
    buf[: d.numel(), 0] = d
    buf[: d.numel(), 1] = ids.double()
    allk = comm.all_gather(buf).view(-1, 2)
    allk = allk[torch.isfinite(allk[:, 0])]
    _sd, sid = _lex_sorted(allk[:, 0], allk[:, 1].long())
    return int(sid[m_th])


class _LocalScan:
    """This rank's side of one exact fallback scan: its unvisited rows, evaluated in growing sets.

    Rows are evaluated in the order of a lower bound ``lb2`` of their squared distance to ``last`` (their
    projections' squared distance); after each :meth:`grow` every row with ``lb2 < outside`` has its exact
    float64 distance, and every other row has ``s2 >= lb2 >= outside``. The sets are nested, so each row is
    evaluated once. The window test runs only where it can change the local best valid row: rows at
    distance ``>= t`` from ``last`` that would beat it, in (d, id) order, stopping at the first valid one.
    """

    def __init__(self, sh: _Shard, last_row: torch.Tensor, others: torch.Tensor, threshold: float):
        self.sh, self.last_row, self.others, self.threshold = sh, last_row, others, threshold
        self.unv = torch.nonzero(~sh.visited).flatten()  # ascending local positions
        self.n_u = self.unv.numel()
        self.lb2 = None
        if self.n_u:
            y_last = last_row @ sh.basis
            self.lb2 = (sh.y.index_select(0, self.unv) - y_last).square_().sum(dim=1).mul_(LB_SAFETY)
        self.outside = -math.inf
        empty = torch.empty(0, dtype=torch.float64)
        self.d, self.s2, self.ids = empty, empty, torch.empty(0, dtype=torch.int64)
        self.best = (math.inf, -1, math.inf)  # local best valid (d, id, s2)
        self.c0 = (math.inf, -1)  # local nearest evaluated (d, id)

    def grow(self, batch: int) -> None:
        """Evaluate the rows whose lower bound is below the (batch + 1)-th smallest one (all if batch >= U)."""
        if self.n_u == 0 or self.outside == math.inf:
            self.outside = math.inf
            return
        new_outside = math.inf if batch >= self.n_u else float(torch.kthvalue(self.lb2, batch + 1).values)
        mask = (self.lb2 >= self.outside) & (self.lb2 < new_outside)
        self.outside = new_outside
        cand = self.unv[mask]  # ascending: argmin/stable sorts below break ties by the lower id
        if cand.numel() == 0:
            return
        sh, metric = self.sh, self.sh.metric
        rows = prepare(sh.x.index_select(0, cand), metric)
        # (the kernel of the reference's distances: the same bits, so ties with t fall the same way)
        l2 = distances_between(rows, self.last_row[None, :], "l2")[:, 0]
        s2 = l2.square()
        d = l2 if metric == "l2" else 0.5 * s2
        ids = cand + sh.offset
        i0 = int(torch.argmin(d))
        self.c0 = min(self.c0, (float(d[i0]), int(ids[i0])))
        bd, bid, _ = self.best
        better = (d >= self.threshold) & ((d < bd) | ((d == bd) & (ids < bid)))
        pos = torch.nonzero(better).flatten()
        if pos.numel():
            pos = pos[torch.argsort(d[pos], stable=True)]  # (d, id) order
            chunk = 16
            for c0 in range(0, pos.numel(), chunk):
                part = pos[c0 : c0 + chunk]
                sub = rows.index_select(0, part.to(rows.device))
                valid = torch.ones(part.numel(), dtype=torch.bool, device=rows.device)
                if self.others.shape[0]:
                    valid &= (distances_between(sub, self.others, metric) >= self.threshold).all(dim=1)
                hit = torch.nonzero(valid).flatten()
                if hit.numel():
                    j = int(part[int(hit[0])])
                    self.best = (float(d[j]), int(ids[j]), float(s2[j]))
                    break
                chunk *= 4
        self.d = torch.cat([self.d, d.cpu()])
        self.s2 = torch.cat([self.s2, s2.cpu()])
        self.ids = torch.cat([self.ids, ids.cpu()])

    def summary(self) -> torch.Tensor:
        """best_d, best_id, best_s2 (best valid), outside, c0_d, c0_id (nearest evaluated), exhausted."""
        bd, bid, bs2 = self.best
        return torch.tensor(
            [
                bd,
                bid if bid >= 0 else math.inf,
                bs2,
                self.outside,
                self.c0[0],
                self.c0[1] if self.c0[1] >= 0 else math.inf,
                float(self.outside == math.inf),
            ],
            dtype=torch.float64,
        )


def _sharded_pick(
    comm: _Comm,
    sh: _Shard,
    step: int,
    n: int,
    win_rows: torch.Tensor,
    *,
    threshold: float,
    max_rejections: int | None,
    first_batch: int = 256,
) -> int:
    """The TFP rule's next node over all ranks' unvisited rows, exactly (all ranks call it, same answer).

    ``win_rows``: (w, D) float64 prepared rows of the window's path nodes, the newest (``last``) last.
    Every decision below is taken from gathered values, so all ranks take it alike.
    """
    win_rows = win_rows.to(sh.x.device)
    scan = _LocalScan(sh, win_rows[-1], win_rows[:-1], threshold)
    capped = max_rejections is not None and n - step > max_rejections
    batch = min(scan.n_u, first_batch)
    inf = math.inf
    grown = -1
    while True:
        if batch != grown:
            scan.grow(batch)
            grown = batch
        summary = scan.summary()
        outside = scan.outside
        ev_d, ev_s2, ev_ids = scan.d, scan.s2, scan.ids
        allsum = comm.all_gather(summary)  # (world, 7), the same on every rank: the decisions below agree
        big_o = float(allsum[:, 3].min())  # every node not evaluated (on any rank) has s2 >= big_o
        g = None  # the best valid node evaluated anywhere: (d, id, s2)
        has = torch.isfinite(allsum[:, 1])
        if bool(has.any()):
            rows_g = allsum[has]
            _, gid = _lex_sorted(rows_g[:, 0], rows_g[:, 1].long())
            row = rows_g[rows_g[:, 1] == float(gid[0])][0]
            g = (float(row[0]), int(row[1]), float(row[2]))
        if g is not None and g[2] < big_o:  # g is the first valid candidate c_j of the global order
            if not capped:
                return g[1]
            before = (ev_d < g[0]) | ((ev_d == g[0]) & (ev_ids < g[1]))
            ahead = int(comm.all_gather(torch.tensor([int(before.sum())], dtype=torch.int64)).sum())
            if ahead < max_rejections:
                return g[1]
            upto = before | (ev_ids == g[1])  # c_0 .. c_j, j >= M: take c_M
            return _select_mth(comm, ev_d[upto], ev_ids[upto], max_rejections)
        if capped:
            sure = ev_s2 < big_o  # a prefix of the global order, none of it valid
            n_sure = int(comm.all_gather(torch.tensor([int(sure.sum())], dtype=torch.int64)).sum())
            if n_sure > max_rejections:  # the first M candidates are all invalid: c_M
                return _select_mth(comm, ev_d[sure], ev_ids[sure], max_rejections)
        elif bool((allsum[:, 6] == 1).all()):  # every node evaluated, none valid: c_0
            rows_c = allsum[torch.isfinite(allsum[:, 5])]
            _, cid = _lex_sorted(rows_c[:, 4], rows_c[:, 5].long())
            return int(cid[0])
        target = g[2] if g is not None else inf
        if batch < scan.n_u and outside <= target:  # this rank may hide a better node: look further
            batch = min(scan.n_u, batch * 4)


#: The masked scans' kernels by ``fallback`` (:class:`_MaskedScan`).
_MASKED_SCANS = {"device": masked_scan_torch, "triton": masked_scan_triton}


class _MaskedScan:
    """This rank's side of the masked scans (the sharded form of
    :func:`~tfp_kernels.order.scan_triton.triton_exact_pick`, for the steps where the cap cannot fire): one float32
    pass over its unvisited rows against the window's rows, then float64 distances for the few rows the pass
    cannot decide, settled over the ranks by one ``all_gather`` of each rank's best valid row and nearest row.

    Every rank keeps its rows in float32 (prepared in float64, rounded: the rows of the band lists) with
    room for the window's rows after them: the window's rows (sent by rank 0 in float64) are rounded alike
    and scanned as the last rows of the same table, so the scan kernels index them like any row.
    Bounds: ``coef (|q|^2 + max |x|^2)`` per query row ``q`` (the float32 bound of
    :func:`~tfp_kernels.order.band_topk.squared_distance_error_coef`, the global max of the squared norms),
    the scan's rule as :func:`~tfp_kernels.order.scan_triton.triton_exact_pick`'s.

    Args:
        comm, sh: the group and this rank's rows; scan: :func:`~tfp_kernels.order.scan_triton.masked_scan_triton`
            or its torch twin :func:`~tfp_kernels.order.scan_triton.masked_scan_torch`; window: the rule's
            window (at most :data:`~tfp_kernels.order.scan_triton.MAX_SCAN_WINDOW`).

    Attributes:
        settled: rows this rank measured in float64, summed over its scans.
    """

    def __init__(self, comm: _Comm, sh: _Shard, scan, window: int):
        self.comm, self.sh, self.scan = comm, sh, scan
        m, dim = sh.x.shape
        self.x32 = torch.empty(m + window, dim, dtype=torch.float32, device=sh.x.device)
        self.x32[:m] = _prepared32(sh.x, sh.metric)
        self.sq = torch.empty(m + window, dtype=torch.float32, device=sh.x.device)
        self.sq[:m] = squared_norms64(self.x32[:m]).float()
        self.max_sq = comm.all_max(float(self.sq[:m].max()) if m else 0.0)
        self.coef = squared_distance_error_coef(dim, torch.float32, rounded_norms=True)
        self.settled = 0

    def _gathered(self, values: list[float]) -> torch.Tensor:
        return self.comm.all_gather(torch.tensor(values, dtype=torch.float64)).view(self.comm.world, len(values))

    def _nearest(self, rows: torch.Tensor, d: torch.Tensor) -> tuple[float, float]:
        """This rank's least (d, global id) of ``rows`` (local positions, ascending), or (inf, inf)."""
        if rows.numel() == 0:
            return math.inf, math.inf
        i = int(torch.argmin(d))  # (the first minimum: the lowest id)
        return float(d[i]), float(rows[i] + self.sh.offset)

    def pick(self, win_rows: torch.Tensor, threshold: float) -> int:
        """The rule's next node over all ranks (collective; the same on every rank). ``win_rows``: (w, D) float64
        prepared rows of the window's path nodes, ``last`` last."""
        sh, m = self.sh, self.sh.m
        w = win_rows.shape[0]
        queries64 = win_rows.flip(0).to(sh.x.device)  # last first
        self.x32[m : m + w] = queries64.float()
        self.sq[m : m + w] = squared_norms64(self.x32[m : m + w]).float()
        q_slack = self.coef * (self.sq[m : m + w].double() + self.max_sq)
        lower, upper = band_bounds(squared_threshold(threshold, sh.metric), q_slack)
        two_slack = 2.0 * float(q_slack[0])
        unv = torch.nonzero(~sh.visited).flatten()
        best, nearest = (math.inf, math.inf), (math.inf, math.inf)
        if unv.numel():
            queries = torch.arange(m, m + w, device=sh.x.device)
            s2_last, status = self.scan(self.x32, self.sq, unv, queries, lower, upper)
            # this rank's best valid row is valid and exactly no farther than its best surely valid row (all its
            # undecided rows when it has none): the float64 distances of those (the reference's kernel)
            best_sure = float(torch.where(status == 2, s2_last, torch.inf).min())
            limit = best_sure + two_slack if math.isfinite(best_sure) else math.inf
            cand = unv[(status >= 1) & (s2_last <= limit)]
            d = distances_between(prepare(sh.x.index_select(0, cand), sh.metric), queries64, sh.metric)
            valid = (d >= threshold).all(dim=1)
            best = self._nearest(cand[valid], d[valid, 0].cpu())
            # and its nearest row, c_0 should no rank have a valid one (sent along: no second round)
            near = unv[s2_last <= float(s2_last.min()) + two_slack]
            d_last = distances_between(prepare(sh.x.index_select(0, near), sh.metric), queries64[:1], sh.metric)
            nearest = self._nearest(near, d_last[:, 0].cpu())
            self.settled += cand.numel() + near.numel()
        # the least (d, id) over the ranks' best valid rows, else over their nearest rows (ties by index)
        found = self._gathered([*best, *nearest])
        node = _least_key(found[:, :2])
        return node if node is not None else _least_key(found[:, 2:])


def _least_key(keys: torch.Tensor) -> int | None:
    """The id of the least (d, id) row of ``keys`` ((world, 2) float64; rows of +inf: none), or None."""
    keys = keys[torch.isfinite(keys[:, 1])]
    if keys.numel() == 0:
        return None
    _d, ids = _lex_sorted(keys[:, 0], keys[:, 1].long())
    return int(ids[0])


def _projection(comm: _Comm, sh: _Shard, emb_host: torch.Tensor | None, n: int, dim: int) -> None:
    """Rank 0 computes an orthonormal basis from a sample of rows and broadcasts it; every rank projects."""
    r = torch.zeros(1, dtype=torch.int64)
    basis = None
    if comm.rank == _ROOT:
        gen = torch.Generator().manual_seed(0)
        rows = torch.randperm(n, generator=gen)[:PROJECTION_SAMPLE]
        basis = projection_basis(prepare(emb_host.index_select(0, rows), sh.metric), dim=PROJECTION_DIM)
        r[0] = basis.shape[1]
    r = int(comm.bcast(r)[0])
    if basis is None:
        basis = torch.empty(dim, r, dtype=torch.float64)
    sh.basis = comm.bcast(basis.contiguous()).to(sh.x.device)
    sh.y = torch.empty(sh.m, r, dtype=torch.float64, device=sh.x.device)
    for s in range(0, sh.m, 1 << 16):
        sh.y[s : s + (1 << 16)] = prepare(sh.x[s : s + (1 << 16)], sh.metric) @ sh.basis


class RingListBuilder:
    """The sharded list builder: band lists of list rows among themselves over the ring (:func:`_ring_band_lists`),
    gathered to rank 0, the crowded ones lengthened by a :class:`RingLongListBuilder`.

    Collective: every rank builds together. Rank 0 calls :meth:`build` (a list builder as the walk's
    :class:`~tfp_kernels.order.builders.ListTables` and rebuilds take one: ``build(rows) -> BuiltLists``); the other
    ranks call :meth:`serve` in step with it (the first build at once, each rebuild at rank 0's command).

    Args:
        comm, sh: the group and this rank's rows (their list rows and bands set).
        k: the lists' length K (clamped to the list rows of a rebuild, padded).
        block_elements: elements of the (rows x columns) float32 tile of the ring (torch).
        long: a :class:`RingLongListBuilder`, or None (no long lists).
        backend: ``"torch"`` or ``"triton"``: what lists each column block (:func:`_ring_band_lists`).

    Attributes:
        num_lists: R, the list rows of all ranks.
        columns: this rank's list rows in the last build: ``(positions (Q_r,) int64 local rows, ids (Q_r,) int64
            global list-row ids)``, on its device (what the long lists list).
        row_slack: rank 0, from the first build on: (R,) float64 host, every list row's bound.
        time_s: this rank's seconds in builds (ring and gather; the long lists' are the long builder's);
        first_ring_s, first_ring_bytes: its first ring's seconds and bytes sent; gather_s, bytes_to_root: its
        seconds and bytes sending lists to rank 0, over all builds.
    """

    def __init__(self, comm: _Comm, sh: _Shard, k: int, *, block_elements: int,
                 long: RingLongListBuilder | None = None, backend: str = "torch"):
        self.comm, self.sh, self.k, self.block_elements, self.long = comm, sh, k, block_elements, long
        self.backend = backend
        self.num_lists = sum(sh.list_sizes)
        self.columns = None
        self.row_slack = None
        self.time_s = self.gather_s = 0.0
        self.first_ring_s, self.first_ring_bytes, self.bytes_to_root = None, 0, 0

    def build(self, rows: torch.Tensor | None) -> BuiltLists:
        """Rank 0: the lists of the list rows ``rows`` ((Q,) int64 host, ascending; None: all) among themselves, as
        host tensors, with the long lists of the crowded ones."""
        mask = None
        if rows is not None:  # (the other ranks wait for it in serve)
            mask = torch.zeros(self.num_lists, dtype=torch.uint8)
            mask[rows] = 1
            self.comm.bcast(mask)
        index, s2, limit2, num_close, slack = _unpack_lists(self._build_part(mask), self.k)
        if rows is None:
            self.row_slack = slack
        long = None if self.long is None else self.long.lengthen(rows, index, s2, slack, self.columns)
        return BuiltLists(index, s2, limit2, num_close, long=long)

    def serve(self, first: bool) -> None:
        """A rank other than 0: its part of the first build (``first``), or of a rebuild (rank 0 broadcasts which
        list rows)."""
        mask = None if first else self.comm.bcast(torch.empty(self.num_lists, dtype=torch.uint8))
        self._build_part(mask)

    def _build_part(self, mask: torch.Tensor | None) -> torch.Tensor | None:
        """This rank's lists of the build's list rows (``mask``: (R,) uint8 host, None: all) over the ring, sent to
        rank 0; there the packed lists of all ranks in list-row order (None elsewhere)."""
        comm, sh = self.comm, self.sh
        t0 = time.perf_counter()
        u = sh.list_rows.numel()
        if mask is None:
            local, counts = torch.arange(u, device=sh.x.device), sh.list_sizes
        else:
            local = torch.nonzero(mask[sh.list_offset : sh.list_offset + u]).flatten().to(sh.x.device)
            counts = [int(mask[s:e].sum()) for s, e in _bounds(sh.list_sizes)]
        positions, ids = sh.list_rows[local], local + sh.list_offset
        self.columns = (positions, ids)
        k = min(self.k, max(sum(counts) - 1, 1))
        x32 = _prepared32(sh.x, sh.metric, positions)
        index, s2, close, sent = _ring_band_lists(comm, x32, ids, sh.lower[local], sh.upper[local], k, counts,
                                                  block_elements=self.block_elements, backend=self.backend)
        del x32
        if k < self.k:  # fewer rows than K: pad the lists
            index = torch.cat([index, index.new_full((index.shape[0], self.k - k), -1)], dim=1)
            s2 = torch.cat([s2, s2.new_full((s2.shape[0], self.k - k), torch.inf)], dim=1)
        slack = sh.slack[local]
        packed = _pack_lists(index, s2, list_limits(index, s2, slack), close, slack)
        t1 = time.perf_counter()
        if self.first_ring_s is None:
            self.first_ring_s, self.first_ring_bytes = t1 - t0, sent
        gathered, sent = _gather_rows(comm, packed, counts, out_device=torch.device("cpu"))
        self.bytes_to_root += sent
        self.gather_s += time.perf_counter() - t1
        self.time_s += time.perf_counter() - t0
        return gathered


class RingLongListBuilder:
    """Long lists (``long_k`` entries, float64 products) of the crowded lists of each ring build
    (:func:`~tfp_kernels.order.builders.crowded_lists`): rank 0 broadcasts the crowded list rows in float64
    (:func:`_long_query`), every rank lists the build's list rows it holds for them (:func:`_local_long_lists`) and
    rank 0 merges the ranks' best by (value, id) (:func:`_long_lists_root`). A failure on any rank (say, out of
    memory) ends the round on every rank and turns the long lists off: they only save scans.

    Rank 0 calls :meth:`lengthen` (``commands``, ``emb_host`` given); the other ranks :meth:`serve` at its
    ``_LONG`` command.

    Args:
        comm, sh: as :class:`RingListBuilder`'s; long_k: the long lists' length; t2: the squared threshold;
            max_sq: the global max of the list rows' float64 squared norms (the lists' bound); room:
            ``EngineSettings.long_list_room``; block_elements: the tile's elements.
        commands: rank 0's :class:`_Commands`; emb_host: rank 0's (N, D) host rows; node_of: (R,) int64 host, each
            list row's node (a duplicate group's lowest member), or None (the list rows are the nodes).

    Attributes:
        time_s: this rank's seconds in long lists; failed: rank 0, a round failed (no other follows).
    """

    def __init__(self, comm: _Comm, sh: _Shard, long_k: int, *, t2: float, max_sq: float, room: int,
                 block_elements: int, commands: _Commands | None = None, emb_host: torch.Tensor | None = None,
                 node_of: torch.Tensor | None = None):
        self.comm, self.sh, self.long_k, self.t2, self.max_sq, self.room = comm, sh, long_k, t2, max_sq, room
        self.block_elements, self.commands, self.emb_host, self.node_of = block_elements, commands, emb_host, node_of
        self.time_s = 0.0
        self.failed = False

    def lengthen(self, rows: torch.Tensor | None, index: torch.Tensor, s2: torch.Tensor, slack: torch.Tensor,
                 columns) -> LongLists | None:
        """Rank 0: long lists of the crowded ones among a build's lists (index (Q, K) int32, s2 (Q, K) float32, slack
        (Q,) float64 host; of the list rows ``rows``, None: all), over the build's list rows (``columns``: rank
        0's, see :attr:`RingListBuilder.columns`); None when none is crowded or the round failed."""
        if self.failed:
            return None
        t_start = time.perf_counter()
        try:
            crowded = torch.nonzero(crowded_lists(index, s2, slack, self.t2, self.room)).flatten()
            if crowded.numel() == 0:
                return None
            ids = crowded if rows is None else rows[crowded]
            nodes = ids if self.node_of is None else self.node_of[ids]
            try:  # (rank 0's own preparation, before the command: nothing collective to agree on yet)
                payload, q_slack = _long_query(self.emb_host, nodes, ids, metric=self.sh.metric, t2=self.t2,
                                               k=self.long_k, max_sq=self.max_sq)
            except Exception as err:  # (e.g. out of memory: the long lists only save scans)
                raise _LongListsFailed(0, kernel_failure(err)) from err
            self.commands.send(_LONG)
            long_index, long_s2, limit2, q_slack = _long_lists_root(self.comm, self.sh, payload, q_slack, columns,
                                                                    block_elements=self.block_elements)
            return LongLists(crowded, long_index, long_s2, limit2, q_slack)
        except _LongListsFailed as err:  # (every rank left the round together, or none entered it)
            warnings.warn(f"tfp_order(group=...): the long lists failed {err}; going on without them (same "
                          "path, more scans)", RuntimeWarning, stacklevel=5)
            self.failed = True
            return None
        finally:
            self.time_s += time.perf_counter() - t_start

    def serve(self, columns) -> None:
        """A rank other than 0: its part of a round, over its list rows of the last build (``columns``)."""
        t_start = time.perf_counter()
        try:
            _serve_long_lists(self.comm, self.sh, columns, self.block_elements)
        except _LongListsFailed as err:  # (every rank left the round; rank 0 turns the long lists off)
            if err.rank == self.comm.rank:
                warnings.warn(f"tfp_order(group=...): this rank's part of the long lists failed {err}; the ranks "
                              "go on without them (same path, more scans)", RuntimeWarning, stacklevel=4)
        finally:
            self.time_s += time.perf_counter() - t_start


def _long_list_builder(comm: _Comm, sh: _Shard, options: OrderOptions, k: int, t2: float, block_elements: int, *,
                       commands, emb_host, node_of) -> RingLongListBuilder | None:
    """The run's :class:`RingLongListBuilder` (collective: the bound's max), or None: as in one process, for
    ``long_lists=True``, or ``"auto"`` from ``EngineSettings.long_list_min_rows`` list rows; never with a cap or
    t = 0."""
    o, s = options, options.settings
    num_lists = sum(sh.list_sizes)
    long_k = min(s.long_list_factor * k, num_lists - 1)
    use = num_lists >= s.long_list_min_rows if o.long_lists == "auto" else bool(o.long_lists)
    if not (use and o.max_rejections is None and t2 > 0 and long_k > k):
        return None
    local = prepare(sh.x.index_select(0, sh.list_rows), sh.metric, torch.float64).square().sum(dim=1)
    max_sq = comm.all_max(float(local.max()) if local.numel() else 0.0)
    return RingLongListBuilder(comm, sh, long_k, t2=t2, max_sq=max_sq, room=s.long_list_room,
                               block_elements=block_elements, commands=commands, emb_host=emb_host, node_of=node_of)


def _local_long_lists(sh: _Shard, q64: torch.Tensor, q_ids: torch.Tensor, q_lower: torch.Tensor, k: int, columns,
                      block_elements: int) -> torch.Tensor:
    """This rank's part of the long lists: per float64 query row (global list-row ids ``q_ids``, band lower bounds
    ``q_lower``), the ``k`` smallest float64 squared distances ``>= q_lower`` to this rank's list rows ``columns``
    (``(positions, ids)``: local rows and their global list-row ids; the query row itself excluded), by (value,
    id). Returns (Q, 2 k) float64: values (+inf padding), then ids (-1 padding), as one tensor to gather."""
    positions, ids = columns
    x64 = prepare(sh.x.index_select(0, positions), sh.metric, torch.float64)
    ids = ids.to(x64.device)
    q = q64.shape[0]
    out = torch.cat([torch.full((q, k), torch.inf, dtype=torch.float64, device=x64.device),
                     torch.full((q, k), -1.0, dtype=torch.float64, device=x64.device)], dim=1)
    kk = min(k, x64.shape[0])
    if kk == 0 or q == 0:
        return out
    sq, q_sq = x64.square().sum(dim=1), q64.square().sum(dim=1)
    block = max(1, block_elements // x64.shape[0])
    for q0 in range(0, q, block):
        q1 = min(q, q0 + block)
        s2 = (q_sq[q0:q1, None] + sq[None, :]) - 2.0 * (q64[q0:q1] @ x64.T)
        s2.clamp_(min=0).masked_fill_(q_ids[q0:q1, None] == ids[None, :], torch.inf)  # self
        s2.masked_fill_(s2 < q_lower[q0:q1, None], torch.inf)
        vals, cols = select_smallest(s2, kk)  # (columns in increasing id)
        out[q0:q1, :kk] = vals
        out[q0:q1, k : k + kk] = torch.where(torch.isinf(vals), -1, ids[cols]).double()
    return out


class _LongListsFailed(Exception):
    """A long-list round failed on some rank (every rank agreed to go on without): ``rank``, and the failure
    (``"Type: message"``) where it is known (on that rank)."""

    def __init__(self, rank: int, failure: str):
        super().__init__(f"on rank {rank}" + (f" ({failure})" if failure else ""))
        self.rank = rank


def _agree_on_failure(comm: _Comm, err: Exception | None) -> None:
    """A collective: every rank says whether its part of a long-list round failed (``err``); raises
    :class:`_LongListsFailed` on every rank when one did (the lowest such rank named), so that all ranks skip
    the rest of the round together instead of one leaving the others waiting in a collective."""
    failed = comm.all_max(float(comm.world - comm.rank) if err is not None else 0.0)
    if failed > 0:
        rank = comm.world - int(failed)
        raise _LongListsFailed(rank, kernel_failure(err) if rank == comm.rank and err is not None else "")


def _serve_long_lists(comm: _Comm, sh: _Shard, columns, block_elements: int, payload=None) -> torch.Tensor | None:
    """Every rank's side of a long-list round (:func:`_long_lists_root` broadcasts ``payload`` on rank 0): this
    rank's part over its list rows ``columns`` (:func:`_local_long_lists`), gathered to rank 0 (returned there,
    (W Q, 2 k) in rank order; None elsewhere). A failure on any rank (say, out of memory) ends the round on
    every rank with :class:`_LongListsFailed`."""
    dim = sh.x.shape[1]
    q, k = comm.bcast(payload[0] if payload is not None else torch.zeros(2, dtype=torch.int64)).tolist()
    buf, err = None, None
    try:  # (the query rows' buffer: Q x D float64, as large as the rank's part)
        buf = payload[1] if payload is not None else torch.empty(q * (dim + 2), dtype=torch.float64,
                                                                 device=sh.x.device)
    except Exception as e:  # noqa: BLE001 - agreed on below, reported by the caller
        err = e
    _agree_on_failure(comm, err)
    data = comm.bcast(buf).to(sh.x.device)
    q64 = data[: q * dim].view(q, dim)
    q_ids, q_lower = data[q * dim : q * dim + q].long(), data[q * dim + q :]
    part = None
    try:
        part = _local_long_lists(sh, q64, q_ids, q_lower, k, columns, block_elements).cpu()
    except Exception as e:  # noqa: BLE001
        err = e
    _agree_on_failure(comm, err)
    gathered, _ = _gather_rows(comm, part, [q] * comm.world, out_device=torch.device("cpu"))
    return gathered


def _long_query(emb_host: torch.Tensor, nodes: torch.Tensor, ids: torch.Tensor, *, metric: str, t2: float, k: int,
                max_sq: float):
    """Rank 0, before a long-list round: the payload of the list rows ``ids`` (global list-row ids, host int64; the
    rows of ``nodes``) for :func:`_serve_long_lists` (their float64 rows, ids and band lower bounds) and their
    bound (Q,) float64."""
    q64 = prepare(emb_host.index_select(0, nodes), metric, torch.float64)
    slack = float64_error_coef(emb_host.shape[1]) * (q64.square().sum(dim=1) + max_sq)
    lower, _ = band_bounds(t2, slack)
    payload = (torch.tensor([ids.numel(), k], dtype=torch.int64),
               torch.cat([q64.flatten(), ids.double(), lower.double()]))
    return payload, slack


def _long_lists_root(comm: _Comm, sh: _Shard, payload, slack: torch.Tensor, columns, *, block_elements: int):
    """Rank 0: the long lists of the rows of ``payload`` (:func:`_long_query`), over every rank's list rows of the
    build (``columns``: rank 0's), in float64: the query rows broadcast, each rank's best ``k`` gathered and
    merged by (value, id) (the global best k are among the ranks' best k). Returns host tensors (index (Q, k)
    int32, s2 (Q, k) float32, limit2 (Q,) float64, slack (Q,) float64) as the single-process long lists; raises
    :class:`_LongListsFailed` when a rank failed its part (every rank then left the round)."""
    q, k = payload[0].tolist()
    gathered = _serve_long_lists(comm, sh, columns, block_elements, payload)
    try:  # (rank 0 alone from here: the other ranks are done with the round)
        parts = gathered.view(comm.world, q, 2 * k)
        values = parts[:, :, :k].permute(1, 0, 2).reshape(q, comm.world * k)
        ids = parts[:, :, k:].permute(1, 0, 2).reshape(q, comm.world * k)
        # (among equal values the columns go by rank, then by id within a rank: by global id)
        vals, cols = select_smallest(values, k)
        index = torch.where(torch.isinf(vals), -1.0, ids.gather(1, cols)).to(torch.int32)
        s2 = vals.float()
        return index.contiguous(), s2.contiguous(), list_limits(index, s2, slack), slack
    except Exception as err:  # (e.g. out of host memory merging the ranks' parts)
        raise _LongListsFailed(0, kernel_failure(err)) from err


#: Visited nodes a command carries in its one message beyond the window's rows (more: a second message).
_INLINE_NODES = 256


def _message_size(window: int, dim: int) -> int:
    """float64 entries of a command's message: the header (command, step, new nodes, window rows), the window's
    rows and :data:`_INLINE_NODES` visited nodes."""
    return 4 + window * dim + _INLINE_NODES


class _Commands:
    """Rank 0's side of the walk's protocol (:func:`_serve` is the other ranks'): :meth:`send` broadcasts a
    command with the nodes visited since the last one (every rank marks its own, rank 0 too) and, for a scan, the
    window's rows, in one message of :func:`_message_size` float64 entries (a second one only for a longer list of
    visited nodes: one collective per command, the scans' price on many ranks).

    Args:
        comm, sh: the group and rank 0's rows; path: (N,) int64 host, the walk's path (read up to each step);
        window: the rule's window (capped at N - 1).
    """

    def __init__(self, comm: _Comm, sh: _Shard, path: torch.Tensor, window: int):
        self.comm, self.sh, self.path = comm, sh, path
        self.size = _message_size(window, sh.x.shape[1])
        self.synced = 0  # path[:synced] has been sent to the other ranks

    def send(self, cmd: int, step: int | None = None, win_rows: torch.Tensor | None = None) -> None:
        """Broadcast ``cmd`` at ``step`` (``path[:step]`` set; None: the step of the last command) with the nodes
        visited since the last command and ``win_rows`` ((w, D) float64 host, or None)."""
        step = self.synced if step is None else step
        new = self.path[self.synced : step]
        n_win = 0 if win_rows is None else win_rows.shape[0]
        payload = torch.cat([new.double()] + ([] if win_rows is None else [win_rows.flatten()]))
        message = torch.zeros(self.size, dtype=torch.float64)
        message[:4] = torch.tensor([cmd, step, new.numel(), n_win], dtype=torch.float64)
        inline = payload.numel() <= self.size - 4
        if inline:
            message[4 : 4 + payload.numel()] = payload
        self.comm.bcast(message)
        if not inline:
            self.comm.bcast(payload)
        self.sh.mark(new)
        self.synced = step


def _receive(comm: _Comm, sh: _Shard, size: int) -> tuple[int, int, torch.Tensor | None]:
    """A rank other than 0: the next command of :meth:`_Commands.send` (``size``: its message's entries), its
    visited nodes marked. Returns ``(cmd, step, win_rows)`` (win_rows: (w, D) float64 host, or None)."""
    dim = sh.x.shape[1]
    message = comm.bcast(torch.empty(size, dtype=torch.float64))
    cmd, step, n_new, n_win = (int(v) for v in message[:4].tolist())
    total = n_new + n_win * dim
    payload = message[4 : 4 + total] if total <= size - 4 else comm.bcast(torch.empty(total, dtype=torch.float64))
    sh.mark(payload[:n_new].long())
    return cmd, step, payload[n_new:].view(n_win, dim) if n_win else None


def _projection_scan(masked: _MaskedScan | None, rule: Rule, unvisited: int) -> bool:
    """Whether a scan with ``unvisited`` nodes left is the projection-ordered one: no masked scan given, or the cap
    can fire (every rank decides it alike, from the step)."""
    return masked is None or rule.cap_may_fire(unvisited)


def _scan_step(comm: _Comm, sh: _Shard, masked: _MaskedScan | None, step: int, n: int, win_rows: torch.Tensor,
               rule: Rule) -> int:
    """One sharded scan (collective): the masked scan where it serves (given, and the cap cannot fire), else the
    projection-ordered scan :func:`_sharded_pick` (the basis sent before)."""
    if not _projection_scan(masked, rule, n - step):
        return masked.pick(win_rows, rule.threshold)
    return _sharded_pick(comm, sh, step, n, win_rows, threshold=rule.threshold, max_rejections=rule.max_rejections)


def _serve(comm: _Comm, sh: _Shard, builder: RingListBuilder, rule: Rule, n: int,
           masked: _MaskedScan | None = None) -> float:
    """The loop of the ranks other than 0 during the walk: run rank 0's commands (:class:`_Commands`) until done.
    Returns this rank's seconds in scans."""
    dim = sh.x.shape[1]
    scan_s = 0.0
    size = _message_size(rule.window, dim)
    while True:
        cmd, step, win_rows = _receive(comm, sh, size)
        if cmd == _DONE:
            return scan_s
        if cmd == _BASIS:
            _projection(comm, sh, None, n, dim)
        elif cmd == _SCAN:
            # (the node rank 0 takes comes with its next command: under "spread" it settles forced steps itself)
            t0 = time.perf_counter()
            _scan_step(comm, sh, masked, step, n, win_rows, rule)
            scan_s += time.perf_counter() - t0
        elif cmd == _REBUILD:
            builder.serve(first=False)
        elif cmd == _LONG:
            builder.long.serve(builder.columns)
        else:  # pragma: no cover - protocol error
            raise RuntimeError(f"tfp_order(group=...): unknown command {cmd} from rank 0")


class ShardedScanPicker:
    """The sharded walk's exact scan (a picker: ``pick(step) -> node``, ``counts()``), commanded from rank 0: every
    rank scans its own unvisited rows and the ranks settle the global pick (:func:`_scan_step`: the masked scan of
    :class:`_MaskedScan` where given and the cap cannot fire, else :func:`_sharded_pick`). Where no node is valid
    it takes the rule's ``c_0`` (with the cap ``c_M``): the policy's :class:`~tfp_kernels.order.pickers.PolicyPicker`
    around it settles such a step under ``"spread"``.

    Args:
        comm, sh: the group and rank 0's rows; commands: rank 0's :class:`_Commands`; emb_host: (N, D) host rows
            (the window's rows are sent from them); state: the :class:`~tfp_kernels.order.pickers.WalkState`;
            rule: the :class:`~tfp_kernels.order.pickers.Rule`; masked: rank 0's :class:`_MaskedScan`, or None.

    ``counts()``: its scans by kind, ``num_masked_scans`` and ``num_projection_scans`` (the rows they measured in
    float64 are each rank's own count, :class:`_MaskedScan`'s ``settled``, summed into the stats at the end).
    """

    def __init__(self, comm: _Comm, sh: _Shard, commands: _Commands, emb_host: torch.Tensor, state: WalkState,
                 rule: Rule, masked: _MaskedScan | None = None):
        self.comm, self.sh, self.commands = comm, sh, commands
        self.emb_host, self.state, self.rule, self.masked = emb_host, state, rule, masked
        self.masked_scans = self.projection_scans = 0

    def pick(self, step: int) -> int:
        sh, n, dim = self.sh, self.state.n, self.emb_host.shape[1]
        projection = _projection_scan(self.masked, self.rule, n - step)
        if projection and sh.basis is None:  # (the projection scans' basis, at the first of them)
            self.commands.send(_BASIS, step)
            _projection(self.comm, sh, self.emb_host, n, dim)
        window = self.state.path[max(0, step - self.rule.window) : step]
        win_rows = prepare(self.emb_host.index_select(0, window), sh.metric)
        self.commands.send(_SCAN, step, win_rows)
        if projection:
            self.projection_scans += 1
        else:
            self.masked_scans += 1
        return _scan_step(self.comm, sh, self.masked, step, n, win_rows, self.rule)

    def counts(self) -> dict[str, int]:
        return {"num_masked_scans": self.masked_scans, "num_projection_scans": self.projection_scans}


def _rebuild_lists(commands: _Commands, builder: RingListBuilder, lists: ListTables, state: WalkState,
                   groups: DuplicateGroups | None):
    """``rebuild(step)`` of :func:`~tfp_kernels.order.schedule.run_walk` on rank 0: the lists of the list rows with
    an unvisited node, among themselves, over the ring."""

    def rebuild(step: int) -> None:
        commands.send(_REBUILD, step)
        if groups is not None:  # the groups with an unvisited member
            alive = torch.zeros(builder.num_lists, dtype=torch.bool)
            alive[groups.group_of[~state.visited].long()] = True
            rows = torch.nonzero(alive).flatten()
        else:
            rows = torch.nonzero(~state.visited).flatten()
        lists.install(rows, builder.build(rows))

    return rebuild


def _close_sets(emb_host: torch.Tensor, lists: ListTables, options: OrderOptions):
    """Rank 0: the close sets of the nodes where the cap could fire
    (:func:`~tfp_kernels.order.builders.cap_close_sets`), from its host copy of the rows, or None (no cap, or none);
    with a cap the list rows are the nodes."""
    o, n = options, emb_host.shape[0]
    if not (o.use_close_sets and o.max_rejections is not None and n - 1 > o.max_rejections):
        return None
    x32 = torch.cat([prepare(emb_host[r0 : r0 + 4096], o.metric, torch.float64).float() for r0 in range(0, n, 4096)])
    sq = squared_norms64(x32).float()  # (rounded once from float64, as the single-process lists do)
    return cap_close_sets(x32, sq, lists.num_close, squared_threshold(o.threshold, o.metric),
                          sq.double() + sq.max().double(), lists.index.shape[1], o.max_rejections,
                          budget=o.settings.close_set_budget)


def _walk_root(comm: _Comm, sh: _Shard, emb_host: torch.Tensor, groups: DuplicateGroups | None,
               builder: RingListBuilder, commands: _Commands, state: WalkState, options: OrderOptions,
               time_setup: float, masked: _MaskedScan | None = None) -> EngineCounters:
    """Rank 0: the first build, then the walk (:func:`~tfp_kernels.order.schedule.run_walk`, the single-process
    driver) over the ring's lists with the sharded scans and rebuilds; fills ``state.path``; returns the run's
    counters."""
    o = options
    n = state.n
    t0 = time.perf_counter()
    lists = ListTables(builder.build(None), long_k=None if builder.long is None else builder.long.long_k)
    close = _close_sets(emb_host, lists, o)
    time_band = time.perf_counter() - t0

    t0 = time.perf_counter()
    policy = walk_policy(o.policy, threshold=o.threshold, metric=o.metric, n=n,
                         groups=lambda: near_duplicate_groups(emb_host, threshold=o.threshold,
                                                              metric=o.metric, alone=lists.alone(groups)))
    counters = WalkCounters()  # (its scans stay 0: the op returns at each scan, run over the ranks)
    norms = (torch.linalg.vector_norm(emb_host.double(), dim=1).contiguous() if o.metric == "cosine"
             else torch.empty(0, dtype=torch.float64))
    slack = builder.row_slack if groups is None else builder.row_slack[groups.group_of.long()]  # (per node)
    walk_groups = None if groups is None else (groups.group_of, groups.offsets, groups.members,
                                               groups.offsets[:-1].clone())
    walk = WalkOp(
        WalkTables(emb_host, norms, lists.index, lists.s2, lists.limit2, slack.contiguous(), lists.num_close,
                   state.path, state.visited, host_scan=no_host_scan(), groups=walk_groups, long_lists=lists.long,
                   close_sets=close, policy=policy),
        threshold=o.threshold, window=o.window, max_rejections=o.max_rejections, cosine=o.metric == "cosine",
        counters=counters)
    rule = Rule(o.metric, o.threshold, o.window, o.max_rejections)
    picker = PolicyPicker(ShardedScanPicker(comm, sh, commands, emb_host, state, rule, masked), policy, emb_host,
                          state, prepared=False)
    bar = progress_bar(o, n)
    time_setup += time.perf_counter() - t0

    tally = run_walk(n, walk=walk, pick=picker.pick, rebuild=_rebuild_lists(commands, builder, lists, state, groups)
                     if o.rebuild == "auto" else None, path=state.path, visited=state.visited, counters=counters,
                     k=builder.k, bar=bar, settings=o.settings)
    if bar is not None:
        bar.close()
    commands.send(_DONE, n)
    forced = picker.forced
    forced.add_walk_counter(counters.tensor)
    long = builder.long
    return EngineCounters(
        band_backend=f"{builder.backend}-ring", band_dtype="float32", k=builder.k,
        num_fallbacks=tally.scans + counters.scans, num_rebuilds=tally.rebuilds,
        time_band_s=time_band + tally.band_s, time_walk_s=tally.walk_s, time_fallback_s=tally.fallback_s,
        time_setup_s=time_setup, num_groups=builder.num_lists,
        num_long_lists=lists.num_long_lists, long_k=0 if long is None else long.long_k,
        time_long_s=0.0 if long is None else long.time_s,
        num_close_sets=0 if close is None else int((close[0].diff() > 0).sum()),
        num_cap_fallbacks=counters.cap_scans, num_close_set_scans=counters.close_set_scans,
        num_forced_steps=forced.count, first_forced_step=forced.first,
    )


@dataclass(frozen=True)
class _Traffic:
    """What the distribution cost this rank (:class:`ShardedOrderStats`' fields of the same meaning)."""

    time_lists_s: float = 0.0
    time_gather_s: float = 0.0
    bytes_ring: int = 0
    bytes_to_root: int = 0


def _share_counters(comm: _Comm, record: EngineCounters | None, *, time_band_s: float, time_long_s: float,
                    time_fallback_s: float, time_setup_s: float) -> EngineCounters:
    """Rank 0's counters (``record`` there) on every rank (collective); the other ranks put their own times in."""
    shared = [record]
    if comm.world > 1:
        dist.broadcast_object_list(shared, group=comm.group, group_src=_ROOT, device=comm.device)
    if comm.rank == _ROOT:
        return record
    return dataclasses.replace(shared[0], time_band_s=time_band_s, time_long_s=time_long_s, time_walk_s=0.0,
                               time_fallback_s=time_fallback_s, time_setup_s=time_setup_s)


def _sharded_order(comm: _Comm, shard: torch.Tensor, sizes: list[int], options: OrderOptions,
                   block_elements: int) -> tuple[torch.Tensor, EngineCounters, _Traffic]:
    """The sharded engine on every rank (collective), for N >= 2 rows and a known threshold (``options``, in the
    scaled rows' units): rows to rank 0 and the duplicate groups, the bands and K, the ring's first build, the
    walk on rank 0 (the others serving it). Returns the (N,) int64 host path, rank 0's counters and this rank's
    :class:`_Traffic`."""
    o, n = options, sum(sizes)
    t0 = time.perf_counter()
    sh = _Shard(shard, sum(sizes[: comm.rank]), sizes, o.metric)
    host_dtype = torch.float64 if shard.dtype == torch.float64 else torch.float32
    emb_host, rows_sent = _gather_rows(comm, shard, sizes, out_device=torch.device("cpu"), out_dtype=host_dtype)
    gather_s = time.perf_counter() - t0
    groups = _share_groups(comm, sh, emb_host, o)
    t2 = squared_threshold(o.threshold, o.metric)
    x32, sq_norms = _set_list_bounds(comm, sh, t2)
    k = _auto_list_length(comm, sh, x32, sq_norms, t2, o.settings) if o.k == "auto" else o.k
    k = min(k, max(sum(sh.list_sizes) - 1, 1))
    del x32, sq_norms
    state = commands = None
    if comm.rank == _ROOT:
        state = WalkState(n, o.start, torch.device("cpu"), o.window)
        commands = _Commands(comm, sh, state.path, o.window)
    long = _long_list_builder(comm, sh, o, k, t2, block_elements, commands=commands, emb_host=emb_host,
                              node_of=None if groups is None else groups.representatives)
    builder = RingListBuilder(comm, sh, k, block_elements=block_elements, long=long, backend=o.band_backend)
    # (windows beyond the scan kernel's: every scan by projections, no float32 copy of window rows to hold)
    masked = _MaskedScan(comm, sh, _MASKED_SCANS[o.fallback], o.window) if o.window <= MAX_SCAN_WINDOW else None
    time_setup = time.perf_counter() - t0 - gather_s
    record, scan_s = None, 0.0
    if comm.rank == _ROOT:
        record = _walk_root(comm, sh, emb_host, groups, builder, commands, state, o, time_setup, masked)
        path = state.path
    else:
        builder.serve(first=True)
        scan_s = _serve(comm, sh, builder, Rule(o.metric, o.threshold, o.window, o.max_rejections), n, masked)
        path = torch.empty(n, dtype=torch.int64)
    path = comm.bcast(path)
    if masked is not None:  # (the rows every rank's masked scans measured in float64)
        settled = int(comm.all_gather(torch.tensor([masked.settled], dtype=torch.int64)).sum())
        if record is not None:
            record = dataclasses.replace(record, scan_candidates=settled)
    long_s = 0.0 if long is None else long.time_s
    record = _share_counters(comm, record, time_band_s=builder.time_s + long_s, time_long_s=long_s,
                             time_fallback_s=scan_s, time_setup_s=time_setup)
    return path, record, _Traffic(builder.first_ring_s or 0.0, gather_s + builder.gather_s, builder.first_ring_bytes,
                                  rows_sent + builder.bytes_to_root)


def tfp_order_sharded(
    embeddings: torch.Tensor,
    *,
    group=None,
    metric: str = "l2",
    quantile: float = 0.02,
    threshold: float | None = None,
    window: int = 4,
    max_rejections: int | None = None,
    start: int = 0,
    k: int | str = "auto",
    backend: str = "auto",
    progress: bool = False,
    return_stats: bool = False,
    rebuild: str | None = "auto",
    sample_pairs: int | None = None,
    seed: int = 0,
    block_elements: int = 1 << 24,
    long_lists: bool | str = "auto",
    policy: str = "paper",
    settings: EngineSettings | None = None,
    band_backend: str = "auto",
    fallback: str = "auto",
):
    """TFP order of rows sharded over the ranks of a process group (collective: every rank calls it).

    What :func:`~tfp_kernels.tfp_order` computes on the concatenation of every rank's rows, in rank order;
    ``tfp_order(shard, ..., group=g)`` calls this. See the module docstring for the phases, what moves
    between ranks and the memory per rank.

    Args:
        embeddings: (n_r, D) this rank's rows (global rows ``offset_r ..``, ``offset_r`` = rows of the lower
            ranks), float16/bfloat16/float32/float64, finite; n_r = 0 allowed. Same D, dtype and device type
            on every rank; CPU tensors with gloo, CUDA tensors (on this rank's device) with NCCL.
        group: the process group (None: the default group). Must be initialised.
        metric, quantile, threshold, window, max_rejections, start, k, progress, return_stats: as in
            :func:`~tfp_kernels.tfp_order`, the same on every rank (checked). ``start`` is a global index.
            ``k="auto"``: the single-process rule, its sampled list rows counted against every rank's list rows.
            Exact duplicates are grouped as in one process (one band list per group; not with a cap, nor with
            ``t = 0``): ``stats.num_groups`` counts the list rows.
        backend: ``"auto"`` or ``"fast"`` (the only sharded implementation: ring band lists, C++ walk on
            rank 0, sharded exact scans). The compiled extension is needed on rank 0.
        rebuild: as in the single-process fast path: ``"auto"`` recomputes the lists of the unvisited nodes
            when the rows scanned since the last build reach the work of a rebuild
            (:class:`~tfp_kernels.order.schedule.RebuildSchedule`); None disables it.
        sample_pairs, seed: of the threshold sample, as in :func:`~tfp_kernels.estimate_threshold`
            (tfp_order uses the defaults None and 0).
        block_elements: elements of the (rows x columns) float32 tile of the list phase.
        long_lists: as in :func:`~tfp_kernels.tfp_order`: the crowded lists (gathered on rank 0) get 4K-entry
            float64 lists, each rank listing its own list rows for them and rank 0 merging the ranks' best.
        policy: as in :func:`~tfp_kernels.tfp_order` (the same path): the C++ walk on rank 0 takes the urgent
            near-duplicate groups' members (grouped over rank 0's copy of the rows), and rank 0 settles the forced
            steps (farthest node from the window) over its copy of the rows after the sharded scan found no valid
            node.
        settings: None (the defaults) or an :class:`~tfp_kernels.order.options.EngineSettings`, as in
            :func:`~tfp_kernels.tfp_order` (the band lists' schedule is not used: the ring lists in float32),
            equal on every rank (checked).
        band_backend: what lists each block of the ring: ``"torch"`` (float32 tiles; on the CPU the C++
            selection), ``"triton"`` (the fused kernel, one launch per column block, IEEE float32 products:
            CUDA, or CPU tensors under ``TRITON_INTERPRET=1``) or ``"auto"`` (triton for CUDA embeddings where
            Triton runs, else torch). Same lists up to float32 rounding (same bound), same path.
        fallback: how each rank scans its unvisited rows (:class:`_MaskedScan`: one masked float32 pass against
            the window's rows, then float64 distances for the rows the pass cannot decide, one ``all_gather``
            per scan): ``"device"`` (the pass in torch ops), ``"triton"`` (the Triton scan kernel: CUDA, or CPU
            tensors under ``TRITON_INTERPRET=1``; windows of up to 64 nodes) or ``"auto"`` (triton for CUDA
            embeddings where Triton runs and the window fits, else device). Steps where the cap can fire, and
            every step of a window beyond 64 nodes, take the projection-ordered scan (:func:`_sharded_pick`).
            Same path.

    Returns:
        path: (N,) int64 on the device of ``embeddings``, a permutation of ``0..N-1`` (global indices), the
        same on every rank; with ``return_stats=True``, ``(path, ShardedOrderStats)``.

    Raises:
        TypeError / ValueError on every rank when any rank's shard or arguments are bad, or when the ranks
        disagree on D, dtype, device type, arguments or settings (the message names the ranks).
    """
    comm = _Comm(group)
    req = _validate(comm, embeddings, metric=metric, quantile=quantile, threshold=threshold, window=window,
                    max_rejections=max_rejections, start=start, k=k, backend=backend, rebuild=rebuild,
                    long_lists=long_lists, policy=policy, settings=settings, band_backend=band_backend,
                    fallback=fallback)
    n = sum(req.sizes)
    # every rank's rows scaled by the same 2**k (from the largest entry of all ranks' rows), detached
    scaled = inputs.prepare_rows(req.shard, req.metric, largest=comm.all_max(inputs.largest_magnitude(req.shard)))
    shard, threshold = scaled.rows, scaled.to_rows_units(req.threshold)
    t0 = time.perf_counter()
    threshold_sent = 0
    if threshold is not None:
        source = "given"
    elif n == 1:
        threshold, source = 0.0, "given"
    else:
        threshold, source, threshold_sent = _sharded_threshold(
            comm, shard, req.sizes, sum(req.sizes[: comm.rank]), metric=req.metric, quantile=req.quantile,
            sample_pairs=sample_pairs, seed=seed,
        )
    t1 = time.perf_counter()
    if n == 1:
        path = torch.full((1,), req.start, dtype=torch.int64)
        record = EngineCounters(band_backend="torch-ring", band_dtype="float32", num_groups=1,
                                k=req.settings.auto_k_base if req.k == "auto" else req.k)
        traffic = _Traffic()
    else:
        options = OrderOptions(metric=req.metric, threshold=threshold, window=req.window,
                               max_rejections=req.max_rejections, start=req.start, policy=req.policy, k=req.k,
                               rebuild=req.rebuild, long_lists=req.long_lists, progress=progress,
                               settings=req.settings, band_backend=req.band_backend, fallback=req.fallback)
        path, record, traffic = _sharded_order(comm, shard, req.sizes, options, block_elements)
    path = path.to(shard.device)
    t2 = time.perf_counter()
    if not return_stats:
        return path
    threshold = scaled.to_user_units(threshold) if req.threshold is None else req.threshold  # (user units)
    return path, ShardedOrderStats(
        threshold=threshold, threshold_source=source, backend="sharded", num_nodes=n, time_threshold_s=t1 - t0,
        time_order_s=t2 - t1, policy=req.policy, **dataclasses.asdict(record), world_size=comm.world, rank=comm.rank,
        num_rows=req.sizes[comm.rank], time_lists_s=traffic.time_lists_s, time_gather_s=traffic.time_gather_s,
        bytes_ring=traffic.bytes_ring, bytes_to_root=threshold_sent + traffic.bytes_to_root,
    )


# tfp_order(shard, ..., group=g) hands its arguments to tfp_order_sharded (the ordering layer does not import
# this module: it registers itself)
register_sharded_driver(tfp_order_sharded)
