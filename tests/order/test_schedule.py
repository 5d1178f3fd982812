"""The list-rebuild rule of the walk (tfp_kernels.order.schedule)."""

import pytest

from tfp_kernels.order.options import DEFAULT_SETTINGS
from tfp_kernels.order.schedule import RebuildSchedule

MIN_REBUILD_NODES = DEFAULT_SETTINGS.min_rebuild_nodes
NODES_PER_SCANNED_ROW = DEFAULT_SETTINGS.nodes_per_scanned_row


def test_rebuild_when_scanned_rows_reach_the_price():
    s = RebuildSchedule(100_000)
    remaining = 40_000
    price = remaining * remaining // NODES_PER_SCANNED_ROW  # 25,000,000 rows = 625 scans of 40,000 rows
    assert s.price(remaining) == price
    s.record(624 * 64, 64, remaining)  # 624 scans with dead lists of 64 entries
    assert not s.due(remaining)
    s.record(64, 64, remaining)
    assert s.due(remaining)
    s.rebuilt()
    assert s.rent == 0 and not s.due(remaining)


def test_rent_is_counted_against_the_rows_left_at_each_scan():
    s = RebuildSchedule(100_000)
    s.record(10 * 64, 64, 50_000)
    s.record(10 * 64, 64, 10_000)
    assert s.rent == 600_000
    # the price falls with the square of the rows left: the same rent buys a rebuild later in the walk
    assert not s.due(10_000) and s.rent < s.price(10_000)
    assert s.due(6_000)


@pytest.mark.parametrize("n, remaining", [(MIN_REBUILD_NODES - 1, 600), (50_000, MIN_REBUILD_NODES // 2 - 1)])
def test_no_rebuild_for_small_walks_or_few_rows_left(n, remaining):
    s = RebuildSchedule(n)
    s.record(10**9, 1, remaining)
    assert not s.due(remaining)


def test_disabled_and_chunk():
    s = RebuildSchedule(1_000_000, enabled=False)
    s.record(10**9, 1, 500_000)
    assert not s.due(500_000)
    assert RebuildSchedule(1_000_000).chunk == 3906 and RebuildSchedule(1000).chunk == 256


def test_scans_count_for_the_visited_fraction_of_their_lists():
    s = RebuildSchedule(100_000)
    s.record(0, 64, 40_000)  # scans whose lists had no visited entry: a rebuild would give the same lists
    assert s.rent == 0
    s.record(16, 64, 40_000)  # e.g. one scan with a quarter of its list visited
    assert s.rent == 10_000


def test_walk_counts_the_visited_entries_of_undecided_lists():
    import torch

    from tfp_kernels import has_extension
    from tfp_kernels.order.band_topk import band_bounds, band_topk_reference

    if not has_extension():
        pytest.skip("needs tfp_kernels._C")
    g = torch.Generator().manual_seed(3)
    n, k, threshold = 200, 8, 1.0
    emb = torch.randn(n, 5, generator=g)
    slack = torch.full((n,), 1e-4, dtype=torch.float64)
    lower, upper = band_bounds(threshold**2, slack)
    lists = band_topk_reference(emb, lower, upper, k)
    limit2 = lists.s2[:, -1].double() - slack
    entries = lists.index[0].long()
    assert bool((entries >= 0).all())

    def run(visited_entries, max_rejections=-1):
        path = torch.zeros(n, dtype=torch.long)  # path[0] = node 0
        visited = torch.zeros(n, dtype=torch.bool)
        visited[0] = True
        visited[visited_entries] = True
        counter = torch.tensor([0, 0, 0, 0, 0, -1], dtype=torch.long)  # (WalkCounters' slots)
        step = torch.ops.tfp_kernels.tfp_walk(
            emb, torch.empty(0, dtype=torch.float64), lists.index, lists.s2, limit2, slack, lists.num_close,
            torch.empty(0, dtype=torch.float16), *[torch.empty(0, dtype=torch.float64)] * 3, path, visited, counter,
            1, -1, threshold, 4, max_rejections, False,
        )
        return step, counter.tolist()[:3]

    # every entry visited: the list cannot decide, and all of it is stale
    assert run(entries) == (1, [0, 0, k])
    # all but the last entry visited: the last one is not provably nearer than the nodes past the list
    assert run(entries[:-1]) == (1, [0, 0, k - 1])
    # a cap that could fire: the scan is the cap's, not the lists' (no stale entries counted; a step where the cap
    # could fire, returned to the caller)
    assert run(entries, max_rejections=1)[1] == [0, 1, 0]


def test_walk_counts_the_scans_where_the_cap_could_fire(monkeypatch):
    import torch

    from tfp_kernels import has_extension
    from tests.order.engine_options import fast_tfp_order

    if not has_extension():
        pytest.skip("needs tfp_kernels._C")
    ops = torch.ops.tfp_kernels
    counters = []

    class Spy:  # torch.ops.tfp_kernels, keeping the counter tensor the walk is given
        def __getattr__(self, name):
            return getattr(ops, name)

        @staticmethod
        def tfp_walk(*args):
            counters.append(args[13])
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


def test_run_walk_drives_a_fake_walk_picker_and_rebuilds():
    # the driver alone: a fake walk that takes the nodes of a known path but stops at every 7th step (its list
    # "cannot decide") and reports 100 stale entries per call, a fake picker that answers those steps; the driver
    # must hand each stop to the picker, mark visited, and rebuild when the schedule says so
    import torch

    from tfp_kernels.order.options import EngineSettings
    from tfp_kernels.order.schedule import run_walk
    from tfp_kernels.order.walk_op import WalkCounters

    n = 3000
    target = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    path = torch.empty(n, dtype=torch.long)
    path[0] = target[0]
    visited = torch.zeros(n, dtype=torch.bool)
    visited[target[0]] = True
    counters = WalkCounters()
    picked, rebuilt = [], []

    def walk(step, stop):
        assert visited[path[:step]].all() and int(visited.sum()) == step
        counters.tensor[2] += 100
        while step < stop:
            if step % 7 == 0 and (not picked or picked[-1] != step):
                return step
            path[step] = target[step]
            visited[target[step]] = True
            step += 1
        return step

    def pick(step):
        picked.append(step)
        return int(target[step])

    tally = run_walk(n, walk=walk, pick=pick, rebuild=rebuilt.append, path=path, visited=visited,
                     counters=counters, k=4, settings=EngineSettings(min_rebuild_nodes=64))
    assert torch.equal(path, target) and bool(visited.all())
    assert picked == list(range(7, n, 7)) and tally.scans == len(picked)
    assert tally.rebuilds == len(rebuilt) > 0 and all(0 < s < n for s in rebuilt)
    # no rebuild callable: none
    path[1:], visited[:] = -1, False
    visited[target[0]] = True
    picked.clear()
    tally = run_walk(n, walk=walk, pick=pick, rebuild=None, path=path, visited=visited, counters=counters, k=4)
    assert torch.equal(path, target) and tally.rebuilds == 0


def test_walk_counters_are_named_slots():
    from tfp_kernels.order.walk_op import WalkCounters

    c = WalkCounters()
    assert c.tensor.tolist() == [0, 0, 0, 0, 0, -1] and c.first_forced_step == -1
    c.tensor[:] = torch_tensor([5, 4, 3, 2, 1, 9])
    assert (c.scans, c.cap_scans, c.stale_entries, c.close_set_scans, c.forced_steps) == (5, 4, 3, 2, 1)
    with pytest.raises(AttributeError):
        c.nothing


def torch_tensor(values):
    import torch

    return torch.tensor(values, dtype=torch.int64)
