"""estimate_threshold: exact over all pairs for small N, seeded sample otherwise."""

import itertools
import math

import pytest
import torch

from tfp_kernels import estimate_threshold
from tfp_kernels.order import threshold_estimate
from tfp_kernels.order.threshold import quantile_linear


def brute_force_threshold(emb, metric, q):
    """All pairs i < j in float64 by plain Python loops, zeros dropped, linear-interpolated quantile."""
    x = emb.double()
    if metric == "cosine":
        x = x / x.norm(dim=1, keepdim=True)
    ds = []
    for i, j in itertools.combinations(range(x.shape[0]), 2):
        d = float((x[i] - x[j]).norm())
        if metric == "cosine":
            d = 0.5 * d * d
        if d > 0:
            ds.append(d)
    ds.sort()
    pos = q * (len(ds) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ds) - 1)
    return ds[lo] + (pos - lo) * (ds[hi] - ds[lo])


def test_hand_worked_threshold():
    # points 0, 1, 3, 3 on a line: positive pair distances 1, 2, 3, 2, 3 (the 3-3 pair is dropped);
    # sorted 1, 2, 2, 3, 3; q = 0.25 -> position 1 -> 2.0; q = 0.1 -> position 0.4 -> 1.4.
    emb = torch.tensor([[0.0], [1.0], [3.0], [3.0]])
    assert estimate_threshold(emb, quantile=0.25) == pytest.approx(2.0)
    assert estimate_threshold(emb, quantile=0.1) == pytest.approx(1.4)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("n, d", [(2, 3), (37, 5), (61, 17)])
def test_exact_matches_brute_force(metric, n, d):
    torch.manual_seed(n)
    emb = torch.randn(n, d)
    if n > 2:
        emb[-1] = emb[0]  # a duplicate pair, distance 0, must be ignored
    for q in (0.02, 0.5, 0.9):
        assert estimate_threshold(emb, metric=metric, quantile=q) == pytest.approx(
            brute_force_threshold(emb, metric, q), rel=1e-12, abs=1e-12
        )


def test_exact_matches_torch_quantile():
    torch.manual_seed(0)
    emb = torch.randn(300, 16, dtype=torch.float64)
    dist = torch.cdist(emb, emb, compute_mode="donot_use_mm_for_euclid_dist")
    iu = torch.triu_indices(300, 300, offset=1)
    pairs = dist[iu[0], iu[1]]
    expected = torch.quantile(pairs[pairs > 0], 0.02).item()
    est = threshold_estimate(emb)
    assert est.exact and est.num_pairs == 300 * 299 // 2
    assert est.value == pytest.approx(expected, rel=1e-12)


def test_sampled_is_seeded_and_close_to_exact():
    torch.manual_seed(1)
    emb = torch.randn(400, 8)
    exact = threshold_estimate(emb, quantile=0.05)
    a = threshold_estimate(emb, quantile=0.05, sample_pairs=20_000, seed=3)
    b = threshold_estimate(emb, quantile=0.05, sample_pairs=20_000, seed=3)
    c = threshold_estimate(emb, quantile=0.05, sample_pairs=20_000, seed=4)
    assert exact.exact and not a.exact and a.num_pairs == 20_000
    assert a.value == b.value
    assert a.value != c.value
    # sampling error: sd of the quantile level is sqrt(q(1-q)/m) = 1.5e-3; allow 5 sd in level terms
    dist = torch.cdist(emb.double(), emb.double())
    iu = torch.triu_indices(400, 400, offset=1)
    pairs = dist[iu[0], iu[1]]
    level = (pairs < a.value).double().mean().item()
    assert abs(level - 0.05) < 5 * math.sqrt(0.05 * 0.95 / 20_000)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_sampled_l2_equals_the_prepared_rows_bit_for_bit(dtype):
    """The sampled l2 estimate gathers the embeddings' rows and converts them block by block: the value of the
    pairs' distances over the float64 copy (prepare), bit for bit, in every input dtype and across blocks."""
    from tfp_kernels.order import distance, threshold

    g = torch.Generator().manual_seed(7)
    emb = (torch.randn(300, 37, generator=g) * 3).to(dtype)
    emb[5] = emb[9]  # a duplicate pair (distance 0, left out)
    est = threshold_estimate(emb, quantile=0.05, sample_pairs=5_000, seed=2)
    gen = torch.Generator().manual_seed(2)
    i = torch.randint(0, 300, (5_000,), generator=gen)
    j = torch.randint(0, 299, (5_000,), generator=gen)
    j += (j >= i).long()
    d = distance.pair_distances(distance.prepare(emb, "l2"), i, j, "l2")
    assert not est.exact and est.value == threshold.quantile_linear(d[d > 0], 0.05)
    blocks = distance.pair_distances(emb, i, j, "l2", dtype=torch.float64)
    small = distance.BLOCK_ELEMENTS
    try:  # blocks of 3 pairs: the conversion per block changes nothing
        distance.BLOCK_ELEMENTS = 3 * 37
        assert torch.equal(distance.pair_distances(emb, i, j, "l2", dtype=torch.float64), blocks)
    finally:
        distance.BLOCK_ELEMENTS = small
    assert torch.equal(blocks, d)
    with pytest.raises(ValueError, match="metric='l2' only"):
        distance.pair_distances(emb, i, j, "cosine", dtype=torch.float64)


def test_sample_pairs_at_least_all_pairs_is_exact():
    emb = torch.randn(20, 4)
    est = threshold_estimate(emb, sample_pairs=190)
    assert est.exact and est.value == estimate_threshold(emb)


