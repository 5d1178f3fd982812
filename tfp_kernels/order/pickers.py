"""The pickers: the exact scans that settle the steps the band lists could not decide.

Where the C++ walk returns short of its stop, the list of ``last`` could not prove the rule's pick, and the
driver asks a picker for the node of that step: ``picker.pick(step) -> node``. The pickers share the
:class:`WalkState` (path, visited mask on the host and on the device, the window) and the :class:`Rule`:

- :class:`DeviceScanPicker`: :func:`~tfp_kernels.order.scan.exact_pick` over every unvisited node, with torch on
  the embeddings' device (projection lower bounds, float64 exact distances);
- :class:`FusedScanPicker`: one fused Triton pass over float16 copies of the unvisited rows
  (:func:`~tfp_kernels.order.scan_triton.triton_exact_pick`), trying its fastest modes first; where the rejection
  cap could fire it hands the step to another picker;
- :class:`CloseSetPicker`: with the cap, the scan over the close set of ``last`` and its band list only, where
  that decides; else another picker's;
- :class:`PolicyPicker`: another picker's pick settled by the walk's policy (``"spread"`` takes the node farthest
  from the window at a forced step), and the forced steps counted.

A picker is anything with ``pick(step) -> int`` and ``counts() -> dict`` (what it counted, by the name of an
:class:`~tfp_kernels.order.stats.EngineCounters` field; a wrapping picker adds its inner one's) (the sharded scan over the ranks' rows is another:
``tfp_kernels.distributed``). Kernels are arguments, so that a test can hand a failing one in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .band_topk import band_bounds
from .failures import warn_failure
from .float16_rows import half_rows
from .host_scan import half_scan_slack
from .policy import ForcedSteps, WalkPolicy
from .scan import exact_pick, pick_among, projection_basis
from .scan_triton import MAX_SCAN_WINDOW, SCAN_CHUNK, triton_exact_pick


@dataclass(frozen=True)
class Rule:
    """The TFP rule a walk applies: ``metric``, ``threshold`` (t, in the prepared rows' units), ``window`` and
    ``max_rejections`` (None: no cap)."""

    metric: str
    threshold: float
    window: int
    max_rejections: int | None

    def cap_may_fire(self, unvisited: int) -> bool:
        """Whether the cap could fire with ``unvisited`` nodes left (it needs more than ``max_rejections``)."""
        return self.max_rejections is not None and unvisited > self.max_rejections


class WalkState:
    """The walk's path and visited mask (host, filled by the C++ walk and the driver), and a copy of the mask on
    the device the pickers scan on, brought up to date lazily (:meth:`visited_on_device`).

    Args:
        n: nodes; start: the first node; device: where the pickers scan; window: the rule's window.

    Attributes:
        path: (n,) int64 host; visited: (n,) bool host.
    """

    def __init__(self, n: int, start: int, device: torch.device, window: int):
        self.n, self.device, self.window = n, device, window
        self.path = torch.empty(n, dtype=torch.long)
        self.path[0] = start
        self.visited = torch.zeros(n, dtype=torch.bool)
        self.visited[start] = True
        self._visited_dev = self.visited.to(device)
        self._synced = 1  # path[:_synced] is marked in _visited_dev

    def visited_on_device(self, step: int) -> torch.Tensor:
        """(n,) bool on the device: the nodes of ``path[:step]`` (for CPU, the host mask itself)."""
        if self.device.type == "cpu":
            self._visited_dev = self.visited
        elif step > self._synced:
            self._visited_dev[self.path[self._synced : step].to(self.device, non_blocking=True)] = True
        self._synced = step
        return self._visited_dev

    def unvisited_on_device(self, step: int) -> torch.Tensor:
        """(U,) int64 ascending unvisited nodes at ``step``, on the device."""
        return torch.nonzero(~self.visited_on_device(step)).flatten()

    def last(self, step: int) -> int:
        """The newest path node before ``step``."""
        return int(self.path[step - 1])

    def older_window(self, step: int) -> list[int]:
        """The window's nodes other than ``last`` (older first)."""
        return self.path[max(0, step - self.window) : step - 1].tolist()

    def window_nodes(self, step: int) -> list[int]:
        """The window's nodes (older first, ``last`` at the end)."""
        return self.path[max(0, step - self.window) : step].tolist()


class DeviceScanPicker:
    """The exact scan over every unvisited node with torch on the device of ``x64`` (:func:`exact_pick`); the
    projections of its lower bounds are computed at the first scan.

    Args:
        x64: (N, D) float64 prepared rows (device); state: the :class:`WalkState`; rule: the :class:`Rule`.
    """

    def __init__(self, x64: torch.Tensor, state: WalkState, rule: Rule):
        self.x64, self.state, self.rule = x64, state, rule
        self.y64 = None

    def pick(self, step: int) -> int:
        if self.y64 is None:
            self.y64 = self.x64 @ projection_basis(self.x64)
        s, r = self.state, self.rule
        return exact_pick(self.x64, self.y64, s.unvisited_on_device(step), s.last(step), s.older_window(step),
                          threshold=r.threshold, max_rejections=r.max_rejections, metric=r.metric)

    def counts(self) -> dict[str, int]:
        return {}


class FusedScanPicker:
    """One fused Triton scan per step (float16 copies of the unvisited rows, settled in float64), for the steps
    where the cap cannot fire; the others go to ``capped`` (a picker).

    Its list of unvisited nodes serves several scans (they skip the nodes visited since) and is remade once half of
    it is stale. The first scan tries the modes ``(tensor_cores, fused_settle)`` fastest first; a failing mode
    (a compile failure on an untested GPU or Triton) warns and the next is tried; later scans keep the one that
    worked.

    Args:
        x64, x32: (N, D) float64 / float32 prepared rows; sq_norms: (N,) float32 their squared norms; t2: the
            squared threshold; state, rule: as :class:`DeviceScanPicker`'s; capped: the picker of the steps where
            the cap could fire.
        kernel: the fused scan, default :func:`~tfp_kernels.order.scan_triton.triton_exact_pick`.

    Attributes:
        candidates: rows the scans settled in float64, summed.
    """

    MODES = ((True, True), (True, False), (False, False))

    def __init__(self, x64: torch.Tensor, x32: torch.Tensor, sq_norms: torch.Tensor, t2: float, state: WalkState,
                 rule: Rule, capped, *, kernel: Callable = triton_exact_pick):
        self.x64, self.x32, self.sq, self.t2 = x64, x32, sq_norms, t2
        self.state, self.rule, self.capped, self.kernel = state, rule, capped, kernel
        self.rows, self.rows_at = None, 0
        self.half = None
        self.mode = None
        self.slack = {}  # by tensor_cores: (slack, band_bounds(t2, slack)) of every node
        self.tally = [0]

    @staticmethod
    def usable(rule: Rule) -> bool:
        """Whether the fused scan can serve this rule at all (its window fits the kernel)."""
        return rule.window <= MAX_SCAN_WINDOW

    def counts(self) -> dict[str, int]:
        return add_counts(self.capped.counts(), {"scan_candidates": self.tally[0]})

    def pick(self, step: int) -> int:
        if self.rule.cap_may_fire(self.state.n - step):
            return self.capped.pick(step)
        visited = self.state.visited_on_device(step)
        if self.rows is None or 2 * (step - self.rows_at) > self.rows.numel():
            self.rows, self.rows_at = torch.nonzero(~visited).flatten(), step
        if self.half is None:  # the float16 rows the scans read (half the bytes)
            rows16, scale = half_rows(self.x32)
            self.half = (rows16, scale.float())  # (the kernel's scales: converted once, not per scan)
        if self.mode is not None:
            return self._scan(self.mode, step, visited)
        for mode in self.MODES:
            try:
                node = self._scan(mode, step, visited)
                self.mode = mode
                return node
            except Exception as err:  # (a compile failure on an untested GPU or Triton)
                if mode == self.MODES[-1]:
                    raise
                what = "tensor-core products" if not mode[1] else "float64 settle kernel"
                instead = "float32 products" if not mode[1] else "the torch settle"
                warn_failure(f"the fused scan's {what}", err, f"trying {instead} instead (same path, slower scans)")
        raise AssertionError("unreachable")

    def _scan(self, mode: tuple[bool, bool], step: int, visited: torch.Tensor) -> int:
        tensor_cores, fused_settle = mode
        if tensor_cores not in self.slack:  # (computed once: a pass over N and a host sync)
            slack = half_scan_slack(self.sq, self.x32.shape[1], float32_norms=True,
                                    tensor_core_chunk=SCAN_CHUNK if tensor_cores else None)
            self.slack[tensor_cores] = slack, band_bounds(self.t2, slack)
        slack, bounds = self.slack[tensor_cores]
        s, r = self.state, self.rule
        return self.kernel(
            self.x64, self.x32, self.sq, slack, self.rows, s.last(step), s.older_window(step),
            threshold=r.threshold, metric=r.metric, visited=visited, half=self.half, tally=self.tally,
            tensor_cores=tensor_cores, fused_settle=fused_settle, bounds=bounds,
        )


class CloseSetPicker:
    """With the cap: the scan over the unvisited members of the close set of ``last`` and of its band list (every
    node that may precede a pick nearer than the list's limit), as the C++ walk's host scans do; where ``last``
    has no set, that does not decide, or the cap cannot fire, ``inner``'s pick.

    Args:
        inner: the picker otherwise; x64: (N, D) float64 prepared rows (device); close: ``(offsets (N + 1,) int64,
            members (S,) int32)`` host close sets; band_index: (N, K) int32 host band lists; limit2: (N,) float64
            host limits (both read at each pick: rebuilds write into them); state, rule: as the others'.

    Attributes:
        set_scans: the picks settled over a set and a list.
    """

    def __init__(self, inner, x64: torch.Tensor, close: tuple[torch.Tensor, torch.Tensor], band_index: torch.Tensor,
                 limit2: torch.Tensor, state: WalkState, rule: Rule):
        self.inner, self.x64, self.close, self.band_index, self.limit2 = inner, x64, close, band_index, limit2
        self.state, self.rule = state, rule
        self.set_scans = 0

    def pick(self, step: int) -> int:
        if self.rule.cap_may_fire(self.state.n - step):
            node = self._set_pick(step)
            if node is not None:
                self.set_scans += 1
                return node
        return self.inner.pick(step)

    def counts(self) -> dict[str, int]:
        return add_counts(self.inner.counts(), {"num_close_set_scans": self.set_scans})

    def _set_pick(self, step: int) -> int | None:
        s, r = self.state, self.rule
        last = s.last(step)
        begin, end = int(self.close[0][last]), int(self.close[0][last + 1])
        if begin == end:
            return None
        members = self.close[1][begin:end].long()
        listed = self.band_index[last].long()
        listed = listed[listed >= 0]
        cand = torch.cat([members[~s.visited[members]], listed[~s.visited[listed]]]).unique()
        return pick_among(self.x64, cand.to(self.x64.device), float(self.limit2[last]), last, s.older_window(step),
                          threshold=r.threshold, max_rejections=r.max_rejections, metric=r.metric)


class PolicyPicker:
    """``inner``'s pick settled by the walk's :class:`~tfp_kernels.order.policy.WalkPolicy` (the node farthest from
    the window at a forced step under ``"spread"``); ``forced``: the :class:`~tfp_kernels.order.policy.ForcedSteps`
    these picks made.

    ``x64``: (N, D) float64 prepared rows on the state's device; or, with ``prepared=False``, the embeddings
    themselves (any float dtype: each block the policy reads is prepared there, as the sharded walk's host copy
    of the rows is)."""

    def __init__(self, inner, policy: WalkPolicy, x64: torch.Tensor, state: WalkState, *, prepared: bool = True):
        self.inner, self.policy, self.x64, self.state, self.prepared = inner, policy, x64, state, prepared
        self.forced = ForcedSteps()

    def pick(self, step: int) -> int:
        s = self.state
        node, forced = self.policy.settle(self.inner.pick(step), self.x64, s.window_nodes(step),
                                          lambda: s.unvisited_on_device(step), prepared=self.prepared)
        self.forced.note(step, forced)
        return node

    def counts(self) -> dict[str, int]:
        return self.inner.counts()


def add_counts(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    """The counts of ``a`` and ``b`` added by name."""
    return {name: a.get(name, 0) + b.get(name, 0) for name in {**a, **b}}
