"""The fast exact TFP ordering: band top-k lists, the C++ walk over them, exact fallback scans.

Pipeline (docs/design.md, 'Why the path is exact'), for validated embeddings and a known threshold ``t``:

1. rows prepared in float32 (unit rows for cosine) and the arithmetic error bound of the fast
   distances (:func:`~tfp_kernels.order.band_topk.squared_distance_error_coef`);
2. band top-k lists: per node the K nearest nodes whose *approximate* squared distance is at least
   ``t`` minus the error bound (so no node at exact distance ``>= t`` is left out), plus an upper
   bound of the number of nodes closer than ``t``; the lists that sit within their error bound of ``t``
   (crowded: they could decide almost nothing) are replaced by longer ones, in float64 beside 16-bit lists
   (:func:`crowded_lists`, ``long_lists``);
3. the walk (C++ op ``tfp_walk``, on host copies) takes each next node from the list of ``last``,
   deciding with exact double-precision distances, and stops where the list cannot prove the answer;
4. there, :func:`~tfp_kernels.order.scan.exact_pick` scans the unvisited nodes exactly (on the device of
   the embeddings), and the walk resumes.

The result is the path of :func:`~tfp_kernels.order.reference.tfp_order_reference` up to
floating-point ties (both decide with float64 distances; only their rounding differs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ._checks import check_long_lists
from .band_topk import (
    SPLIT_DTYPES,
    BandLists,
    band_bounds,
    band_topk_rows,
    band_topk_torch,
    close_sets,
    float64_error_coef,
    list_limits,
    squared_distance_error_coef,
)
from .distance import ieee_fp32_matmul, prepare
from .float16_rows import half_rows
from .host_scan import half_scan_rows, half_scan_slack, no_host_scan, squared_norms64
from .policy import ForcedSteps, walk_policy
from .scan import exact_pick, pick_among, projection_basis
from .scan_triton import MAX_SCAN_WINDOW, SCAN_CHUNK, triton_exact_pick
from .schedule import MIN_REBUILD_NODES, LongListTables, bind_walk, run_walk
from .threshold import squared_threshold


@dataclass
class FastOrderInfo:
    """Counters and timings of one fast ordering run."""

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


class DuplicateGroups(NamedTuple):
    """Exact-duplicate rows, as the C++ walk takes them (host tensors).

    group_of: (N,) int32 group of each node; offsets: (U + 1,) int64; members: (N,) int64, the nodes of group
    ``g`` in increasing order at ``offsets[g]:offsets[g + 1]``; representatives: (U,) int64, each group's
    lowest node.
    """

    group_of: torch.Tensor
    offsets: torch.Tensor
    members: torch.Tensor
    representatives: torch.Tensor


def duplicate_groups(rows: torch.Tensor) -> DuplicateGroups | None:
    """Groups of equal rows of ``rows`` (N, D) (any device: the sort runs there), or None when all rows are
    distinct; the groups are returned as host tensors."""
    unique, inverse, counts = torch.unique(rows, dim=0, return_inverse=True, return_counts=True)
    num_groups = unique.shape[0]
    if num_groups == rows.shape[0]:
        return None
    inverse, counts = inverse.cpu(), counts.cpu()
    members = torch.argsort(inverse, stable=True)
    offsets = torch.zeros(num_groups + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=offsets[1:])
    return DuplicateGroups(
        inverse.to(torch.int32).contiguous(),
        offsets,
        members.contiguous(),
        members.index_select(0, offsets[:-1]),
    )


def kernel_failure(err: Exception) -> str:
    """``"Type: first line of the message"`` (at most 200 characters of it) for a warning."""
    lines = str(err).splitlines()
    return f"{type(err).__name__}: {lines[0][:200] if lines else ''}"


#: Up to this many nodes, CUDA inputs run their fallback scans on the host (fallback="auto").
_HOST_SCAN_MAX_NODES = 16_384


#: ``k="auto"``: the band lists' length at small N, and the most it is raised to (memory: N x K x 8 bytes on the
#: device and again on the host, 2 GB at N = 10^6).
AUTO_K_BASE = 64
AUTO_K_MAX = 128
#: ``k="auto"`` estimates the band's density only from this many list rows up (below, K = AUTO_K_BASE).
AUTO_K_MIN_ROWS = 65536
#: Rows sampled for the estimate.
AUTO_K_SAMPLE_ROWS = 256


def auto_list_length(x32: torch.Tensor, sq_norms: torch.Tensor, t2: float, slack: torch.Tensor, *,
                     base: int | None = None, max_k: int | None = None, min_rows: int | None = None,
                     sample_rows: int | None = None, seed: int = 0) -> int:
    """The band lists' length K of ``k="auto"``: ``base``, raised where the threshold band is dense.

    A list proves its answer only if the answer's fast squared distance is below its last entry's by the
    lists' error bound, and the entries within the bound below ``t^2`` (listed because they may be at
    ``>= t``) take slots too: a row whose list holds ~``K`` nodes within ``slack`` of ``t^2`` decides almost
    nothing. That count grows with N (~``q N`` nodes are closer than ``t``, and the distances of
    high-dimensional data crowd around ``t``): on the benchmark's clustered data (D = 768, float16 x 3
    lists, bound ~0.03 in squared distance, ``t^2`` ~2,050) a sampled row has a median of 14 and a 90th
    percentile of 63 nodes within the bound of ``t^2`` at N = 10^6 (2 and 9 at N = 131,072), and a walk over
    K = 64 lists could not decide 37% of its first 300 steps (4.7% with K = 128, none with K = 256; exact
    walk, simulated on the CPU: ``benchmarks/simulate_crowding.py``), the scans taking 125 of 178 s at N =
    10^6 on an H200.

    K = the smallest power of two that is at least ``base`` and ``2 c_90 + 32`` (``c_90``: the 90th percentile
    over ``sample_rows`` seeded random rows of the number of nodes ``j`` with ``|s2_fast(i, j) - t^2| <
    slack_i``), at most ``max_k`` (unless ``base`` is more). :data:`AUTO_K_MAX` is 128: the Triton kernel's
    256-column lists compile for half a minute to minutes (see ``band_topk_triton._configs``) and neither
    list length beyond 64 has been timed on a GPU yet (on the 2-core CPU, N = 100,000 without the cap: K =
    128 took 60.6 s with 0.6% of the steps scanned, K = 64 75.6 s with 1.3%). Lists of fewer than
    ``min_rows`` rows keep ``base`` (the estimate's ``sample_rows x N`` products would cost more than the
    scans they save).

    Args:
        x32: (R, D) float32 list rows (prepared), any device; sq_norms: (R,) float32 their squared norms;
        t2: the squared threshold; slack: (R,) float64 bounds of the lists' fast squared distances.
        base, max_k, min_rows, sample_rows: None for :data:`AUTO_K_BASE`, :data:`AUTO_K_MAX`,
            :data:`AUTO_K_MIN_ROWS`, :data:`AUTO_K_SAMPLE_ROWS` (read at the call).

    Returns:
        K (Python int; not capped by R: the caller clamps it to R - 1).
    """
    min_rows = AUTO_K_MIN_ROWS if min_rows is None else min_rows
    sample_rows = AUTO_K_SAMPLE_ROWS if sample_rows is None else sample_rows
    rows = x32.shape[0]
    if rows < min_rows or t2 <= 0:
        return AUTO_K_BASE if base is None else base
    pick = auto_sample_rows(rows, sample_rows, seed).to(x32.device)
    counts = band_counts(x32.index_select(0, pick), sq_norms.index_select(0, pick), slack.index_select(0, pick),
                         x32, sq_norms, t2)
    return list_length_for_counts(counts, base=base, max_k=max_k)


def auto_sample_rows(rows: int, sample_rows: int, seed: int = 0) -> torch.Tensor:
    """The (min(rows, sample_rows),) int64 rows :func:`auto_list_length` samples (seeded, host)."""
    return torch.randperm(rows, generator=torch.Generator().manual_seed(seed))[:sample_rows]


def band_counts(q: torch.Tensor, q_sq: torch.Tensor, q_slack: torch.Tensor, x32: torch.Tensor,
                sq_norms: torch.Tensor, t2: float) -> torch.Tensor:
    """(S,) int64: for each of the S rows ``q`` (float32, their squared norms ``q_sq`` and bounds ``q_slack``), the
    rows of ``x32`` (R, D) whose fast squared distance lies within ``q_slack`` of ``t2``; same device."""
    counts = torch.zeros(q.shape[0], dtype=torch.int64, device=q.device)
    q_sq, q_slack = q_sq.float()[:, None], q_slack.float()[:, None]
    block = max(1, (1 << 26) // max(1, q.shape[0]))  # (S x block) float32 per block: 256 MB
    with ieee_fp32_matmul():  # (not TF32, even where the caller allowed it: the counts are of float32 s2)
        for c0 in range(0, x32.shape[0], block):
            s2 = q_sq + sq_norms[None, c0 : c0 + block] - 2.0 * (q @ x32[c0 : c0 + block].T)
            counts += ((s2 - t2).abs_() < q_slack).sum(dim=1)
    return counts


def list_length_for_counts(counts: torch.Tensor, *, base: int | None = None, max_k: int | None = None) -> int:
    """K of :func:`auto_list_length` from the sampled rows' :func:`band_counts`."""
    base = AUTO_K_BASE if base is None else base
    max_k = AUTO_K_MAX if max_k is None else max_k
    need = 2.0 * float(torch.quantile(counts.double().cpu(), 0.9)) + 32.0
    k = base
    while k < need and k < max_k:
        k *= 2
    return max(base, min(k, max_k))


