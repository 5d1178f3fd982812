"""The fast exact ordering (band lists + C++ walk + exact fallback scans) equals the reference."""

import functools

import pytest
import torch

from tfp_kernels import check_path, estimate_threshold, has_extension, tfp_order, tfp_order_reference
from tfp_kernels.order.band_topk_triton import triton_runs_on
from tests.order.engine_options import fast_tfp_order
from tfp_kernels.order.fast import Kernels
from tfp_kernels.order.options import EngineSettings
from tfp_kernels.order.walk_op import WalkCounters, host_table

pytestmark = pytest.mark.skipif(not has_extension(), reason="the fast path needs tfp_kernels._C")



def clustered(n, d, *, clusters=8, spread=0.5, dup_every=6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, d, generator=g) * 3
    labels = torch.randint(0, clusters, (n,), generator=g)
    emb = centres[labels] + spread * torch.randn(n, d, generator=g)
    if dup_every:
        src = emb[::dup_every].clone()
        emb[1::dup_every] = src[: emb[1::dup_every].shape[0]] + 1e-3 * torch.randn(emb[1::dup_every].shape, generator=g)
    return emb.to(dtype)


def anisotropic(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(n, 8, generator=g) * torch.linspace(3, 0.5, 8)
    return lat @ torch.randn(8, d, generator=g) + 0.05 * torch.randn(n, d, generator=g)


#: fallbacks for CPU tensors: the fused Triton scan takes them only under the interpreter (on a GPU machine the
#: CUDA tests run it)
CPU_FALLBACKS = ["host", "device", pytest.param("triton", marks=pytest.mark.skipif(
    not triton_runs_on("cpu"), reason="CPU tensors in Triton need TRITON_INTERPRET=1"))]

CASES = [
    pytest.param(clustered(300, 24), "l2", 4, None, 0, 16, id="clustered-l2"),
    pytest.param(clustered(300, 24), "cosine", 4, None, 5, 16, id="clustered-cosine-start5"),
    pytest.param(clustered(257, 33, seed=1), "l2", 1, None, 0, 8, id="window1-k8"),
    pytest.param(clustered(257, 33, seed=1), "l2", 6, None, 0, 64, id="window6"),
    pytest.param(clustered(200, 17, seed=2), "l2", 4, 3, 0, 16, id="cap3"),
    pytest.param(clustered(200, 17, seed=2), "cosine", 4, 40, 0, 16, id="cap40-cosine"),
    pytest.param(clustered(200, 17, seed=3), "l2", 4, 0, 0, 16, id="cap0"),
    pytest.param(anisotropic(400, 48), "l2", 4, None, 0, 32, id="anisotropic"),
    pytest.param(torch.randn(150, 7, generator=torch.Generator().manual_seed(4)), "l2", 3, None, 0, 1, id="k1"),
    pytest.param(torch.randn(9, 5, generator=torch.Generator().manual_seed(5)), "l2", 4, None, 2, 64, id="k-over-n"),
]


@pytest.mark.parametrize("emb, metric, window, cap, start, k", CASES)
@pytest.mark.parametrize("fallback", CPU_FALLBACKS)
def test_fast_equals_reference(emb, metric, window, cap, start, k, fallback):
    t = estimate_threshold(emb, metric=metric, quantile=0.05)
    ref = tfp_order_reference(emb, metric=metric, threshold=t, window=window, max_rejections=cap, start=start)
    path, info = fast_tfp_order(emb, metric=metric, threshold=t, window=window, max_rejections=cap, start=start,
                                k=k, fallback=fallback, band_backend="torch")
    assert torch.equal(path, ref)
    if fallback == "triton" and cap is None and info.num_fallbacks:
        # each fused scan settles its nearest surely valid row (or the undecided rows near it) in float64
        assert 1 <= info.scan_candidates <= info.num_fallbacks * emb.shape[0]
    if fallback != "triton":
        assert info.scan_candidates == 0


@pytest.mark.parametrize("band_dtype", ["float16x3", "bfloat16x3", "bfloat16"])
@pytest.mark.parametrize("case", [0, 1, 3, 4, 7])
def test_low_precision_lists_give_the_same_path(case, band_dtype):
    # lists from split (bf16 hi + lo) or plain bf16 products, simulated with float32 GEMMs on the CPU: their
    # wider error bound moves the band edges and the walk's certificates, never a decision
    emb, metric, window, cap, start, k = CASES[case].values
    t = estimate_threshold(emb, metric=metric, quantile=0.05)
    ref = tfp_order_reference(emb, metric=metric, threshold=t, window=window, max_rejections=cap, start=start)
    path, info = fast_tfp_order(emb, metric=metric, threshold=t, window=window, max_rejections=cap, start=start,
                                k=k, band_backend="torch", band_dtype=band_dtype)
    assert torch.equal(path, ref) and info.band_dtype == band_dtype


@pytest.mark.parametrize("band_dtype, schedule", [("float32", "rows"), ("float16x3", "rows"), ("float16x3", "pairs")])
def test_triton_band_lists_in_the_walk(band_dtype, schedule):
    # the whole fast path with the Triton band kernel (interpreted on the CPU; float32 or split float16
    # products there, as the interpreter's bf16 tl.dot is wrong), by row blocks or by pairs of blocks: the
    # same path as the reference
    if not triton_runs_on("cpu"):
        pytest.skip("CPU tensors in Triton need TRITON_INTERPRET=1 (on a GPU: test_cuda_fast_equals_reference)")
    settings = EngineSettings(band_schedule=schedule)
    emb = clustered(48, 10, clusters=4, seed=21) * 1e-3  # (small rows: the float16 split scales them)
    t = estimate_threshold(emb, quantile=0.05)
    ref = tfp_order_reference(emb, threshold=t)
    path, info = fast_tfp_order(emb, settings=settings, metric="l2", threshold=t, window=4, max_rejections=None, start=0, k=8,
                                band_backend="triton", band_dtype=band_dtype)
    assert info.band_backend == "triton" and info.band_dtype == band_dtype and torch.equal(path, ref)


def test_band_dtype_choice_and_bad_value():
    emb = clustered(120, 16, seed=9)
    _, stats = tfp_order(emb, return_stats=True)
    assert stats.band_dtype == "float32"  # CPU: the split would cost three float32 products
    with pytest.raises(ValueError, match="band_dtype must be"):
        tfp_order(emb, band_dtype="float8")


def test_public_api_uses_fast_backend_and_reports_stats():
    emb = clustered(400, 32, seed=7)
    path, stats = tfp_order(emb, return_stats=True, k=16)
    assert stats.backend == "fast" and stats.band_backend in ("torch", "triton") and stats.k == 16
    assert 0 <= stats.fallback_rate <= 1 and stats.num_fallbacks <= 399
    assert torch.equal(path, tfp_order_reference(emb, threshold=stats.threshold))
    assert torch.equal(path, tfp_order(emb, backend="reference"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(dtype):
    emb = clustered(150, 20, seed=8, dtype=dtype)
    t = estimate_threshold(emb)
    assert torch.equal(tfp_order(emb, threshold=t), tfp_order_reference(emb, threshold=t))


def test_duplicates_and_identical_rows():
    emb = torch.randn(6, 4).repeat(20, 1)  # every row 20 times
    t = estimate_threshold(emb)
    assert torch.equal(tfp_order(emb, threshold=t, k=8), tfp_order_reference(emb, threshold=t))
    same = torch.ones(30, 3)
    with pytest.warns(UserWarning):
        assert tfp_order(same, start=4).tolist() == [4] + [i for i in range(30) if i != 4]


@pytest.mark.parametrize("fallback", ["host", "device"])  # "triton": same scan interface, too slow interpreted
def test_list_rebuilds_keep_the_path_exact(fallback):
    settings = EngineSettings(min_rebuild_nodes=64)
    emb = clustered(1500, 24, clusters=25, spread=0.3, seed=13)
    t = estimate_threshold(emb)
    ref = tfp_order_reference(emb, threshold=t)
    for k in (4, 16):
        path, info = fast_tfp_order(emb, settings=settings, metric="l2", threshold=t, window=4, max_rejections=None, start=0, k=k,
                                    rebuild="auto", fallback=fallback)
        assert info.num_rebuilds > 0
        assert torch.equal(path, ref)


def test_progress_bar_run_matches(capsys):
    emb = clustered(2500, 16, clusters=20, seed=12)
    t = estimate_threshold(emb)
    assert torch.equal(tfp_order(emb, threshold=t, progress=True), tfp_order(emb, threshold=t))
    err = capsys.readouterr().err
    assert "tfp band lists" in err and "tfp walk" in err  # both long phases show a bar


def test_tiny_inputs():
    assert tfp_order(torch.randn(1, 3)).tolist() == [0]
    assert tfp_order(torch.randn(2, 3), start=1, threshold=0.0).tolist() == [1, 0]


def test_larger_n_validated_with_check_path():
    emb = clustered(3000, 32, clusters=40, seed=9)
    t = estimate_threshold(emb)
    path, stats = tfp_order(emb, threshold=t, return_stats=True)
    res = check_path(emb, path, threshold=t)
    assert res.ok, res.message


@pytest.mark.parametrize("seed", range(8))
def test_host_scans_with_caps_and_windows(seed):
    """The C++ walk's own scans (fallback="host") on inputs where most steps scan (K = 1 or 2): the float16 pass,
    its bounds and the exact settling equal the reference for caps that fire (0, 2, 7), windows 1 to 6, both
    metrics; rows with many exact ties (small integers) give a path that check_path accepts."""
    g = torch.Generator().manual_seed(seed)
    n, d = int(torch.randint(20, 90, (1,), generator=g)), int(torch.randint(2, 40, (1,), generator=g))
    metric = "cosine" if seed % 2 else "l2"
    tie_free = torch.randn(n, d, generator=g)
    ties = torch.randint(-2, 3, (n, d), generator=g).float()
    ties[ties.norm(dim=1) == 0] = 1.0
    for cap, window, k in [(None, 4, 1), (0, 3, 2), (2, 4, 1), (7, 2, 2), (None, 6, 2), (None, 1, 1)]:
        for emb in (tie_free, ties):
            t = estimate_threshold(emb, metric=metric, quantile=0.1)
            path, info = fast_tfp_order(emb, metric=metric, threshold=t, window=window, max_rejections=cap, start=0,
                                        k=k, fallback="host", band_backend="torch", group_duplicates=False)
            assert info.num_fallbacks > 0
            if emb is tie_free:
                ref = tfp_order_reference(emb, metric=metric, threshold=t, window=window, max_rejections=cap)
                assert torch.equal(path, ref), (cap, window, k)
            else:
                res = check_path(emb, path, metric=metric, threshold=t, window=window, max_rejections=cap)
                assert res.ok, (cap, window, k, res.message)


def test_walk_op_rejects_bad_arguments():
    emb = torch.randn(4, 3)
    lists = torch.zeros(4, 2, dtype=torch.int32)
    args = [emb, torch.empty(0, dtype=torch.float64), lists, torch.zeros(4, 2), torch.zeros(4, dtype=torch.float64),
            torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.int32), torch.empty(0, dtype=torch.float64),
            torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.bool), WalkCounters().tensor]
    args[8:8] = [torch.empty(0, dtype=torch.float64)] * 3  # scan_scale, scan_sq_norms, scan_slack
    with pytest.raises(RuntimeError, match="step must lie in"):
        torch.ops.tfp_kernels.tfp_walk(*args, 0, -1, 1.0, 4, -1, False)
    bad = list(args)
    bad[2] = lists.long()
    with pytest.raises(RuntimeError, match="band_index must have dtype Int"):
        torch.ops.tfp_kernels.tfp_walk(*bad, 1, -1, 1.0, 4, -1, False)
    bad = list(args)
    bad[7] = emb.clone()  # float32 rows: the scan reads float16 copies
    with pytest.raises(RuntimeError, match="float16 scaled prepared rows"):
        torch.ops.tfp_kernels.tfp_walk(*bad, 1, -1, 1.0, 4, -1, False)
    bad[7] = emb.half()
    with pytest.raises(RuntimeError, match="scan_scale, scan_sq_norms and scan_slack must be"):
        torch.ops.tfp_kernels.tfp_walk(*bad, 1, -1, 1.0, 4, -1, False)


def _with_duplicate_groups(n_distinct: int, d: int, seed: int) -> torch.Tensor:
    """Clustered rows where many rows are repeated exactly: a few big groups, many small ones, singletons."""
    g = torch.Generator().manual_seed(seed)
    base = clustered(n_distinct, d, clusters=6, spread=0.4, seed=seed)
    sizes = torch.ones(n_distinct, dtype=torch.long)
    sizes[: n_distinct // 10] = torch.randint(2, 6, (n_distinct // 10,), generator=g)
    sizes[:3] = torch.tensor([40, 25, 12])  # groups bigger than K fill whole lists
    rows = torch.repeat_interleave(torch.arange(n_distinct), sizes)
    return base[rows[torch.randperm(rows.numel(), generator=g)]]


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("window", [1, 4])
@pytest.mark.parametrize("fallback", CPU_FALLBACKS)
def test_duplicate_groups_keep_the_path_exact(metric, window, fallback):
    emb = _with_duplicate_groups(160, 12, seed=window)
    t = estimate_threshold(emb, metric=metric, quantile=0.05)
    ref = tfp_order_reference(emb, metric=metric, threshold=t, window=window, start=7)
    grouped, info = fast_tfp_order(emb, metric=metric, threshold=t, window=window, max_rejections=None, start=7,
                                   k=8, fallback=fallback, band_backend="torch")
    assert info.num_groups < emb.shape[0]
    assert torch.equal(grouped, ref)
    plain, info = fast_tfp_order(emb, metric=metric, threshold=t, window=window, max_rejections=None, start=7,
                                 k=8, fallback=fallback, band_backend="torch", group_duplicates=False)
    assert info.num_groups == emb.shape[0]
    assert torch.equal(plain, ref)


@pytest.mark.parametrize(("window", "seed", "quantile"),
                         [(2, 2, 0.1), (2, 3, 0.05), (3, 3, 0.05), (64, 3, 0.05), (65, 3, 0.05)])
def test_cosine_walk_with_and_without_cached_unit_rows(window, seed, quantile):
    """The C++ walk divides each cosine row by its norm once per step for windows up to 64 nodes (UnitRows) and in
    every distance for wider ones: both give the reference's path. In the first three cases t (the estimate's
    quantile, a pair's exact distance) decides a step at a tie: unit rows one rounding off (a multiplication by
    the reciprocal norm in place of the division) change their paths. (Such ties are where the walk may part
    from the reference at all: its lanes sum in another order than torch.cdist; seed 4, window 3, quantile 0.1
    is one, before and after the cache.)"""
    emb = _with_duplicate_groups(150, 11, seed=seed)
    t = estimate_threshold(emb, metric="cosine", quantile=quantile)
    ref = tfp_order_reference(emb, metric="cosine", threshold=t, window=window, start=3)
    for group_duplicates in (True, False):
        path, _ = fast_tfp_order(emb, metric="cosine", threshold=t, window=window, max_rejections=None, start=3,
                                 k=8, fallback="host", band_backend="torch", group_duplicates=group_duplicates)
        assert torch.equal(path, ref)


def test_duplicate_groups_with_rebuilds_and_fewer_scans():
    settings = EngineSettings(min_rebuild_nodes=64)
    emb = _with_duplicate_groups(700, 16, seed=3)
    t = estimate_threshold(emb)
    ref = tfp_order_reference(emb, threshold=t)
    grouped, with_groups = fast_tfp_order(emb, settings=settings, metric="l2", threshold=t, window=4, max_rejections=None, start=0,
                                          k=16)
    plain, without = fast_tfp_order(emb, settings=settings, metric="l2", threshold=t, window=4, max_rejections=None, start=0, k=16,
                                    group_duplicates=False)
    assert torch.equal(grouped, ref) and torch.equal(plain, ref)
    assert with_groups.num_rebuilds > 0
    assert with_groups.num_fallbacks < without.num_fallbacks


def test_duplicate_groups_are_not_used_with_a_cap_or_zero_threshold():
    emb = _with_duplicate_groups(60, 5, seed=4)
    t = estimate_threshold(emb)
    for kwargs in ({"threshold": t, "max_rejections": 5}, {"threshold": 0.0, "max_rejections": None}):
        ref = tfp_order_reference(emb, window=4, **kwargs)
        path, info = fast_tfp_order(emb, metric="l2", window=4, start=0, k=8, **kwargs)
        assert info.num_groups == emb.shape[0]
        assert torch.equal(path, ref)


def test_duplicate_groups_found_exactly():
    from tfp_kernels.order.duplicates import duplicate_groups

    rows = torch.tensor([[1.0, 2.0], [0.0, 1.0], [1.0, 2.0], [-0.0, 1.0], [3.0, 3.0], [1.0, 2.0]])
    groups = duplicate_groups(rows)
    members = [groups.members[a:b].tolist() for a, b in zip(groups.offsets[:-1], groups.offsets[1:])]
    assert sorted(members) == [[0, 2, 5], [1, 3], [4]]
    assert all(groups.group_of[m].unique().numel() == 1 for m in members)
    assert sorted(groups.representatives.tolist()) == [0, 1, 4]
    assert duplicate_groups(torch.eye(3)) is None


def test_walk_op_rejects_partial_group_arguments():
    emb = torch.randn(4, 3)
    args = [emb, torch.empty(0, dtype=torch.float64), torch.zeros(4, 2, dtype=torch.int32), torch.zeros(4, 2),
            torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.int32),
            torch.empty(0, dtype=torch.float64), torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.bool),
            WalkCounters().tensor]
    args[8:8] = [torch.empty(0, dtype=torch.float64)] * 3  # scan_scale, scan_sq_norms, scan_slack
    with pytest.raises(RuntimeError, match="pass all of group_of"):
        torch.ops.tfp_kernels.tfp_walk(*args, 1, -1, 1.0, 4, -1, False, torch.zeros(4, dtype=torch.int32))
    group_args = (torch.zeros(4, dtype=torch.int32), torch.tensor([0, 4]), torch.arange(4), torch.zeros(1, dtype=torch.long))
    with pytest.raises(RuntimeError, match=r"band_index and band_s2 must have shape \(1, K\)"):
        torch.ops.tfp_kernels.tfp_walk(*args, 1, -1, 1.0, 4, -1, False, *group_args)


