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
