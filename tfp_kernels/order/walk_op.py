"""The C++ walk's boundary: the only module that knows the op ``tfp_walk``'s layout.

:class:`WalkOp` binds the op to its host tables once (:class:`WalkTables`: rows, band lists and their bounds,
the host scan's rows, path, visited mask, duplicate groups, long lists, close sets, the policy's tables) and
runs it as ``walk(step, stop)``; :class:`WalkCounters` names the slots of the counter tensor it adds to. The
driver (:func:`~tfp_kernels.order.schedule.run_walk`) and the list builders see only these.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .host_scan import HalfScanRows, no_host_scan
from .options import DEFAULT_SETTINGS
from .policy import WalkPolicy


def host_table(t: torch.Tensor, dtype: torch.dtype | None = None, *, huge_pages: bool | None = None,
               min_bytes: int = DEFAULT_SETTINGS.huge_page_min_bytes) -> torch.Tensor:
    """``t`` as a contiguous host tensor of ``dtype`` (default: its own); a new copy in memory advised for
    transparent huge pages (Linux ``madvise(MADV_HUGEPAGE)``) when ``huge_pages`` (default: when a copy is
    needed anyway and it takes at least ``min_bytes``: ``EngineSettings.huge_page_min_bytes``), else
    ``t.to("cpu", dtype)``.

    The walk reads the rows and the band lists at random: with 4 KB pages nearly every row fetch of a random
    walk over GBs also misses the TLB (the walk over the rows of N = 100,000, 300 MB, took 5.0-5.3 instead of
    5.6-5.8 us per step on the 2-core CPU with huge pages)."""
    import mmap

    dtype = t.dtype if dtype is None else dtype
    nbytes = t.numel() * torch.empty((), dtype=dtype).element_size()
    if huge_pages is None:
        huge_pages = (t.device.type != "cpu" or t.dtype != dtype) and nbytes >= min_bytes
    if not huge_pages or nbytes == 0 or not hasattr(mmap, "MADV_HUGEPAGE"):
        return t.to("cpu", dtype).contiguous()
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buf.madvise(mmap.MADV_HUGEPAGE)  # before the first touch: the copy faults in huge pages
    except OSError:  # (a kernel without transparent huge pages: ordinary pages)
        pass
    out = torch.frombuffer(buf, dtype=dtype, count=t.numel()).view(t.shape)  # (the tensor keeps buf alive)
    out.copy_(t)
    return out


class LongListTables:
    """The walk's long lists (see the op ``tfp_walk``): ``tables`` = [long_row (R,) int32 (-1: none), long_index
    (L, K_long) int32, long_s2 (L, K_long) float32, long_slack (L,) float64], host tensors. Builds append to
    them (the rows of lists no longer used stay, unreferenced); :class:`WalkOp` reads them at each call."""

    def __init__(self, num_rows: int, long_k: int):
        self.tables = [torch.full((num_rows,), -1, dtype=torch.int32), torch.empty(0, long_k, dtype=torch.int32),
                       torch.empty(0, long_k, dtype=torch.float32), torch.empty(0, dtype=torch.float64)]

    def clear(self, rows: torch.Tensor) -> None:
        """The list rows ``rows`` (host int64) read their band lists again."""
        self.tables[0][rows] = -1

    def append(self, rows: torch.Tensor, index: torch.Tensor, s2: torch.Tensor, slack: torch.Tensor) -> None:
        """Point the list rows ``rows`` (host int64, (Q,)) at new long lists (host: index (Q, K_long) int32, s2
        (Q, K_long) float32, slack (Q,) float64); their limits go to the caller's band_limit2."""
        first = self.tables[1].shape[0]
        self.tables[0][rows] = torch.arange(first, first + rows.numel(), dtype=torch.int32)
        for i, part in ((1, index), (2, s2), (3, slack)):
            self.tables[i] = torch.cat([self.tables[i], part])


