"""Band top-k lists: blockwise torch and the fused Triton kernel against the float64 reference."""

import numpy as np
import pytest
import torch

from tfp_kernels.order.band_topk import (
    MIN_ACC_CHUNK,
    BandLists,
    band_topk_reference,
    band_topk_rows,
    band_topk_torch,
    close_sets,
    float64_error_coef,
    split_rows,
    squared_distance_error_coef,
)
from tfp_kernels.order.band_tiles_triton import ACC_CHUNK
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


#: The versions of the C++ band selection, capped by TFP_KERNELS_SELECT_ISA (the best the CPU has by default).
SELECT_ISAS = ["avx512", "avx2", "portable"]


def cpu_has(isa):
    """Whether this CPU runs the ``isa`` version of the dispatched C++ ops (torch reads the same CPU features)."""
    rank = {"DEFAULT": 0, "ZVECTOR": 0, "VSX": 0, "SVE256": 0, "AVX2": 1, "AVX512": 2}
    have = rank.get(torch.backends.cpu.get_cpu_capability(), 0)
    return {"portable": 0, "avx2": 1, "avx512": 2}[isa] <= have


def skip_unless_cpu_has(isa):
    if not cpu_has(isa):
        pytest.skip(f"this CPU has no {isa} (the op would run a lower version: tested under that name)")


def assert_lists_match(fast, ref, x, coef, exact=None, norms=None):
    """Fast lists equal the reference except where exact squared distances tie within the error bound.
    ``exact(i, cols)``: the exact squared distances of row i to the columns ``cols`` (default: rows of ``x``);
    ``norms``: the squared norms that bound every pair (default: those of ``x``)."""
    if exact is None:
        def exact(i, cols):
            return (x.double()[cols] - x.double()[i]).square().sum(1)
    sq = x.double().square().sum(1) if norms is None else norms
    assert fast.index.shape == ref.index.shape and fast.index.dtype == torch.int32
    assert torch.equal(fast.index == -1, torch.isinf(fast.s2))
    for i in range(fast.index.shape[0]):
        a, b = fast.index[i], ref.index[i]
        if torch.equal(a, b):
            continue
        # differences only among entries whose exact distances are within the error bound of each other
        # or of the band edge: compare exact distances position by position
        ea = torch.where(a >= 0, exact(i, a.clamp(min=0).long()), torch.inf)
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
def test_cpu_select_op_within_bound_of_torch_epilogue(n, d, k):
    """The C++ op multiplies each pair once (pair blocks) where the torch epilogue multiplies whole rows: the
    products of a pair may then differ by the BLAS kernel's summation order (seen on AVX2-only CPUs: one
    rounding), so the lists are what the walk relies on, within the float32 bound, and equal to the torch
    epilogue's but for entries tied within that bound. (Bit for bit on the same products: the exact-ties test
    below and test_cpu_select_op_forms_s2_from_dot_products.)"""
    from tfp_kernels import has_extension

    if not has_extension():
        pytest.skip("needs tfp_kernels._C")
    x = make_rows(n, d, seed=n + 1)
    lo, hi = bounds(x) if n > 2 else (torch.zeros(n), torch.ones(n))
    a = band_topk_torch(x, x.square().sum(1), lo, hi, k, block_elements=n * 5, use_extension=True)
    b = band_topk_torch(x, x.square().sum(1), lo, hi, k, block_elements=n * 5, use_extension=False)
    coef = squared_distance_error_coef(d, torch.float32)
    assert_lists_within_bound(a, x, lo, hi, coef)
    assert_lists_match(a, b, x, coef)


@pytest.mark.parametrize("n, k", [(33, 5), (161, 12)])
def test_cpu_select_op_equals_torch_epilogue_with_exact_ties(n, k):
    """Small-integer rows: many equal distances, so the K-th place is decided by column, inside and across the
    op's chunks of 16 columns and in its tail."""
    from tfp_kernels import has_extension

    if not has_extension():
        pytest.skip("needs tfp_kernels._C")
    x = torch.randint(-1, 2, (n, 3), generator=torch.Generator().manual_seed(n)).float()
    sq = x.square().sum(1)
    lo, hi = torch.full((n,), 1.5), torch.full((n,), 2.5)
    a = band_topk_torch(x, sq, lo, hi, k, block_elements=n * 4, use_extension=True)
    b = band_topk_torch(x, sq, lo, hi, k, block_elements=n * 4, use_extension=False)
    assert torch.equal(a.index, b.index) and torch.equal(a.s2, b.s2) and torch.equal(a.num_close, b.num_close)
    assert int((a.s2[:, -1] == a.s2[:, 0]).sum()) > 0  # lists made of ties


@pytest.mark.parametrize("block_rows", [1, 5, 16, 23, 200])
@pytest.mark.parametrize("n, d, k", [(1, 3, 4), (37, 19, 8), (130, 33, 20), (70, 17, 100)])
def test_cpu_pair_blocks_match_reference(n, d, k, block_rows):
    """Each pair's product once (diagonal and off-diagonal blocks, the column side of the latter, blocks of 1
    row, N not a multiple of the block) against the float64 reference, within the float32 bound."""
    from tfp_kernels import has_extension
    from tfp_kernels.order.band_topk import _band_topk_pairs

    if not has_extension():
        pytest.skip("needs tfp_kernels._C")
    x = make_rows(n, d, seed=n + 2)
    lo, hi = bounds(x) if n > 2 else (torch.zeros(n), torch.ones(n))
    fast = _band_topk_pairs(x, x.square().sum(1), lo, hi, k, block_rows=block_rows)
    ref = band_topk_reference(x, lo, hi, k)
    assert_lists_match(fast, ref, x, squared_distance_error_coef(d, torch.float32))


