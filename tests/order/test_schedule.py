"""The list-rebuild rule of the walk (tfp_kernels.order.schedule)."""

import pytest

from tfp_kernels.order.schedule import MIN_REBUILD_NODES, NODES_PER_SCANNED_ROW, RebuildSchedule


def test_rebuild_when_scanned_rows_reach_the_price():
    s = RebuildSchedule(100_000)
    remaining = 40_000
    price = remaining * remaining // NODES_PER_SCANNED_ROW  # 25,000,000 rows = 625 scans of 40,000 rows
    assert s.price(remaining) == price
    s.record(624, remaining)
    assert not s.due(remaining)
    s.record(1, remaining)
    assert s.due(remaining)
    s.rebuilt()
    assert s.rent == 0 and not s.due(remaining)


def test_rent_is_counted_against_the_rows_left_at_each_scan():
    s = RebuildSchedule(100_000)
    s.record(10, 50_000)
    s.record(10, 10_000)
    assert s.rent == 600_000
    # the price falls with the square of the rows left: the same rent buys a rebuild later in the walk
    assert not s.due(10_000) and s.rent < s.price(10_000)
    assert s.due(6_000)


@pytest.mark.parametrize("n, remaining", [(MIN_REBUILD_NODES - 1, 600), (50_000, MIN_REBUILD_NODES // 2 - 1)])
def test_no_rebuild_for_small_walks_or_few_rows_left(n, remaining):
    s = RebuildSchedule(n)
    s.record(10**9, remaining)
    assert not s.due(remaining)


def test_disabled_and_chunk():
    s = RebuildSchedule(1_000_000, enabled=False)
    s.record(10**9, 500_000)
    assert not s.due(500_000)
    assert RebuildSchedule(1_000_000).chunk == 3906 and RebuildSchedule(1000).chunk == 256


def test_cap_may_fire_is_the_walks_test():
    from tfp_kernels.order.schedule import cap_may_fire

    assert not cap_may_fire(None, 10**6, 10**6, 64)
    assert not cap_may_fire(100, 100, 90, 64)  # not more unvisited nodes than the cap
    assert cap_may_fire(100, 101, 36, 64) and not cap_may_fire(100, 101, 35, 64)


def test_walk_counts_the_scans_where_the_cap_could_fire(monkeypatch):
    import torch

    from tfp_kernels import has_extension
    from tfp_kernels.order.fast import fast_tfp_order

    if not has_extension():
        pytest.skip("needs tfp_kernels._C")
    ops = torch.ops.tfp_kernels
    counters = []

    class Spy:  # torch.ops.tfp_kernels, keeping the counter tensor the walk is given
        def __getattr__(self, name):
            return getattr(ops, name)

        @staticmethod
        def tfp_walk(*args):
            counters.append(args[10])
            return ops.tfp_walk(*args)

    monkeypatch.setattr(torch.ops, "tfp_kernels", Spy())
    emb = torch.randn(300, 6, generator=torch.Generator().manual_seed(0))
    fast_tfp_order(emb, metric="l2", threshold=1.0, window=4, max_rejections=5, start=0, k=4, fallback="host")
    capped = counters[-1].tolist()
    fast_tfp_order(emb, metric="l2", threshold=1.0, window=4, max_rejections=None, start=0, k=4, fallback="host")
    uncapped = counters[-1].tolist()
    monkeypatch.undo()
    # a cap of 5 with lists of 4: the cap can fire at every step with more than 5 unvisited nodes and one close
    assert 0 < capped[1] <= capped[0]
    assert uncapped[1] == 0 and uncapped[0] >= 0