def list_length(embeddings: torch.Tensor, threshold: float, *, metric: str = "l2", k="auto",
                band_dtype="auto", band_backend: str = "auto") -> int:
    """The band lists' length K that :func:`fast_tfp_order` takes for these arguments (``k="auto"``:
    :func:`auto_list_length`), e.g. to compile its kernels ahead of a timed run. Estimated on every row
    (the ordering lists one row per group of exact duplicates: its K can differ where they are many).

    Args:
        embeddings: (N, D) validated embeddings, any device.
    """
    n, dim = embeddings.shape
    if k != "auto":
        return min(int(k), max(n - 1, 1))
    x32 = prepare(embeddings, metric, torch.float32)
    sq = squared_norms64(x32).float()
    backend = resolve_band_backend(band_backend, embeddings.device)
    slack = band_error_coef(dim, resolve_band_dtype(band_dtype, backend), backend) * (
        sq.double() + sq.max().double())
    return min(auto_list_length(x32, sq, squared_threshold(threshold, metric), slack), max(n - 1, 1))


#: Host tables of at least this many bytes that the walk reads at random (the rows, the band lists) are copied
#: into memory backed by transparent huge pages, where a host copy is made anyway (from the GPU, or another
#: dtype): with 4 KB pages nearly every row fetch of a random walk over GBs also misses the TLB. The walk over
#: the rows of N = 100,000 (300 MB) took 5.0-5.3 instead of 5.6-5.8 us per step on the 2-core CPU.
HUGE_PAGE_MIN_BYTES = 1 << 26