@pytest.mark.gpu
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("band_backend, band_dtype", [("triton", "float16x3"), ("triton", "bfloat16x3"),
                                                      ("triton", "float32"),
                                                      ("triton", "bfloat16"), ("torch", "float32")])
def test_cuda_fast_equals_reference(metric, band_backend, band_dtype):
    emb = clustered(3000, 64, clusters=30, seed=10).cuda()
    t = estimate_threshold(emb, metric=metric)
    ref = tfp_order_reference(emb, metric=metric, threshold=t)
    for fallback in ("host", "device", "triton"):
        path, info = fast_tfp_order(emb, metric=metric, threshold=t, window=4, max_rejections=None, start=0, k=64,
                                    fallback=fallback, band_backend=band_backend, band_dtype=band_dtype)
        assert path.device == emb.device and info.band_backend == band_backend
        assert torch.equal(path, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_cuda_pairs_schedule_equals_reference(metric):
    # the band lists of the pairs kernel (each unordered pair's product once, rounds of super-block pairs; its
    # compiled launch setting, 128-row tiles) in the walk, beside long lists: the reference's path
    emb = clustered(5000, 96, clusters=40, seed=12).cuda()
    t = estimate_threshold(emb, metric=metric)
    ref = tfp_order_reference(emb, metric=metric, threshold=t)
    settings = EngineSettings(band_schedule="pairs")
    for fallback in ("host", "triton"):
        path, info = fast_tfp_order(emb, settings=settings, metric=metric, threshold=t, window=4, max_rejections=None, start=0,
                                    k=32, fallback=fallback, band_backend="triton", long_lists=True)
        assert info.band_backend == "triton" and torch.equal(path, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("band_dtype", ["float16x3", "bfloat16"])
def test_cuda_long_lists_equal_reference(band_dtype):
    # long lists in float64 on the GPU (band_topk_rows) beside the Triton kernel's lists; bf16 lists crowd
    emb = clustered(3000, 64, clusters=30, seed=10).cuda()
    t = estimate_threshold(emb)
    ref = tfp_order_reference(emb, threshold=t)
    for fallback in ("device", "triton"):
        path, info = fast_tfp_order(emb, metric="l2", threshold=t, window=4, max_rejections=None, start=0, k=16,
                                    fallback=fallback, band_backend="triton", band_dtype=band_dtype, long_lists=True)
        assert torch.equal(path, ref) and info.long_k == 64
        assert info.num_long_lists > 0 or band_dtype != "bfloat16"


@pytest.mark.gpu
def test_cuda_close_sets_equal_reference():
    # close sets from CUDA products (IEEE float32 ones even where the caller allows TF32: their bound assumes it),
    # with the host scans (N <= 16,384 on CUDA) and the device scans (both over set and list where that decides)
    emb = clustered(1200, 24, clusters=6, spread=0.6, seed=3).cuda()
    t = estimate_threshold(emb, quantile=0.05)
    ref = tfp_order_reference(emb, threshold=t, max_rejections=60)
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        for fallback in ("host", "device"):
            path, info = fast_tfp_order(emb, metric="l2", threshold=t, window=4, max_rejections=60, start=0, k=8,
                                        fallback=fallback, band_backend="triton")
            assert torch.equal(path, ref) and info.num_close_sets > 0 and info.num_close_set_scans > 0
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32


@pytest.mark.gpu
def test_cuda_large_n_check_path():
    emb = anisotropic(100_000, 64, seed=11).cuda()
    t = estimate_threshold(emb)
    path, stats = tfp_order(emb, threshold=t, return_stats=True)
    steps = torch.randperm(100_000 - 1, generator=torch.Generator().manual_seed(0))[:3000] + 1
    res = check_path(emb, path, threshold=t, steps=steps)
    assert res.ok, res.message


def test_triton_fallback_refuses_cpu_tensors_when_compiled(monkeypatch):
    # compiled Triton cannot read host memory: a clear error at the entry, not a failure inside a launch
    from tfp_kernels.order import band_topk_triton
    from tfp_kernels.order.band_tiles_triton import HAVE_TRITON

    if not HAVE_TRITON:
        pytest.skip("needs triton")
    monkeypatch.setattr(band_topk_triton, "_interpreted", lambda: False)
    emb = clustered(40, 6, seed=1)
    t = estimate_threshold(emb, quantile=0.05)
    with pytest.raises(ValueError, match="fallback='triton' needs Triton and CUDA embeddings"):
        fast_tfp_order(emb, metric="l2", threshold=t, window=4, max_rejections=None, start=0, k=8,
                       fallback="triton", band_backend="torch")


def test_fused_scan_falls_back_to_float32_products_when_the_tensor_core_kernel_fails():
    from tfp_kernels.order import scan_triton

    if not triton_runs_on("cpu"):
        pytest.skip("CPU tensors in Triton need TRITON_INTERPRET=1")
    real = scan_triton.masked_scan_triton
    calls = []

    def no_tensor_cores(*args, **kwargs):
        calls.append(args[-1])
        if args[-1]:  # (tensor_cores, the last positional argument triton_exact_pick passes)
            raise RuntimeError("PassManager::run failed")
        return real(*args, **kwargs)

    kernels = Kernels(fused_scan=functools.partial(scan_triton.triton_exact_pick, scan=no_tensor_cores))
    emb, metric, window, cap, start, k = CASES[0].values
    t = estimate_threshold(emb, metric=metric, quantile=0.05)
    ref = tfp_order_reference(emb, metric=metric, threshold=t, window=window, start=start)
    with pytest.warns(RuntimeWarning) as record:
        path, info = fast_tfp_order(emb, kernels=kernels, metric=metric, threshold=t, window=window, max_rejections=None,
                                    start=start, k=k, fallback="triton", band_backend="torch")
    messages = [str(w.message) for w in record]
    assert any("float64 settle kernel failed" in m for m in messages)
    assert any("tensor-core products failed" in m for m in messages)
    assert torch.equal(path, ref) and info.num_fallbacks > 1
    # tried with the settle kernel, then without, then float32 products for every scan
    assert calls[:2] == [True, True] and not any(calls[2:]) and len(calls) == info.num_fallbacks + 2


def test_fused_scan_falls_back_to_the_torch_settle_when_the_settle_kernel_fails(monkeypatch):
    from tfp_kernels.order import scan_triton

    if not triton_runs_on("cpu"):
        pytest.skip("CPU tensors in Triton need TRITON_INTERPRET=1")
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(scan_triton, "settle_pick", broken)
    emb, metric, window, _, start, k = CASES[0].values
    t = estimate_threshold(emb, metric=metric, quantile=0.05)
    ref = tfp_order_reference(emb, metric=metric, threshold=t, window=window, start=start)
    with pytest.warns(RuntimeWarning, match="float64 settle kernel failed") as record:
        path, info = fast_tfp_order(emb, metric=metric, threshold=t, window=window, max_rejections=None,
                                    start=start, k=k, fallback="triton", band_backend="torch")
    assert not any("tensor-core" in str(w.message) for w in record)
    assert torch.equal(path, ref) and info.num_fallbacks > 1 and calls == [1]  # tried once


def _shell(rows, scale=1.0):
    """Scaled basis vectors: every pair at squared distance exactly 2 scale^2."""
    return torch.eye(rows, rows + 3) * scale


def test_auto_list_length_counts_the_rows_near_the_threshold():
    from tfp_kernels.order.list_length import auto_list_length

    x = _shell(100, 3.0)
    sq = (x * x).sum(1)
    slack = torch.full((100,), 0.5, dtype=torch.float64)
    # every other row lies within the bound of t^2 = 18: c_90 = 99, 2 c_90 + 32 = 230 -> 256, capped
    assert auto_list_length(x, sq, 18.0, slack, settings=EngineSettings(auto_k_min_rows=1, auto_k_max=1024)) == 256
    assert auto_list_length(x, sq, 18.0, slack, settings=EngineSettings(auto_k_min_rows=1, auto_k_max=128)) == 128
    assert auto_list_length(x, sq, 18.0, slack, settings=EngineSettings(auto_k_min_rows=1)) == 128  # auto_k_max
    assert auto_list_length(x, sq, 18.0, slack, settings=EngineSettings(auto_k_min_rows=1, auto_k_base=512)) == 512  # never below the base
    # none within the bound (t^2 = 18 +- 1 with a bound of 0.5): 32 needed, the base stays
    assert auto_list_length(x, sq, 19.0, slack, settings=EngineSettings(auto_k_min_rows=1)) == 64
    assert auto_list_length(x, sq, 17.0, slack, settings=EngineSettings(auto_k_min_rows=1)) == 64
    # too few rows to estimate, or t = 0: the base
    assert auto_list_length(x, sq, 18.0, slack) == 64
    assert auto_list_length(x, sq, 0.0, slack, settings=EngineSettings(auto_k_min_rows=1)) == 64
    # 31 rows with 30 others near t^2, 69 rows with none: c_90 = 30, 2 c_90 + 32 = 92 -> 128
    y = _shell(100) * torch.cat([torch.full((31, 1), 3.0), torch.full((69, 1), 30.0)])
    y_sq = (y * y).sum(1)
    assert auto_list_length(y, y_sq, 18.0, slack, settings=EngineSettings(auto_k_min_rows=1)) == 128


def test_auto_list_length_raises_k_and_keeps_the_path():
    emb = clustered(600, 24, clusters=6, seed=5)
    t = estimate_threshold(emb, quantile=0.05)
    ref = tfp_order_reference(emb, threshold=t)
    _, stats = tfp_order(emb, threshold=t, return_stats=True)  # "auto" below auto_k_min_rows: the base
    assert stats.k == 64
    settings = EngineSettings(auto_k_min_rows=1, auto_k_base=8)
    path, stats = tfp_order(emb, threshold=t, k="auto", return_stats=True)
    assert stats.k > 8 and stats.k & (stats.k - 1) == 0
    assert check_path(emb, path, threshold=t).ok
    assert torch.equal(path, ref) or check_path(emb, path, threshold=t).tolerated_ties > 0
    with pytest.raises(ValueError, match="k must be 'auto' or a positive integer"):
        tfp_order(emb, k="big")
    with pytest.raises(ValueError, match="k must be 'auto' or a positive integer"):
        tfp_order(emb, k=0)


def test_host_table_copies_into_huge_page_memory_when_a_copy_is_made():
    x = torch.randn(300, 7, dtype=torch.float64)
    assert host_table(x).data_ptr() == x.data_ptr()  # host, same dtype: no copy
    small = host_table(x, torch.float32)  # a copy below the size limit: an ordinary one
    assert small.dtype == torch.float32 and torch.equal(small, x.float())
    big = host_table(x, torch.float32, min_bytes=1024)
    assert big.dtype == torch.float32 and big.is_contiguous() and big.shape == x.shape
    assert torch.equal(big, x.float()) and big.data_ptr() != x.data_ptr()
    big[0, 0] = 5.0  # writable, and its own memory
    assert x[0, 0] != 5.0
    forced = host_table(x[:, 1:4], huge_pages=True)  # a non-contiguous view, same dtype
    assert torch.equal(forced, x[:, 1:4]) and forced.is_contiguous()
    flags = host_table(torch.arange(10) % 3 == 0, huge_pages=True)
    assert flags.dtype == torch.bool and flags.tolist() == [i % 3 == 0 for i in range(10)]
    assert host_table(torch.empty(0, 4), torch.float64, huge_pages=True).shape == (0, 4)


def test_fast_path_with_huge_page_tables_matches():
    # every host table that is a copy (the float64 rows as float32 here; the lists, from their float32 s2 on)
    # in huge-page memory: the same path
    emb = clustered(700, 20, seed=9).double()
    t = estimate_threshold(emb, quantile=0.05)
    ref = tfp_order_reference(emb, threshold=t)
    path, info = fast_tfp_order(emb, settings=EngineSettings(huge_page_min_bytes=1), metric="l2", threshold=t,
                                window=4, max_rejections=None, start=0, k=8)
    assert torch.equal(path, ref) and info.num_fallbacks > 0


def test_crowded_lists_by_hand():
    from tfp_kernels.order.builders import crowded_lists

    # slack 1 (lists of t^2 = 10 hold s2 >= 9): an entry could decide if s2 < s2_K - 2 (surely closer than the rest)
    s2 = torch.tensor([[9.5, 10.2, 10.8, 11.0],  # all within twice the bound of the last: nothing decides
                       [12.0, 15.0, 20.0, 30.0],  # three entries could decide
                       [9.5, 10.2, float("inf"), float("inf")],  # not full: complete, decides by itself
                       [11.0, 11.5, 12.0, 13.5],  # 11.0 (< 13.5 - 2), not 11.5: one
                       [9.2, 9.8, 12.0, 13.0]])  # two (below t maybe, but they may be at >= t exactly)
    index = torch.tensor([[1, 2, 3, 4], [0, 2, 3, 4], [0, 1, -1, -1], [0, 1, 2, 3], [0, 1, 2, 3]], dtype=torch.int32)
    slack = torch.ones(5, dtype=torch.float64)
    assert crowded_lists(index, s2, slack, 10.0, room=1).tolist() == [True, False, False, False, False]
    assert crowded_lists(index, s2, slack, 10.0, room=2).tolist() == [True, False, False, True, False]
    assert crowded_lists(index, s2, slack, 10.0, room=3).tolist() == [True, False, False, True, True]
    assert crowded_lists(index, s2, slack, 10.0, room=4).tolist() == [True, True, False, True, True]


LONG_LIST_CASES = [0, 1, 2, 3, 7, 8, 9]  # the CASES without a cap


@pytest.mark.parametrize("case", LONG_LIST_CASES)
@pytest.mark.parametrize("band_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("fallback", ["host", "device"])
def test_long_lists_keep_the_path_exact(case, band_dtype, fallback):
    emb, metric, window, cap, start, k = CASES[case].values
    t = estimate_threshold(emb, metric=metric, quantile=0.05)
    ref = tfp_order_reference(emb, metric=metric, threshold=t, window=window, max_rejections=cap, start=start)
    path, info = fast_tfp_order(emb, metric=metric, threshold=t, window=window, max_rejections=cap, start=start,
                                k=k, fallback=fallback, band_backend="torch", band_dtype=band_dtype, long_lists=True)
    assert torch.equal(path, ref)
    n_lists = info.num_groups
    assert info.long_k == (min(4 * info.k, n_lists - 1) if min(4 * info.k, n_lists - 1) > info.k else 0)


@pytest.mark.parametrize("band_dtype", ["bfloat16", "float32"])
def test_long_lists_replace_crowded_lists_with_rebuilds(band_dtype):
    # bf16 lists (error bound ~1% of the squared norms) crowd around t everywhere: the long float64 lists decide
    # most of the steps their lists could not, through the rebuilds (which lengthen the rebuilt lists again)
    settings = EngineSettings(min_rebuild_nodes=64)
    emb = clustered(1500, 24, clusters=25, spread=0.3, seed=13)
    t = estimate_threshold(emb)
    ref = tfp_order_reference(emb, threshold=t)
    runs = {}
    for long_lists in (False, True):
        path, info = fast_tfp_order(emb, settings=settings, metric="l2", threshold=t, window=4, max_rejections=None, start=0, k=8,
                                    band_backend="torch", band_dtype=band_dtype, long_lists=long_lists)
        assert torch.equal(path, ref)
        runs[long_lists] = info
    assert runs[False].num_long_lists == 0 and runs[False].long_k == 0 and runs[False].time_long_s == 0
    assert runs[True].long_k == 32 and runs[True].time_long_s > 0
    if band_dtype == "bfloat16":
        assert runs[True].num_long_lists > 1500  # every list at the first build, more at the rebuilds
        assert runs[True].num_fallbacks < runs[False].num_fallbacks / 2
        assert runs[True].num_rebuilds > 0


def test_long_lists_auto_and_off_with_a_cap_or_zero_threshold():
    from tfp_kernels.order.band_topk import band_topk_rows

    emb = clustered(300, 24)
    t = estimate_threshold(emb)
    calls = []
    counting = Kernels(long_rows=lambda *a, **kw: calls.append(1) or band_topk_rows(*a, **kw))
    for kwargs in ({"threshold": t, "max_rejections": 5}, {"threshold": 0.0, "max_rejections": None}):
        ref = tfp_order_reference(emb, window=4, **kwargs)
        path, info = fast_tfp_order(emb, kernels=counting, metric="l2", window=4, start=0, k=8, band_dtype="bfloat16",
                                    band_backend="torch", long_lists=True, **kwargs)
        assert torch.equal(path, ref) and info.long_k == 0 and not calls
    # "auto": only from long_list_min_rows list rows
    _, info = fast_tfp_order(emb, kernels=counting, metric="l2", threshold=t, window=4, max_rejections=None, start=0, k=8,
                             band_dtype="bfloat16", band_backend="torch")
    assert info.long_k == 0 and not calls
    settings = EngineSettings(long_list_min_rows=100)
    path, info = fast_tfp_order(emb, kernels=counting, settings=settings, metric="l2", threshold=t, window=4, max_rejections=None, start=0, k=8,
                                band_dtype="bfloat16", band_backend="torch")
    assert info.long_k == 32 and info.num_long_lists > 0 and calls
    assert torch.equal(path, tfp_order_reference(emb, threshold=t))
    path, info = fast_tfp_order(emb, settings=settings, metric="l2", threshold=t, window=4, max_rejections=None, start=0, k=8,
                                band_dtype="float32", band_backend="torch")
    assert info.long_k == 32 and torch.equal(path, tfp_order_reference(emb, threshold=t))
    with pytest.raises(ValueError, match="long_lists must be"):
        fast_tfp_order(emb, metric="l2", threshold=t, window=4, max_rejections=None, start=0, k=8, long_lists="yes")


def test_walk_op_reads_long_lists_and_rejects_partial_ones():
    # one list row with a long list: the walk must take its entries (the band table's list is empty) and its
    # limit; without the long tables it cannot decide and returns for a scan at step 1
    emb = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 5.0], [9.0, 9.0]], dtype=torch.float64)
    n = 4
    band_index = torch.full((n, 1), -1, dtype=torch.int32)
    band_s2 = torch.full((n, 1), float("inf"))
    limit2 = torch.zeros(n, dtype=torch.float64)  # the band lists prove nothing
    limit2[0] = float("inf")  # row 0's long list is complete
    args = [emb, torch.empty(0, dtype=torch.float64), band_index, band_s2, limit2, torch.zeros(n, dtype=torch.float64),
            torch.zeros(n, dtype=torch.int32), torch.empty(0, dtype=torch.float16)]
    args += [torch.empty(0, dtype=torch.float64)] * 3
    long_row = torch.tensor([0, -1, -1, -1], dtype=torch.int32)
    long_index = torch.tensor([[1, 2, 3]], dtype=torch.int32)
    long_s2 = torch.tensor([[9.0, 25.0, 162.0]])
    long_slack = torch.zeros(1, dtype=torch.float64)

    def walk(*extra):
        path = torch.tensor([0, 0, 0, 0])
        visited = torch.tensor([True, False, False, False])
        step = torch.ops.tfp_kernels.tfp_walk(*args, path, visited, WalkCounters().tensor, 1, -1, 2.0, 4,
                                              -1, False, None, None, None, None, *extra)
        return step, path

    step, path = walk(long_row, long_index, long_s2, long_slack)
    assert step == 2 and path[1] == 1  # took node 1 from the long list, then row 1 could not decide
    assert walk()[0] == 1
    with pytest.raises(RuntimeError, match="pass all of long_row"):
        walk(long_row, long_index, long_s2, None)
    with pytest.raises(RuntimeError, match="long_row must have 4 entries"):
        walk(long_row[:2].contiguous(), long_index, long_s2, long_slack)
    with pytest.raises(RuntimeError, match="long_slack must have L = 1 entries"):
        walk(long_row, long_index, long_s2, torch.zeros(2, dtype=torch.float64))


