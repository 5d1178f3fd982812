"""The band lists' length K of ``k="auto"``: the base length, raised where the threshold band is dense
(:func:`auto_list_length`)."""

from __future__ import annotations

import torch

from .band_precision import band_error_coef, resolve_band_backend, resolve_band_dtype
from .distance import ieee_fp32_matmul, prepare
from .host_scan import squared_norms64
from .options import DEFAULT_SETTINGS, EngineSettings
from .threshold import squared_threshold


def auto_list_length(x32: torch.Tensor, sq_norms: torch.Tensor, t2: float, slack: torch.Tensor, *,
                     settings: EngineSettings = DEFAULT_SETTINGS, seed: int = 0) -> int:
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

    K = the smallest power of two that is at least ``base`` (``settings.auto_k_base``) and ``2 c_90 + 32`` (``c_90``: the 90th percentile
    over ``sample_rows`` seeded random rows of the number of nodes ``j`` with ``|s2_fast(i, j) - t^2| <
    slack_i``), at most ``settings.auto_k_max`` (unless ``base`` is more). Its default, 128, is: the Triton kernel's
    256-column lists compile for half a minute to minutes (see ``band_topk_triton._configs``) and neither
    list length beyond 64 has been timed on a GPU yet (on the 2-core CPU, N = 100,000 without the cap: K =
    128 took 60.6 s with 0.6% of the steps scanned, K = 64 75.6 s with 1.3%). Lists of fewer than
    ``settings.auto_k_min_rows`` rows keep ``base`` (the estimate's ``sample_rows x N`` products would cost more than the
    scans they save).

    Args:
        x32: (R, D) float32 list rows (prepared), any device; sq_norms: (R,) float32 their squared norms;
        t2: the squared threshold; slack: (R,) float64 bounds of the lists' fast squared distances.
        settings: the engine's constants (``auto_k_*``).

    Returns:
        K (Python int; not capped by R: the caller clamps it to R - 1).
    """
    rows = x32.shape[0]
    if rows < settings.auto_k_min_rows or t2 <= 0:
        return settings.auto_k_base
    pick = auto_sample_rows(rows, settings.auto_k_sample_rows, seed).to(x32.device)
    counts = band_counts(x32.index_select(0, pick), sq_norms.index_select(0, pick), slack.index_select(0, pick),
                         x32, sq_norms, t2)
    return list_length_for_counts(counts, settings)


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


def list_length_for_counts(counts: torch.Tensor, settings: EngineSettings = DEFAULT_SETTINGS) -> int:
    """K of :func:`auto_list_length` from the sampled rows' :func:`band_counts`."""
    base, max_k = settings.auto_k_base, settings.auto_k_max
    need = 2.0 * float(torch.quantile(counts.double().cpu(), 0.9)) + 32.0
    k = base
    while k < need and k < max_k:
        k *= 2
    return max(base, min(k, max_k))


def list_length(embeddings: torch.Tensor, threshold: float, *, metric: str = "l2", k="auto",
                band_dtype="auto", band_backend: str = "auto", settings: EngineSettings = DEFAULT_SETTINGS) -> int:
    """The band lists' length K that :func:`~tfp_kernels.order.fast.fast_tfp_order` takes for these arguments (``k="auto"``:
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
    return min(auto_list_length(x32, sq, squared_threshold(threshold, metric), slack, settings=settings),
               max(n - 1, 1))
