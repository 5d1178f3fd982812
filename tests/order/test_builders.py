"""The list builders (tfp_kernels/order/builders.py) against the plain-torch band lists, without the walk."""

import pytest
import torch

from tfp_kernels.order.band_topk import band_bounds, band_topk_reference, band_topk_rows
from tfp_kernels.order.builders import (
    BandListBuilder,
    BuiltLists,
    ListRows,
    ListTables,
    LongListBuilder,
    band_lists,
    crowded_lists,
    global_ids,
)
from tfp_kernels.order.options import EngineSettings


def grid_rows(n: int, d: int, seed: int) -> torch.Tensor:
    """Rows of small integers: every float32 product and squared distance is exact, so the fast lists and the
    float64 reference must agree entry for entry (ties broken by index in both)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 4, (n, d), generator=g).float()


def list_rows(x: torch.Tensor, t2: float) -> ListRows:
    sq = x.double().square().sum(1).float()
    return ListRows.of(x, sq, sq.double() + sq.max().double(), t2, "torch", torch.float32)


@pytest.mark.parametrize("n, d, k", [(1, 3, 1), (2, 5, 4), (37, 7, 5), (130, 9, 16)])
def test_band_list_builder_equals_the_reference(n, d, k):
    x = grid_rows(n, d, seed=n)
    rows = list_rows(x, t2=6.0)
    k = min(k, max(n - 1, 1))
    built = BandListBuilder(rows, k).build(None)
    ref = band_topk_reference(x, rows.lower, rows.upper, k)
    assert isinstance(built, BuiltLists) and built.long is None
    assert built.index.device.type == "cpu" and built.index.dtype == torch.int32
    assert torch.equal(built.index, ref.index) and torch.equal(built.s2, ref.s2)
    assert torch.equal(built.num_close, ref.num_close)
    assert built.limit2.dtype == torch.float64 and built.limit2.shape == (n,)


def test_rebuild_lists_subset_among_itself_with_global_ids_and_padding():
    x = grid_rows(60, 7, seed=3)
    rows = list_rows(x, t2=5.0)
    builder = BandListBuilder(rows, 8)
    subset = torch.tensor([2, 5, 6, 11, 40, 59])  # 6 rows: lists of 5 entries, padded to K = 8
    built = builder.build(subset)
    ref = band_topk_reference(x[subset], rows.lower[subset], rows.upper[subset], 5)
    assert built.index.shape == (6, 8) and (built.index[:, 5:] == -1).all() and torch.isinf(built.s2[:, 5:]).all()
    assert torch.equal(built.index[:, :5], global_ids(ref.index, subset))
    assert torch.equal(built.s2[:, :5], ref.s2)


def test_first_build_falls_back_from_a_failing_triton_kernel_to_torch():
    x = grid_rows(40, 5, seed=1)
    sq = x.square().sum(1)
    rows = ListRows.of(x, sq, sq.double() + sq.max().double(), 4.0, "triton", "float16x3")
    calls = []

    def kernel(x32, sq_norms, lower, upper, k, backend, dtype, progress, schedule):
        calls.append((backend, dtype, schedule))
        if backend == "triton":
            raise RuntimeError("PassManager::run failed\nmore")
        return band_lists(x32, sq_norms, lower, upper, k, backend, dtype, progress, schedule)

    builder = BandListBuilder(rows, 6, band_kernel=kernel, settings=EngineSettings(band_schedule="pairs"))
    with pytest.warns(RuntimeWarning, match=r"Triton band kernel failed .*PassManager::run failed\); using the blockwise"):
        built = builder.build_all(may_fall_back=True)
    assert calls == [("triton", "float16x3", "pairs"), ("torch", torch.float32, "pairs")]
    assert builder.backend == "torch" and builder.rows.dtype == torch.float32
    # the fallback's bound is float32's (wider than the split's), and so are its lists
    assert torch.equal(builder.rows.slack, list_rows(x, 4.0).slack)
    ref = band_topk_reference(x, builder.rows.lower, builder.rows.upper, 6)
    assert torch.equal(built.index, ref.index)
    # a backend the user asked for: the failure is raised
    with pytest.raises(RuntimeError, match="PassManager"):
        BandListBuilder(rows, 6, band_kernel=kernel).build_all(may_fall_back=False)


def test_long_lists_of_the_crowded_rows_equal_longer_reference_lists():
    # rows all at the same distance from one another (scaled basis vectors): every list is crowded at t^2 = 2
    x = torch.eye(30, 33) * 1.0
    rows = list_rows(x, t2=2.0)
    long = LongListBuilder(rows, 16, float64_rows=x.double())
    builder = BandListBuilder(rows, 4, long=long)
    built = builder.build(None)
    assert built.long is not None and built.long.where.tolist() == list(range(30))
    lower, upper = band_bounds(2.0, built.long.slack)
    ref = band_topk_reference(x.double(), lower, upper, 16)
    assert torch.equal(built.long.index, ref.index)
    assert built.long.limit2.shape == (30,) and built.long.slack.dtype == torch.float64
    tables = ListTables(built, long_k=16)
    assert tables.num_long_lists == 30 and torch.equal(tables.limit2, built.long.limit2)
    assert tables.long.tables[0].tolist() == list(range(30))


def test_long_lists_failure_warns_once_and_turns_them_off():
    x = torch.eye(20, 21)
    rows = list_rows(x, t2=2.0)
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("CUDA out of memory (simulated)")

    long = LongListBuilder(rows, 12, float64_rows=None, rows_kernel=failing)
    builder = BandListBuilder(rows, 4, long=long)
    with pytest.warns(RuntimeWarning, match="long lists failed .*out of memory"):
        first = builder.build(None)
    second = builder.build(torch.arange(10))
    assert first.long is None and second.long is None and long.failed and calls == [1]


def test_list_tables_install_a_rebuild_in_place():
    x = grid_rows(50, 6, seed=7)
    rows = list_rows(x, t2=5.0)
    builder = BandListBuilder(rows, 6)
    tables = ListTables(builder.build(None), long_k=None)
    index = tables.index  # the walk holds these very tensors
    subset = torch.tensor([0, 3, 4, 20, 49])
    tables.install(subset, builder.build(subset))
    assert tables.index is index
    assert set(index[subset][index[subset] >= 0].tolist()) <= set(subset.tolist())
    assert torch.equal(index[1], builder.build(None).index[1])  # the other rows keep theirs


def test_crowded_lists_need_full_lists():
    index = torch.tensor([[1, 2, 3], [1, 2, -1]], dtype=torch.int32)
    s2 = torch.tensor([[10.0, 10.1, 10.2], [10.0, 10.1, float("inf")]])
    slack = torch.tensor([1.0, 1.0], dtype=torch.float64)
    assert crowded_lists(index, s2, slack, 10.0, room=4).tolist() == [True, False]
    assert crowded_lists(index, s2, slack, 10.0, room=0).tolist() == [False, False]


def test_band_topk_rows_is_the_long_lists_default_kernel():
    x = grid_rows(25, 5, seed=2)
    rows = list_rows(x, 4.0)
    assert LongListBuilder(rows, 8, float64_rows=None).rows_kernel is band_topk_rows
