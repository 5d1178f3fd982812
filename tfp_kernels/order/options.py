"""What the ordering engine is asked to do: :class:`OrderOptions` (the rule and the engine's choices) and
:class:`EngineSettings` (its tuning constants).

Both are frozen: an engine run reads them once, so nothing changes under a walk, and a test or a benchmark
that wants other constants passes its own ``EngineSettings`` instead of assigning module globals (which
would leak into every later call in the process). ``tfp_order(..., settings=...)`` and
``tfp_order_sharded(..., settings=...)`` take one; the defaults are :data:`DEFAULT_SETTINGS`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

#: The Triton band lists' schedules (:attr:`EngineSettings.band_schedule`).
BAND_SCHEDULES = ("rows", "pairs")


@dataclass(frozen=True)
class EngineSettings:
    """Tuning constants of the fast ordering engine. None of them changes the path: they set how much work
    the lists, the scans and the rebuilds do (the figures behind each default are in the docstrings named).

    Attributes:
        auto_k_base: ``k="auto"``: the band lists' length at small N
            (:func:`~tfp_kernels.order.list_length.auto_list_length`).
        auto_k_max: ``k="auto"``: the most it is raised to (memory: N x K x 8 bytes on the device and again on
            the host, 2 GB at N = 10^6).
        auto_k_min_rows: ``k="auto"`` estimates the band's density only from this many list rows up.
        auto_k_sample_rows: rows sampled for that estimate.
        host_scan_max_nodes: ``fallback="auto"``: up to this many nodes, CUDA inputs run their exact scans on the
            host (in the C++ walk); beyond, on the device.
        huge_page_min_bytes: host tables of at least this many bytes that the walk reads at random are copied into
            memory advised for transparent huge pages (:func:`~tfp_kernels.order.walk_op.host_table`).
        band_schedule: the Triton band lists' schedule: ``"rows"`` (every row block against all columns) or
            ``"pairs"`` (each unordered pair's product once; not yet timed on a GPU).
        long_list_room: a full band list with fewer than this many entries that could decide a step is crowded
            and gets a long list (:func:`~tfp_kernels.order.builders.crowded_lists`).
        long_list_factor: the long lists' length, in band lists' lengths.
        long_list_min_rows: ``long_lists="auto"``: only for walks over this many list rows or more.
        close_set_budget: with a cap, the close sets hold at most this many entries per band-list entry (a number)
            (:func:`~tfp_kernels.order.builders.cap_close_sets`).
        min_rebuild_nodes: walks of fewer nodes never rebuild their lists
            (:class:`~tfp_kernels.order.schedule.RebuildSchedule`).
        nodes_per_scanned_row: a rebuild of r nodes is priced as ``r^2 / nodes_per_scanned_row`` scanned rows.
    """

    auto_k_base: int = 64
    auto_k_max: int = 128
    auto_k_min_rows: int = 65536
    auto_k_sample_rows: int = 256
    host_scan_max_nodes: int = 16_384
    huge_page_min_bytes: int = 1 << 26
    band_schedule: str = "rows"
    long_list_room: int = 4
    long_list_factor: int = 4
    long_list_min_rows: int = 65536
    close_set_budget: float = 4
    min_rebuild_nodes: int = 1024
    nodes_per_scanned_row: int = 64

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "band_schedule":
                if value not in BAND_SCHEDULES:
                    raise ValueError(f"EngineSettings.band_schedule must be one of {BAND_SCHEDULES}, got {value!r}")
                continue
            kinds = (int, float) if field.name == "close_set_budget" else int
            if not isinstance(value, kinds) or isinstance(value, bool) or not value >= 0 or value == float("inf"):
                raise ValueError(f"EngineSettings.{field.name} must be a non-negative "
                                 f"{'number' if kinds != int else 'int'}, got {value!r}")
        for name in ("auto_k_base", "auto_k_max", "auto_k_sample_rows", "long_list_factor", "nodes_per_scanned_row"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineSettings.{name} must be at least 1, got {getattr(self, name)}")


#: The engine's defaults.
DEFAULT_SETTINGS = EngineSettings()


def check_settings(settings) -> EngineSettings:
    """``settings`` checked: None (:data:`DEFAULT_SETTINGS`) or an :class:`EngineSettings`."""
    if settings is None:
        return DEFAULT_SETTINGS
    if not isinstance(settings, EngineSettings):
        raise TypeError(f"settings must be a tfp_kernels.order.EngineSettings or None, got {type(settings).__name__}")
    return settings


@dataclass(frozen=True)
class OrderOptions:
    """One fast ordering run, as :func:`~tfp_kernels.order.fast.fast_tfp_order` takes it (checked by the public
    entry points, :func:`~tfp_kernels.tfp_order` and the sharded driver).

    The rule: ``metric`` (``"l2"`` or ``"cosine"``), ``threshold`` (t >= 0, in the units of the prepared rows),
    ``window``, ``max_rejections`` (None: no cap), ``start``, ``policy`` (``"paper"`` or ``"spread"``).

    The engine's choices (none changes the path): ``k`` (band lists' length or ``"auto"``), ``band_backend``
    (``"auto"``, ``"triton"``, ``"torch"``), ``band_dtype`` (what the band lists multiply), ``fallback`` (where the
    exact scans run: ``"auto"``, ``"host"``, ``"device"``, ``"triton"``), ``rebuild`` (``"auto"`` or None),
    ``group_duplicates``, ``long_lists`` (``"auto"``, True, False), ``use_close_sets``, ``progress``, and the
    tuning constants ``settings``.
    """

    metric: str
    threshold: float
    window: int
    max_rejections: int | None = None
    start: int = 0
    policy: str = "paper"
    k: int | str = "auto"
    band_backend: str = "auto"
    band_dtype: Any = "auto"
    fallback: str = "auto"
    rebuild: str | None = "auto"
    group_duplicates: bool = True
    long_lists: bool | str = "auto"
    use_close_sets: bool = True
    progress: bool = False
    settings: EngineSettings = DEFAULT_SETTINGS

    def __post_init__(self):
        from ._checks import check_list_length, check_long_lists

        check_list_length(self.k)
        check_long_lists(self.long_lists)
        if self.fallback not in ("auto", "host", "device", "triton"):
            raise ValueError(f"fallback must be 'auto', 'host', 'device' or 'triton', got {self.fallback!r}")
        if self.rebuild not in ("auto", None):
            raise ValueError(f"rebuild must be 'auto' or None, got {self.rebuild!r}")
        if self.band_backend not in ("auto", "triton", "torch"):
            raise ValueError(f"band backend must be 'auto', 'triton' or 'torch', got {self.band_backend!r}")
        if not isinstance(self.settings, EngineSettings):
            raise TypeError(f"settings must be an EngineSettings, got {type(self.settings).__name__}")

    def groups_duplicates(self, n: int) -> bool:
        """Whether a run over ``n`` rows lists one row per group of equal rows: ``group_duplicates``, and not
        with a cap (its proof counts nodes), nor with t = 0 (equal rows are then valid neighbours), nor for
        n <= 2."""
        return self.group_duplicates and self.max_rejections is None and self.threshold > 0 and n > 2