def test_walk_op_stops_a_long_list_by_its_own_error_bound():
    # node 2 (exact s2 4) is listed after node 1 (9) with a stored s2 of 9.5: the walk looks at it only if the
    # list's bound allows an exact s2 below 9 (9.5 - slack < 9); the band tables' bound (slack[last]) is huge
    emb = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    n = 3
    limit2 = torch.full((n,), float("inf"), dtype=torch.float64)
    args = [emb, torch.empty(0, dtype=torch.float64), torch.full((n, 1), -1, dtype=torch.int32),
            torch.full((n, 1), float("inf")), limit2, torch.full((n,), 100.0, dtype=torch.float64),
            torch.zeros(n, dtype=torch.int32), torch.empty(0, dtype=torch.float16)]
    args += [torch.empty(0, dtype=torch.float64)] * 3
    tables = [torch.tensor([0, -1, -1], dtype=torch.int32), torch.tensor([[1, 2]], dtype=torch.int32),
              torch.tensor([[9.0, 9.5]])]
    picks = {}
    for slack in (1.0, 0.0):
        path = torch.zeros(n, dtype=torch.long)
        visited = torch.tensor([True, False, False])
        torch.ops.tfp_kernels.tfp_walk(*args, path, visited, WalkCounters().tensor, 1, 2, 2.0, 4, -1, False,
                                       None, None, None, None, *tables, torch.tensor([slack], dtype=torch.float64))
        picks[slack] = int(path[1])
    assert picks == {1.0: 2, 0.0: 1}


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("fallback", ["host", "device"])
def test_close_sets_keep_the_path_exact_with_fewer_cap_scans(metric, fallback):
    """With a cap that the lists' counts say could fire at many steps, the walk counts the unvisited members of
    those nodes' close sets instead: the same path as the reference (and as without the sets), fewer scans; the
    scans that remain at such steps, over the set and the list only where that decides, too."""
    emb = clustered(1200, 24, clusters=6, spread=0.6, seed=3)
    t = estimate_threshold(emb, metric=metric, quantile=0.05)
    ref = tfp_order_reference(emb, metric=metric, threshold=t, max_rejections=60)
    runs = {}
    for use in (True, False):
        path, info = fast_tfp_order(emb, metric=metric, threshold=t, window=4, max_rejections=60, start=0, k=8,
                                    fallback=fallback, band_backend="torch", use_close_sets=use)
        assert torch.equal(path, ref)
        runs[use] = info
    assert runs[False].num_close_sets == 0 and runs[True].num_close_sets > 0
    assert 0 < runs[False].num_cap_fallbacks <= runs[False].num_fallbacks
    assert runs[True].num_cap_fallbacks < runs[False].num_cap_fallbacks
    assert runs[True].num_fallbacks < runs[False].num_fallbacks
    # the scans at such steps pass over the set and the list where that decides (in the C++ walk, or from Python)
    assert runs[False].num_close_set_scans == 0
    assert 0 < runs[True].num_close_set_scans <= runs[True].num_fallbacks