def host_table(t: torch.Tensor, dtype: torch.dtype | None = None, *, huge_pages: bool | None = None) -> torch.Tensor:
    """``t`` as a contiguous host tensor of ``dtype`` (default: its own); a new copy in memory advised for
    transparent huge pages (Linux ``madvise(MADV_HUGEPAGE)``) when ``huge_pages`` (default: when a copy is
    needed anyway and it takes at least :data:`HUGE_PAGE_MIN_BYTES`), else ``t.to("cpu", dtype)``."""
    import mmap

    dtype = t.dtype if dtype is None else dtype
    nbytes = t.numel() * torch.empty((), dtype=dtype).element_size()
    if huge_pages is None:
        huge_pages = (t.device.type != "cpu" or t.dtype != dtype) and nbytes >= HUGE_PAGE_MIN_BYTES
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


def resolve_band_backend(backend: str, device: torch.device) -> str:
    """``"triton"`` or ``"torch"`` for ``backend`` (``"auto"``: Triton on CUDA when available)."""
    if backend == "auto":
        if device.type == "cuda":
            from .band_topk_triton import triton_available

            return "triton" if triton_available() else "torch"
        return "torch"
    if backend not in ("triton", "torch"):
        raise ValueError(f"band backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    return backend


#: The Triton band lists' schedule (``band_topk_triton``'s ``schedule``): ``"rows"``, every row block against all
#: columns; ``"pairs"``, each unordered pair's product once (half the products, in rounds of block pairs:
#: :mod:`~tfp_kernels.order.band_pairs_triton`). "rows" until the pairs kernel's speed is measured on a GPU
#: (``bench_order --band-schedule pairs``, ``bench_band_topk``'s ``*_pairs`` cases).
BAND_SCHEDULE = "rows"


def band_lists(
    x32: torch.Tensor,
    sq_norms: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
    k: int,
    backend: str,
    input_dtype=torch.float32,
    progress: str | None = None,
) -> tuple[BandLists, str]:
    """Dispatch the band top-k to the Triton kernel (CUDA; :data:`BAND_SCHEDULE`) or the blockwise torch
    version; the products are those of ``input_dtype`` (error bound: ``squared_distance_error_coef(D,
    input_dtype)``). ``progress``: the label of a progress bar over the row blocks of the torch version (the
    Triton kernel runs without one)."""
    backend = resolve_band_backend(backend, x32.device)
    if backend == "triton":
        from .band_topk_triton import band_topk_triton

        return band_topk_triton(x32, sq_norms, lower, upper, k, input_dtype=input_dtype,
                                schedule=BAND_SCHEDULE), "triton"
    return band_topk_torch(x32, sq_norms, lower, upper, k, input_dtype=input_dtype, progress=progress), "torch"


#: Precisions of the band lists' products (``band_dtype``): see :func:`resolve_band_dtype`.
BAND_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "bfloat16x3": "bfloat16x3",
               "float16x3": "float16x3"}


def band_error_coef(dim: int, band_dtype, band_backend: str) -> float:
    """The band lists' error coefficient (:func:`~tfp_kernels.order.band_topk.squared_distance_error_coef`) for
    rows whose squared norms were rounded once from float64: split products are summed by chunks of
    :data:`~tfp_kernels.order.band_tiles_triton.ACC_CHUNK` in the Triton kernel, in one chain by the torch
    version."""
    chunk = None
    if band_backend == "triton" and band_dtype in SPLIT_DTYPES:
        from .band_tiles_triton import ACC_CHUNK

        chunk = ACC_CHUNK
    return squared_distance_error_coef(dim, band_dtype, acc_chunk=chunk, rounded_norms=True)


