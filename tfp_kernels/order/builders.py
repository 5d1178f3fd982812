"""The list builders: the band lists the walk reads, built over the list rows (nodes, or one row per group of
exact duplicates), with long lists where they are crowded and close sets where the cap could fire.

- :class:`ListRows`: the rows the lists are built over, their squared norms and the bound of the lists' fast
  squared distances (which depends on what the lists multiply: :meth:`ListRows.with_precision`);
- :class:`BandListBuilder`: band lists of some list rows among themselves (torch or Triton, :func:`band_lists`),
  each crowded one lengthened by a :class:`LongListBuilder` (:func:`crowded_lists`); ``build(None)`` lists every
  row, ``build(rows)`` the given rows among themselves (a rebuild). Its first build falls back from the Triton
  kernel to the torch lists when the kernel fails (:meth:`BandListBuilder.build_all`);
- :class:`ListTables`: the host tables the walk reads (the band tables and long lists of
  :class:`~tfp_kernels.order.walk_op.WalkTables`), written by :meth:`ListTables.install`;
- :func:`cap_close_sets`: the close sets of the nodes where the rejection cap could fire.

A builder is anything with ``build(rows) -> BuiltLists``. The kernels are arguments (``band_kernel``,
``rows_kernel``), so that a test can hand a failing one in.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

from .band_precision import band_error_coef, resolve_band_backend
from .band_topk import BandLists, band_bounds, band_topk_rows, band_topk_torch, close_sets, float64_error_coef, list_limits
from .duplicates import DuplicateGroups
from .failures import warn_failure
from .options import DEFAULT_SETTINGS, EngineSettings
from .walk_op import LongListTables, host_table


@dataclass(frozen=True)
class ListRows:
    """The rows the band lists are built over (R list rows: every node, or each duplicate group's lowest node), on
    the embeddings' device.

    Attributes:
        x32: (R, D) float32 prepared rows; sq: (R,) float32 their squared norms (rounded once from float64);
        norm_sum: (R,) float64 ``sq + max(sq over all nodes)``, the scale of every error bound;
        t2: the squared threshold; backend, dtype: the band lists' kernel and what it multiplies
            (:func:`~tfp_kernels.order.band_precision.resolve_band_dtype`);
        slack: (R,) float64 bound of ``|s2_fast - s2_exact|`` of the lists' products;
        lower, upper: (R,) float32 the threshold band's bounds (:func:`~tfp_kernels.order.band_topk.band_bounds`).
    """

    x32: torch.Tensor
    sq: torch.Tensor
    norm_sum: torch.Tensor
    t2: float
    backend: str
    dtype: object
    slack: torch.Tensor
    lower: torch.Tensor
    upper: torch.Tensor

    @classmethod
    def of(cls, x32: torch.Tensor, sq: torch.Tensor, norm_sum: torch.Tensor, t2: float, backend: str,
           dtype) -> ListRows:
        rows = cls(x32, sq, norm_sum, t2, backend, dtype, norm_sum, sq, sq)
        return rows.with_precision(backend, dtype)

    def with_precision(self, backend: str, dtype) -> ListRows:
        """The same rows listed by ``backend`` multiplying ``dtype``: their bound and band."""
        slack = band_error_coef(self.x32.shape[1], dtype, backend) * self.norm_sum
        lower, upper = band_bounds(self.t2, slack)
        return replace(self, backend=backend, dtype=dtype, slack=slack, lower=lower, upper=upper)

    def take(self, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(x32, sq, lower, upper, slack)`` of the list rows ``rows`` (int64, this device)."""
        return tuple(t[rows] for t in (self.x32, self.sq, self.lower, self.upper, self.slack))


class BuiltLists(NamedTuple):
    """One build's lists, host tensors, for Q list rows (all R, or those of a rebuild): index (Q, K) int32 global
    list-row ids (-1: none), s2 (Q, K) float32, limit2 (Q,) float64, num_close (Q,) int32; ``long``: None or
    the :class:`LongLists` of the crowded ones."""

    index: torch.Tensor
    s2: torch.Tensor
    limit2: torch.Tensor
    num_close: torch.Tensor
    long: LongLists | None = None


class LongLists(NamedTuple):
    """Long lists of some of a build's rows, host tensors: where (P,) int64 positions in the build's rows,
    index (P, K_long) int32 global list-row ids, s2 (P, K_long) float32, limit2 (P,) float64, slack (P,) float64
    the bound of their s2."""

    where: torch.Tensor
    index: torch.Tensor
    s2: torch.Tensor
    limit2: torch.Tensor
    slack: torch.Tensor


def global_ids(index: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """Lists of positions in ``rows`` (int32, -1: none) as global list-row ids (``rows`` None: unchanged)."""
    if rows is None:
        return index
    return torch.where(index >= 0, rows.to(torch.int32)[index.clamp(min=0).long()], -1)


class LongListBuilder:
    """Long lists (``long_k`` entries) for the crowded band lists of a build (:func:`crowded_lists`).

    Computed with torch products (``rows_kernel``, default :func:`~tfp_kernels.order.band_topk.band_topk_rows`) over
    ``x`` (float64 rows, their squared norms ``sq`` and a float64 bound ``slack``), or over the band lists' own
    float32 rows and bound when the band lists are float32. A failure (e.g. out of device memory) warns once and
    turns the long lists off: they only save scans. ``time_s``: seconds spent; ``failed``: whether they failed.
    """

    def __init__(self, rows: ListRows, long_k: int, *, float64_rows: torch.Tensor | None,
                 settings: EngineSettings = DEFAULT_SETTINGS, rows_kernel: Callable = band_topk_rows):
        self.long_k, self.room, self.rows_kernel = long_k, settings.long_list_room, rows_kernel
        self.min_bytes = settings.huge_page_min_bytes
        if float64_rows is None:  # float32 band lists: their own products and bound
            self.x, self.sq, self.slack = rows.x32, rows.sq, None
        else:
            self.x = float64_rows
            self.sq = float64_rows.square().sum(dim=1)
            self.slack = float64_error_coef(float64_rows.shape[1]) * (self.sq + self.sq.max())
        self.time_s = 0.0
        self.failed = False

    def lengthen(self, rows: ListRows, subset: torch.Tensor | None, lists: BandLists,
                 row_slack: torch.Tensor) -> LongLists | None:
        """Long lists of the crowded ones among ``lists`` (those of ``subset``'s list rows, all when None, listed
        among ``subset``), or None (none crowded, or the kernel failed)."""
        if self.failed:
            return None
        t_start = time.perf_counter()
        try:
            crowded = torch.nonzero(crowded_lists(lists.index, lists.s2, row_slack, rows.t2, self.room)).flatten()
            if crowded.numel() == 0:
                return None
            slack = rows.slack if self.slack is None else self.slack
            x, sq, slack = (self.x, self.sq, slack) if subset is None else (
                self.x[subset], self.sq[subset], slack[subset])
            q_slack = slack[crowded]
            q_lower, q_upper = band_bounds(rows.t2, q_slack)
            try:
                out = self.rows_kernel(x, sq, crowded, q_lower, q_upper, self.long_k)  # (-1 padded past the rows)
            except Exception as err:  # noqa: BLE001 - (e.g. out of device memory: the long lists only save scans)
                warn_failure("the long lists", err, "going on without them (same path, more scans)", stacklevel=4)
                self.failed = True
                return None
            index = global_ids(out.index, subset)
            limit2 = list_limits(index, out.s2, q_slack)
            return LongLists(*(host_table(t, min_bytes=self.min_bytes) for t in (crowded, index, out.s2, limit2, q_slack)))
        finally:
            self.time_s += time.perf_counter() - t_start


class BandListBuilder:
    """Band lists of ``k`` entries over the :class:`ListRows` (see the module docstring).

    Args:
        rows: the list rows and their precision; k: the lists' length (clamped to the rows of a rebuild, padded).
        long: a :class:`LongListBuilder`, or None (no long lists).
        settings: ``band_schedule`` (Triton) and ``huge_page_min_bytes`` (host copies).
        progress: label progress bars of the torch lists.
        band_kernel: ``(x32, sq, lower, upper, k, backend, dtype, progress, schedule) -> (BandLists, backend)``,
            default :func:`band_lists`.
    """

    def __init__(self, rows: ListRows, k: int, *, long: LongListBuilder | None = None,
                 settings: EngineSettings = DEFAULT_SETTINGS, progress: bool = False,
                 band_kernel: Callable = None):
        self.rows, self.k, self.long, self.settings, self.progress = rows, k, long, settings, progress
        self.band_kernel = band_lists if band_kernel is None else band_kernel
        self.backend = ""  # the backend of the first build (rebuilds use it)

    def build(self, subset: torch.Tensor | None) -> BuiltLists:
        """Lists of the list rows ``subset`` ((Q,) int64 on the rows' device; None: all) among themselves."""
        rows = self.rows
        if subset is None:
            x, sq, lower, upper, slack = rows.x32, rows.sq, rows.lower, rows.upper, rows.slack
            k, label = self.k, "tfp band lists"
        else:
            x, sq, lower, upper, slack = rows.take(subset)
            k, label = min(self.k, max(subset.numel() - 1, 1)), "tfp band lists (rebuild)"
        out, backend = self.band_kernel(x, sq, lower, upper, k, self.backend or rows.backend, rows.dtype,
                                        label if self.progress else None, self.settings.band_schedule)
        self.backend = self.backend or backend
        index = global_ids(out.index, subset)
        s2 = out.s2
        if index.shape[1] < self.k:  # fewer rows than K: pad the lists
            pad = self.k - index.shape[1]
            index = torch.cat([index, index.new_full((index.shape[0], pad), -1)], dim=1)
            s2 = torch.cat([s2, s2.new_full((s2.shape[0], pad), torch.inf)], dim=1)
        long = None if self.long is None else self.long.lengthen(rows, subset, out, slack)
        limit2 = list_limits(index, s2, slack)
        return BuiltLists(*(host_table(t, min_bytes=self.settings.huge_page_min_bytes)
                            for t in (index, s2, limit2, out.num_close)), long=long)

    def build_all(self, *, may_fall_back: bool) -> BuiltLists:
        """The first build, of every list row. When the Triton kernel fails and ``may_fall_back`` (the backend was
        chosen automatically), warn and list with torch in float32 instead (same path, slower; the rows' bound
        widens to float32's: :attr:`rows` changes)."""
        try:
            return self.build(None)
        except Exception as err:  # a Triton compile/launch failure on an untested GPU or Triton version
            if not (may_fall_back and self.rows.backend == "triton"):
                raise
            warn_failure("the Triton band kernel", err, "using the blockwise torch band lists instead (same path, "
                         "slower). Pass band_backend='triton' to see the error.", stacklevel=4)
            self.rows = self.rows.with_precision("torch", torch.float32)
            self.backend = ""
            return self.build(None)


class ListTables:
    """The walk's band tables (host: index (R, K) int32, s2 (R, K) float32, limit2 (R,) float64, num_close (R,)
    int32) and long lists (:class:`~tfp_kernels.order.walk_op.LongListTables`, or None), filled from builds.

    ``num_long_lists``: the lists replaced by long ones, over all builds.
    """

    def __init__(self, first: BuiltLists, *, long_k: int | None):
        self.index, self.s2, self.limit2, self.num_close = first.index, first.s2, first.limit2, first.num_close
        self.long = None if long_k is None else LongListTables(self.index.shape[0], long_k)
        self.num_long_lists = 0
        self._add_long(None, first.long)

    def alone(self, groups: DuplicateGroups | None) -> torch.Tensor:
        """(N,) bool host: the nodes no other node lies closer than t to, as the first build's lists prove it
        (``num_close``, over every row, counts none within the lists' error bound of t, and the node has no
        equal row); ``groups``: the lists' exact-duplicate groups (list row of each node), or None (one row
        per node). What :func:`~tfp_kernels.order.policy.near_duplicate_groups` may skip."""
        no_close = self.num_close == 0
        if groups is None:
            return no_close
        return (no_close & (groups.offsets.diff() == 1))[groups.group_of.long()]

    def install(self, rows: torch.Tensor, built: BuiltLists) -> None:
        """A rebuild's lists of the list rows ``rows`` ((Q,) int64 host) replace theirs, in place (the bound walk
        reads the same tensors)."""
        for table, part in zip((self.index, self.s2, self.limit2, self.num_close), built[:4]):
            table[rows] = part
        if self.long is not None:
            self.long.clear(rows)
            self._add_long(rows, built.long)

    def _add_long(self, rows: torch.Tensor | None, long: LongLists | None) -> None:
        if long is None or self.long is None:
            return
        at = long.where if rows is None else rows[long.where]
        self.long.append(at, long.index, long.s2, long.slack)
        self.limit2[at] = long.limit2
        self.num_long_lists += at.numel()


def band_lists(
    x32: torch.Tensor,
    sq_norms: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
    k: int,
    backend: str,
    input_dtype=torch.float32,
    progress: str | None = None,
    schedule: str = "rows",
) -> tuple[BandLists, str]:
    """Dispatch the band top-k to the Triton kernel (CUDA; ``schedule``: ``"rows"``, every row block against all
    columns, or ``"pairs"``, each unordered pair's product once: :mod:`~tfp_kernels.order.band_pairs_triton`) or the blockwise torch
    version; the products are those of ``input_dtype`` (error bound: ``squared_distance_error_coef(D,
    input_dtype)``). ``progress``: the label of a progress bar over the row blocks of the torch version (the
    Triton kernel runs without one)."""
    backend = resolve_band_backend(backend, x32.device)
    if backend == "triton":
        from .band_topk_triton import band_topk_triton

        return band_topk_triton(x32, sq_norms, lower, upper, k, input_dtype=input_dtype,
                                schedule=schedule), "triton"
    return band_topk_torch(x32, sq_norms, lower, upper, k, input_dtype=input_dtype, progress=progress), "torch"


def cap_close_sets(x32: torch.Tensor, sq_norms: torch.Tensor, num_close: torch.Tensor, t2: float,
                   norm_sum: torch.Tensor, k: int, max_rejections: int, *,
                   budget: int = DEFAULT_SETTINGS.close_set_budget) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Close sets for the walk (op ``tfp_walk``'s ``close_offsets`` / ``close_members``) of the nodes where the
    rejection cap could fire by their counts alone (``num_close + k >= max_rejections``), smallest counts
    first, within ``budget`` entries per list entry (``EngineSettings.close_set_budget``: int32 entries, twice the
    bytes of the lists' index and s2 at 4; N = 100,000, K = 128, the paper's cap: 2 held 2,073 of the 2,684 sets
    the cap concerned, 4 all of them: 43.9 -> 38.9 s); or None when there are none.

    The walk must scan at every such node (a list cannot prove that fewer than ``max_rejections`` unvisited
    nodes precede its pick while the count of nodes closer than ``t``, visited ones included, allows it); with
    a set it counts the set's unvisited members instead, and most such nodes come up after many of their close
    nodes were visited; the scans that remain at such steps pass over the set and the node's band list only,
    where that decides (in the C++ walk's host scans, and from Python before a device scan). (2-core CPU,
    clustered N = 100,000, K = 128, the paper's cap: 2,684 of the 3,287 scans were of this kind; with the sets
    1,070 remain, all settled over set and list: walk 33.0 -> 6.5 s, for ~2.7 s of products for the sets.)

    Args:
        x32: (N, D) float32 prepared rows; sq_norms: (N,) float32 their squared norms; norm_sum: (N,) float64
            ``sq_norms + max(sq_norms)``; all on the embeddings' device. num_close: (N,) int32 host counts of
            the band lists. t2: the squared threshold.

    Returns:
        ``(offsets (N + 1,) int64, members (S,) int32)`` host tensors (empty ranges for the other nodes).
    """
    n = x32.shape[0]
    counts = num_close.long()
    risky = torch.nonzero(counts + k >= max_rejections).flatten()
    if risky.numel() == 0:
        return None
    by_count = torch.argsort(counts[risky], stable=True)
    kept = by_count[torch.cumsum(counts[risky][by_count], dim=0) <= budget * n * k]
    if kept.numel() == 0:
        return None
    rows = risky[kept].sort().values
    rows_dev = rows.to(x32.device)
    # float32 products (close_sets: IEEE ones), with their own bound: the set holds every node closer than t
    slack = band_error_coef(x32.shape[1], torch.float32, "torch") * norm_sum[rows_dev]
    offsets, members = close_sets(x32, sq_norms, rows_dev, band_bounds(t2, slack)[1])
    sizes = torch.zeros(n, dtype=torch.int64)
    sizes[rows] = offsets.diff().cpu()
    all_offsets = torch.zeros(n + 1, dtype=torch.int64)
    torch.cumsum(sizes, dim=0, out=all_offsets[1:])
    return all_offsets, host_table(members)


def crowded_lists(index: torch.Tensor, s2: torch.Tensor, slack: torch.Tensor, t2: float,
                  room: int = DEFAULT_SETTINGS.long_list_room) -> torch.Tensor:
    """(R,) bool: the full band lists with fewer than ``room`` (``EngineSettings.long_list_room``) entries that could
    decide a step, i.e. that could be proven closer than every node outside the list: ``s2 < s2_K - 2 slack``.

    The entries of such a list all lie within twice its error bound of its last one, and (all being at least
    ``t^2 - slack``) the list sits at the band's edge: the nodes whose exact distance may fall on either
    side of ``t`` fill it, and where they are K or more (the distances of large sets of high-dimensional rows
    crowd around ``t``) it proves nothing, whatever is visited. An exact TFP walk over the benchmark's clustered
    data at N = 10^6 (first 300 steps in float64, with the float16 x 3 lists' bound;
    ``benchmarks/simulate_crowding.py``): every step a K = 128 list could not decide (4.7%) had such a list
    (5.7% of the steps' lists were crowded; K = 64: 36.8% undecided, 38.8% crowded), and float64 lists of 4K
    entries for the crowded ones decide every step: the rule's pick lay within the first 7 valid nodes.

    Args:
        index: (R, K) int32 band lists; s2: (R, K) float32 their squared distances; slack: (R,) float64 the
            lists' error bounds; same device. (``t2`` is not needed: the lists' lower bound holds it.)
    """
    s = s2.double()
    could_decide = (s < s[:, -1:] - 2.0 * slack[:, None]).sum(dim=1)
    return (index[:, -1] >= 0) & (could_decide < room)
