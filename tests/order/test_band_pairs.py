"""The pairs kernel of the band top-k (each unordered pair's product once, in rounds of disjoint block pairs)
against the float64 reference and the row-block kernel: odd sizes, several super blocks (odd and even counts),
merges on both sides of a tile, exact ties, K > N, split products."""

import itertools

import pytest
import torch

from tfp_kernels.order.band_topk import band_topk_reference, squared_distance_error_coef
from tfp_kernels.order.band_topk_triton import band_topk_triton, triton_available

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton (GPU or TRITON_INTERPRET=1) not available")


def pairs_config(**extra):
    return {"BLOCK_M": 16, "BLOCK_D": 16, "num_warps": 4, "num_stages": 1, **extra}


def integer_rows(n, d, seed, span=3):
    """Rows of small integers: every product, norm and squared distance is exact in float32 (and in the float16
    split), so the lists of any summation order are the reference's exactly, ties included."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-span, span + 1, (n, d), generator=g).float()


def half_integer_bounds(x, q_lo, q_hi):
    """(lower, upper) between the integer squared distances: no distance ties with a bound."""
    s2 = torch.cdist(x.double(), x.double()).square().round()
    off = s2[~torch.eye(x.shape[0], dtype=torch.bool)]
    t_lo = float(torch.quantile(off, q_lo)) if off.numel() else 1.0
    t_hi = float(torch.quantile(off, q_hi)) if off.numel() else 2.0
    n = x.shape[0]
    return torch.full((n,), round(t_lo) - 0.5), torch.full((n,), round(t_hi) + 0.5)


def run_pairs(x, lo, hi, k, **kwargs):
    config = kwargs.pop("config", pairs_config())
    out = band_topk_triton(x.to(DEVICE), x.to(DEVICE).square().sum(1), lo.to(DEVICE), hi.to(DEVICE), k,
                           schedule="pairs", config=config, **kwargs)
    return type(out)(out.index.cpu(), out.s2.cpu(), out.num_close.cpu())


def assert_equal_lists(a, b):
    assert torch.equal(a.index, b.index), (a.index, b.index)
    assert torch.equal(a.s2, b.s2)
    assert torch.equal(a.num_close, b.num_close)


def test_pair_rounds_hold_every_pair_once():
    from tfp_kernels.order.band_pairs_triton import pair_rounds

    for blocks in range(1, 10):
        rounds = pair_rounds(blocks)
        seen = []
        for pairs in rounds:
            assert pairs.dtype == torch.int32 and pairs.shape[1] == 2
            flat = pairs.flatten().tolist()
            members = [int(i) for i, j in pairs.tolist() for i in ((i,) if i == j else (i, j))]
            assert len(members) == len(set(members)), (blocks, pairs)  # no block twice in a round
            assert all(0 <= i < blocks for i in flat)
            assert bool((pairs[:, 0] <= pairs[:, 1]).all())
            seen += [tuple(p) for p in pairs.tolist()]
        expected = [(i, j) for i, j in itertools.combinations_with_replacement(range(blocks), 2)]
        assert sorted(seen) == expected, blocks
        assert len(rounds) == (1 if blocks == 1 else 1 + blocks - 1 + blocks % 2)
    with pytest.raises(ValueError, match="num_blocks"):
        pair_rounds(0)


def test_super_block_rows():
    from tfp_kernels.order.band_pairs_triton import super_block_rows

    assert super_block_rows(10**6, 128, 0) == 128  # off the GPU: one tile
    assert super_block_rows(10**6, 128, 132) == 1024  # 977 blocks: 488 pairs a round
    assert super_block_rows(65536, 128, 132) == 128  # too few rows to fill a round with bigger blocks
    assert super_block_rows(10**7, 64, 132) == 512  # at most 8 tiles a side
    rows = super_block_rows(300_000, 128, 132)
    assert rows % 128 == 0 and 300_000 // (2 * rows) >= 2 * 132


@needs_triton
@pytest.mark.parametrize("n, d, k, extra", [
    (1, 3, 4, {}),
    (2, 5, 4, {}),
    (37, 7, 8, {}),  # 3 super blocks of one tile (an odd count: a bye in every round), the last partial
    (53, 9, 8, {"SUPER": 32}),  # 2 super blocks of 2 tiles: off-diagonal tiles inside an (I, I) pair
    (53, 9, 8, {"SUPER": 32, "CAP": 16}),  # CAP = the tile: a merge before every tile with candidates, both sides
    (70, 5, 16, {"SUPER": 16, "CAP": 16}),  # many ties (5 dims of 7 values), many rounds
    (20, 6, 40, {"CAP": 64}),  # K > N (K pads to 64)
])
def test_pairs_equal_the_reference_exactly_on_integer_rows(n, d, k, extra):
    # exact squared distances: the lists (ties broken by index), s2 and counts must be the reference's exactly,
    # whatever the order in which a row's columns arrive
    x = integer_rows(n, d, seed=n + d)
    lo, hi = half_integer_bounds(x, 0.2, 0.4)
    out = run_pairs(x, lo, hi, k, config=pairs_config(**extra))
    assert_equal_lists(out, band_topk_reference(x, lo, hi, k))


@needs_triton
@pytest.mark.parametrize("n, d, k, extra", [(37, 19, 8, {}), (45, 33, 12, {"SUPER": 32, "CAP": 16})])
def test_pairs_match_the_reference_within_the_bound(n, d, k, extra):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, d, generator=g)
    x[n // 2] = x[0]  # an exact duplicate
    x[n // 3] = x[1] + 1e-4  # a near-duplicate
    s2 = torch.cdist(x.double(), x.double()).square()
    t2 = float(torch.quantile(s2[s2 > 0], 0.1))
    lo, hi = torch.full((n,), t2), torch.full((n,), t2 * 1.5)
    out = run_pairs(x, lo, hi, k, config=pairs_config(**extra))
    ref = band_topk_reference(x, lo, hi, k)
    coef = squared_distance_error_coef(d, torch.float32)
    sq = x.double().square().sum(1)
    for i in range(n):
        tol = 4 * coef * float(sq[i] + sq.max())
        listed = out.index[i][out.index[i] >= 0].long()
        exact = (x.double()[listed] - x.double()[i]).square().sum(1)
        assert not (listed == i).any()
        assert bool((exact >= t2 - tol).all())  # in the band, up to the bound
        ref_s2 = ref.s2[i][torch.isfinite(ref.s2[i])].double()
        assert listed.numel() == ref_s2.numel()
        assert torch.allclose(exact.sort().values, ref_s2, atol=2 * tol, rtol=0)
        assert torch.allclose(out.s2[i][: listed.numel()].double(), exact, atol=tol, rtol=0)
    assert int((out.num_close - ref.num_close).abs().max()) == 0  # (no pair within the bound of upper here)


@needs_triton
def test_pairs_ties_by_index():
    # four copies of one point and one other, over two super blocks: each copy's band lists its copies first,
    # by index, though the copies of the second block reach the first block's rows as columns of a transposed tile
    x = torch.tensor([[1.0, 2.0]] * 4 + [[5.0, 5.0]] * 1 + [[1.0, 2.0]] * 12 + [[9.0, 9.0]] * 3)
    zero = torch.zeros(x.shape[0])
    out = run_pairs(x, zero, zero, 5)
    copies = [i for i in range(x.shape[0]) if x[i].tolist() == [1.0, 2.0]]
    for i in copies:
        assert out.index[i].tolist() == [j for j in copies if j != i][:5]
    assert_equal_lists(out, band_topk_reference(x, zero, zero, 5))


@needs_triton
def test_pairs_ties_at_the_cutoff_from_lower_columns():
    # 3 dims of {-1, 0, 1}: squared distances 0..12, so most rows' K-th best ties with many other columns; the
    # rows of later super blocks fill their lists from their own block first and meet the lower columns of the
    # tie later (as columns of transposed tiles): those must still replace the higher ones (whole-key filter)
    # (K = 16: the kernel's lists have at least 16 columns, the cutoff is the 16th best)
    x = integer_rows(64, 3, seed=2, span=1)
    lo, hi = half_integer_bounds(x, 0.05, 0.1)
    out = run_pairs(x, lo, hi, 16, config=pairs_config(CAP=16))
    ref = band_topk_reference(x, lo, hi, 16)
    assert (ref.s2[:, -1:] == ref.s2).sum() > 3 * 64  # (ties at the cutoff)
    assert_equal_lists(out, ref)


@needs_triton
def test_pairs_every_tile_improves():
    # points on a line at decreasing distance from row 0 as the column index grows, with mirrored ties: row
    # 0's running top-K improves in every tile of both sides (the filter's worst case)
    n = 45
    pos = torch.cat([torch.arange(n // 2, 0, -1.0), -torch.arange(n // 2, 0, -1.0), torch.zeros(1)])
    x = torch.stack([pos, torch.zeros(n)], 1)
    x = torch.cat([x[-1:], x[:-1]])  # row 0 is the origin
    lo, hi = torch.full((n,), 1.0), torch.full((n,), 10.0)
    out = run_pairs(x, lo, hi, 6, config=pairs_config(CAP=16))
    assert_equal_lists(out, band_topk_reference(x, lo, hi, 6))
    assert out.index[0].tolist() == [22, 44, 21, 43, 20, 42]


@needs_triton
@pytest.mark.parametrize("dtype", ["float16x3", torch.float16])
def test_pairs_with_16_bit_products(dtype):
    # small integers are exact in float16 (and their split has no low part): the reference's lists exactly
    x = integer_rows(41, 11, seed=4)
    lo, hi = half_integer_bounds(x, 0.1, 0.3)
    out = run_pairs(x, lo, hi, 8, input_dtype=dtype, config=pairs_config(SUPER=32))
    assert_equal_lists(out, band_topk_reference(x, lo, hi, 8))


@needs_triton
def test_pairs_equal_the_row_block_kernel():
    x = integer_rows(50, 13, seed=9, span=2)
    lo, hi = half_integer_bounds(x, 0.3, 0.5)
    rows = band_topk_triton(x.to(DEVICE), x.to(DEVICE).square().sum(1), lo.to(DEVICE), hi.to(DEVICE), 10)
    assert_equal_lists(run_pairs(x, lo, hi, 10), type(rows)(rows.index.cpu(), rows.s2.cpu(), rows.num_close.cpu()))


@needs_triton
def test_pairs_refuse_bad_settings():
    x = integer_rows(20, 4, seed=1)
    lo, hi = half_integer_bounds(x, 0.2, 0.4)
    with pytest.raises(ValueError, match="schedule"):
        band_topk_triton(x, x.square().sum(1), lo, hi, 4, schedule="columns")
    with pytest.raises(ValueError, match="SUPER must be a multiple"):
        run_pairs(x, lo, hi, 4, config=pairs_config(SUPER=24))
    with pytest.raises(ValueError, match="CAP must be a multiple"):
        run_pairs(x, lo, hi, 4, config=pairs_config(CAP=24))
    with pytest.raises(ValueError, match="pointer loads"):
        run_pairs(x, lo, hi, 4, config=pairs_config(STACKED=True))
    with pytest.raises(ValueError, match="BLOCK_D"):
        run_pairs(x, lo, hi, 4, input_dtype="float16x3", config=pairs_config(BLOCK_D=128))