def test_quantile_linear_beyond_torch_limit_matches_sort():
    torch.manual_seed(5)
    v = torch.rand((1 << 24) + 3, dtype=torch.float32)
    s = v.sort().values
    pos = 0.02 * (v.numel() - 1)
    lo = int(pos)
    expected = s[lo].item() + (pos - lo) * (s[lo + 1].item() - s[lo].item())
    assert quantile_linear(v, 0.02) == pytest.approx(expected, rel=1e-6)


def test_all_zero_distances_warns_and_returns_zero():
    with pytest.warns(UserWarning, match="threshold is set to 0.0"):
        assert estimate_threshold(torch.zeros(6, 3)) == 0.0


# ------------------------------------------------------------------ exact mode from float32 products + bounds


def _blobs(n: int, d: int, seed: int, duplicates: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(7, d, generator=g) * 3
    emb = centers[torch.randint(0, 7, (n,), generator=g)] + torch.randn(n, d, generator=g)
    if duplicates:
        emb[:duplicates] = emb[duplicates : 2 * duplicates]
    return emb


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize(
    "n, d, duplicates", [(2, 3, 0), (3, 1, 0), (97, 5, 0), (301, 37, 40), (640, 129, 0), (1200, 768, 10)]
)
@pytest.mark.parametrize("q", [0.001, 0.02, 0.5, 0.999])
def test_bounds_equal_all_pairs_bit_for_bit(metric, n, d, duplicates, q):
    emb = _blobs(n, d, seed=n + d, duplicates=duplicates)
    fast = threshold_estimate(emb, metric=metric, quantile=q)
    slow = threshold_estimate(emb, metric=metric, quantile=q, exact_method="all")
    assert fast.exact and slow.exact
    assert fast.value == slow.value  # bit for bit
    assert (fast.num_pairs, fast.num_positive) == (slow.num_pairs, slow.num_positive)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_bounds_equal_all_pairs_with_ties_and_dtypes(dtype):
    # integer coordinates: many exactly equal distances, and identical rows (distance 0, left out)
    g = torch.Generator().manual_seed(5)
    emb = torch.randint(0, 4, (400, 3), generator=g).to(dtype)
    for q in (0.02, 0.3, 0.9):
        fast = threshold_estimate(emb, quantile=q)
        slow = threshold_estimate(emb, quantile=q, exact_method="all")
        assert fast.value == slow.value and fast.num_positive == slow.num_positive < fast.num_pairs


@pytest.mark.parametrize("n", [2, 3, 200])
def test_bounds_block_layouts_agree(n, monkeypatch):
    """The pairs of a block laid out by one copy per row (CPU default) or one boolean gather per block (GPU
    default): the same value, across blocks of a few rows (N not a multiple of the block)."""
    from tfp_kernels.order import threshold
    from tfp_kernels.order.distance import prepare

    x = prepare(torch.randn(n, 9, generator=torch.Generator().manual_seed(n)), "l2")
    monkeypatch.setattr(threshold, "BLOCK_ELEMENTS", 7 * n)
    got = [threshold._exact_quantile_by_bounds(x, "l2", 0.3, row_copies=rows) for rows in (True, False)]
    assert got[0] is not None and got[0] == got[1]
    assert got[0][0] == threshold_estimate(x, quantile=0.3, exact_method="all").value


def test_bounds_fall_back_to_all_pairs_when_the_window_is_crowded(monkeypatch):
    from tfp_kernels.order import threshold as threshold_module

    emb = _blobs(200, 9, seed=1)
    expected = threshold_estimate(emb, exact_method="all").value
    monkeypatch.setattr(threshold_module, "_MAX_CANDIDATES", 0)
    assert threshold_module._exact_quantile_by_bounds(emb.double(), "l2", 0.02) is None
    assert threshold_estimate(emb).value == expected


def test_bounds_all_rows_identical_warns():
    with pytest.warns(UserWarning, match="distance 0"):
        est = threshold_estimate(torch.ones(20, 4))
    assert est.value == 0.0 and est.num_positive == 0


def test_bad_exact_method():
    with pytest.raises(ValueError, match="exact_method"):
        threshold_estimate(torch.randn(5, 2), exact_method="fast")


@pytest.mark.parametrize("m", [1, 7, 300_000, 1_000_003])
@pytest.mark.parametrize("kind", ["ties", "continuous"])
def test_order_statistics_equal_a_full_sort(m, kind):
    from tfp_kernels.order.threshold import order_statistics

    g = torch.Generator().manual_seed(m)
    values = torch.randint(0, 50, (m,), generator=g).float() if kind == "ties" else torch.rand(m, generator=g)
    ordered = values.sort().values
    for ranks in ([1], [1, 2], [m // 2, m // 2 + 1], [max(1, m - 1), m], [(m + 49) // 50] * 2):
        ranks = [min(max(r, 1), m) for r in ranks]
        assert order_statistics(values, ranks) == [float(ordered[r - 1]) for r in ranks]


def test_order_statistics_falls_back_when_the_bracket_misses(monkeypatch):
    from tfp_kernels.order import threshold as threshold_module

    values = torch.rand(400_000, generator=torch.Generator().manual_seed(1))
    values[0] = -1.0  # the only sampled entry below: the bracket holds one value, not rank 1001
    expected = float(values.sort().values[1000])
    calls = []
    real = torch.kthvalue

    def spy(x, k):
        calls.append(x.numel())
        return real(x, k)

    monkeypatch.setattr(threshold_module.torch, "kthvalue", spy)
    # a sample made of entry 0 only: the counts disagree and the full input is used
    real_randint = torch.randint
    monkeypatch.setattr(threshold_module.torch, "randint", lambda *a, **k: torch.zeros_like(real_randint(*a, **k)))
    assert threshold_module.order_statistics(values, [1001]) == [expected]
    assert calls == [values.numel()]
