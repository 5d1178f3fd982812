"""The walk's driver loop (:func:`run_walk`) and when it recomputes the band lists of the unvisited nodes: a
ski-rental rule in units of work.

As the walk goes on, the entries of the band lists get visited, and more and more steps find nothing
certain in the list of ``last``: each such step costs an exact scan of the r unvisited nodes (O(r D),
memory-bound). Recomputing the lists among the r unvisited nodes (O(r^2 D), compute-bound) makes them fresh
again. The rule (:class:`RebuildSchedule`):

- *rent*: the rows scanned since the last build that fresher lists could have saved: a scan of r unvisited
  nodes adds r times the fraction of its list (the list of ``last``) already visited. A fresh list holds the
  unvisited entries of the stale one and, in place of its visited ones, the next nodes of the band: it can
  only decide where those new places do, so a scan whose list has no visited entry (every entry too close
  to a window node, say) is one a rebuild gives again, and a list all visited is the scan a rebuild saves.
  Steps where the rejection cap could fire are not counted (the walk scans there whatever its list holds);
- *price* of a rebuild of r nodes, in the same unit: ``r^2 / NODES_PER_SCANNED_ROW``, the rows a scan could
  read in the time the list phase spends on r^2 pairs. Measured: on the 2-core CPU, the list phase takes
  9.2 ns per pair (N = 50,000, D = 768: 23 s) and a host scan 0.68 us per unvisited row (17 ms at ~25,000
  rows), a ratio of 74; on an H200 the float32 list phase ran at 15.5 TFLOP/s (0.1 ns per pair at D = 768)
  and a torch device scan ~2 ms at 16k rows, a ratio of ~1,200 there, ~100 for a bandwidth-bound scan of
  a million rows; the constant is 64, rounding toward rebuilding early (fresh lists also shorten the walk).
  Re-measured after the CPU's list phase (5 ns per pair at N = 100,000) and its host scans (now on both
  cores) got faster (N = 100,000, K = 64, no cap): 64 -> 32.3 s (998 scans, 3 rebuilds), 16 -> 34.6 s
  (2,385 scans, 3 rebuilds): it stays 64;
- rebuild once the rent reaches the price.

The previous rule counted every scan in full, also where the window, not the visited entries, sends the
walk to scans. Measured at N = 100,000, D = 768 (the benchmark's clusters, cap 10,000, 2-core CPU): the
first 30% of the walk made 3,700 scans (1,500 of them the cap's), and no unvisited node's list was more
than 55/64 visited at any of the checkpoints; the previous rule rebuilt 5 times (lists 200 s, walk 146 s:
4,482 scans, 346 s in all), this one 4 times (lists 131 s, walk 193 s: 6,129 scans, 325 s): the early
rebuild of ~85,000 nodes saved fewer scans than its price.

This is the classic ski-rental rule: while the scan rate stays steady between rebuilds it never pays more
than twice what the best rebuild schedule in hindsight would. It counts work, not seconds, so the schedule,
the scan count and the rebuild count are the same on every run (the CLI's report is byte-identical) and
do not depend on the machine's load. It replaced a fixed schedule (check after each quarter of the remaining
nodes; rebuild if more than 5% of those steps scanned), which missed bursts of scans starting between two
check points (N = 30,000 clustered, D = 768: 506 of its 951 scans came in the 50-65% stretch of the walk).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.profiler import record_function

from .policy import WalkPolicy

#: Below this many nodes the lists are never rebuilt (the scans are cheap there).
MIN_REBUILD_NODES = 1024
#: A rebuild of r nodes is priced as r^2 / NODES_PER_SCANNED_ROW scanned rows (module docstring).
NODES_PER_SCANNED_ROW = 64


class RebuildSchedule:
    """The rebuild rule of the module docstring, for one walk over ``n`` nodes.

    Args:
        n: nodes of the walk.
        enabled: False: :meth:`due` is never true.
        min_nodes: no rebuild for walks of fewer nodes, nor with fewer than ``min_nodes // 2`` unvisited.

    Attributes:
        chunk: steps per walk call (the walk returns at least this often, so that the scans are counted
            against the remaining nodes of their stretch, within 0.4% of n).
        rent: rows scanned since the last build.
    """

    def __init__(self, n: int, *, enabled: bool = True, min_nodes: int = MIN_REBUILD_NODES):
        self.enabled = bool(enabled) and n >= min_nodes
        self.min_remaining = min_nodes // 2
        self.chunk = max(256, n // 256)
        self.rent = 0

    def record(self, stale_entries: int, k: int, remaining: int) -> None:
        """Scans were made with about ``remaining`` unvisited nodes, at steps whose lists (of ``k`` entries)
        held ``stale_entries`` visited entries in all: each scan counts for the fraction of its list visited."""
        self.rent += stale_entries * remaining // k

    @staticmethod
    def price(remaining: int) -> int:
        """A rebuild of ``remaining`` nodes, in scanned rows."""
        return remaining * remaining // NODES_PER_SCANNED_ROW

    def due(self, remaining: int) -> bool:
        """Whether to rebuild now, with ``remaining`` unvisited nodes."""
        return self.enabled and remaining >= self.min_remaining and self.rent >= self.price(remaining)

    def rebuilt(self) -> None:
        """The lists were rebuilt: the rent starts over."""
        self.rent = 0


class LongListTables:
    """The walk's long lists (see the op ``tfp_walk``): ``tables`` = [long_row (R,) int32 (-1: none), long_index
    (L, K_long) int32, long_s2 (L, K_long) float32, long_slack (L,) float64], host tensors. Builds append to
    them (the rows of lists no longer used stay, unreferenced); :func:`bind_walk` reads them at each call."""

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


def bind_walk(
    *,
    embeddings: torch.Tensor,
    norms: torch.Tensor,
    band_index: torch.Tensor,
    band_s2: torch.Tensor,
    limit2: torch.Tensor,
    slack: torch.Tensor,
    num_close: torch.Tensor,
    host_scan: tuple[torch.Tensor, ...],
    path: torch.Tensor,
    visited: torch.Tensor,
    counter: torch.Tensor,
    threshold: float,
    window: int,
    max_rejections: int | None,
    cosine: bool,
    group_args: tuple[torch.Tensor, ...] = (),
    long_lists: LongListTables | None = None,
    close_sets: tuple[torch.Tensor, torch.Tensor] | None = None,
    policy: WalkPolicy | None = None,
) -> Callable[[int, int], int]:
    """The C++ op ``tfp_walk`` bound to its tables, as :func:`run_walk`'s ``walk(step, stop)``.

    The tensors are the op's (host, contiguous; see ``csrc/tfp_kernels.cpp``); rebuilds write into the band
    tables in place, so the bound walk always reads the current lists. ``host_scan``: a
    :class:`~tfp_kernels.order.host_scan.HalfScanRows` (the walk runs its scans itself) or
    :func:`~tfp_kernels.order.host_scan.no_host_scan` (it returns at each of them). ``long_lists``: None, or the
    :class:`LongListTables`, read at each call (rebuilds append to them). ``close_sets``: None, or the op's
    ``(close_offsets, close_members)`` (:func:`~tfp_kernels.order.fast.cap_close_sets`). ``policy``: a
    :class:`~tfp_kernels.order.policy.WalkPolicy` (None: the paper's rule).
    """
    cap = -1 if max_rejections is None else max_rejections
    tables = (embeddings, norms, band_index, band_s2, limit2, slack, num_close, *host_scan, path, visited, counter)

    groups = group_args or (None, None, None, None)
    close = close_sets or (None, None)
    policy_args = (policy or WalkPolicy()).op_args

    def walk(step: int, stop: int) -> int:
        longs = (None, None, None, None) if long_lists is None else long_lists.tables
        return int(torch.ops.tfp_kernels.tfp_walk(*tables, step, stop, threshold, window, cap, cosine, *groups,
                                                  *longs, *close, *policy_args))

    return walk


@dataclass
class WalkTally:
    """What :func:`run_walk` spent: seconds in the C++ walk calls, in the caller's scans and in rebuilds;
    the caller's scans (not those the C++ walk ran itself) and the rebuilds."""

    walk_s: float = 0.0
    fallback_s: float = 0.0
    band_s: float = 0.0
    scans: int = 0
    rebuilds: int = 0


def run_walk(
    n: int,
    *,
    walk: Callable[[int, int], int],
    pick: Callable[[int], int],
    rebuild: Callable[[int], None] | None,
    path: torch.Tensor,
    visited: torch.Tensor,
    counter: torch.Tensor,
    k: int,
    bar=None,
    min_rebuild_nodes: int = MIN_REBUILD_NODES,
) -> WalkTally:
    """The walk's driver loop, shared by the single-process and the sharded orderings.

    From step 1 (``path[0]`` set and visited) to ``n``: ``walk(step, stop)`` runs the C++ walk up to ``stop``
    (at most :attr:`RebuildSchedule.chunk` steps) and returns where it stopped; short of ``stop`` the list of
    ``last`` could not decide and ``pick(step)`` scans exactly, returning the node; ``rebuild(step)``
    recomputes the lists of the unvisited nodes when :class:`RebuildSchedule` says so (None: never).

    Args:
        path: (n,) int64 host path, filled in place; visited: (n,) bool host mask, updated in place.
        counter: (3,) int64, the C++ walk's counters: the scans it ran, those of them where the cap could
            fire, and the visited entries of the lists that could not decide without the cap (at its own
            scans and at the steps it returned for ``pick``).
        k: the lists' length.
        bar: a tqdm bar advanced by the steps, or None.
        min_rebuild_nodes: see :class:`RebuildSchedule` (``min_nodes``).
    """
    schedule = RebuildSchedule(n, enabled=rebuild is not None, min_nodes=min_rebuild_nodes)
    tally = WalkTally()
    step = 1
    shown = time.perf_counter()
    while step < n:
        if bar is not None and time.perf_counter() - shown > 1.0:  # the scans and rebuilds so far, each second
            shown = time.perf_counter()
            scans = f"scans {tally.scans + int(counter[0])}"
            if tally.scans:  # (the C++ walk's own scans are timed with the walk)
                scans += f" ({tally.fallback_s / tally.scans * 1e3:.2f} ms each)"
            bar.set_postfix_str(f"{scans}, rebuilds {tally.rebuilds} ({tally.band_s:.1f} s)", refresh=False)
        t0 = time.perf_counter()
        stale_before = int(counter[2])
        stop = min(step + schedule.chunk, n)
        with record_function("tfp_walk"):  # (labels for torch.profiler: benchmarks/profile_order.py)
            new_step = walk(step, stop)
        tally.walk_s += time.perf_counter() - t0
        if bar is not None:
            bar.update(new_step - step)
        step = new_step
        if step < n and step < stop:  # the list of `last` cannot decide: an exact scan here
            t0 = time.perf_counter()
            with record_function("tfp_scan"):
                node = pick(step)
            path[step] = node
            visited[node] = True
            step += 1
            tally.scans += 1
            if bar is not None:
                bar.update(1)
            tally.fallback_s += time.perf_counter() - t0
        schedule.record(int(counter[2]) - stale_before, k, n - step)
        if step < n and schedule.due(n - step):
            t0 = time.perf_counter()
            with record_function("tfp_rebuild"):
                rebuild(step)
            tally.rebuilds += 1
            tally.band_s += time.perf_counter() - t0
            schedule.rebuilt()
    return tally
