"""The host scan's float16 rows and their error bound (tfp_kernels.order.host_scan), and the C++ scan's
versions (AVX-512, AVX2, portable) against the reference path."""

import pytest
import torch

from tfp_kernels import has_extension, tfp_order_reference
from tfp_kernels.order.host_scan import half_scan_error_coef, half_scan_rows


def _pass_s2(scan, x32, i, j):
    """The scan pass's squared distance of rows i and j, as the C++ pass forms it (float16 row i times float32
    row j, float32 accumulation, norms and scale in double)."""
    dot = (scan.rows[i].float() * x32[j]).sum(dtype=torch.float32)
    s2 = scan.sq_norms[i] + scan.sq_norms[j] - 2.0 * scan.scale[i] * dot.double()
    return s2.clamp(min=0.0)


def _exact_s2(x32, i, j):
    return (x32[i].double() - x32[j].double()).square().sum()


def test_rows_are_scaled_into_float16s_normal_range():
    x = torch.tensor([[3.0, -0.5, 1e-9], [0.0, 0.0, 0.0], [1e30, 2e29, 0.0], [1e-35, -3e-36, 0.0]])
    scan = half_scan_rows(x)
    assert scan.rows.dtype == torch.float16 and scan.scale.dtype == torch.float64
    largest = scan.rows.float().abs().amax(dim=1)
    assert bool(((largest >= 2**14) & (largest < 2**15))[[0, 2]].all()) and float(largest[1]) == 0.0
    # rows below 2^-100 keep the scale 2^-114 (finite float32 multipliers); their entries stay exact or subnormal
    assert float(scan.scale[3]) == 2.0**-114 and float(largest[3]) < 2**14
    assert bool((torch.log2(scan.scale) == torch.log2(scan.scale).round()).all())  # powers of two
    back = scan.rows.double() * scan.scale[:, None]
    assert bool(((back - x.double()).abs() <= 2**-11 * x.double().abs() + 2**-25 * scan.scale[:, None]).all())
    assert torch.equal(scan.sq_norms, x.double().square().sum(dim=1))


def test_bound_holds_where_the_rounding_errors_add_up():
    """Entries just below the midpoint between 1 and the next float16 all round down by ~2^-11 relative: the
    pass's error of a row against itself is ~91% of the bound (a bound using 2^-12 for float16 fails here)."""
    d = 257
    value = 1.0 + 2.0**-11 - 2.0**-20
    x = torch.full((2, d), value)
    x[1, ::2] = -value
    scan = half_scan_rows(x)
    for i in range(2):
        err = float((_pass_s2(scan, x, i, i) - _exact_s2(x, i, i)).abs())
        assert err <= float(scan.slack[i])
        assert err > 0.85 * half_scan_error_coef(d) * 2 * float(scan.sq_norms[i])


@pytest.mark.parametrize("d", [1, 7, 100, 768])
def test_bound_holds_on_rows_of_any_magnitude(d):
    g = torch.Generator().manual_seed(d)
    n = 40
    magnitudes = torch.logspace(-30, 30, n).float()
    x = torch.randn(n, d, generator=g) * magnitudes[:, None]
    x[::5] *= torch.logspace(-12, 0, d).float()  # entries deep in float16's subnormal range after scaling
    x[3] = 0.0
    scan = half_scan_rows(x)
    for i in range(n):
        for j in range(n):
            err = float((_pass_s2(scan, x, i, j) - _exact_s2(x, i, j)).abs())
            assert err <= float(scan.slack[i]) and err <= float(scan.slack[j]), (i, j)


@pytest.mark.skipif(not has_extension(), reason="needs tfp_kernels._C")
@pytest.mark.parametrize("isa", ["avx512", "avx2", "portable"])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_every_scan_version_gives_the_reference_path(isa, metric, monkeypatch):
    """Each version of the pass the CPU can run (TFP_KERNELS_SCAN_ISA caps the choice; a CPU without the
    ISA runs the next one down), on K = 1 lists so that most steps scan, with D not a multiple of 16."""
    from tests.order.engine_options import fast_tfp_order
    from tfp_kernels.order.threshold import estimate_threshold

    monkeypatch.setenv("TFP_KERNELS_SCAN_ISA", isa)
    g = torch.Generator().manual_seed(5)
    emb = torch.randn(150, 37, generator=g) * 1e-3
    t = estimate_threshold(emb, metric=metric, quantile=0.1)
    for cap in (None, 3):
        path, info = fast_tfp_order(emb, metric=metric, threshold=t, window=4, max_rejections=cap, start=0, k=1,
                                    fallback="host", band_backend="torch", group_duplicates=False)
        assert info.num_fallbacks > 0
        ref = tfp_order_reference(emb, metric=metric, threshold=t, window=4, max_rejections=cap)
        assert torch.equal(path, ref), (isa, cap)


@pytest.mark.skipif(not has_extension(), reason="needs tfp_kernels._C")
def test_unknown_scan_isa_is_refused(monkeypatch):
    from tests.order.engine_options import fast_tfp_order

    monkeypatch.setenv("TFP_KERNELS_SCAN_ISA", "sse9")
    with pytest.raises(RuntimeError, match="TFP_KERNELS_SCAN_ISA must be"):
        fast_tfp_order(torch.randn(30, 4), metric="l2", threshold=0.5, window=4, max_rejections=None, start=0, k=1,
                       fallback="host", group_duplicates=False)


def test_rows_converted_by_chunks_equal_one_pass(monkeypatch):
    import tfp_kernels.order.float16_rows as float16_rows
    import tfp_kernels.order.host_scan as host_scan

    x = torch.randn(1000, 7, generator=torch.Generator().manual_seed(2)) * torch.logspace(-5, 5, 1000)[:, None]
    whole = host_scan.half_scan_rows(x)
    monkeypatch.setattr(host_scan, "_CHUNK_ROWS", 33)
    monkeypatch.setattr(float16_rows, "_CHUNK_ROWS", 33)  # (the float16 rows, converted in float16_rows)
    chunked = host_scan.half_scan_rows(x)
    assert all(torch.equal(a, b) for a, b in zip(whole, chunked))
    assert host_scan.half_scan_rows(torch.zeros(0, 4)).rows.shape == (0, 4)