def test_close_sets_within_their_budget():
    from tfp_kernels.order.builders import cap_close_sets

    emb = clustered(1200, 24, clusters=6, spread=0.6, seed=3)
    t = estimate_threshold(emb, quantile=0.05)
    ref = tfp_order_reference(emb, threshold=t, max_rejections=60)
    sets, num_sets = {}, {}
    kernels = Kernels(close_sets=lambda *a, **kw: sets.setdefault("out", cap_close_sets(*a, **kw)))
    for budget in (2, 0.05, 0):  # entries per list entry: all the nodes the cap concerns, some, none
        sets.clear()
        path, info = fast_tfp_order(emb, kernels=kernels, settings=EngineSettings(close_set_budget=budget), metric="l2", threshold=t, window=4, max_rejections=60, start=0, k=8,
                                    band_backend="torch")
        assert torch.equal(path, ref)
        if budget == 0:
            assert sets["out"] is None and info.num_close_sets == 0
            continue
        offsets, members = sets["out"]
        assert int(offsets[-1]) <= budget * 1200 * 8 and members.numel() == int(offsets[-1])
        assert info.num_close_sets == int((offsets.diff() > 0).sum()) > 0
        num_sets[budget] = info.num_close_sets
    assert num_sets[0.05] < num_sets[2]
    # no cap, or a cap no step can reach: no sets
    for cap in (None, 5000):
        sets.clear()
        fast_tfp_order(emb, kernels=kernels, metric="l2", threshold=t, window=4, max_rejections=cap, start=0, k=8,
                       band_backend="torch")
        assert not sets