@pytest.mark.parametrize("isa", SELECT_ISAS)
@pytest.mark.parametrize("block_rows", [3, 16, 50])
def test_cpu_pair_blocks_equal_row_blocks_on_exact_ties(block_rows, isa, monkeypatch):
    """Small-integer rows (exact products, many equal distances): the pair blocks give exactly the lists of the
    whole-row selection of torch ops, ties at the K-th place going to the lower column across blocks and sides;
    so do the C++ row blocks (from dot products and from s2). Both versions of the selection
    (TFP_KERNELS_SELECT_ISA caps the choice; ISAs the CPU lacks are skipped)."""
    from tfp_kernels import has_extension
    from tfp_kernels.order.band_topk import _band_topk_pairs

    if not has_extension():
        pytest.skip("needs tfp_kernels._C")
    skip_unless_cpu_has(isa)
    monkeypatch.setenv("TFP_KERNELS_SELECT_ISA", isa)
    n, k = 161, 12
    x = torch.randint(-1, 2, (n, 3), generator=torch.Generator().manual_seed(4)).float()
    sq = x.square().sum(1)
    lo, hi = torch.full((n,), 1.5), torch.full((n,), 2.5)
    b = band_topk_torch(x, sq, lo, hi, k, use_extension=False)
    for a in (_band_topk_pairs(x, sq, lo, hi, k, block_rows=block_rows),
              band_topk_torch(x, sq, lo, hi, k, block_elements=n * block_rows, use_extension=True)):
        assert torch.equal(a.index, b.index) and torch.equal(a.s2, b.s2) and torch.equal(a.num_close, b.num_close)
    s2 = (sq[:, None] + sq[None, :] - 2.0 * x @ x.T).clamp_(min=0)
    index, _, close = torch.ops.tfp_kernels.band_select(s2[40:90].contiguous(), 40, lo[40:90], hi[40:90], k)
    assert torch.equal(index, b.index[40:90]) and torch.equal(close, b.num_close[40:90])


def test_cpu_selection_versions_give_the_same_lists(monkeypatch):
    """The selection's versions (AVX-512, AVX2, portable baseline: each the CPU has): the same lists, bit for
    bit, on random rows (pair blocks: row and column sides; N and the blocks' widths not multiples of the
    16-column chunks, K > N, duplicates)."""
    from tfp_kernels import has_extension
    from tfp_kernels.order.band_topk import _band_topk_pairs

    if not has_extension():
        pytest.skip("needs tfp_kernels._C")
    isas = [isa for isa in SELECT_ISAS if cpu_has(isa)]
    for rows in (make_rows(203, 19, seed=8), make_rows(70, 17, seed=9)):
        r_lo, r_hi, sq = *bounds(rows), rows.square().sum(1)
        for k, block_rows in ((8, 23), (100, 200), (8, 37)):
            got = {}
            for isa in isas:
                monkeypatch.setenv("TFP_KERNELS_SELECT_ISA", isa)
                got[isa] = _band_topk_pairs(rows, sq, r_lo, r_hi, k, block_rows=block_rows)
            first = got["portable"]
            for isa, b in got.items():
                assert torch.equal(first.index, b.index) and torch.equal(first.s2, b.s2), isa
                assert torch.equal(first.num_close, b.num_close), isa


def test_cpu_selection_refuses_an_unknown_isa(monkeypatch):
    from tfp_kernels import has_extension
    from tfp_kernels.order.band_topk import _band_topk_pairs

    if not has_extension():
        pytest.skip("needs tfp_kernels._C")
    monkeypatch.setenv("TFP_KERNELS_SELECT_ISA", "sse9")
    x = make_rows(20, 5)
    with pytest.raises(RuntimeError, match="TFP_KERNELS_SELECT_ISA must be avx512, avx2 or portable"):
        _band_topk_pairs(x, x.square().sum(1), torch.zeros(20), torch.ones(20), 4)


def test_cpu_select_op_forms_s2_from_dot_products():
    from tfp_kernels import has_extension

    if not has_extension():
        pytest.skip("needs tfp_kernels._C")
    x = make_rows(90, 13, seed=31)
    sq = x.square().sum(1)
    lo, hi = bounds(x)
    op = torch.ops.tfp_kernels.band_select
    for r0, r1 in ((0, 90), (17, 40)):  # the whole block, and rows of the middle (self columns offset)
        dot = x[r0:r1] @ x.T
        s2 = dot.clone().mul_(-2.0).add_(sq[None, :]).add_(sq[r0:r1, None]).clamp_(min=0)
        a = op(s2, r0, lo[r0:r1], hi[r0:r1], 7)
        b = op(dot, r0, lo[r0:r1], hi[r0:r1], 7, sq[r0:r1], sq)
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    with pytest.raises(RuntimeError, match="both row_sq and col_sq"):
        op(dot, 17, lo[17:40], hi[17:40], 7, sq[17:40], None)
    with pytest.raises(RuntimeError, match="row_sq must have 23 entries"):
        op(dot, 17, lo[17:40], hi[17:40], 7, sq, sq)


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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not triton_available(), reason="needs CUDA and Triton")
@pytest.mark.parametrize("k", [200, 256])
def test_triton_256_column_lists_match_torch(k):
    # K > 128: the lists of k="auto" at N ~ 10^6, with the launch settings of 256 columns (too slow for the
    # interpreter at N > K)
    x = make_rows(1000, 77, seed=3).cuda()
    lo, hi = bounds(x.cpu())
    lo, hi = lo.cuda(), hi.cuda()
    tri = band_topk_triton(x, x.square().sum(1), lo, hi, k)
    ref = band_topk_reference(x.cpu(), lo.cpu(), hi.cpu(), k)
    assert_lists_match(type(tri)(tri.index.cpu(), tri.s2.cpu(), tri.num_close.cpu()), ref, x.cpu(),
                       squared_distance_error_coef(77, torch.float32))


@needs_triton
def test_triton_exact_ties_by_index():
    # four copies of one point and one other: every copy's band (s2 >= 0) lists its copies first, by index
    x = torch.tensor([[1.0, 2.0]] * 4 + [[5.0, 5.0]], device=DEVICE)
    sq = x.square().sum(1)
    zero = torch.zeros(5, device=DEVICE)
    tri = band_topk_triton(x, sq, zero, zero, 4)
    assert tri.index.cpu().tolist() == [[1, 2, 3, 4], [0, 2, 3, 4], [0, 1, 3, 4], [0, 1, 2, 4], [0, 1, 2, 3]]


