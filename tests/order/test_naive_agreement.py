"""The reference agrees with the naive baseline (the paper's algorithm run the naive way)."""

import pytest
import torch

from benchmarks.naive_tfp import naive_distance_matrix, naive_threshold, naive_tfp_order
from tfp_kernels import check_path, estimate_threshold, tfp_order_reference


def data(kind, n=300, d=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(n, d, generator=g)
    centres = torch.randn(10, d, generator=g) * 4
    emb = centres.repeat_interleave(n // 10, dim=0) + 0.5 * torch.randn(n, d, generator=g)
    emb[1::5] = emb[0::5] + 1e-2 * torch.randn(emb[0::5].shape, generator=g)  # near-duplicates
    return emb


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("kind", ["gaussian", "clustered"])
def test_same_path_as_naive(kind, metric):
    emb = data(kind)
    t = naive_threshold(naive_distance_matrix(emb, metric), 0.02)
    # max_rejections=None: the cap cannot interfere (and 300 < the paper's 10000 anyway)
    naive = naive_tfp_order(emb, metric=metric, threshold=t, max_rejections=None)
    ref = tfp_order_reference(emb, metric=metric, threshold=t)
    assert torch.equal(naive, ref)
    assert check_path(emb, ref, metric=metric, threshold=t)


def test_same_path_as_naive_with_paper_cap_at_small_n():
    emb = data("clustered", seed=1)
    t = naive_threshold(naive_distance_matrix(emb), 0.02)
    assert torch.equal(naive_tfp_order(emb, threshold=t), tfp_order_reference(emb, threshold=t, max_rejections=10000))
    # a small cap that does fire: both implement it the same way
    assert torch.equal(
        naive_tfp_order(emb, threshold=t, max_rejections=2), tfp_order_reference(emb, threshold=t, max_rejections=2)
    )


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_threshold_close_to_naive(metric):
    # The naive threshold counts each pair twice (i, j) and (j, i) and uses float32 matrix-product
    # distances; the difference is an interpolation detail plus rounding, far below the spacing of
    # neighbouring order statistics' scale.
    emb = data("gaussian", seed=2)
    ours = estimate_threshold(emb, metric=metric)
    naive = naive_threshold(naive_distance_matrix(emb, metric), 0.02)
    assert ours == pytest.approx(naive, rel=2e-3)