@pytest.mark.parametrize("cap", [None, 3, 12])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_pick_among_candidates_and_a_bound(metric, cap):
    """scan.pick_among over part of the unvisited nodes with the bound of the others: exact_pick's node where it
    decides (always when the candidates are the nearest ones below the bound), None only where the pick might
    lie past the bound."""
    from tfp_kernels.order.distance import prepare
    from tfp_kernels.order.scan import exact_pick, pick_among, projection_basis

    g = torch.Generator().manual_seed(5)
    x64 = prepare(clustered(90, 6, clusters=3, seed=6).double(), metric, torch.float64)
    y64 = x64 @ projection_basis(x64)
    t = float(estimate_threshold(x64, metric=metric, quantile=0.2))
    decided = 0
    for trial in range(40):
        unvisited = torch.randperm(90, generator=g)[: int(torch.randint(20, 90, (1,), generator=g))].sort().values
        last, window_nodes = int(unvisited[0]), [int(v) for v in unvisited[1:3]]
        unvisited = unvisited[3:]
        capped = cap if cap is not None and unvisited.numel() > cap else None
        expected = exact_pick(x64, y64, unvisited, last, window_nodes, threshold=t, max_rejections=cap, metric=metric)
        s2 = (x64[unvisited] - x64[last]).square().sum(dim=1)
        keep = int(torch.randint(1, unvisited.numel() + 1, (1,), generator=g))
        # some candidates: the nearest ones and a few farther (so that nodes outside lie between them); the
        # bound: the nearest outside node's s2
        chosen = torch.argsort(s2)[:keep]
        chosen = torch.cat([chosen[: max(1, keep // 2)], chosen[keep // 2 :][torch.rand(keep - keep // 2,
                                                                                        generator=g) < 0.5]])
        outside = torch.ones(unvisited.numel(), dtype=torch.bool)
        outside[chosen] = False
        near = unvisited[chosen]
        bound = float(s2[outside].min()) if outside.any() else float("inf")
        got = pick_among(x64, near, bound, last, window_nodes, threshold=t, max_rejections=capped, metric=metric)
        if got is not None:
            decided += 1
            assert got == expected, trial
        if not outside.any() and (capped is not None or got is not None):
            assert got == expected  # every node a candidate: decided (c_0 aside, which needs nearest_if_none)
        assert pick_among(x64, unvisited, float("inf"), last, window_nodes, threshold=t, max_rejections=capped,
                          metric=metric, nearest_if_none=capped is None) == expected
    assert decided > 5


