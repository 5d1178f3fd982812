"""The record of what an ordering did: :class:`OrderStats`, whose engine counters (:class:`EngineCounters`)
are defined once, here, for every engine (reference, fast, sharded) and for the reports built from them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineCounters:
    """What an ordering engine counted and timed (zero / empty where an engine does not have the part).

    Attributes:
        band_backend: ``"triton"`` or ``"torch"`` (fast backend only).
        band_dtype: what the band lists multiply: ``"float32"``, ``"float16x3"``, ``"bfloat16x3"`` or
            ``"bfloat16"`` (fast backend only).
        k: length K of the band lists (fast backend only).
        num_fallbacks: steps the band lists could not decide, settled by an exact scan.
        num_rebuilds: times the lists of the unvisited nodes were recomputed among the unvisited.
        time_band_s, time_walk_s, time_fallback_s: seconds per phase of the fast backend (lists, C++ walk,
            scans run outside it); time_setup_s: its set-up (rows, host copies; within ``time_order_s``).
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
        num_forced_steps: steps whose node lies closer than ``t`` to a node of the window: without the cap, the
            steps where the threshold ran out (no unvisited node was at distance ``>= t`` from the window, so the
            rule took ``c_0``, or with ``policy="spread"`` the node farthest from the window); with the cap, also
            the steps where the cap took a node closer than ``t``. Counted in the walk, with exact distances: by
            the reference at every step, by the fast backends at their exact scans (a band list's pick is valid);
            :func:`~tfp_kernels.order.policy.count_forced_steps` counts them for any order.
        first_forced_step: the first of them (an index into the path), None when there is none.
    """

    band_backend: str = ""
    band_dtype: str = ""
    k: int = 0
    num_fallbacks: int = 0
    num_rebuilds: int = 0
    time_band_s: float = 0.0
    time_walk_s: float = 0.0
    time_fallback_s: float = 0.0
    time_setup_s: float = 0.0
    num_groups: int = 0
    scan_candidates: int = 0
    num_long_lists: int = 0
    long_k: int = 0
    time_long_s: float = 0.0
    num_close_sets: int = 0
    num_cap_fallbacks: int = 0
    num_close_set_scans: int = 0
    num_forced_steps: int = 0
    first_forced_step: int | None = None


#: The names report.json gives the counters of :class:`EngineCounters` it shows.
REPORT_NAMES = {"num_fallbacks": "fallbacks", "num_rebuilds": "rebuilds", "num_long_lists": "long_lists",
                "num_close_sets": "close_sets", "num_cap_fallbacks": "cap_scans", "num_forced_steps": "forced_steps"}


@dataclass(frozen=True, kw_only=True)
class OrderStats(EngineCounters):
    """What :func:`~tfp_kernels.tfp_order` did: the run's header and its :class:`EngineCounters` (keyword
    arguments only).

    Attributes:
        threshold: the threshold ``t`` used (distance units of ``metric``).
        threshold_source: ``"given"``, ``"exact"`` (all pairs) or ``"sampled"``.
        backend: the implementation that computed the path: ``"fast"`` (band lists + C++ walk +
            exact fallback scans) or ``"reference"``.
        num_nodes: N.
        time_threshold_s: seconds spent estimating the threshold (0 when given).
        time_order_s: seconds spent computing the path (all phases).
        policy: ``"paper"`` or ``"spread"`` (:mod:`~tfp_kernels.order.policy`).
    """

    threshold: float
    threshold_source: str
    backend: str
    num_nodes: int
    time_threshold_s: float
    time_order_s: float
    policy: str = "paper"

    def report_counters(self) -> dict:
        """The run's counters as ``tfp-pack``'s report.json gives them (its ``"order"`` section): ``backend``,
        ``band_backend``, ``k``, ``policy``, ``first_forced_step``, the rates, and the counters under the report's
        names (:data:`REPORT_NAMES`)."""
        out = {"backend": self.backend, "band_backend": self.band_backend, "k": self.k}
        out.update({report: getattr(self, field) for field, report in REPORT_NAMES.items()})
        out.update(fallback_rate=round(self.fallback_rate, 6), policy=self.policy,
                   first_forced_step=self.first_forced_step,
                   forced_step_rate=round(self.num_forced_steps / max(1, self.num_nodes - 1), 6))
        return out

    @property
    def fallback_rate(self) -> float:
        """Fraction of the N - 1 steps settled by an exact fallback scan."""
        return self.num_fallbacks / max(1, self.num_nodes - 1)