def resolve_band_dtype(band_dtype, band_backend: str):
    """What the band lists multiply (an ``input_dtype`` of the band top-k functions).

    ``"auto"``: ``"float16x3"`` with the Triton kernel (rows scaled per row by powers of two and split as
    float16 hi + lo, three tensor-core products summed by chunks: an error bound 1.2e-5 of the squared norms
    at D = 768, 4x below float32 products' and 32x below the unchunked bf16 split's, at the 16-bit rate),
    float32 with the torch backend (the split would cost three float32 products there). The bound is what
    the lists can decide: at N = 10^6 (the benchmark's clustered data, D = 768) about 240 nodes per row lie
    within the bf16 split's bound (3.7e-4) of the threshold, which filled every K = 64 list with nodes the
    exact distances then reject, against ~7 within the float16 split's. ``"bfloat16x3"`` (unscaled bf16
    split, bound 5.9e-5 chunked) and ``"bfloat16"`` (one bf16 product, bound ~0.8% of the squared norms:
    measured on the CPU, 10-190x more fallback scans than float32 at N = 16,000, D = 768) are allowed.
    """
    if band_dtype == "auto":
        return "float16x3" if band_backend == "triton" else torch.float32
    if isinstance(band_dtype, torch.dtype) and band_dtype in (torch.float32, torch.bfloat16):
        return band_dtype
    if isinstance(band_dtype, str) and band_dtype in BAND_DTYPES:
        return BAND_DTYPES[band_dtype]
    raise ValueError(
        f"band_dtype must be 'auto', 'float32', 'bfloat16', 'bfloat16x3' or 'float16x3', got {band_dtype!r}"
    )


#: Long lists (:func:`crowded_lists`): a band list with fewer than this many entries that could decide gets one.
LONG_LIST_ROOM = 4
#: Their length, in band lists' lengths.
LONG_LIST_FACTOR = 4
#: ``long_lists="auto"``: only for walks over this many list rows or more (below, the scans they save are cheap).
LONG_LIST_MIN_ROWS = 65536


#: Close sets (:func:`cap_close_sets`): at most this many entries per band-list entry (N K in all), int32: twice the
#: bytes of the lists' index and s2. (N = 100,000, K = 128, the paper's cap: 2 held 2,073 of the 2,684 sets the
#: cap concerned, 4 all of them: 43.9 -> 38.9 s.)
CLOSE_SET_BUDGET = 4