@pytest.mark.parametrize("case", ["first-valid-past-the-limit", "cap-rank-past-the-limit"])
def test_walk_op_scan_over_a_close_set_falls_back_past_the_list_limit(case):
    """The host scan over a close set and a list decides only picks nearer than the list's limit: node 4 lies
    outside both (legitimately: its squared distance 2.25 is past the limit 2.0) and is the rule's pick; the
    pass over set and list alone would take node 3 (its first valid node, past the limit) or node 6 (its node
    of rank M), so the walk must run the full scan."""
    from tfp_kernels.order.host_scan import half_scan_rows

    # 1-D nodes; last = node 0 at 0; t = 1
    pos = {0: 0.0, 1: 2.5, 2: 0.5, 3: 2.0, 4: -1.5, 5: 9.0, 6: 2.2, 7: -0.6}
    emb = torch.tensor([[pos[i]] for i in range(8)])
    n = emb.shape[0]
    if case == "first-valid-past-the-limit":  # window 1; nodes 2 and 7 closer than t; M = 3
        window, cap, first, members, close = 1, 3, [0], [2, 7], 2
        visited_nodes = [0, 1, 6]  # (node 1, 6 out of the way)
    else:  # window 2 (node 1 at 2.5 before last): nodes 3 and 6 invalid by it; M = 2
        window, cap, first, members, close = 2, 2, [1, 0], [2], 1
        visited_nodes = [0, 1, 7]
    band_index = torch.full((n, 2), -1, dtype=torch.int32)
    band_index[0] = torch.tensor([3, 6], dtype=torch.int32)
    band_s2 = torch.full((n, 2), float("inf"))
    band_s2[0] = torch.tensor([4.0, 4.84])
    limit2 = torch.zeros(n, dtype=torch.float64)
    limit2[0] = 2.0
    num_close = torch.zeros(n, dtype=torch.int32)
    num_close[0] = close
    offsets = torch.zeros(n + 1, dtype=torch.long)
    offsets[1:] = len(members)
    scan = half_scan_rows(emb)
    picks = {}
    for with_sets in (True, False):
        path = torch.zeros(n, dtype=torch.long)
        path[: len(first)] = torch.tensor(first)
        visited = torch.zeros(n, dtype=torch.bool)
        visited[visited_nodes] = True
        counter = WalkCounters().tensor
        sets = (offsets, torch.tensor(members, dtype=torch.int32)) if with_sets else (None, None)
        torch.ops.tfp_kernels.tfp_walk(
            emb, torch.empty(0, dtype=torch.float64), band_index, band_s2, limit2,
            torch.zeros(n, dtype=torch.float64), num_close, *scan, path, visited, counter, len(first),
            len(first) + 1, 1.0, window, cap, False, None, None, None, None, None, None, None, None, *sets)
        picks[with_sets] = int(path[len(first)])
        assert counter[3] == 0 and counter[1] == 1  # a step where the cap could fire, not settled by set + list
    assert picks == {True: 4, False: 4}


