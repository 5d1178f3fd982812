"""Band top-k lists: blockwise torch and the fused Triton kernel against the float64 reference."""

import pytest
import torch

from tfp_kernels.order.band_topk import (
    band_topk_reference,
    band_topk_torch,
    squared_distance_error_coef,
)
from tfp_kernels.order.band_topk_triton import band_topk_triton, triton_available

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton (GPU or TRITON_INTERPRET=1) not available")


def make_rows(n, d, seed=0, duplicates=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    if duplicates and n > 4:
        x[n // 2] = x[0]  # an exact duplicate (s2 = 0)
        x[n // 3] = x[1] + 1e-4  # a near-duplicate
    return x


def bounds(x, lo_q=0.1, hi_q=0.2):
    """Per-row bounds at two quantiles of the row's squared distances (self excluded)."""
    s2 = torch.cdist(x.double(), x.double()).square()
    s2.fill_diagonal_(torch.inf)
    finite = s2.clone()
    finite[torch.isinf(finite)] = torch.nan
    # scaled off the order statistics, so that no pair distance ties with a bound
    lo = torch.nanquantile(finite, lo_q, dim=1) * 1.0001
    hi = torch.nanquantile(finite, hi_q, dim=1) * 1.0001
    return lo.float(), hi.float()


def assert_lists_match(fast, ref, x, coef):
    """Fast lists equal the reference except where exact squared distances tie within the error bound."""
    sq = x.double().square().sum(1)
    assert fast.index.shape == ref.index.shape and fast.index.dtype == torch.int32
    assert torch.equal(fast.index == -1, torch.isinf(fast.s2))
    for i in range(x.shape[0]):
        a, b = fast.index[i], ref.index[i]
        if torch.equal(a, b):
            continue
        # differences only among entries whose exact distances are within the error bound of each other
        # or of the band edge: compare exact distances position by position
        ea = torch.where(a >= 0, (x.double()[a.clamp(min=0).long()] - x.double()[i]).square().sum(1), torch.inf)
        eb = ref.s2[i].double()
        tol = coef * (sq[i] + sq.max()) * 4
        both = torch.isfinite(ea) & torch.isfinite(eb)
        assert torch.all((ea[both] - eb[both]).abs() <= tol + 1e-6 * eb[both]), (i, a, b, ea, eb)
    close_diff = (fast.num_close - ref.num_close).abs()
    assert int(close_diff.max()) <= 2  # only pairs tied with `upper` within rounding may differ


@pytest.mark.parametrize("n, d, k", [(1, 3, 4), (2, 5, 1), (37, 19, 8), (130, 33, 20), (64, 64, 64), (70, 17, 100)])
def test_torch_matches_reference(n, d, k):
    x = make_rows(n, d, seed=n)
    lo, hi = bounds(x) if n > 2 else (torch.zeros(n), torch.ones(n))
    ref = band_topk_reference(x, lo, hi, k)
    fast = band_topk_torch(x, x.square().sum(1), lo, hi, k, block_elements=n * 7)  # several row blocks
    assert_lists_match(fast, ref, x, squared_distance_error_coef(d, torch.float32))


@pytest.mark.parametrize("n, d, k", [(1, 3, 4), (37, 19, 8), (130, 33, 20), (70, 17, 100)])
def test_cpu_select_op_equals_torch_epilogue(n, d, k):
    from tfp_kernels import has_extension

    if not has_extension():
        pytest.skip("needs tfp_kernels._C")
    x = make_rows(n, d, seed=n + 1)
    lo, hi = bounds(x) if n > 2 else (torch.zeros(n), torch.ones(n))
    a = band_topk_torch(x, x.square().sum(1), lo, hi, k, block_elements=n * 5, use_extension=True)
    b = band_topk_torch(x, x.square().sum(1), lo, hi, k, block_elements=n * 5, use_extension=False)
    assert torch.equal(a.index, b.index) and torch.equal(a.s2, b.s2) and torch.equal(a.num_close, b.num_close)


def test_reference_semantics_hand_worked():
    # points 0, 1, 3, 6 on a line: squared distances from 0: 1, 9, 36; from 3: 9, 4, 9
    x = torch.tensor([[0.0], [1.0], [3.0], [6.0]])
    lower = torch.full((4,), 4.0)  # band: s2 >= 4
    upper = torch.full((4,), 4.0)  # close: s2 < 4
    out = band_topk_reference(x, lower, upper, 2)
    assert out.index.tolist() == [[2, 3], [2, 3], [1, 0], [2, 1]]
    # row 2: s2 to node 1 is 4 (in the band), to 0 and 3 it is 9: ties broken by index -> [1, 0]
    assert out.s2.tolist()[2] == [4.0, 9.0]
    assert out.num_close.tolist() == [1, 1, 0, 0]


@needs_triton
@pytest.mark.parametrize("n, d, k", [(1, 3, 4), (5, 3, 16), (37, 19, 8), (70, 33, 20), (40, 16, 40)])
def test_triton_matches_torch(n, d, k):
    x = make_rows(n, d, seed=100 + n).to(DEVICE)
    lo, hi = bounds(x.cpu()) if n > 2 else (torch.zeros(n), torch.ones(n))
    lo, hi = lo.to(DEVICE), hi.to(DEVICE)
    sq = x.square().sum(1)
    tri = band_topk_triton(x, sq, lo, hi, k)
    ref = band_topk_reference(x.cpu(), lo.cpu(), hi.cpu(), k)
    assert_lists_match(
        type(tri)(tri.index.cpu(), tri.s2.cpu(), tri.num_close.cpu()), ref, x.cpu(),
        squared_distance_error_coef(d, torch.float32),
    )


@needs_triton
def test_triton_exact_ties_by_index():
    # four copies of one point and one other: every copy's band (s2 >= 0) lists its copies first, by index
    x = torch.tensor([[1.0, 2.0]] * 4 + [[5.0, 5.0]], device=DEVICE)
    sq = x.square().sum(1)
    zero = torch.zeros(5, device=DEVICE)
    tri = band_topk_triton(x, sq, zero, zero, 4)
    assert tri.index.cpu().tolist() == [[1, 2, 3, 4], [0, 2, 3, 4], [0, 1, 3, 4], [0, 1, 2, 4], [0, 1, 2, 3]]
