"""The TFP threshold: a low quantile of the pairwise distances (DESIGN.md 1.1, step 1)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from . import _checks
from .distance import BLOCK_ELEMENTS, distances_from, pair_distances, prepare

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
        upper = (cols[None, :] > rows[:, None])
        d = d[upper & (d > 0)]
        parts.append(d)
    return torch.cat(parts), n * (n - 1) // 2


def _sampled_positive_pair_distances(x: torch.Tensor, metric: str, num: int, seed: int) -> torch.Tensor:
    n = x.shape[0]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    i = torch.randint(0, n, (num,), generator=gen)
    j = torch.randint(0, n - 1, (num,), generator=gen)
    j += (j >= i).long()  # uniform over ordered pairs with i != j, i.e. over unordered pairs
    d = pair_distances(x, i.to(x.device), j.to(x.device), metric)
    return d[d > 0]


def threshold_estimate(
    embeddings: torch.Tensor,
    *,
    metric: str = "l2",
    quantile: float = 0.02,
    sample_pairs: int | None = None,
    seed: int = 0,
) -> ThresholdEstimate:
    """Like :func:`estimate_threshold`, but also says how the value was obtained."""
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
    total = n * (n - 1) // 2
    exact = total <= (MAX_EXACT_PAIRS if sample_pairs is None else sample_pairs)
    x = prepare(embeddings, metric)
    if exact:
        positive, looked = _all_positive_pair_distances(x, metric)
    else:
        looked = DEFAULT_SAMPLE_PAIRS if sample_pairs is None else sample_pairs
        positive = _sampled_positive_pair_distances(x, metric, looked, seed)
    if positive.numel() == 0:
        warnings.warn(
            f"all {looked} {'pairs' if exact else 'sampled pairs'} of embeddings are at distance 0 "
            "(identical rows); the threshold is set to 0.0, which disables the filtering",
            UserWarning,
            stacklevel=3,
        )
        return ThresholdEstimate(0.0, exact, looked, 0)
    return ThresholdEstimate(quantile_linear(positive, quantile), exact, looked, positive.numel())


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
    Distances are computed in float64 from explicit differences (see :mod:`tfp_kernels.order.distance`).

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