def test_walk_op_counts_unvisited_close_nodes_and_rejects_partial_close_sets():
    # node 0's count says 2 nodes lie closer than t: with K = 1 the cap of 2 could fire, so the walk returns for a
    # scan at step 1; its close set (nodes 1 and 2, both visited) shows none is left, and the list decides
    emb = torch.tensor([[0.0], [0.1], [0.2], [5.0], [9.0]], dtype=torch.float64)
    n = 5
    band_index = torch.tensor([[3], [-1], [-1], [-1], [-1]], dtype=torch.int32)
    band_s2 = torch.tensor([[25.0], [torch.inf], [torch.inf], [torch.inf], [torch.inf]])
    limit2 = torch.tensor([torch.inf, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    num_close = torch.tensor([2, 0, 0, 0, 0], dtype=torch.int32)
    args = [emb, torch.empty(0, dtype=torch.float64), band_index, band_s2, limit2, torch.zeros(n, dtype=torch.float64),
            num_close, torch.empty(0, dtype=torch.float16)]
    args += [torch.empty(0, dtype=torch.float64)] * 3

    def walk(*close):
        path = torch.zeros(n, dtype=torch.long)
        visited = torch.tensor([True, True, True, False, False])
        counter = WalkCounters().tensor
        step = torch.ops.tfp_kernels.tfp_walk(*args, path, visited, counter, 1, -1, 1.0, 4, 2, False,
                                              None, None, None, None, None, None, None, None, *close)
        return step, int(path[1]), counter.tolist()[:3]

    offsets = torch.tensor([0, 2, 2, 2, 2, 2])
    assert walk() == (1, 0, [0, 1, 0])  # returned at step 1, counted as a step where the cap could fire
    assert walk(offsets, torch.tensor([1, 2], dtype=torch.int32)) == (2, 3, [0, 0, 0])
    # a set with an unvisited member leaves the count at 1: 1 + K = 2, the cap could still fire
    assert walk(offsets, torch.tensor([1, 4], dtype=torch.int32))[0] == 1
    with pytest.raises(RuntimeError, match="pass both close_offsets and close_members"):
        walk(offsets, None)
    with pytest.raises(RuntimeError, match="close_offsets must have U \\+ 1 = 6 entries"):
        walk(offsets[:5].contiguous(), torch.tensor([1, 2], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="must run from 0 to close_members' 3 entries"):
        walk(offsets, torch.tensor([1, 2, 3], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="close_members must have dtype Int"):
        walk(offsets, torch.tensor([1, 2]))


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_long_lists_with_duplicate_groups(metric):
    # the long lists hold group ids like the band lists (one list per group, of the groups' representatives),
    # through rebuilds
    settings = EngineSettings(min_rebuild_nodes=64)
    emb = _with_duplicate_groups(500, 12, seed=5)
    t = estimate_threshold(emb, metric=metric)
    ref = tfp_order_reference(emb, metric=metric, threshold=t, start=3)
    path, info = fast_tfp_order(emb, settings=settings, metric=metric, threshold=t, window=4, max_rejections=None, start=3, k=8,
                                band_backend="torch", band_dtype="bfloat16", long_lists=True)
    assert info.num_groups < emb.shape[0] and info.num_long_lists > 0
    assert torch.equal(path, ref)


def test_long_lists_failure_warns_and_goes_on_without_them():
    # the long lists only save scans: a failure (say, out of device memory) warns once and turns them off
    settings = EngineSettings(min_rebuild_nodes=64)
    calls = []

    def fail(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("CUDA out of memory (simulated)")

    emb = clustered(1500, 24, clusters=25, spread=0.3, seed=13)
    t = estimate_threshold(emb)
    with pytest.warns(RuntimeWarning, match="long lists failed .*out of memory"):
        path, info = fast_tfp_order(emb, kernels=Kernels(long_rows=fail), settings=settings, metric="l2", threshold=t, window=4, max_rejections=None, start=0, k=8,
                                    band_backend="torch", band_dtype="bfloat16", long_lists=True)
    assert torch.equal(path, tfp_order_reference(emb, threshold=t))
    assert len(calls) == 1 and info.num_long_lists == 0 and info.num_rebuilds > 0


def test_walk_op_takes_exactly_the_six_named_counters():
    emb = torch.randn(4, 3)
    args = [emb, torch.empty(0, dtype=torch.float64), torch.zeros(4, 2, dtype=torch.int32), torch.zeros(4, 2),
            torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.int32),
            torch.empty(0, dtype=torch.float16), *[torch.empty(0, dtype=torch.float64)] * 3,
            torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.bool)]
    for bad in (torch.zeros(3, dtype=torch.long), torch.empty(0, dtype=torch.long), torch.zeros(6, dtype=torch.int32)):
        with pytest.raises(RuntimeError, match=r"counters must be a contiguous \(6,\) int64 tensor"):
            torch.ops.tfp_kernels.tfp_walk(*args, bad, 1, -1, 1.0, 4, -1, False)