def cap_close_sets(x32: torch.Tensor, sq_norms: torch.Tensor, num_close: torch.Tensor, t2: float,
                   norm_sum: torch.Tensor, k: int, max_rejections: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Close sets for the walk (op ``tfp_walk``'s ``close_offsets`` / ``close_members``) of the nodes where the
    rejection cap could fire by their counts alone (``num_close + k >= max_rejections``), smallest counts
    first, within :data:`CLOSE_SET_BUDGET` entries per list entry; or None when there are none.

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
    kept = by_count[torch.cumsum(counts[risky][by_count], dim=0) <= CLOSE_SET_BUDGET * n * k]
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
                  room: int | None = None) -> torch.Tensor:
    """(R,) bool: the full band lists with fewer than ``room`` (default :data:`LONG_LIST_ROOM`) entries that could
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
    room = LONG_LIST_ROOM if room is None else room
    s = s2.double()
    could_decide = (s < s[:, -1:] - 2.0 * slack[:, None]).sum(dim=1)
    return (index[:, -1] >= 0) & (could_decide < room)


def fast_tfp_order(
    embeddings: torch.Tensor,
    *,
    metric: str,
    threshold: float,
    window: int,
    max_rejections: int | None,
    start: int,
    k: int | str,
    band_backend: str = "auto",
    band_dtype="auto",
    fallback: str = "auto",
    rebuild: str | None = "auto",
    progress: bool = False,
    group_duplicates: bool = True,
    long_lists: bool | str = "auto",
    use_close_sets: bool = True,
    policy: str = "paper",
) -> tuple[torch.Tensor, FastOrderInfo]:
    """Exact TFP path of validated ``embeddings`` (N, D) for a known ``threshold``.

    ``fallback="host"`` runs the exact fallback scans inside the C++ walk (a product pass over float16 host
    copies of the unvisited rows, settled in double precision: :mod:`~tfp_kernels.order.host_scan`); ``"device"`` runs them with torch on the device of the embeddings,
    returning from the C++ walk at each one; ``"triton"``: like ``"device"`` but each scan is one fused
    Triton pass over float16 copies of the unvisited rows (:mod:`~tfp_kernels.order.scan_triton`; without
    the rejection cap, else as ``"device"``); ``"auto"``: host for CPU tensors and for CUDA tensors up to
    ``_HOST_SCAN_MAX_NODES`` (16,384) nodes, device beyond.

    ``rebuild``: ``"auto"``: the lists of the unvisited nodes are recomputed among the unvisited nodes only
    (their old entries are mostly visited by then, which is what sends the walk to the expensive scans) when
    the rows scanned since the last build reach the work of a rebuild
    (:class:`~tfp_kernels.order.schedule.RebuildSchedule`); None disables it. Walks of fewer than
    ``MIN_REBUILD_NODES`` nodes never rebuild.

    ``k``: the band lists' length, or ``"auto"`` (:func:`auto_list_length`).

    ``band_dtype``: precision of the band lists' products (:func:`resolve_band_dtype`; default float16 x 3
    on tensor cores with the Triton kernel). The lists' error bound (hence the band edges and the walk's
    certificates) matches it, so the path is the same, decided by the same exact distances; only how often
    the lists cannot decide changes.

    ``group_duplicates``: exact duplicate rows (identical embeddings, e.g. SFT records sharing an
    instruction) get one band list per group, whose entries stand for the group's next unvisited member
    (members have identical distances to everything, so the rule always takes the lowest-index one).
    Without it, a popular duplicate group fills whole lists with members that the window then rejects
    all at once, and the walk falls back to scans (measured on the synthetic SFT data, 20k records of
    6.8k distinct instructions: 55% of steps scanned). Not used with a cap or with ``t = 0``.

    ``long_lists``: the band lists that sit within their error bound of ``t^2`` (:func:`crowded_lists`) are
    replaced by lists :data:`LONG_LIST_FACTOR` times longer, computed for those rows with torch products
    (:func:`~tfp_kernels.order.band_topk.band_topk_rows`) at each build and rebuild: in float64 (an error bound
    ~1e-7 of the squared norms instead of ~1e-5: their band edge holds almost no node of either side) unless
    the band lists are float32 (then float32: as on the CPU, where float64 products cost twice as much).
    ``"auto"``: for walks over :data:`LONG_LIST_MIN_ROWS` list rows or more; True: always; False: never. Not
    with a cap, nor with ``t = 0``. (2-core CPU, N = 100,000, no cap, float32 lists, one session: K = 64 76.3 s
    with 1,274 scans, 69.0 s with 617 long lists and 998 scans; with K = 128 no list was crowded.)

    ``use_close_sets``: with a cap, the walk counts the unvisited members of the close sets of the nodes where
    the cap could fire (:func:`cap_close_sets`), so that fewer of their steps need a scan; False: by the lists'
    counts only (same path, more scans).

    ``policy``: ``"paper"`` or ``"spread"`` (:mod:`~tfp_kernels.order.policy`; validated by the caller, no cap), as a
    :class:`~tfp_kernels.order.policy.WalkPolicy`: the C++ walk takes the urgent groups' members and its host scans
    the farthest node where none is valid; the device scans' picks are settled by its ``settle``.

    Returns:
        path: (N,) int64 on the device of ``embeddings``; and a :class:`FastOrderInfo`.
    """
    info = FastOrderInfo()
    long_lists = check_long_lists(long_lists)
    device = embeddings.device
    n, dim = embeddings.shape
    # the arguments' checks first, before any of the work
    if fallback == "auto":
        # CUDA: the host scan (C++, one float16 pass over the unvisited rows, ~0.3 ms at N = 4,000 on 2 cores)
        # beats the torch device scan (~2 ms at N = 16,384 on an H200, launch- and sync-bound) on the buffers of a
        # training loop; beyond _HOST_SCAN_MAX_NODES the device's bandwidth wins
        fallback = "host" if device.type == "cpu" or n <= _HOST_SCAN_MAX_NODES else "device"
    if fallback not in ("host", "device", "triton"):
        raise ValueError(f"fallback must be 'auto', 'host', 'device' or 'triton', got {fallback!r}")
    if fallback == "triton":
        from .band_topk_triton import triton_runs_on

        if not triton_runs_on(device):
            raise ValueError(
                f"fallback='triton' needs Triton and CUDA embeddings (CPU ones only under TRITON_INTERPRET=1), "
                f"got embeddings on {device}"
            )
    if rebuild not in ("auto", None):
        raise ValueError(f"rebuild must be 'auto' or None, got {rebuild!r}")
    t0 = time.perf_counter()
    x64 = prepare(embeddings, metric, torch.float64)
    x32 = x64.float()
    sq_norms = squared_norms64(x32).float()  # the float32 rows' norms, rounded once (rounded_norms below)
    auto_backend = band_backend == "auto"
    band_backend = resolve_band_backend(band_backend, device)
    band_dtype = resolve_band_dtype(band_dtype, band_backend)
    norm_sum = sq_norms.double() + sq_norms.max().double()
    t2 = squared_threshold(threshold, metric)
    # (N,) bounds of |s2_fast - s2_exact| per row of the band lists' products (the scans have their own)
    band_slack = band_error_coef(dim, band_dtype, band_backend) * norm_sum
    lower, upper = band_bounds(t2, band_slack)
    host = torch.device("cpu")
    host_dtype = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
    emb_host = host_table(embeddings, host_dtype)
    # exact duplicates share one band list (their rows, hence all their distances, are identical); not with
    # the cap (its proof counts nodes) nor with t = 0 (duplicates would then be valid neighbours)
    groups = None
    if group_duplicates and max_rejections is None and threshold > 0 and n > 2:
        groups = duplicate_groups(embeddings)  # (on the GPU for CUDA inputs: ~4 s of host sort at N = 1e6)
    reps = None if groups is None else groups.representatives.to(device)
    if groups is not None:
        group_args = (groups.group_of, groups.offsets, groups.members, groups.offsets[:-1].clone())
        info.num_groups = groups.offsets.numel() - 1
    else:
        group_args = ()
        info.num_groups = n

    def duplicates():
        dups = groups if groups is not None or group_duplicates else duplicate_groups(embeddings)
        return None if dups is None else (dups.group_of, dups.offsets.diff())

    policy = walk_policy(policy, threshold=threshold, metric=metric, n=n, duplicates=duplicates)

    def list_rows(*tables):
        """The tables' rows of the list rows (nodes, or duplicate groups' representatives)."""
        return tables if reps is None else tuple(t.index_select(0, reps) for t in tables)

    list_x32, list_sq, list_lower, list_upper, list_slack = list_rows(x32, sq_norms, lower, upper, band_slack)
    num_lists = list_x32.shape[0]
    if k == "auto":
        k = auto_list_length(list_x32, list_sq, t2, list_slack)
    k = min(k, max(num_lists - 1, 1))
    info.k = k
    long_k = min(LONG_LIST_FACTOR * k, num_lists - 1)
    if long_lists == "auto":
        long_lists = num_lists >= LONG_LIST_MIN_ROWS
    long_lists = bool(long_lists) and max_rejections is None and t2 > 0 and long_k > k
    long_x = long_sq = long_slack64 = None  # (long_slack64 None: float32 long lists, the band lists' bound)
    if long_lists:
        info.long_k = long_k
        if band_dtype == torch.float32:  # the band lists' own products and bound
            long_x, long_sq = list_x32, list_sq
        else:
            (long_x,) = list_rows(x64)
            long_sq = long_x.square().sum(dim=1)
            long_slack64 = float64_error_coef(dim) * (long_sq + long_sq.max())
    info.time_setup_s = time.perf_counter() - t0

    long_failed = []  # a failure of the long lists turns them off for the rest of the run

    def lengthen(rows: torch.Tensor | None, index: torch.Tensor, s2: torch.Tensor, row_slack: torch.Tensor):
        """Long lists of the crowded lists among ``rows`` (all list rows when None; their band lists ``index``,
        ``s2`` and bounds ``row_slack``), among ``rows``: the host
        tensors (positions in ``rows`` (Q,) int64, index (Q, long_k) int32 global list-row ids, s2 (Q,
        long_k) float32, limit2 (Q,) float64, slack (Q,) float64 the bound of their s2), or None when no list
        is crowded."""
        t_start = time.perf_counter()
        try:
            crowded = torch.nonzero(crowded_lists(index, s2, row_slack, t2)).flatten()
            if crowded.numel() == 0:
                return None
            try:
                long_slack = list_slack if long_slack64 is None else long_slack64
                x, sq, slack = (long_x, long_sq, long_slack) if rows is None else (
                    long_x[rows], long_sq[rows], long_slack[rows])
                q_slack = slack[crowded]
                q_lower, q_upper = band_bounds(t2, q_slack)
                out = band_topk_rows(x, sq, crowded, q_lower, q_upper, long_k)  # (-1 padded past the rows' count)
            except Exception as err:  # noqa: BLE001 - (e.g. out of device memory: the long lists only save scans)
                import warnings

                warnings.warn(f"tfp_order: the long lists failed ({kernel_failure(err)}); going on without them "
                              "(same path, more scans)", RuntimeWarning, stacklevel=4)
                long_failed.append(err)
                return None
            index = out.index if rows is None else torch.where(
                out.index >= 0, rows.to(torch.int32)[out.index.clamp(min=0).long()], -1)
            return [host_table(t) for t in (crowded, index, out.s2, list_limits(index, out.s2, q_slack), q_slack)]
        finally:
            info.time_long_s += time.perf_counter() - t_start

    def build(rows: torch.Tensor | None):
        """Lists of ``rows`` (all list rows — nodes, or duplicate groups — when None) among ``rows``, with
        global list-row ids, as host tensors."""
        if rows is None:
            out, info.band_backend = band_lists(
                list_x32, list_sq, list_lower, list_upper, k, band_backend, band_dtype,
                "tfp band lists" if progress else None,
            )
            index = out.index
        else:
            out, _ = band_lists(
                list_x32[rows],
                list_sq[rows],
                list_lower[rows],
                list_upper[rows],
                min(k, max(rows.numel() - 1, 1)),
                info.band_backend,
                band_dtype,
                "tfp band lists (rebuild)" if progress else None,
            )
            index = torch.where(out.index >= 0, rows.to(torch.int32)[out.index.clamp(min=0).long()], -1)
            if index.shape[1] < k:  # fewer rows than K: pad the lists
                pad = k - index.shape[1]
                index = torch.cat([index, index.new_full((index.shape[0], pad), -1)], dim=1)
                out = type(out)(
                    out.index,
                    torch.cat([out.s2, out.s2.new_full((out.s2.shape[0], pad), torch.inf)], 1),
                    out.num_close,
                )
        row_slack = list_slack if rows is None else list_slack[rows]
        limit2 = list_limits(index, out.s2, row_slack)
        long = lengthen(rows, out.index, out.s2, row_slack) if long_lists and not long_failed else None
        return [host_table(t) for t in (index, out.s2, limit2, out.num_close)], long

    long_tables = LongListTables(num_lists, long_k)

    def add_long_lists(rows_host: torch.Tensor | None, long) -> None:
        """Point the rows of ``long`` (:func:`lengthen`) at their new long lists; their limits into limit2."""
        if long is None:
            return
        where, index, s2, limit, slack = long
        rows = where if rows_host is None else rows_host[where]
        long_tables.append(rows, index, s2, slack)
        limit2[rows] = limit
        info.num_long_lists += rows.numel()

    t0 = time.perf_counter()
    try:
        (band_index, band_s2, limit2, num_close), long = build(None)
    except Exception as err:  # a Triton compile/launch failure on an untested GPU or Triton version
        if not (auto_backend and band_backend == "triton"):
            raise
        import warnings

        warnings.warn(
            f"tfp_order: the Triton band kernel failed ({kernel_failure(err)}); "
            "using the blockwise torch band lists instead (same path, slower). Pass band_backend='triton' to "
            "see the error.",
            RuntimeWarning,
            stacklevel=3,
        )
        band_backend, band_dtype = "torch", torch.float32
        band_slack = band_error_coef(dim, band_dtype, band_backend) * norm_sum  # (wider than the split's)
        lower, upper = band_bounds(t2, band_slack)
        list_lower, list_upper, list_slack = list_rows(lower, upper, band_slack)
        (band_index, band_s2, limit2, num_close), long = build(None)
    add_long_lists(None, long)
    close = None  # the close sets of the nodes where the cap could fire (rows are nodes: no groups with a cap)
    if use_close_sets and max_rejections is not None and n - 1 > max_rejections and groups is None:
        close = cap_close_sets(x32, sq_norms, num_close, t2, norm_sum, k, max_rejections)
        info.num_close_sets = 0 if close is None else int((close[0].diff() > 0).sum())
    info.band_dtype = str(band_dtype).replace("torch.", "")
    info.time_band_s = time.perf_counter() - t0
    if progress:
        from tqdm.auto import tqdm

        tqdm.write(f"tfp band lists: {num_lists} rows, K = {k}, {info.band_backend} {info.band_dtype}, "
                   f"{info.time_band_s:.2f} s (setup {info.time_setup_s:.2f} s)")

    t0 = time.perf_counter()
    norms_host = (
        torch.linalg.vector_norm(emb_host.double(), dim=1).contiguous()
        if metric == "cosine"
        else torch.empty(0, dtype=torch.float64)
    )
    slack_host = band_slack.to(host).contiguous()  # the walk bounds the error of the lists' s2
    path = torch.empty(n, dtype=torch.long)
    path[0] = start
    visited = torch.zeros(n, dtype=torch.bool)
    visited[start] = True
    visited_dev = visited.to(device)
    synced = 1  # path[:synced] is marked in visited_dev
    # the fused scan applies the rule without the cap: used while the cap cannot fire (no cap, or fewer
    # unvisited nodes than the cap), else the torch scan
    fused_scan = fallback == "triton" and window <= MAX_SCAN_WINDOW
    y64 = None  # projections for the device scans' lower bounds, computed at the first of them
    # the host scans' float16 copy of the prepared rows and its error bound (empty: the walk returns at scans)
    host_scan = half_scan_rows(x32) if fallback == "host" else no_host_scan()
    # scans in the C++ walk; steps where the cap could fire; visited entries of undecided lists; the walk's scans
    # over a close set and a list only; its forced steps and the first of them
    counter = torch.tensor([0, 0, 0, 0, 0, -1], dtype=torch.long)
    forced_steps = ForcedSteps()  # (those of the scans run from here)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, initial=1, desc="tfp walk", unit="node")
        if bar.disable:
            bar = None
    info.time_setup_s += time.perf_counter() - t0

    scan_rows, scan_rows_at = None, 0  # the fused scans' list of unvisited nodes, and the step it was made at
    fused_half = None
    # the fused scans' (tensor_cores, fused_settle) modes, fastest first: the first scan tries them in turn
    # (a compile failure on an untested GPU or Triton warns and takes the next), later scans keep the one
    # that worked
    fused_modes = [(True, True), (True, False), (False, False)]
    fused_mode = None
    fused_slack = {}  # their bounds, by tensor_cores: (slack, band_bounds(t2, slack)) of every node
    candidates = [0]  # rows the fused scans settled in float64

    def fused_pick(mode: tuple[bool, bool], last: int, window_nodes: list[int]) -> int:
        """One fused Triton scan over ``scan_rows`` (see :func:`pick`)."""
        tensor_cores, fused_settle = mode
        if tensor_cores not in fused_slack:  # (computed once: a pass over N and a host sync)
            slack = half_scan_slack(
                sq_norms, dim, float32_norms=True, tensor_core_chunk=SCAN_CHUNK if tensor_cores else None)
            fused_slack[tensor_cores] = slack, band_bounds(t2, slack)
        slack, bounds = fused_slack[tensor_cores]
        return triton_exact_pick(
            x64, x32, sq_norms, slack, scan_rows, last, window_nodes, threshold=threshold,
            metric=metric, visited=visited_dev, half=fused_half, tally=candidates, tensor_cores=tensor_cores,
            fused_settle=fused_settle, bounds=bounds,
        )

    set_scans = [0]  # the device scans settled over a close set and a band list

    def close_set_pick(last: int, window_nodes: list[int]) -> int | None:
        """With the cap: the scan over the unvisited members of the close set of ``last`` and of its band list
        (every node that may precede a pick nearer than the list's limit), as the C++ walk's host scans do;
        None when ``last`` has no set or that does not decide."""
        begin, end = int(close[0][last]), int(close[0][last + 1])
        if begin == end:
            return None
        members = close[1][begin:end].long()
        listed = band_index[last].long()
        listed = listed[listed >= 0]
        cand = torch.cat([members[~visited[members]], listed[~visited[listed]]]).unique()
        node = pick_among(x64, cand.to(device), float(limit2[last]), last, window_nodes, threshold=threshold,
                          max_rejections=max_rejections, metric=metric)
        set_scans[0] += node is not None
        return node

    def pick(step: int) -> int:
        """The node at ``step``: the rule's (:func:`scan`), settled by the policy; forced steps noted."""
        node, forced = policy.settle(scan(step), x64, path[max(0, step - window) : step].tolist(),
                                     lambda: torch.nonzero(~visited_dev).flatten())
        forced_steps.note(step, forced)
        return node

    def scan(step: int) -> int:
        """The exact scan at ``step``, on the device (the host mode's scans run inside the C++ walk)."""
        nonlocal y64, visited_dev, synced, scan_rows, scan_rows_at, fused_half, fused_mode
        if y64 is None and not (fused_scan and (max_rejections is None or max_rejections >= n)):
            y64 = x64 @ projection_basis(x64)
        if device.type != "cpu":
            visited_dev[path[synced:step].to(device, non_blocking=True)] = True  # (no wait for the queue)
        else:
            visited_dev = visited
        synced = step
        last, window_nodes = int(path[step - 1]), path[max(0, step - window) : step - 1].tolist()
        if close is not None and n - step > max_rejections:
            node = close_set_pick(last, window_nodes)
            if node is not None:
                return node
        if fused_scan and (max_rejections is None or n - step <= max_rejections):
            # one list of the unvisited nodes serves several fused scans (they skip the nodes visited since):
            # rebuilt once half of it is stale, not at every scan (a pass over N and a host sync each)
            if scan_rows is None or 2 * (step - scan_rows_at) > scan_rows.numel():
                scan_rows, scan_rows_at = torch.nonzero(~visited_dev).flatten(), step
            if fused_half is None:  # the float16 rows the fused scans read (half the bytes)
                rows16, scale = half_rows(x32)
                fused_half = (rows16, scale.float())  # (the kernel's scales: converted once, not per scan)

            if fused_mode is None:  # the first fused scan: the fastest kernels that compile here
                for mode in fused_modes:
                    try:
                        node = fused_pick(mode, last, window_nodes)
                        fused_mode = mode
                        break
                    except Exception as err:  # (a compile failure on an untested GPU or Triton)
                        if mode == fused_modes[-1]:
                            raise
                        import warnings

                        what = "tensor-core products" if not mode[1] else "float64 settle kernel"
                        warnings.warn(
                            f"tfp_order: the fused scan's {what} failed ({kernel_failure(err)}); trying "
                            f"{'float32 products' if not mode[1] else 'the torch settle'} instead (same path, "
                            "slower scans)",
                            RuntimeWarning,
                            stacklevel=2,
                        )
            else:
                node = fused_pick(fused_mode, last, window_nodes)
        else:
            node = exact_pick(
                x64,
                y64,
                torch.nonzero(~visited_dev).flatten(),
                last,
                window_nodes,
                threshold=threshold,
                max_rejections=max_rejections,
                metric=metric,
            )
        return node

    walk = bind_walk(
        embeddings=emb_host, norms=norms_host, band_index=band_index, band_s2=band_s2, limit2=limit2,
        slack=slack_host, num_close=num_close, host_scan=host_scan, path=path, visited=visited, counter=counter,
        threshold=threshold, window=window, max_rejections=max_rejections, cosine=metric == "cosine",
        group_args=group_args, long_lists=long_tables if long_lists else None, close_sets=close,
        policy=policy,
    )

    def rebuild_lists(step: int) -> None:
        if groups is not None:  # the groups with an unvisited member
            alive = torch.zeros(num_lists, dtype=torch.bool)
            alive[groups.group_of[~visited].long()] = True
            rows_host = torch.nonzero(alive).flatten()
        else:
            rows_host = torch.nonzero(~visited).flatten()
        tables, long = build(rows_host.to(device))
        for table, part in zip((band_index, band_s2, limit2, num_close), tables):
            table[rows_host] = part
        if long_lists:
            long_tables.clear(rows_host)
            add_long_lists(rows_host, long)

    tally = run_walk(
        n, walk=walk, pick=pick, rebuild=rebuild_lists if rebuild == "auto" else None, path=path, visited=visited,
        counter=counter, k=k, bar=bar,
        min_rebuild_nodes=MIN_REBUILD_NODES,
    )
    info.time_walk_s += tally.walk_s
    info.time_fallback_s += tally.fallback_s
    info.time_band_s += tally.band_s
    info.num_fallbacks += tally.scans
    info.num_rebuilds += tally.rebuilds
    info.scan_candidates = candidates[0]
    if bar is not None:
        bar.close()
    info.num_fallbacks += int(counter[0])  # scans run inside the C++ walk (their time is in time_walk_s)
    info.num_cap_fallbacks = int(counter[1])
    info.num_close_set_scans = int(counter[3]) + set_scans[0]
    forced_steps.add_walk_counter(counter)
    info.num_forced_steps, info.first_forced_step = forced_steps.count, forced_steps.first
    return path.to(device), info