def _interp_config(**extra):
    return {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_D": 16, "num_warps": 4, "num_stages": 1, **extra}


@needs_triton
@pytest.mark.parametrize("n, d, k, extra", [
    (53, 19, 8, {"CAP": 16}),  # CAP = BLOCK_N: a merge before every tile with candidates
    (53, 19, 8, {"programs": 2}),  # persistent programs: each takes several row blocks in turn
    (75, 33, 16, {"CAP": 16, "programs": 3}),
    (20, 7, 40, {"CAP": 64, "programs": 1}),  # K > N (K pads to 64)
])
def test_triton_merge_schedule_does_not_change_lists(n, d, k, extra):
    # same tile shape (so the same float32 sums): the candidate filter, the merge points and the persistent
    # loop must give exactly the lists of the default schedule, which match the reference
    x = make_rows(n, d, seed=7 * n).to(DEVICE)
    lo, hi = bounds(x.cpu())
    lo, hi = lo.to(DEVICE), hi.to(DEVICE)
    sq = x.square().sum(1)
    base = band_topk_triton(x, sq, lo, hi, k, config=_interp_config())
    other = band_topk_triton(x, sq, lo, hi, k, config=_interp_config(**extra))
    assert torch.equal(base.index, other.index) and torch.equal(base.s2, other.s2)
    assert torch.equal(base.num_close, other.num_close)
    ref = band_topk_reference(x.cpu(), lo.cpu(), hi.cpu(), k)
    assert_lists_match(type(base)(*(t.cpu() for t in (base.index, base.s2, base.num_close))), ref, x.cpu(),
                       squared_distance_error_coef(d, torch.float32))


@pytest.mark.parametrize("dtype", ["bfloat16x3", "float16x3"])
def test_split_products_match_float32_within_the_split_bound(dtype):
    x = make_rows(97, 50, seed=5) * torch.logspace(-3, 3, 50)  # components over six decades
    sq = x.square().sum(1)
    lo, hi = bounds(x)
    ref = band_topk_reference(x, lo, hi, 12)
    split = band_topk_torch(x, sq, lo, hi, 12, input_dtype=dtype)
    assert_lists_within_bound(split, x, lo, hi, squared_distance_error_coef(50, dtype))
    assert (split.index == ref.index).float().mean() > 0.95  # ~float32 accuracy: mostly the exact lists
    plain = band_topk_torch(x, sq, lo, hi, 12, input_dtype=torch.bfloat16)
    assert (plain.index == ref.index).float().mean() < (split.index == ref.index).float().mean()


@needs_triton
@pytest.mark.parametrize("schedule", ["rows", "pairs"])
@pytest.mark.parametrize("singles", [False, True])
def test_triton_long_sweep_with_single_candidate_tiles(schedule, singles):
    # 12 tiles of 16 columns and a band of the farthest ~1.5% of the pairs: most tiles hold at most one
    # candidate per row (with SINGLES, the kernels' two-reduction path), some several (the prefix-sum path);
    # small integers:
    # exact distances, so the lists must be the reference's exactly, ties by index included
    g = torch.Generator().manual_seed(11)
    x = torch.randint(-4, 5, (190, 6), generator=g).float()
    s2 = torch.cdist(x.double(), x.double()).square().round()
    t2 = float(torch.quantile(s2[s2 > 0], 0.985))
    lo, hi = torch.full((190,), round(t2) - 0.5), torch.full((190,), round(t2) + 4.5)
    config = _interp_config() if schedule == "rows" else {"BLOCK_M": 16, "BLOCK_D": 16, "num_warps": 4,
                                                         "num_stages": 1, "SUPER": 32}
    config["SINGLES"] = singles
    tri = band_topk_triton(x.to(DEVICE), x.to(DEVICE).square().sum(1), lo.to(DEVICE), hi.to(DEVICE), 16,
                           config=config, schedule=schedule)
    ref = band_topk_reference(x, lo, hi, 16)
    assert torch.equal(tri.index.cpu(), ref.index) and torch.equal(tri.s2.cpu(), ref.s2)
    assert torch.equal(tri.num_close.cpu(), ref.num_close)


@needs_triton
def test_triton_every_tile_improves():
    # points on a line at decreasing distance from row 0 as the column index grows: row 0's running top-K
    # improves in every tile (the filter's worst case); ties at the cutoff come from mirrored points
    n = 45
    pos = torch.cat([torch.arange(n // 2, 0, -1.0), -torch.arange(n // 2, 0, -1.0), torch.zeros(1)])
    x = torch.stack([pos, torch.zeros(n)], 1).to(DEVICE)
    x = torch.cat([x[-1:], x[:-1]])  # row 0 is the origin
    zero = torch.zeros(n, device=DEVICE)
    hi = torch.full((n,), 10.0, device=DEVICE)
    tri = band_topk_triton(x, x.square().sum(1), zero + 1.0, hi, 6, config=_interp_config(CAP=16))
    ref = band_topk_reference(x.cpu(), zero.cpu() + 1.0, hi.cpu(), 6)
    assert torch.equal(tri.index.cpu(), ref.index) and torch.equal(tri.num_close.cpu(), ref.num_close)
    assert tri.index[0].tolist() == [22, 44, 21, 43, 20, 42]  # +1, -1, +2, -2, +3, -3: ties to the lower index


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, "tf32", "bfloat16x3", "float16x3"])
def test_triton_low_precision_within_its_error_bound(dtype):
    if dtype in (torch.bfloat16, "bfloat16x3") and not torch.cuda.is_available():
        # measured with Triton 3.x: the interpreter's tl.dot of two bf16 tiles returns values ~1e10 (it
        # multiplies the raw bits); fp16 tiles are right, and bf16 runs on the GPU
        pytest.skip("Triton's interpreter computes bf16 tl.dot wrongly; bf16 is checked on the GPU")
    n, d, k = 61, 24, 12
    x = make_rows(n, d, seed=3).to(DEVICE)
    lo, hi = bounds(x.cpu())
    sq = x.square().sum(1)
    tri = band_topk_triton(x, sq, lo.to(DEVICE), hi.to(DEVICE), k, input_dtype=dtype)
    # the kernel's products are those of the rows rounded to `dtype` (or of their split): mostly the lists
    # of the torch version of the same products, which differ only in float32 summation order
    if dtype != "tf32":  # (no torch version of tf32 products; the interpreter multiplies in float32)
        same = band_topk_torch(x, sq, lo.to(DEVICE), hi.to(DEVICE), k, input_dtype=dtype)
        assert (tri.index == same.index).float().mean() > 0.9
    chunk = ACC_CHUNK if dtype in ("bfloat16x3", "float16x3") else None  # split products: summed by chunks
    assert_lists_within_bound(type(tri)(*(t.cpu() for t in (tri.index, tri.s2, tri.num_close))), x.cpu(), lo, hi,
                              squared_distance_error_coef(d, dtype, acc_chunk=chunk))


@needs_triton
@pytest.mark.parametrize("n, d, k, dtype", [
    (53, 19, 8, torch.float16),  # D not a multiple of 8: rows copied to a 16-byte row stride
    (70, 33, 16, "float16x3"),  # split rows: four descriptors
    (40, 16, 40, torch.float16),  # K > N
    (1, 5, 4, "float16x3"),  # N = 1: one row block past the end
    (37, 24, 12, torch.bfloat16),
])
def test_triton_descriptor_tiles_equal_pointer_tiles(n, d, k, dtype):
    if dtype == torch.bfloat16 and not torch.cuda.is_available():
        pytest.skip("Triton's interpreter computes bf16 tl.dot wrongly; bf16 is checked on the GPU")
    # tiles read through tensor descriptors (out-of-range rows and entries as zeros) instead of masked loads
    x = make_rows(n, d, seed=11 * n).to(DEVICE)
    lo, hi = bounds(x.cpu()) if n > 2 else (torch.zeros(n), torch.ones(n))
    sq = x.square().sum(1)
    config = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_D": 16, "num_warps": 4, "num_stages": 2}
    args = (x, sq, lo.to(DEVICE), hi.to(DEVICE), k)
    pointer = band_topk_triton(*args, input_dtype=dtype, config=config)
    tiles = band_topk_triton(*args, input_dtype=dtype, config={**config, "DESCRIPTORS": True})
    if not torch.cuda.is_available():  # the interpreter multiplies the same tiles the same way
        assert torch.equal(pointer.index, tiles.index) and torch.equal(pointer.s2, tiles.s2)
        assert torch.equal(pointer.num_close, tiles.num_close)
    chunk = ACC_CHUNK if dtype == "float16x3" else None
    assert_lists_within_bound(type(tiles)(*(t.cpu() for t in (tiles.index, tiles.s2, tiles.num_close))), x.cpu(),
                              lo, hi, squared_distance_error_coef(d, dtype, acc_chunk=chunk))


#: The stacked products under the interpreter: chunks of 16 entries, four products each in one tl.dot
_STACKED = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_D": 16, "num_warps": 4, "num_stages": 2, "STACKED": True}


@needs_triton
@pytest.mark.parametrize("n, d, k, dtype", [
    (70, 33, 16, "float16x3"),  # D not a multiple of the chunk: zero padding
    (1, 5, 4, "float16x3"),  # N = 1
    (40, 16, 40, "float16x3"),  # K > N
    (53, 19, 8, "bfloat16x3"),
])
def test_triton_stacked_products_within_the_bound(n, d, k, dtype):
    if dtype == "bfloat16x3" and not torch.cuda.is_available():
        pytest.skip("Triton's interpreter computes bf16 tl.dot wrongly; bf16 is checked on the GPU")
    # the chunk's four products as one tensor-core product over [lo, lo, hi, hi] x [lo; hi; lo; hi]
    x = make_rows(n, d, seed=13 * n).to(DEVICE)
    lo, hi = bounds(x.cpu()) if n > 2 else (torch.zeros(n), torch.ones(n))
    sq = x.square().sum(1)
    args = (x, sq, lo.to(DEVICE), hi.to(DEVICE), k)
    config = _STACKED if not torch.cuda.is_available() else {**_STACKED, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 32}
    stacked = band_topk_triton(*args, input_dtype=dtype, config=config)
    plain = band_topk_triton(*args, input_dtype=dtype)
    lists = type(stacked)(*(t.cpu() for t in (stacked.index, stacked.s2, stacked.num_close)))
    assert_lists_within_bound(lists, x.cpu(), lo, hi, squared_distance_error_coef(d, dtype, acc_chunk=ACC_CHUNK))
    assert (stacked.index == plain.index).float().mean() > 0.9  # (near-ties may swap within the bound)
    assert torch.allclose(stacked.s2, plain.s2, rtol=0, atol=1e-3 * float(sq.max()))


def test_stacked_rows_layout():
    from tfp_kernels.order.band_topk_triton import _stacked_rows

    hi = torch.arange(10.0).view(2, 5)
    lo = -torch.arange(10.0).view(2, 5)
    z = _stacked_rows(hi, lo, 4)  # D = 5 padded to 8: chunks [lo 0..3 | hi 0..3], [lo 4, 0, 0, 0 | hi 4, 0, 0, 0]
    assert z.tolist()[0] == [0, -1, -2, -3, 0, 1, 2, 3, -4, 0, 0, 0, 4, 0, 0, 0]
    assert z.tolist()[1] == [-5, -6, -7, -8, 5, 6, 7, 8, -9, 0, 0, 0, 9, 0, 0, 0]


@needs_triton
def test_triton_stacked_products_need_split_rows():
    x = make_rows(20, 8).to(DEVICE)
    zero = torch.zeros(20, device=DEVICE)
    with pytest.raises(ValueError, match="STACKED needs split rows"):
        band_topk_triton(x, x.square().sum(1), zero, zero, 4, config=_STACKED)


@needs_triton
def test_triton_descriptors_refuse_float32_rows():
    x = make_rows(20, 8).to(DEVICE)
    zero = torch.zeros(20, device=DEVICE)
    with pytest.raises(ValueError, match="16-bit rows"):
        band_topk_triton(x, x.square().sum(1), zero, zero, 4, config={**_interp_config(), "DESCRIPTORS": True})


def assert_lists_within_bound(fast, x, lower, upper, coef, rows=None):
    """What the walk relies on, for lists computed with error at most ``coef * (|x_i|^2 + max |x|^2)``:
    listed s2 within the bound of the exact value, no listed node surely below ``lower``, no unlisted node
    of the band surely closer than the last listed entry (every one of them when the list is not full),
    ``num_close`` off only by nodes within the bound of ``upper``; the row itself never listed. ``rows``: the
    rows to check (default all)."""
    x = x.double()
    sq = x.square().sum(1)
    exact = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist").square()
    for i in range(x.shape[0]) if rows is None else rows.tolist():
        tol = coef * float(sq[i] + sq.max()) * 1.0001
        e = exact[i].clone()
        e[i] = torch.nan
        listed = fast.index[i][fast.index[i] >= 0].long()
        assert i not in listed.tolist()
        assert torch.all((fast.s2[i][: listed.numel()].double() - e[listed]).abs() <= tol)
        assert torch.all(e[listed] >= float(lower[i]) - tol)
        out = torch.ones_like(e, dtype=torch.bool)
        out[listed] = False
        out[i] = False
        sure_band = out & (e >= float(lower[i]) + tol)
        if listed.numel() == fast.index.shape[1]:
            assert torch.all(e[sure_band] >= float(fast.s2[i][-1]) - tol)
        else:
            assert not sure_band.any()
        surely_close = int((e < float(upper[i]) - tol).sum())
        maybe_close = int((e < float(upper[i]) + tol).sum())
        assert surely_close <= int(fast.num_close[i]) <= maybe_close


def _rows_of_every_magnitude(n=40, d=37, seed=2):
    """Rows scaled by 1e-30 .. 1e30, with entries over six decades, a zero row and a row of one entry."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.logspace(-3, 3, d)[torch.randperm(d, generator=g)]
    x *= torch.logspace(-30, 30, n)[:, None]
    x[3] = 0.0
    x[5] = 0.0
    x[5, 7] = 3.0
    return x


@pytest.mark.parametrize("dtype, u", [("float16x3", 2.0**-11), ("bfloat16x3", 2.0**-8)])
def test_split_rows_residual_bound(dtype, u):
    x = _rows_of_every_magnitude()
    hi, lo, scale = split_rows(x, dtype)
    if dtype == "bfloat16x3":
        assert scale is None and hi.dtype == torch.bfloat16
        scale = torch.ones(x.shape[0])
    else:  # powers of two that bring each row's largest entry to [2^14, 2^15) (zero rows: any)
        assert hi.dtype == lo.dtype == torch.float16 and scale.dtype == torch.float32
        assert torch.equal(torch.frexp(scale).mantissa, torch.full_like(scale, 0.5))
        amax = (x.abs().amax(1) / scale)[x.abs().amax(1) > 0]
        assert torch.all((amax >= 2**14) & (amax < 2**15))
    scaled = x.double() / scale.double()[:, None]
    residual = (scaled - hi.double() - lo.double()).abs()
    assert torch.all(residual <= u * u * scaled.abs() + 2.0**-24)


def test_chunked_accumulation_bound():
    # chunked sums (the Triton kernel) are bounded far tighter than one long chain (the torch simulation)
    for dtype in ("bfloat16x3", "float16x3"):
        chain = squared_distance_error_coef(768, dtype)
        chunked = squared_distance_error_coef(768, dtype, acc_chunk=ACC_CHUNK)
        assert chunked < chain / 3
        assert squared_distance_error_coef(768, dtype, acc_chunk=ACC_CHUNK, rounded_norms=True) < chunked
        # longer chunks, larger bound; chunks longer than D are chains of D
        assert squared_distance_error_coef(768, dtype, acc_chunk=32) < chunked
        assert squared_distance_error_coef(40, dtype, acc_chunk=64) == squared_distance_error_coef(40, dtype,
                                                                                                   acc_chunk=40)
    # float16 splits with rounded norms: 5x better than float32 products at D = 768 (the point of the scaled split)
    assert squared_distance_error_coef(768, "float16x3", acc_chunk=ACC_CHUNK, rounded_norms=True) < (
        squared_distance_error_coef(768, torch.float32) / 5)
    with pytest.raises(ValueError, match="acc_chunk must be at least"):
        squared_distance_error_coef(768, "float16x3", acc_chunk=MIN_ACC_CHUNK - 1)


@needs_triton
def test_triton_split_refuses_chunks_beyond_its_bound():
    x = make_rows(20, 8).to(DEVICE)
    zero = torch.zeros(20, device=DEVICE)
    with pytest.raises(ValueError, match="BLOCK_D"):
        band_topk_triton(x, x.square().sum(1), zero, zero, 4, input_dtype="float16x3",
                         config=_interp_config(BLOCK_D=2 * ACC_CHUNK))


@needs_triton
@pytest.mark.parametrize("dtype", ["float16x3", "bfloat16x3"])
def test_triton_split_within_chunked_bound_at_every_magnitude(dtype):
    if dtype == "bfloat16x3" and not torch.cuda.is_available():
        pytest.skip("Triton's interpreter computes bf16 tl.dot wrongly; bf16 is checked on the GPU")
    # rows from 1e-30 to 1e30 (float16 splits are scaled per row), d not a multiple of the chunk
    x = _rows_of_every_magnitude(n=40, d=37)
    x = x[(x.abs().amax(1) > 1e-6) & (x.abs().amax(1) < 1e6)]  # (times 1e-8..1e8: s2 within float32's range)
    rows = [x * 10.0**e for e in (-8, 0, 8)]
    for x in rows:
        sq = x.double().square().sum(1).float()  # rounded float64 norms, as the fast order passes them
        lo, hi = bounds(x)
        coef = squared_distance_error_coef(x.shape[1], dtype, acc_chunk=ACC_CHUNK, rounded_norms=True)
        for config in (None, _STACKED if not torch.cuda.is_available() else {**_STACKED, "BLOCK_D": 32}):
            tri = band_topk_triton(x.to(DEVICE), sq.to(DEVICE), lo.to(DEVICE), hi.to(DEVICE), 6, input_dtype=dtype,
                                   config=config)
            assert_lists_within_bound(type(tri)(*(t.cpu() for t in (tri.index, tri.s2, tri.num_close))), x, lo,
                                      hi, coef)


@pytest.mark.gpu
@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("dtype", ["float16x3", "bfloat16x3"])
def test_triton_split_chunked_bound_on_coherent_sums(dtype, stacked):
    # positive entries: every product adds with the same sign, so the accumulators' rounding (truncation on
    # tensor cores) piles up along each chain; one chain of 3 D products would exceed the chunked bound's
    # accumulation term by ~D / 64. The listed s2 must stay within the chunked bound of the exact ones.
    g = torch.Generator().manual_seed(4)
    n, d = 256, 2048
    x = 1.0 + torch.rand(n, d, generator=g) * 1e-3
    x[1::2] += 1e-2 * torch.rand(n // 2, d, generator=g)
    sq = x.double().square().sum(1).float()
    lo = torch.zeros(n)
    hi = torch.zeros(n)
    # (stacked: one product per chunk; if Triton folded the chunks' sum into its accumulator, this would fail)
    config = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_D": 32, "num_warps": 8, "num_stages": 3, "STACKED": True}
    tri = band_topk_triton(x.cuda(), sq.cuda(), lo.cuda(), hi.cuda(), 32, input_dtype=dtype,
                           config=config if stacked else None)
    x64 = x.double()
    exact = torch.cdist(x64, x64, compute_mode="donot_use_mm_for_euclid_dist").square()
    listed = tri.index.cpu().long()
    err = (tri.s2.cpu().double() - exact.gather(1, listed)).abs()
    coef = squared_distance_error_coef(d, dtype, acc_chunk=ACC_CHUNK, rounded_norms=True)
    tol = coef * (sq.double()[:, None] + sq.double()[listed])
    assert torch.all(err <= tol), float((err / tol).max())


def _truncate_to_float32(v):
    """float64 -> float32 rounded toward zero (tensor-core accumulators truncate)."""
    r = v.astype(np.float32)
    over = np.abs(r.astype(np.float64)) > np.abs(v)
    r[over] = np.nextafter(r[over], np.float32(0))
    return r


def _emulated_split_dot(x_parts, y_parts, chunk, chained):
    """The Triton kernel's sum of a split's three products, one pair per row: per chunk of ``chunk`` entries a
    fresh float32 accumulator (``chained``: one accumulator throughout) taking hi.lo', lo.hi', then hi.hi', every
    addition truncated; the chunks added in float32 with rounding to nearest."""
    (xh, xl), (yh, yl) = x_parts, y_parts
    n, d = xh.shape
    total = np.zeros(n, np.float32)
    part = np.zeros(n, np.float32)
    for c0 in range(0, d, chunk):
        if not chained:
            part = np.zeros(n, np.float32)
        for a, b in ((xh, yl), (xl, yh), (xh, yh)):
            for k in range(c0, min(d, c0 + chunk)):
                part = _truncate_to_float32(part.astype(np.float64) + a[:, k] * b[:, k])  # (exact products)
        if not chained:
            total = (total.astype(np.float64) + part.astype(np.float64)).astype(np.float32)
    return part if chained else total


@pytest.mark.parametrize("dtype", ["float16x3", "bfloat16x3"])
def test_chunked_bound_holds_for_truncating_accumulators_and_needs_the_chunks(dtype):
    # coherent sums (positive entries) with truncating adds: the chunked sum stays within the chunked bound; one
    # chain through all 3 D products does not (for float16 splits, where accumulation dominates the bound)
    g = np.random.default_rng(0)
    n, d = 16, 768
    x = torch.tensor(1.0 + g.random((n, d)) * 1e-3, dtype=torch.float32)
    y = torch.tensor(1.0 + g.random((n, d)) * 1e-2, dtype=torch.float32)
    sx, sy = split_rows(x, dtype), split_rows(y, dtype)
    scale = np.ones(n) if sx.scale is None else (sx.scale.double() * sy.scale.double()).numpy()
    x_parts, y_parts = ([p.double().numpy() for p in s[:2]] for s in (sx, sy))
    exact = (x.double() * y.double()).sum(1).numpy()
    norms = (x.double().square().sum(1) + y.double().square().sum(1)).numpy()
    bound = squared_distance_error_coef(d, dtype, acc_chunk=ACC_CHUNK, rounded_norms=True) * norms
    chunked = _emulated_split_dot(x_parts, y_parts, ACC_CHUNK, chained=False) * scale
    assert np.all(2.0 * np.abs(chunked - exact) <= bound)
    if dtype == "float16x3":
        chained = _emulated_split_dot(x_parts, y_parts, ACC_CHUNK, chained=True) * scale
        assert np.any(2.0 * np.abs(chained - exact) > bound)


def test_split_rows_by_chunks_equals_one_pass(monkeypatch):
    from tfp_kernels.order import band_topk

    x = _rows_of_every_magnitude(n=40, d=37)
    whole = split_rows(x, "float16x3")
    monkeypatch.setattr(band_topk, "_SPLIT_CHUNK_ROWS", 7)  # 40 rows: 5 full chunks and a partial one
    chunked = split_rows(x, "float16x3")
    for a, b in zip(whole, chunked):
        assert torch.equal(a, b)


@pytest.mark.parametrize("n, block_rows", [(1, 4), (37, 5), (1000, 7)])
def test_pair_blocks_progress_counts_every_row_once(n, block_rows):
    # the bar advances by whole rows in proportion to each block's pairs and ends at exactly N
    from tfp_kernels import has_extension
    from tfp_kernels.order.band_topk import _band_topk_pairs

    if not has_extension():
        pytest.skip("the pair blocks need the C++ extension")

    class Bar:
        def __init__(self):
            self.n, self.steps = 0, []

        def update(self, v):
            assert isinstance(v, int) and v >= 0
            self.n += v
            self.steps.append(v)

    x = make_rows(n, 8, seed=n)
    bar = Bar()
    _band_topk_pairs(x, x.square().sum(1), torch.zeros(n), torch.zeros(n), 4, bar, block_rows=block_rows)
    assert bar.n == n
    if n == 1000:  # the first row block (143 blocks of pairs) no longer counts as 7 rows: ~1.4% of them
        assert sum(bar.steps[:143]) > 10


@needs_triton
def test_small_inputs_take_the_first_launch_setting_without_tuning(monkeypatch):
    # a training loop's first small call compiles one kernel, not every candidate
    from tfp_kernels.order import band_topk_triton as btk

    first, second = _interp_config(), _interp_config(BLOCK_N=32)
    monkeypatch.setattr(btk, "_configs", lambda k_pad, device_type, hopper=False, split=False: [first, second])

    def no_timing(*args, **kwargs):
        raise AssertionError("tuned a small input")

    monkeypatch.setattr(btk.triton.testing, "do_bench", no_timing)
    x = make_rows(btk._MIN_TUNE_ROWS - 1, 4)
    zero = torch.zeros(x.shape[0])
    assert btk._tuned_config(x, None, None, x.square().sum(1), zero, zero, 16, "ieee", 0) is first


def test_launch_setting_candidates():
    from tfp_kernels.order import band_topk_triton as btk

    split = btk._configs(64, "cuda", hopper=True, split=True)
    assert sum(bool(c.get("STACKED")) for c in split) == 2 and not any(c.get("DESCRIPTORS") for c in split)
    assert all(c["BLOCK_D"] <= btk.ACC_CHUNK for c in split)  # within the split's error bound
    plain = btk._configs(64, "cuda", hopper=True)
    assert sum(bool(c.get("DESCRIPTORS")) for c in plain) == 2 and not any(c.get("STACKED") for c in plain)
    assert not any(c.get("STACKED") or c.get("DESCRIPTORS") for c in btk._configs(64, "cuda", split=True))
    for k_pad in (128, 256):  # settings of 32 merge keys per thread (few tuning compiles)
        configs = btk._configs(k_pad, "cuda", hopper=True, split=True)
        assert all(c["BLOCK_M"] * k_pad // (32 * c["num_warps"]) == 32 for c in configs)
        assert len(configs) == (2 if k_pad == 128 else 1) and len(btk._configs(k_pad, "cuda")) == 1


@pytest.mark.parametrize("n, d, k", [(1, 3, 4), (2, 5, 1), (37, 19, 8), (70, 17, 100), (130, 33, 20)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("block_elements", [None, 200])
def test_row_lists_within_their_bound(n, d, k, dtype, block_elements):
    # lists of some rows (odd ones, out of order, a duplicated row among them) against all rows: what the walk
    # relies on, within each precision's bound; the float32 ones equal the torch row blocks' lists
    x = make_rows(n, d, seed=n)
    lower, upper = bounds(x) if n > 2 else (torch.zeros(n), torch.full((n,), 1e9))
    rows = torch.arange(n).flip(0)[::2].contiguous()
    xs = x.to(dtype)
    sq = xs.double().square().sum(1).to(dtype) if dtype == torch.float64 else x.square().sum(1)
    got = band_topk_rows(xs, sq, rows, lower[rows], upper[rows], k, block_elements=block_elements)
    assert got.index.shape == (rows.numel(), k) and got.index.dtype == torch.int32 and got.s2.dtype == torch.float32
    coef = squared_distance_error_coef(d, torch.float32) if dtype == torch.float32 else float64_error_coef(d)
    full = BandLists(torch.full((n, k), -1, dtype=torch.int32), torch.full((n, k), torch.inf),
                     torch.zeros(n, dtype=torch.int32))
    full.index[rows], full.s2[rows], full.num_close[rows] = got.index, got.s2, got.num_close
    assert_lists_within_bound(full, x, lower, upper, coef, rows)
    listed = got.index[:, 1:] >= 0
    assert torch.all(torch.where(listed, got.s2[:, 1:] >= got.s2[:, :-1], True))  # sorted by s2
    if dtype == torch.float32:  # and by index among equal ones (float64 values rounded to float32 may tie)
        keys = got.s2.double() * 2**40 + got.index.double()
        assert torch.all(torch.where(listed, keys[:, 1:] > keys[:, :-1], True))
    if dtype == torch.float32:
        rowwise = band_topk_torch(x, sq, lower, upper, k, use_extension=False)
        assert torch.equal(got.index, rowwise.index[rows])


def test_row_lists_float64_ties_by_index():
    # exact copies of one row: equal float64 distances, listed by index (torch.topk leaves their order open)
    x = torch.zeros(12, 3, dtype=torch.float64)
    x[1:] = 1.0
    x[0] = 0.0
    sq = x.square().sum(1)
    got = band_topk_rows(x, sq, torch.tensor([0]), torch.tensor([0.5]), torch.tensor([0.5]), 6)
    assert got.index[0].tolist() == [1, 2, 3, 4, 5, 6]
    assert torch.all(got.s2[0] == 3.0) and int(got.num_close[0]) == 0
    # ties inside the list only, and fewer band entries than K (the rest -1), in the same block
    x2 = torch.cat([x, torch.tensor([[0.5, 0.0, 0.0]], dtype=torch.float64)])
    rows = torch.tensor([12, 0])
    got = band_topk_rows(x2, x2.square().sum(1), rows, torch.tensor([0.0, 2.9]), torch.tensor([0.0, 2.9]), 13)
    assert got.index[1].tolist() == list(range(1, 12)) + [-1, -1]  # node 12 (s2 0.25) is below the band
    assert got.index[0, 0] == 0 and got.index[0, 1:12].tolist() == list(range(1, 12)) and got.index[0, 12] == -1


def test_row_lists_refuse_bad_arguments():
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match="float32 or float64"):
        band_topk_rows(x.half(), x.square().sum(1), torch.tensor([0]), torch.zeros(1), torch.ones(1), 2)
    with pytest.raises(ValueError, match=r"must be \(Q,\)"):
        band_topk_rows(x, x.square().sum(1), torch.tensor([0, 1]), torch.zeros(1), torch.ones(2), 2)
    with pytest.raises(ValueError, match="positive integer"):
        band_topk_rows(x, x.square().sum(1), torch.tensor([0]), torch.zeros(1), torch.ones(1), 0)


@pytest.mark.parametrize("n, d", [(1, 3), (2, 5), (37, 19), (130, 33)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("block_elements", [None, 200])
def test_close_sets_hold_every_close_node(n, d, dtype, block_elements):
    # sets of some rows (odd ones, out of order, a duplicated row among them): every node closer than the
    # threshold in float64 is in its row's set, nothing past the bound is, never the row itself; sizes are the
    # row lists' num_close (same products), members increasing
    x = make_rows(n, d, seed=n + 7)
    xs = x.to(dtype)
    sq = xs.double().square().sum(1).to(dtype) if dtype == torch.float64 else x.square().sum(1)
    exact = torch.cdist(x.double(), x.double()).square()
    off_diagonal = exact[~torch.eye(n, dtype=torch.bool)]
    t2 = float(off_diagonal.quantile(0.3)) if n > 1 else 1.0
    coef = squared_distance_error_coef(d, torch.float32) if dtype == torch.float32 else float64_error_coef(d)
    slack = coef * (x.double().square().sum(1) + x.double().square().sum(1).max())
    upper = (t2 + slack).float()
    rows = torch.arange(n).flip(0)[::2].contiguous()
    offsets, members = close_sets(xs, sq, rows, upper[rows], block_elements=block_elements)
    assert offsets.dtype == torch.int64 and members.dtype == torch.int32 and offsets.shape == (rows.numel() + 1,)
    assert offsets[0] == 0 and offsets[-1] == members.numel()
    lists = band_topk_rows(xs, sq, rows, upper[rows], upper[rows], 4, block_elements=block_elements)
    assert torch.equal(offsets.diff(), lists.num_close.long())
    for q, r in enumerate(rows.tolist()):
        got = members[offsets[q] : offsets[q + 1]].long()
        assert torch.all(got.diff() > 0) and r not in got.tolist()
        surely = torch.nonzero(exact[r] < t2 - 2 * slack[r]).flatten()
        surely = surely[surely != r]
        assert set(surely.tolist()) <= set(got.tolist())
        assert torch.all(exact[r, got] < t2 + 2 * slack[r])
    assert int(offsets[-1]) > 0 or n <= 2  # (the test is not empty)


def test_close_sets_of_no_rows_and_bad_arguments():
    x = torch.randn(5, 3)
    sq = x.square().sum(1)
    offsets, members = close_sets(x, sq, torch.empty(0, dtype=torch.int64), torch.empty(0))
    assert offsets.tolist() == [0] and members.numel() == 0
    with pytest.raises(ValueError, match="float32 or float64"):
        close_sets(x.half(), sq, torch.tensor([0]), torch.ones(1))
    with pytest.raises(ValueError, match=r"must be \(Q,\)"):
        close_sets(x, sq, torch.tensor([0, 1]), torch.ones(1))



@needs_triton
@pytest.mark.parametrize("m, c, d, k, config", [
    (1, 1, 3, 4, None),  # one row, one column
    (37, 21, 19, 8, None),  # neither a multiple of the tile, d not a power of two
    (20, 53, 33, 16, {"CAP": 16, "programs": 2}),  # persistent programs, a merge before every tile with candidates
    (16, 5, 7, 40, None),  # K > C: lists padded
])
def test_triton_rows_against_columns_match_reference(m, c, d, k, config):
    # rows listed against another array's rows (a sharded build's block of another rank's rows): the one launch
    # over the concatenation must list exactly the columns the reference does, none of the rows themselves
    g = torch.Generator().manual_seed(m * 100 + c)
    cols = torch.randn(c, d, generator=g)
    x = torch.randn(m, d, generator=g)
    if c > 2:
        x[0] = cols[2]  # a row equal to a column: s2 = 0 is a column, listed when the band starts at 0
        cols[1] = cols[0]  # two equal columns: ties by column
    s2 = torch.cdist(x.double(), cols.double()).square()
    lo = (s2.quantile(0.1, dim=1) * 1.0001).float() if c > 2 else torch.zeros(m)
    hi = (s2.quantile(0.5, dim=1) * 1.0001).float() if c > 2 else torch.full((m,), 1e9)
    lo[0] = 0.0
    args = [t.to(DEVICE) for t in (x, x.square().sum(1), lo, hi)]
    config = None if config is None else _interp_config(**config)
    tri = band_topk_triton(*args, k, config=config,
                           columns=(cols.to(DEVICE), cols.to(DEVICE).square().sum(1)))
    ref = band_topk_reference(x, lo, hi, k, columns=cols)
    tri = type(tri)(tri.index.cpu(), tri.s2.cpu(), tri.num_close.cpu())
    assert tri.index.shape == (m, k) and int(tri.index.max()) < c
    assert torch.equal(tri.num_close, ref.num_close)
    coef = squared_distance_error_coef(d, torch.float32)
    both = torch.cat([cols, x]).double()
    assert_lists_match(tri, ref, None, coef, norms=both.square().sum(1),
                       exact=lambda i, j: (cols.double()[j] - x[i].double()).square().sum(1))
    if c > 2:
        assert int(tri.index[0, 0]) == 2  # the equal column, first (its float32 s2 ~ 1e-6, not 0)


@needs_triton
def test_triton_columns_refuse_the_pairs_schedule_and_bad_shapes():
    x = torch.randn(4, 3, device=DEVICE)
    zero = torch.zeros(4, device=DEVICE)
    with pytest.raises(ValueError, match="schedule='rows' only"):
        band_topk_triton(x, x.square().sum(1), zero, zero, 2, schedule="pairs", columns=(x, x.square().sum(1)))
    with pytest.raises(ValueError, match=r"columns must be \(C, 3\)"):
        band_topk_triton(x, x.square().sum(1), zero, zero, 2, columns=(x[:, :2], x.square().sum(1)))


def test_reference_with_columns_lists_no_row_out():
    # the reference's columns mode: every column counts, a column equal to the row included
    x = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    cols = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    out = band_topk_reference(x, torch.zeros(2), torch.full((2,), 2.0), 2, columns=cols)
    assert out.index.tolist() == [[0, 1], [1, 0]]
    assert out.s2.tolist() == [[0.0, 1.0], [4.0, 9.0]]
    assert out.num_close.tolist() == [2, 0]


def test_distances_between_is_distances_from_bit_for_bit():
    # the sharded scans measure window rows sent to them against their own rows: the reference's bits
    from tfp_kernels.order.distance import distances_between, distances_from, prepare

    x = make_rows(57, 19, seed=4).double()
    for metric in ("l2", "cosine"):
        p = prepare(x, metric)
        rows, cols = torch.tensor([0, 5, 17, 56]), torch.tensor([3, 0, 40])
        assert torch.equal(distances_between(p[rows], p[cols], metric), distances_from(p, rows, cols, metric))