class WalkCounters:
    """The (6,) int64 host counter tensor the op ``tfp_walk`` adds to, by name.

    Slots: ``scans`` (exact scans the walk ran itself), ``cap_scans`` (steps, scanned here or returned, where the
    rejection cap could fire), ``stale_entries`` (visited entries of the lists that could not decide, without the
    cap: what :class:`~tfp_kernels.order.schedule.RebuildSchedule` charges), ``close_set_scans`` (its scans settled
    over a close set and a band list), ``forced_steps`` (its scans whose pick lies closer than t to the window) and
    ``first_forced_step`` (-1: none yet).
    """

    SLOTS = ("scans", "cap_scans", "stale_entries", "close_set_scans", "forced_steps", "first_forced_step")

    def __init__(self):
        self.tensor = torch.tensor([0, 0, 0, 0, 0, -1], dtype=torch.int64)

    def __getattr__(self, name: str) -> int:
        try:
            return int(self.tensor[WalkCounters.SLOTS.index(name)])
        except ValueError:
            raise AttributeError(name) from None


@dataclass
class WalkTables:
    """The op ``tfp_walk``'s tables (host, contiguous; their meaning in ``csrc/tfp_kernels.cpp``).

    Attributes:
        embeddings: (N, D) float32 or float64 rows the walk measures exact distances on (the validated input).
        norms: (N,) float64 row norms (cosine) or empty (l2).
        band_index: (R, K) int32 band lists (R list rows: nodes, or duplicate groups); band_s2: (R, K) float32
            their fast squared distances; limit2: (R,) float64 each list's limit; slack: (N,) float64 the error
            bound of the lists' s2; num_close: (R,) int32 upper bounds of the nodes closer than t. Rebuilds write
            into them in place.
        path: (N,) int64 filled in place; visited: (N,) bool updated in place.
        host_scan: the host scans' float16 rows (:func:`~tfp_kernels.order.host_scan.half_scan_rows`), or
            :func:`~tfp_kernels.order.host_scan.no_host_scan` (the walk returns at each scan).
        groups: None or (group_of (N,) int32, offsets (R + 1,) int64, members (N,) int64, next (R,) int64).
        long_lists: None or the :class:`LongListTables` (read at each call: rebuilds append to them).
        close_sets: None or (offsets (N + 1,) int64, members (S,) int32).
        policy: the :class:`~tfp_kernels.order.policy.WalkPolicy` (its urgent groups' tables).
    """

    embeddings: torch.Tensor
    norms: torch.Tensor
    band_index: torch.Tensor
    band_s2: torch.Tensor
    limit2: torch.Tensor
    slack: torch.Tensor
    num_close: torch.Tensor
    path: torch.Tensor
    visited: torch.Tensor
    host_scan: HalfScanRows = None
    groups: tuple[torch.Tensor, ...] | None = None
    long_lists: LongListTables | None = None
    close_sets: tuple[torch.Tensor, torch.Tensor] | None = None
    policy: WalkPolicy | None = None

    def __post_init__(self):
        if self.host_scan is None:
            self.host_scan = no_host_scan()


class WalkOp:
    """The op ``tfp_walk`` bound to its :class:`WalkTables` and the rule: ``walk(step, stop)`` runs the walk from
    ``step`` (``path[:step]`` set) to at most ``stop`` and returns the step it stopped at (short of ``stop``:
    the list of ``last`` could not decide and the caller scans).

    Args:
        tables: the :class:`WalkTables`.
        threshold, window, max_rejections (None: no cap), cosine: the rule.
        counters: the :class:`WalkCounters` the walk adds to.
    """

    def __init__(self, tables: WalkTables, *, threshold: float, window: int, max_rejections: int | None,
                 cosine: bool, counters: WalkCounters):
        self.tables = tables
        self.counters = counters
        self.rule = {"threshold": float(threshold), "window": int(window),
                     "max_rejections": -1 if max_rejections is None else int(max_rejections), "cosine": bool(cosine)}

    def __call__(self, step: int, stop: int) -> int:
        t = self.tables
        scan = t.host_scan
        group_of, offsets, members, group_next = t.groups or (None, None, None, None)
        longs = (None, None, None, None) if t.long_lists is None else t.long_lists.tables
        close_offsets, close_members = t.close_sets or (None, None)
        policy, policy_groups = (t.policy or WalkPolicy()).op_args
        return int(torch.ops.tfp_kernels.tfp_walk(
            t.embeddings, t.norms, t.band_index, t.band_s2, t.limit2, t.slack, t.num_close,
            scan.rows, scan.scale, scan.sq_norms, scan.slack, t.path, t.visited, self.counters.tensor,
            step, stop, self.rule["threshold"], self.rule["window"], self.rule["max_rejections"], self.rule["cosine"],
            group_of, offsets, members, group_next, *longs, close_offsets, close_members, policy, policy_groups,
        ))
