"""Exact at every scale of input: the rows scaled by a power of two give the same path and the threshold times
that power of two; subnormal rows give the reference's path; ``check_path`` tolerances follow the rows' scale;
``window`` / ``max_rejections`` are checked as Python ints and capped at N - 1; ``requires_grad`` rows are
detached.

The rows are small integers over 16 (at most 7 significant bits, many exact ties and a few duplicate rows), so
that ``E * 2**k`` is exact in every dtype where it does not overflow or fall below the smallest subnormal: the
path and the threshold must then be *exactly* those of ``E``.
"""

import datetime
import functools
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist

from tfp_kernels import check_path, estimate_threshold, pack_gpu, tfp_order, tfp_order_reference
from tfp_kernels.order.inputs import SAFE_EXPONENT, THRESHOLD_CAP, prepare_rows, scale_exponent
from tfp_kernels.order.threshold import threshold_estimate

N, D = 37, 9  # N odd, not a multiple of any block


def grid_rows(n=N, d=D, seed=0) -> torch.Tensor:
    """(n, d) float64 multiples of 1/16 in [-4, 4], no zero row, rows 5 and 11 copies of row 2 (duplicates)."""
    g = torch.Generator().manual_seed(seed)
    e = torch.randint(-64, 65, (n, d), generator=g).double() / 16
    e[:, 0] += (e.abs().sum(dim=1) == 0).double()  # (no all-zero row: cosine)
    if n > 11:
        e[5] = e[2]
        e[11] = e[2]
    return e


#: tfp_order's engines that run on the CPU (the default backend, the reference, the device scans, the bf16 split
#: lists, K = 2 lists so that most steps go to the C++ host scan's float16 pass), the cap and the spread policy
CONFIGS = [
    {},
    {"backend": "reference"},
    {"fallback": "device"},
    {"band_dtype": "bfloat16x3"},
    {"k": 2, "fallback": "host"},
    {"max_rejections": 3},
    {"policy": "spread"},
]
#: (dtype, exponent): the scales of the issue (1e-40 ~ 2**-133: float32 subnormals; 1e-300 ~ 2**-997; 1e19 ~ 2**63:
#: float32 squared norms overflow; 1e40 ~ 2**133) where representable, and scales the rows are used at unscaled
#: (2**-20, 2**8) or where the 16-bit dtypes are subnormal (float16 2**-20; bfloat16 2**-128)
CASES = [(torch.float32, k) for k in (-133, 63, -20)] + [(torch.float64, k) for k in (-133, -997, 63, 133)]
CASES += [(torch.float16, k) for k in (-20, 8)] + [(torch.bfloat16, k) for k in (-128, 63)]


def scaled(e64: torch.Tensor, exponent: int, dtype: torch.dtype):
    """``(e64 * 2**exponent).to(dtype)`` and whether that is exact (False: some entry rounded, overflowed or
    vanished); None when the result is not finite."""
    x = e64
    for part in (exponent // 2, exponent - exponent // 2):  # (2**1000 alone would not fit a float64 scalar)
        x = x * math.ldexp(1.0, part)
    out = x.to(dtype)
    if not bool(torch.isfinite(out).all()):
        return None, False
    return out, bool(torch.equal(out.double(), x))


@functools.lru_cache(maxsize=None)
def at_scale_one(dtype, metric, config_index, threshold=None):
    """The path of the unscaled rows (cached: every exponent compares with it)."""
    return tfp_order(grid_rows().to(dtype), metric=metric, threshold=threshold, **CONFIGS[config_index])


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype, exponent", CASES, ids=str)
def test_path_and_threshold_invariant_to_power_of_two(exponent, dtype, metric):
    e = grid_rows().to(dtype)
    x, exact = scaled(grid_rows(), exponent, dtype)
    assert x is not None and exact
    factor = math.ldexp(1.0, exponent) if metric == "l2" else 1.0
    t = estimate_threshold(e, metric=metric)
    assert t > 0
    assert estimate_threshold(x, metric=metric) == t * factor  # exactly
    for how in ("bounds", "all"):
        assert threshold_estimate(x, metric=metric, exact_method=how).value == t * factor
    sampled = threshold_estimate(x, metric=metric, sample_pairs=100, seed=3)  # (666 pairs: sampled)
    assert not sampled.exact
    assert sampled.value == threshold_estimate(e, metric=metric, sample_pairs=100, seed=3).value * factor
    reference = tfp_order_reference(x, metric=metric)
    assert torch.equal(reference, at_scale_one(dtype, metric, 1))
    wide = dtype in (torch.float32, torch.float64)  # (every engine; the 16-bit dtypes: default and reference)
    for i, config in enumerate(CONFIGS if wide else CONFIGS[:2]):
        path, stats = tfp_order(x, metric=metric, return_stats=True, **config)
        assert torch.equal(path, at_scale_one(dtype, metric, i)), config
        assert stats.threshold == t * factor, config
        if "max_rejections" not in config and "policy" not in config:
            assert torch.equal(path, reference), config
    given = tfp_order(x, metric=metric, threshold=0.75 * t * factor, return_stats=True)
    assert torch.equal(given[0], at_scale_one(dtype, metric, 0, 0.75 * t))
    assert given[1].threshold == 0.75 * t * factor and given[1].threshold_source == "given"
    assert check_path(x, reference, threshold=t * factor, metric=metric)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype, exponent", [(torch.float32, -133), (torch.float32, -140), (torch.float64, -1060),
                                             (torch.bfloat16, -128), (torch.float16, -20)], ids=str)
