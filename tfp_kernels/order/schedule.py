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
- *price* of a rebuild of r nodes, in the same unit: ``r^2 / nodes_per_scanned_row``
  (``EngineSettings.nodes_per_scanned_row``), the rows a scan could
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

from .options import DEFAULT_SETTINGS, EngineSettings
from .walk_op import WalkCounters


class RebuildSchedule:
    """The rebuild rule of the module docstring, for one walk over ``n`` nodes.

    Args:
        n: nodes of the walk.
        enabled: False: :meth:`due` is never true.
        settings: ``min_rebuild_nodes`` (no rebuild for walks of fewer nodes, nor with fewer than half as many
            unvisited) and ``nodes_per_scanned_row`` (the price of a rebuild).

    Attributes:
        chunk: steps per walk call (the walk returns at least this often, so that the scans are counted
            against the remaining nodes of their stretch, within 0.4% of n).
        rent: rows scanned since the last build.
    """

    def __init__(self, n: int, *, enabled: bool = True, settings: EngineSettings = DEFAULT_SETTINGS):
        self.enabled = bool(enabled) and n >= settings.min_rebuild_nodes
        self.min_remaining = settings.min_rebuild_nodes // 2
        self.nodes_per_scanned_row = settings.nodes_per_scanned_row
        self.chunk = max(256, n // 256)
        self.rent = 0

    def record(self, stale_entries: int, k: int, remaining: int) -> None:
        """Scans were made with about ``remaining`` unvisited nodes, at steps whose lists (of ``k`` entries)
        held ``stale_entries`` visited entries in all: each scan counts for the fraction of its list visited."""
        self.rent += stale_entries * remaining // k

    def price(self, remaining: int) -> int:
        """A rebuild of ``remaining`` nodes, in scanned rows."""
        return remaining * remaining // self.nodes_per_scanned_row

    def due(self, remaining: int) -> bool:
        """Whether to rebuild now, with ``remaining`` unvisited nodes."""
        return self.enabled and remaining >= self.min_remaining and self.rent >= self.price(remaining)

    def rebuilt(self) -> None:
        """The lists were rebuilt: the rent starts over."""
        self.rent = 0


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
    counters: WalkCounters,
    k: int,
    bar=None,
    settings: EngineSettings = DEFAULT_SETTINGS,
) -> WalkTally:
    """The walk's driver loop, shared by the single-process and the sharded orderings.

    From step 1 (``path[0]`` set and visited) to ``n``: ``walk(step, stop)`` runs the C++ walk up to ``stop``
    (at most :attr:`RebuildSchedule.chunk` steps) and returns where it stopped; short of ``stop`` the list of
    ``last`` could not decide and ``pick(step)`` scans exactly, returning the node; ``rebuild(step)``
    recomputes the lists of the unvisited nodes when :class:`RebuildSchedule` says so (None: never).

    Args:
        path: (n,) int64 host path, filled in place; visited: (n,) bool host mask, updated in place.
        counters: the C++ walk's :class:`~tfp_kernels.order.walk_op.WalkCounters` (read: its own scans, and the
            stale entries the schedule charges).
        k: the lists' length.
        bar: a tqdm bar advanced by the steps, or None.
        settings: the engine's constants (:class:`RebuildSchedule`'s).
    """
    schedule = RebuildSchedule(n, enabled=rebuild is not None, settings=settings)
    tally = WalkTally()
    step = 1
    shown = time.perf_counter()
    while step < n:
        if bar is not None and time.perf_counter() - shown > 1.0:  # the scans and rebuilds so far, each second
            shown = time.perf_counter()
            scans = f"scans {tally.scans + counters.scans}"
            if tally.scans:  # (the C++ walk's own scans are timed with the walk)
                scans += f" ({tally.fallback_s / tally.scans * 1e3:.2f} ms each)"
            bar.set_postfix_str(f"{scans}, rebuilds {tally.rebuilds} ({tally.band_s:.1f} s)", refresh=False)
        t0 = time.perf_counter()
        stale_before = counters.stale_entries
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
        schedule.record(counters.stale_entries - stale_before, k, n - step)
        if step < n and schedule.due(n - step):
            t0 = time.perf_counter()
            with record_function("tfp_rebuild"):
                rebuild(step)
            tally.rebuilds += 1
            tally.band_s += time.perf_counter() - t0
            schedule.rebuilt()
    return tally
