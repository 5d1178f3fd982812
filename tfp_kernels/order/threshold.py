"""The TFP threshold: a low quantile of the pairwise distances (docs/design.md, 'The rule')."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from . import _checks, inputs
from .distance import BLOCK_ELEMENTS, distances_from, ieee_fp32_matmul, pair_distances, prepare

#: Up to this many pairs (N * (N - 1) / 2) the threshold is computed exactly over all pairs by
#: default (N <= 5,793). Memory: 8 bytes per pair (128 MiB at the limit).
MAX_EXACT_PAIRS = 1 << 24
#: Number of sampled pairs used by default above MAX_EXACT_PAIRS.
DEFAULT_SAMPLE_PAIRS = 1 << 20


@dataclass(frozen=True)
class ThresholdEstimate:
    """How a threshold was obtained.

    Attributes:
        value: the threshold ``t`` (distance units of the metric).
        exact: True when computed over all pairs, False when over a sample of pairs.
        num_pairs: pairs looked at (all, or the sample size).
        num_positive: of those, pairs with distance > 0 (the quantile is taken over these).
    """

    value: float
    exact: bool
    num_pairs: int
    num_positive: int


def squared_threshold(threshold: float, metric: str) -> float:
    """The threshold in the squared domain of prepared rows: ``t^2`` (l2) or ``2 t`` (cosine)."""
    return threshold * threshold if metric == "l2" else 2.0 * threshold


def quantile_linear(values: torch.Tensor, q: float) -> float:
    """The ``q``-quantile of a 1-D tensor with linear interpolation (``torch.quantile``'s default).

    Unlike ``torch.quantile`` it has no 2^24-element limit: it uses two ``kthvalue`` selections.

    Args:
        values: (M,) floating tensor, M >= 1, any device.
        q: in [0, 1].
    """
    m = values.numel()
    pos = q * (m - 1)
    lo = int(pos)
    hi = min(lo + 1, m - 1)
    v_lo = torch.kthvalue(values, lo + 1).values.item()
    if hi == lo:
        return float(v_lo)
    v_hi = torch.kthvalue(values, hi + 1).values.item()
    return float(v_lo + (pos - lo) * (v_hi - v_lo))


def _all_positive_pair_distances(x: torch.Tensor, metric: str) -> tuple[torch.Tensor, int]:
    n = x.shape[0]
    parts = []
    block = max(1, BLOCK_ELEMENTS // n)
    cols_all = torch.arange(n, device=x.device)
    for s in range(0, n - 1, block):
        rows = cols_all[s : min(n - 1, s + block)]
        cols = cols_all[s + 1 :]
        d = distances_from(x, rows, cols, metric)  # (r, n - s - 1); keep the strict upper triangle
        upper = cols[None, :] > rows[:, None]
        d = d[upper & (d > 0)]
        parts.append(d)
    return torch.cat(parts), n * (n - 1) // 2


#: Above this many candidate pairs the bounded selection gives up and every pair is computed exactly.
_MAX_CANDIDATES = 1 << 20


def order_statistics(values: torch.Tensor, ranks: list[int]) -> list[float]:
    """The ``r``-th smallest entries of ``values`` (1-based ``ranks``, ascending), exactly.

    ``torch.kthvalue`` selects on one thread and reads the whole input per rank; here a seeded sample of
    2^16 entries brackets the ranks, one parallel pass counts the entries below the bracket and keeps the
    (few) inside it, and the selection runs on those. Falls back to ``kthvalue`` on the whole input when the
    bracket misses (never silently wrong: the counts are checked).

    Args:
        values: (M,) floating tensor, any device; ranks: ints in ``[1, M]``, ascending.
    """
    m = values.numel()
    sample_size = 1 << 16
    if m <= 4 * sample_size:
        return [float(torch.kthvalue(values, r).values) for r in ranks]
    gen = torch.Generator(device="cpu").manual_seed(0)
    sample = values[torch.randint(0, m, (sample_size,), generator=gen).to(values.device)].sort().values
    margin = 6.0 * sample_size**0.5 + 16  # ~6 standard deviations of a sampled rank
    lo_pos = int(ranks[0] / m * sample_size - margin)
    hi_pos = int(ranks[-1] / m * sample_size + margin)
    lo = sample[lo_pos] if lo_pos >= 0 else None
    hi = sample[hi_pos] if hi_pos < sample_size else None
    inside = torch.ones_like(values, dtype=torch.bool)
    if lo is not None:
        inside &= values >= lo
    if hi is not None:
        inside &= values <= hi
    below = int((values < lo).sum()) if lo is not None else 0
    kept = values[inside]
    if not all(below < r <= below + kept.numel() for r in ranks):
        return [float(torch.kthvalue(values, r).values) for r in ranks]
    return [float(torch.kthvalue(kept, r - below).values) for r in ranks]


def _triangle_pairs(flat: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(i, j) of positions in the row-major strict upper triangle (row i holds j = i+1 .. n-1)."""
    rows = torch.arange(n, device=flat.device, dtype=torch.int64)
    row_start = rows * n - rows * (rows + 1) // 2
    i = torch.searchsorted(row_start, flat, right=True) - 1
    return i, flat - row_start.index_select(0, i) + i + 1


def _exact_quantile_by_bounds(x: torch.Tensor, metric: str, q: float,
                              row_copies: bool | None = None) -> tuple[float, int, int] | None:
    """The exact-mode quantile of :func:`threshold_estimate`, from float32 matrix products with error bounds.

    Same value, bit for bit, as computing every pair in float64 from differences, at the cost of one float32
    GEMM over the pairs: every float32 squared distance ``s`` is within ``E`` of the exact one (worst-case
    bound of :func:`~tfp_kernels.order.band_topk.squared_distance_error_coef`, taken with the largest row
    norm), so order statistics move by at most ``E`` too. The ``r``-th smallest exact value is then the
    ``(r - A)``-th smallest exact value of the pairs with ``s`` within ``2E`` of the ``r``-th smallest ``s``
    (``A`` = pairs below that window), and only those candidates are computed in float64. Pairs at distance
    0 (left out of the quantile) are found among the pairs with ``s <= E``, also exactly.

    Args:
        x: (N, D) float64 prepared rows (:func:`~tfp_kernels.order.distance.prepare`), any device.
        row_copies: how the pairs i < j of a block of rows are laid out: one copy per row (default on the
            CPU) or one boolean gather per block (default on a GPU); the same values in the same places.

    Returns:
        ``(value, num_pairs, num_positive)``, or None when too many pairs fall in the windows (then the
        caller computes them all).
    """
    from .band_topk import squared_distance_error_coef

    n, dim = x.shape
    total = n * (n - 1) // 2
    x32 = x.float()
    sq32 = x32.square().sum(dim=1)
    max_sq = float(x.square().sum(dim=1).max())
    # |s2_fp32 - s2_exact| <= coef * (|x_i|^2 + |x_j|^2); the 1e-10 term covers the float64 rounding of the
    # exact values themselves (they are what the quantile returns)
    bound = 1.01 * squared_distance_error_coef(dim, torch.float32) * 2.0 * max_sq + 1e-10 * 4.0 * max_sq
    s2 = torch.empty(total, dtype=torch.float32, device=x.device)
    block = max(1, BLOCK_ELEMENTS // n)
    if row_copies is None:
        row_copies = x.device.type == "cpu"
    pos = 0
    with ieee_fp32_matmul():  # the bound assumes IEEE float32 products
        for start in range(0, n - 1, block):
            stop = min(n - 1, start + block)
            a = x32[start:stop]
            b = x32[start + 1 :]
            part = (sq32[start:stop, None] + sq32[None, start + 1 :]) - 2.0 * (a @ b.T)
            # row r of the block keeps columns > its own index: the last (n - 1 - r) entries
            if row_copies:  # one contiguous copy per row: a boolean gather over the block took twice as
                m = b.shape[0]  # long on the CPU (N = 4096, D = 256: 121 -> 56 ms for all blocks)
                for r in range(stop - start):
                    s2[pos : pos + m - r].copy_(part[r, r:])
                    pos += m - r
            else:  # (one gather per block: a copy per row would be a launch per row)
                keep = (
                    torch.arange(b.shape[0], device=x.device)[None, :]
                    >= torch.arange(stop - start, device=x.device)[:, None]
                )
                values = part[keep]
                s2[pos : pos + values.numel()] = values
                pos += values.numel()

    def exact(flat: torch.Tensor) -> torch.Tensor:
        i, j = _triangle_pairs(flat, n)
        return pair_distances(x, i, j, metric)

    maybe_zero = torch.nonzero(s2 <= bound).reshape(-1)
    if maybe_zero.numel() > _MAX_CANDIDATES:
        return None
    num_zero = int((exact(maybe_zero) == 0).sum()) if maybe_zero.numel() else 0
    num_positive = total - num_zero
    if num_positive == 0:
        return 0.0, total, 0
    level = q * (num_positive - 1)
    lo = int(level)
    hi = min(lo + 1, num_positive - 1)
    rank_lo, rank_hi = num_zero + lo + 1, num_zero + hi + 1  # 1-based over all pairs, zeros first
    s_lo, s_hi = order_statistics(s2, [rank_lo, rank_hi])
    window_lo, window_hi = s_lo - 2.0 * bound, s_hi + 2.0 * bound
    below = int((s2 < window_lo).sum())
    candidates = torch.nonzero((s2 >= window_lo) & (s2 <= window_hi)).reshape(-1)
    if candidates.numel() > _MAX_CANDIDATES:
        return None
    values = exact(candidates).sort().values
    v_lo = float(values[rank_lo - below - 1])
    v_hi = float(values[rank_hi - below - 1])
    return v_lo + (level - lo) * (v_hi - v_lo), total, num_positive


def _sampled_positive_pair_distances(x: torch.Tensor, metric: str, num: int, seed: int,
                                     dtype: torch.dtype | None = None) -> torch.Tensor:
    """``dtype``: see :func:`~tfp_kernels.order.distance.pair_distances` (``x`` the embeddings themselves)."""
    n = x.shape[0]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    i = torch.randint(0, n, (num,), generator=gen)
    j = torch.randint(0, n - 1, (num,), generator=gen)
    j += (j >= i).long()  # uniform over ordered pairs with i != j, i.e. over unordered pairs
    d = pair_distances(x, i.to(x.device), j.to(x.device), metric, dtype=dtype)
    return d[d > 0]


def _warn_all_zero(looked: int, exact: bool) -> None:
    warnings.warn(
        f"all {looked} {'pairs' if exact else 'sampled pairs'} of embeddings are at distance 0 "
        "(identical rows); the threshold is set to 0.0, which disables the filtering",
        UserWarning,
        stacklevel=4,
    )


def threshold_estimate(
    embeddings: torch.Tensor,
    *,
    metric: str = "l2",
    quantile: float = 0.02,
    sample_pairs: int | None = None,
    seed: int = 0,
    exact_method: str = "bounds",
) -> ThresholdEstimate:
    """Like :func:`estimate_threshold`, but also says how the value was obtained.

    ``exact_method`` (exact mode only): ``"bounds"`` (default; float32 products with error bounds, float64
    only near the quantile, see :func:`_exact_quantile_by_bounds`) or ``"all"`` (every pair in float64:
    the reference the tests compare with). Both return the same value.
    """
    if exact_method not in ("bounds", "all"):
        raise ValueError(f"exact_method must be 'bounds' or 'all', got {exact_method!r}")
    metric = _checks.check_metric(metric)
    embeddings = _checks.check_embeddings(embeddings, metric=metric)
    quantile = _checks.check_quantile(quantile)
    if sample_pairs is not None:
        sample_pairs = _checks.check_positive_int(sample_pairs, "sample_pairs")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    n = embeddings.shape[0]
    if n < 2:
        raise ValueError(f"estimate_threshold needs at least 2 rows in embeddings, got N = {n}")
    scaled = inputs.prepare_rows(embeddings, metric)  # detached, scaled by 2**k; the value comes back in user units
    embeddings = scaled.rows
    total = n * (n - 1) // 2
    exact = total <= (MAX_EXACT_PAIRS if sample_pairs is None else sample_pairs)
    if exact:
        x = prepare(embeddings, metric)
        fast = _exact_quantile_by_bounds(x, metric, quantile) if exact_method == "bounds" else None
        if fast is not None:
            value, looked, num_positive = fast
            if num_positive == 0:
                _warn_all_zero(looked, exact)
            return ThresholdEstimate(scaled.to_user_units(value), True, looked, num_positive)
        positive, looked = _all_positive_pair_distances(x, metric)
    else:
        looked = DEFAULT_SAMPLE_PAIRS if sample_pairs is None else sample_pairs
        if metric == "l2":
            # the sampled pairs' rows gathered from the embeddings and converted block by block: the values of
            # their float64 copy (prepare), without making one (N = 100,000, D = 768 float32, 2^20 pairs, 2
            # cores: 3.7 -> 2.3 s, the gathers of float64 rows were 1.2 s of it)
            positive = _sampled_positive_pair_distances(embeddings, metric, looked, seed, dtype=torch.float64)
        else:
            positive = _sampled_positive_pair_distances(prepare(embeddings, metric), metric, looked, seed)
    if positive.numel() == 0:
        _warn_all_zero(looked, exact)
        return ThresholdEstimate(0.0, exact, looked, 0)
    return ThresholdEstimate(scaled.to_user_units(quantile_linear(positive, quantile)), exact, looked, positive.numel())


def estimate_threshold(
    embeddings: torch.Tensor,
    *,
    metric: str = "l2",
    quantile: float = 0.02,
    sample_pairs: int | None = None,
    seed: int = 0,
) -> float:
    """The TFP threshold ``t``: the ``quantile``-quantile of the positive pairwise distances.

    Pairs are ``i < j``; pairs at distance exactly 0 (duplicate rows) are left out, as in the paper.
    The quantile interpolates linearly between order statistics (``torch.quantile``'s default).
    Distances are computed in float64 from explicit differences (see :mod:`tfp_kernels.order.distance`), on
    the rows scaled by a power of two into a safe range (:mod:`~tfp_kernels.order.inputs`; exact): the value,
    in the units of ``embeddings``, is that of the rows at scale 1 times the scale, for rows at 1e-300 or
    1e40 too.

    Exact or sampled:

    - ``sample_pairs=None`` (default): exact over all ``N(N-1)/2`` pairs when that is at most
      ``MAX_EXACT_PAIRS`` (2^24, i.e. N <= 5,793); otherwise ``DEFAULT_SAMPLE_PAIRS`` (2^20) pairs.
    - ``sample_pairs=m``: exact when ``N(N-1)/2 <= m``, otherwise ``m`` pairs.

    Sampling draws ``m`` pairs uniformly (with replacement) from the unordered pairs ``i != j``, with a
    CPU ``torch.Generator`` seeded by ``seed`` (the same pairs on every device). Sampling error: the
    estimate is the exact ``q'``-quantile of the distances for a ``q'`` whose standard deviation is
    ``sqrt(q (1 - q) / m)``; for ``q = 0.02`` and ``m = 2^20`` that is 1.4e-4 (0.7% of q), for
    ``m = 2^24`` 3.4e-5. In distance units the error is that times the inverse density of the
    distances at ``t``; where ``check_path`` or an exact threshold matters, pass ``threshold=``.

    Args:
        embeddings: (N, D), float16/bfloat16/float32/float64, any device; N >= 2, finite.
        metric: ``"l2"`` or ``"cosine"``.
        quantile: q in (0, 1); the paper uses 0.02.
        sample_pairs: see above; a positive int or None.
        seed: seed of the pair sample.

    Returns:
        The threshold as a Python float. When every pair looked at has distance 0 (all rows identical)
        it returns 0.0 with a ``UserWarning``: no filtering is then possible.

    Examples::

        >>> import torch, tfp_kernels
        >>> emb = torch.tensor([[0.0], [1.0], [3.0]])   # pair distances 1, 3, 2
        >>> tfp_kernels.estimate_threshold(emb, quantile=0.5)
        2.0
    """
    return threshold_estimate(
        embeddings, metric=metric, quantile=quantile, sample_pairs=sample_pairs, seed=seed
    ).value