def test_subnormal_rows_give_the_reference_path(dtype, exponent, metric):
    """Full-precision rows scaled into the subnormals lose low bits: the path of those rows is the exact
    reference's, from every engine; the threshold is the reference's (before: 57% farther at step 1)."""
    g = torch.Generator().manual_seed(1)
    e = torch.randn(N, D, generator=g, dtype=torch.float64)
    x = (e * math.ldexp(1.0, exponent // 2) * math.ldexp(1.0, exponent - exponent // 2)).to(dtype)
    assert bool((x.abs() < torch.finfo(dtype).tiny).any()) and bool((x != 0).any(dim=1).all())
    reference, ref_stats = tfp_order_reference(x, metric=metric, return_stats=True)
    assert ref_stats.threshold > 0
    assert check_path(x, reference, threshold=ref_stats.threshold, metric=metric)
    for config in CONFIGS[2:5]:
        path, stats = tfp_order(x, metric=metric, return_stats=True, **config)
        assert torch.equal(path, reference), config
        assert stats.threshold == ref_stats.threshold


@pytest.mark.parametrize("n", [1, 2, 3])
def test_tiny_n_at_extreme_scales(n):
    for exponent in (-1000, 140):
        x, _ = scaled(grid_rows(n=n, d=4), exponent, torch.float64)
        for fn in (tfp_order, tfp_order_reference):
            assert fn(x).tolist() == fn(grid_rows(n=n, d=4)).tolist()


def test_scale_exponent_and_prepare_rows():
    assert scale_exponent(0.0) == 0
    assert scale_exponent(1.0) == scale_exponent(2.0**SAFE_EXPONENT) == scale_exponent(2.0**-SAFE_EXPONENT) == 0
    assert scale_exponent(2.0**-SAFE_EXPONENT * 0.75) == SAFE_EXPONENT  # (0.75 * 2**-20) * 2**20 in [0.5, 1)
    assert scale_exponent(2.0**SAFE_EXPONENT * 3) == -(SAFE_EXPONENT + 2)
    e = grid_rows()
    first = None
    for exponent in (-1060, -133, 63, 133, 1000):
        x, exact = scaled(e, exponent, torch.float64)
        assert exact
        rows = prepare_rows(x, "l2")
        first = rows.rows if first is None else first
        assert torch.equal(rows.rows, first)  # the same rows, bit for bit, from every scale
        assert 0.5 <= float(rows.rows.abs().max()) < 1
        d = math.ldexp(1.5, -rows.exponent - 3)  # a distance of the embeddings, 0.1875 in the rows' units
        assert rows.to_rows_units(d) == 0.1875 and rows.to_user_units(0.1875) == d
        assert rows.to_rows_units(None) is None and rows.to_rows_units(0.0) == 0.0
        if rows.exponent > -960:  # 2**60 in the rows' units: clamped (above every distance either way)
            assert rows.to_rows_units(math.ldexp(1.0, 60 - rows.exponent)) == THRESHOLD_CAP
        assert rows.to_rows_units(5e-324) > 0  # (a positive threshold never becomes 0: duplicates stay invalid)
    plain = prepare_rows(e, "l2")
    assert plain.exponent == 0 and plain.rows.data_ptr() == e.data_ptr()  # ordinary rows: no copy


def test_cosine_row_too_small_for_float64_is_refused():
    e = grid_rows()
    e[3] *= 2.0**-600
    with pytest.raises(ValueError, match=r"row 3 is more than 2\*\*480 times smaller"):
        tfp_order(e, metric="cosine")
    assert tfp_order(e).shape == (N,)  # (l2: fine)


def test_check_path_tolerance_is_relative_to_the_rows():
    """A random order of rows scaled by 1e-7 is refused as at scale 1 (the absolute atol=1e-6 accepted it),
    and so is a path whose step 1 takes a farther node at 1e-40 (the fast path's old error)."""
    g = torch.Generator().manual_seed(2)
    e = torch.randn(60, 8, generator=g, dtype=torch.float64)
    t = estimate_threshold(e)
    shuffled = torch.randperm(60, generator=g)
    for scale in (1.0, 1e-7, 1e-40, 1e-300, 1e40):
        assert not check_path(e * scale, shuffled, threshold=t * scale), scale
    path = tfp_order(e, threshold=t)
    wrong = path.clone()
    wrong[1], wrong[2] = path[2], path[1]
    for dtype, scale in ((torch.float64, 1.0), (torch.float32, 1e-40), (torch.float64, 1e-7), (torch.float64, 1e40)):
        x = (e * scale).to(dtype)
        t_x = estimate_threshold(x)
        good = tfp_order(x, threshold=t_x)
        assert check_path(x, good, threshold=t_x)
        bad = good.clone()
        bad[1], bad[2] = good[2], good[1]
        result = check_path(x, bad, threshold=t_x)
        assert not result and result.first_bad_step == 1, (dtype, scale)
        assert f"threshold {t_x:.6g}" in result.message  # (in the embeddings' units)
    assert not check_path(e * 1e-7, wrong, threshold=t * 1e-7)
    # an explicit atol is in the embeddings' distance units: 1e-6 then explains every difference at 1e-7
    assert check_path(e * 1e-7, wrong, threshold=t * 1e-7, atol=1e-6)


def test_window_and_cap_capped_at_n_minus_one():
    e = grid_rows()
    n = N
    for fn in (tfp_order, tfp_order_reference):
        full = fn(e, window=n - 1)
        for window in (n, 10**12, 2**64, np.int64(10**12), np.uint64(2**63)):
            assert torch.equal(fn(e, window=window), full), (fn, window)
        uncapped = fn(e)
        for cap in (n - 1, n, 2**64, np.int64(10**15)):
            assert torch.equal(fn(e, max_rejections=cap), uncapped), (fn, cap)
        assert fn(e, max_rejections=np.int32(0)).shape == (n,)
        assert fn(e[:1], window=2**64, max_rejections=2**64).tolist() == [0]
    t = estimate_threshold(e)
    path = tfp_order(e, threshold=t, window=n - 1)
    assert check_path(e, path, threshold=t, window=2**64)
    assert check_path(e, tfp_order(e, threshold=t), threshold=t, max_rejections=2**70)
    g = torch.Generator().manual_seed(4)
    big = torch.randn(151, 6, generator=g)
    t = estimate_threshold(big)
    assert check_path(big, tfp_order(big, threshold=t, window=150), threshold=t, window=30_000)  # (N = 300: was 183 s)


@pytest.mark.parametrize("fn", [tfp_order, tfp_order_reference])
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"window": True}, r"window must be an integer >= 1"),
        ({"window": -(2**64)}, r"window must be an integer >= 1"),
        ({"window": 0}, r"window must be an integer >= 1"),
        ({"window": 4.0}, r"window must be an integer >= 1"),
        ({"max_rejections": False}, r"max_rejections must be None \(no cap\) or an integer >= 0"),
        ({"max_rejections": -1}, r"max_rejections must be None"),
        ({"max_rejections": -(2**70)}, r"max_rejections must be None"),
        ({"max_rejections": 2**64, "policy": "spread"}, r"policy='spread' takes no rejection cap"),
    ],
)
def test_bad_window_and_cap(fn, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fn(grid_rows(), **kwargs)
    with pytest.raises(ValueError, match=match):
        check_path(grid_rows(), torch.arange(N), threshold=1.0, **kwargs)


def test_requires_grad_rows_are_detached():
    e = grid_rows().float()
    x = e.clone().requires_grad_(True)
    t = estimate_threshold(e)
    assert estimate_threshold(x) == t
    for fn in (tfp_order, tfp_order_reference):
        path = fn(x)
        assert not path.requires_grad and torch.equal(path, fn(e))
    assert check_path(x, tfp_order(e, threshold=t), threshold=t)
    y = (x * 1e-40).float()  # a non-leaf with a graph, scaled by the engines
    assert torch.equal(tfp_order(y), tfp_order(e * 1e-40))
    assert x.grad is None
    samples = [torch.arange(int(n)) + 1 for n in torch.randint(1, 20, (N,), generator=torch.Generator().manual_seed(0))]
    batch = pack_gpu(samples, max_len=64, embeddings=x, window=2**64, threshold=t)
    assert torch.equal(batch.order, tfp_order(e, threshold=t, window=N - 1, policy="spread"))


def test_sharded_entry_scales_and_caps(tmp_path):
    """The sharded entry (one gloo rank in this process): rows at 1e-300, window 2**64, requires_grad."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=30))
    try:
        e = grid_rows()
        x, exact = scaled(e, -997, torch.float64)
        assert exact
        path, stats = tfp_order(x.requires_grad_(), group=dist.group.WORLD, return_stats=True, window=2**64)
        assert torch.equal(path, tfp_order(e, window=N - 1))
        assert stats.threshold == estimate_threshold(e) * 2.0**-997
        given = tfp_order(x, group=dist.group.WORLD, threshold=estimate_threshold(x), max_rejections=2**64)
        assert torch.equal(given, tfp_order(e))
    finally:
        dist.destroy_process_group()


def test_count_forced_steps_at_extreme_scales():
    from tfp_kernels.order.policy import count_forced_steps

    e = grid_rows()
    t = estimate_threshold(e)
    path = tfp_order(e, threshold=t, window=6)  # (window 6 here, 9 in the count: some steps are forced)
    expected = count_forced_steps(e, path, threshold=t, window=9, metric="l2")
    assert expected[0] > 0
    for exponent in (-1000, -133, 133):
        x, exact = scaled(e, exponent, torch.float64)
        assert exact
        assert count_forced_steps(x, path, threshold=t * 2.0**exponent, window=9, metric="l2") == expected
