"""Sharded ordering (tfp_order(shard, group=...)) on 1, 2 and 4 gloo processes vs single-process tfp_order.

The 2- and 4-process runs each start their processes once (tests/distributed/_helpers_order.py) and run
every case there; the tests below compare what every rank returned with single-process ``tfp_order`` and
``tfp_order_reference`` on the concatenated rows. The data has no distance ties (other than those of exact
duplicates, which the rule breaks by index), so paths must be equal.
"""

from __future__ import annotations

import datetime
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tfp_kernels import tfp_order, tfp_order_reference
from tfp_kernels.distributed import ShardedOrderStats, shard_bounds, shard_rows, tfp_order_sharded
from tfp_kernels.order.band_topk_triton import triton_runs_on
from tfp_kernels.order.threshold import threshold_estimate

_spec = importlib.util.spec_from_file_location(
    "_helpers_order", Path(__file__).with_name("_helpers_order.py")
)
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)

# name -> case (see _helpers_order.case_embeddings / _run_case)
GOOD = {
    "l2_w4": {"n": 37, "d": 8},
    "cosine_w1": {"n": 37, "d": 8, "kwargs": {"metric": "cosine", "window": 1}},
    "l2_cap_k4": {"n": 53, "d": 8, "kwargs": {"max_rejections": 3, "k": 4}},
    "cosine_cap_w1": {
        "n": 53,
        "d": 8,
        "kwargs": {"metric": "cosine", "max_rejections": 5, "k": 4, "window": 1},
    },
    "one_row": {"n": 1, "d": 4},
    "three_rows": {"n": 3, "d": 4, "kwargs": {"start": 2}},
    "float16": {"n": 40, "d": 8, "dtype": torch.float16, "kwargs": {"window": 2}},
    # a window beyond the masked scans' 64 rows: every scan by projections (no float32 copy of window rows)
    "window_70": {"n": 150, "d": 8, "clusters": 4, "kwargs": {"window": 70, "k": 4}},
    # clustered, short lists: fallback scans and (n >= 1024) list rebuilds
    "clustered_l2": {"n": 1100, "d": 12, "clusters": 16, "kwargs": {"k": 4}},
    "clustered_cosine_cap": {
        "n": 1100,
        "d": 12,
        "clusters": 16,
        "dtype": torch.float64,
        "kwargs": {"metric": "cosine", "k": 4, "max_rejections": 30, "start": 7},
    },
    # k="auto" with the estimate on (from 1 row up, base 4, up to 1024): 150 rows spread over the ranks at
    # squared distance 18 from each other (the 2% quantile): each has 149 nodes within the bound of t^2, counted
    # by every rank together (each rank alone sees a part of them): the same K (512) and path as one process
    "auto_k": {"n": 600, "d": 160, "shell": 150, "kwargs": {"k": "auto"},
               "settings": {"auto_k_min_rows": 1, "auto_k_base": 4, "auto_k_max": 1024}},
    # long lists for every full list (4 entries, all "crowded" with long_list_room = 5): 16-entry float64 lists
    # of every rank's rows merged on rank 0, at the first build and at each rebuild (among the unvisited)
    "long_lists": {"n": 1100, "d": 12, "clusters": 16, "kwargs": {"k": 4, "long_lists": True},
                   "settings": {"long_list_room": 5}},
    # the "spread" policy: a duplicate group (urgent from the start, or later), forced steps settled on rank 0
    "spread_dups": {"n": 60, "d": 8, "duplicates": 12, "kwargs": {"policy": "spread"}},
    "spread_cosine_w1": {"n": 53, "d": 8, "duplicates": 20,
                         "kwargs": {"policy": "spread", "metric": "cosine", "window": 1, "k": 4}},
    "spread_clustered": {"n": 1100, "d": 12, "clusters": 16, "duplicates": 200, "kwargs": {"policy": "spread", "k": 4}},
    # duplicate groups (275 distinct rows of 400, groups of several sizes across the ranks): one band list per
    # group over the ring, scans and rebuilds (from 64 nodes) as one process's
    "groups_paper": {"n": 400, "d": 12, "clusters": 16, "copies": 150, "kwargs": {"k": 4},
                     "settings": {"min_rebuild_nodes": 64}},
    "groups_spread": {"n": 400, "d": 12, "clusters": 16, "copies": 150, "kwargs": {"k": 4, "policy": "spread"},
                      "settings": {"min_rebuild_nodes": 64}},
    "groups_cosine_w1": {"n": 300, "d": 8, "clusters": 6, "copies": 120,
                         "kwargs": {"k": 4, "metric": "cosine", "window": 1}, "settings": {"min_rebuild_nodes": 64}},
    # t is the 2% quantile of the pair distances, so some pair lies at exactly t: the scans' float64 distances must
    # be the reference's bits (its cdist kernel), or that pair falls on the other side of t (this case parted from
    # one process at step 49 when the scans summed the squared differences in another order)
    "tie_at_t_cosine_w2": {"n": 200, "d": 12, "clusters": 6, "copies": 60,
                           "kwargs": {"k": 4, "metric": "cosine", "window": 2}},
    # no groups with a cap (its proof counts nodes) nor with t = 0 (duplicates are then valid), as in one process
    "groups_off_cap": {"n": 300, "d": 8, "clusters": 6, "copies": 80, "kwargs": {"k": 4, "max_rejections": 10}},
    "groups_off_t0": {"n": 300, "d": 8, "clusters": 6, "copies": 80, "kwargs": {"k": 4, "threshold": 0.0}},
}
#: the cases with duplicate groups: their scans and rebuilds are those of one process whose walk also returns at
#: every scan (``fallback="device"``; the default host scan runs inside the C++ walk, which the rebuild schedule
#: then charges per stretch of steps instead of per scan)
GROUPED = ["groups_paper", "groups_spread", "groups_cosine_w1"]
# a long-list round failing on one rank (as out of memory would): every rank leaves it together, the long lists
# go off, the walk goes on (same path); on rank 1 at its second round (a rebuild's), on rank 0 at the first
FAILING = {
    "long_lists_fail_rank1": {**GOOD["long_lists"], "long_fail_on_rank": {1: ("_local_long_lists", 1)}},
    "long_lists_fail_rank0": {**GOOD["long_lists"], "long_fail_on_rank": {0: ("_local_long_lists", 0)}},
    # rank 0's preparation of a round (before it commands one: the other ranks never enter it)
    "long_lists_fail_query": {**GOOD["long_lists"], "long_fail_on_rank": {0: ("_long_query", 1)}},
}
SAMPLED = {"n": 150, "d": 6, "direct": True, "kwargs": {"sample_pairs": 300, "seed": 3}}
BAD = {
    "bad_d": {"n": 30, "d": 8, "d_on_rank": {1: 9}},
    "bad_nan": {"n": 30, "d": 8, "nan_on_rank": 1},
    "bad_args": {"n": 30, "d": 8, "kwargs_on_rank": {1: {"window": 3}}},
    "bad_policy": {"n": 30, "d": 8, "kwargs_on_rank": {1: {"policy": "spread"}}},
    "bad_settings": {"n": 30, "d": 8, "settings_on_rank": {1: {"min_rebuild_nodes": 64}}},
}
CASES = {**GOOD, **FAILING, "sampled": SAMPLED, **BAD}
# the 4-process run: fewer cases (four processes share the 2 CI cores)
CASES4 = ["l2_w4", "cosine_cap_w1", "one_row", "three_rows", "clustered_l2", "auto_k", "long_lists", "bad_d",
          "spread_dups", "groups_paper", "groups_spread"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start the 2- and the 4-process runs together; compute the single-process paths while they run."""
    h2 = helpers.start(2, [CASES[n] for n in CASES], tmp_path_factory.mktemp("world2"))
    h4 = helpers.start(4, [CASES[n] for n in CASES4], tmp_path_factory.mktemp("world4"))
    expected = {name: _single(case) for name, case in GOOD.items()}
    for name in GROUPED:
        emb = helpers.case_embeddings(CASES[name])
        expected[name + "/device"] = tfp_order(emb, return_stats=True, fallback="device",
                                               settings=helpers.case_settings(CASES[name]), **CASES[name]["kwargs"])
    r2, r4 = helpers.finish(h2), helpers.finish(h4)
    world2 = {name: [r2[r][i] for r in range(2)] for i, name in enumerate(CASES)}
    world4 = {name: [r4[r][i] for r in range(4)] for i, name in enumerate(CASES4)}
    return world2, world4, expected


@pytest.fixture(scope="module")
def world2(runs):
    return runs[0]


@pytest.fixture(scope="module")
def world4(runs):
    return runs[1]


@pytest.fixture(scope="module")
def expected(runs):
    return runs[2]


def _single(case: dict):
    emb = helpers.case_embeddings(case)
    kwargs = case.get("kwargs", {})
    path, stats = tfp_order(emb, return_stats=True, settings=helpers.case_settings(case), **kwargs)
    ref = tfp_order_reference(emb, **{k: v for k, v in kwargs.items() if k not in ("k", "long_lists")})
    assert torch.equal(path, ref), "single-process fast and reference paths differ: the test data has ties"
    return path, stats


def _check_good(per_rank: list[dict], name: str, expected: dict) -> None:
    case = CASES[name]
    for r, res in enumerate(per_rank):
        assert "error" not in res, f"rank {r}: {res.get('error')}"
    path, stats = expected[name]
    for r, res in enumerate(per_rank):
        assert res["path"].dtype == torch.int64 and res["path"].shape == (case["n"],)
        assert torch.equal(res["path"], path), f"rank {r}'s path differs from single-process tfp_order"
        got = res["stats"]
        assert isinstance(got, ShardedOrderStats) and got.backend == "sharded"
        assert got.threshold == stats.threshold and got.threshold_source == stats.threshold_source
        assert got.world_size == len(per_rank) and got.rank == r
        assert got.num_fallbacks == per_rank[0]["stats"].num_fallbacks
        if stats.backend == "fast":  # (one process orders N <= 3 rows with the reference, which has no groups)
            assert got.num_groups == stats.num_groups, (got.num_groups, stats.num_groups)
        assert got.policy == stats.policy == case.get("kwargs", {}).get("policy", "paper")
        assert (got.num_forced_steps, got.first_forced_step) == (stats.num_forced_steps, stats.first_forced_step)
        if case.get("kwargs", {}).get("k") == "auto":
            assert got.k == stats.k == 512, (got.k, stats.k)
        if case.get("kwargs", {}).get("long_lists"):
            assert got.long_k == stats.long_k == 16 and got.num_long_lists == per_rank[0]["stats"].num_long_lists
            assert got.num_long_lists > case["n"] and got.num_rebuilds > 0  # (first build and rebuilds)


@pytest.mark.parametrize("name", list(GOOD))
def test_two_ranks_match_single_process(world2, expected, name):
    _check_good(world2[name], name, expected)


@pytest.mark.parametrize("name", list(FAILING))
def test_a_failed_long_list_round_turns_them_off_on_every_rank(world2, expected, name):
    per_rank = world2[name]
    failing_rank, (_, at) = next(iter(CASES[name]["long_fail_on_rank"].items()))
    path, _ = expected["long_lists"]
    normal = world2["long_lists"][0]["stats"]
    for r, res in enumerate(per_rank):
        assert "error" not in res, f"rank {r}: {res.get('error')}"
        assert torch.equal(res["path"], path), f"rank {r}'s path differs from single-process tfp_order"
    stats = per_rank[0]["stats"]
    # the rounds before the failure counted, none after it; more scans than with every round
    assert 0 <= stats.num_long_lists < normal.num_long_lists and (stats.num_long_lists > 0) == (at > 0)
    assert stats.num_fallbacks > normal.num_fallbacks
    root_warnings = [w for w in per_rank[0]["warnings"] if "long lists failed" in w]
    assert len(root_warnings) == 1 and f"on rank {failing_rank}" in root_warnings[0], per_rank[0]["warnings"]
    if failing_rank != 0:  # the failing rank says what failed; the others stay quiet
        own = [w for w in per_rank[failing_rank]["warnings"] if "long lists failed" in w]
        assert len(own) == 1 and "injected failure" in own[0], own
    assert "injected failure" in " ".join(per_rank[failing_rank]["warnings"])
    for r, res in enumerate(per_rank):
        if r not in (0, failing_rank):
            assert not [w for w in res["warnings"] if "long lists failed" in w]


@pytest.mark.parametrize("name", [n for n in CASES4 if n in GOOD])
def test_four_ranks_match_single_process(world4, expected, name):
    _check_good(world4[name], name, expected)


def test_fallbacks_and_rebuilds_exercised(world2, world4):
    # the clustered cases must go through the sharded scans and the sharded rebuild, not only the lists
    for res in (world2["clustered_l2"][0], world4["clustered_l2"][0], world2["clustered_cosine_cap"][0]):
        assert res["stats"].num_fallbacks > 20
    assert world2["clustered_l2"][0]["stats"].num_rebuilds >= 1
    assert world4["clustered_l2"][0]["stats"].num_rebuilds >= 1
    # cap cases: the cap can fire at every step, so every step is a scan
    assert world2["l2_cap_k4"][0]["stats"].num_fallbacks > 0
    # scans by the masked pass (rows measured in float64 counted), except with a window beyond its 64 rows
    assert world2["clustered_l2"][0]["stats"].scan_candidates > 0
    assert world2["window_70"][0]["stats"].num_fallbacks > 0 == world2["window_70"][0]["stats"].scan_candidates
    # rank 0 gives the nodes where the counts let the cap fire close sets (from its host copy of the rows), and
    # the walk counts their unvisited members: the same path (_check_good), every rank told the counts
    for res in world2["clustered_cosine_cap"]:
        stats = res["stats"]
        assert 0 < stats.num_close_sets <= 1100 and 0 < stats.num_cap_fallbacks <= stats.num_fallbacks
    assert world2["clustered_l2"][0]["stats"].num_close_sets == 0  # (no cap)


def test_spread_policy_exercised(world2, expected):
    # the duplicate groups change the path (urgent members taken early), the scans run on every rank, and the
    # forced steps settled on rank 0 are those of one process
    for name in ("spread_dups", "spread_clustered"):
        case = CASES[name]
        emb = helpers.case_embeddings(case)
        paper = tfp_order(emb, **{**case["kwargs"], "policy": "paper"})
        assert not torch.equal(expected[name][0], paper)
    stats = world2["spread_clustered"][0]["stats"]
    assert stats.num_fallbacks > 20 and stats.num_rebuilds >= 1 and stats.num_forced_steps > 0


@pytest.mark.parametrize("world, name", [(2, n) for n in GROUPED] + [(4, n) for n in GROUPED if n in CASES4])
def test_duplicate_groups_as_one_process(world2, world4, expected, world, name):
    # one list per group: the groups' count, and one process's path (_check_good), scans and rebuilds
    runs = world2 if world == 2 else world4
    emb = helpers.case_embeddings(CASES[name])
    distinct = torch.unique(emb, dim=0).shape[0]
    assert distinct < CASES[name]["n"] - 50
    path, device = expected[name + "/device"]
    assert torch.equal(path, expected[name][0])
    for res in runs[name]:
        got = res["stats"]
        assert got.num_groups == distinct
        assert (got.num_fallbacks, got.num_rebuilds) == (device.num_fallbacks, device.num_rebuilds)
        assert got.num_fallbacks > 20 and got.num_rebuilds >= 1
        if CASES[name]["kwargs"].get("policy") == "spread":
            assert got.num_forced_steps == device.num_forced_steps


@pytest.mark.parametrize("name", ["groups_off_cap", "groups_off_t0"])
def test_no_duplicate_groups_with_a_cap_or_t0(world2, expected, name):
    emb = helpers.case_embeddings(CASES[name])
    assert torch.unique(emb, dim=0).shape[0] < CASES[name]["n"]  # (there are duplicates to group)
    for res in world2[name]:
        assert res["stats"].num_groups == CASES[name]["n"] == expected[name][1].num_groups
    if name == "groups_off_t0":
        assert world2[name][0]["stats"].threshold == 0.0


def test_empty_shards_when_fewer_rows_than_ranks(world4):
    assert [e - s for s, e in shard_bounds(3, 4)] == [1, 1, 1, 0]
    assert [r["stats"].num_rows for r in world4["three_rows"]] == [1, 1, 1, 0]
    assert [r["stats"].num_rows for r in world4["one_row"]] == [1, 0, 0, 0]
    assert [r["stats"].num_rows for r in world4["l2_w4"]] == [10, 9, 9, 9]


def test_sampled_threshold_is_the_single_process_one(world2):
    case = SAMPLED
    emb = helpers.case_embeddings(case)
    est = threshold_estimate(emb, sample_pairs=300, seed=3)
    assert not est.exact
    path = tfp_order(emb, threshold=est.value)
    for res in world2["sampled"]:
        assert res["stats"].threshold_source == "sampled"
        assert res["stats"].threshold == est.value
        assert torch.equal(res["path"], path)


@pytest.mark.parametrize(
    "name, needle",
    [
        ("bad_d", "disagree on D (the embedding dimension): rank 0: 8, rank 1: 9"),
        ("bad_nan", "bad input on rank 1"),
        ("bad_args", "disagree on arguments"),
        ("bad_policy", "disagree on arguments"),
        ("bad_settings", "disagree on engine settings"),
    ],
)
def test_bad_input_raises_on_every_rank(world2, name, needle):
    for r, res in enumerate(world2[name]):
        assert "error" in res, f"rank {r} did not raise"
        assert res["error"][0] == "ValueError" and needle in res["error"][1], res["error"]


def test_bad_input_raises_on_every_rank_four(world4):
    for res in world4["bad_d"]:
        assert "rank 1: 9" in res["error"][1]


def test_shard_bounds_is_tensor_split():
    for n in (0, 1, 3, 10, 37):
        for w in (1, 2, 3, 4):
            split = torch.arange(n).tensor_split(w)
            assert [(int(p[0]), int(p[-1]) + 1) if p.numel() else None for p in split] == [
                (s, e) if e > s else None for s, e in shard_bounds(n, w)
            ]


def test_needs_an_initialised_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
        tfp_order_sharded(torch.randn(5, 3))


def test_one_rank_in_process(tmp_path):
    """A 1-process gloo group in this process: same path as single-process, incl. the stats fields."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=30))
    try:
        emb = helpers.make_embeddings(300, 10, seed=5, clusters=6)
        assert torch.equal(shard_rows(emb), emb)
        for kwargs in ({"k": 4}, {"k": 4, "metric": "cosine", "max_rejections": 7, "window": 1}):
            path, stats = tfp_order(emb, group=dist.group.WORLD, return_stats=True, **kwargs)
            assert torch.equal(path, tfp_order(emb, **kwargs))
            assert stats.bytes_ring == 0 and stats.bytes_to_root == 0 and stats.world_size == 1
        with pytest.raises(ValueError, match="backend must be 'auto' or 'fast'"):
            tfp_order_sharded(emb, backend="reference")
        with pytest.raises(ValueError, match="rebuild must be 'auto' or None, got 'always'"):
            tfp_order_sharded(emb, rebuild="always")  # (was: taken as None, no rebuilds)
        with pytest.raises(ValueError, match="bad input on rank 0: .*NaN"):
            tfp_order_sharded(torch.full((4, 2), float("nan")))
        with pytest.raises(ValueError, match="every rank's embedding shard is empty"):
            tfp_order_sharded(torch.empty(0, 3))
        with pytest.raises(ValueError, match="fallback must be 'auto', 'device' or 'triton' with a process group"):
            tfp_order(emb, group=dist.group.WORLD, fallback="host")
        with pytest.raises(ValueError, match="band_backend must be 'auto', 'torch' or 'triton', got 'cuda'"):
            tfp_order_sharded(emb, band_backend="cuda")
        if not triton_runs_on("cpu"):
            with pytest.raises(ValueError, match="band_backend='triton' needs Triton and CUDA embeddings"):
                tfp_order_sharded(emb, band_backend="triton")
            with pytest.raises(ValueError, match="fallback='triton' needs Triton and CUDA embeddings"):
                tfp_order_sharded(emb, fallback="triton")
        else:
            with pytest.raises(ValueError, match="fallback='triton' scans windows of at most 64 nodes"):
                tfp_order_sharded(emb, fallback="triton", window=65)
        _masked_scan_matches_the_rule(emb)
    finally:
        dist.destroy_process_group()


def _masked_scan_matches_the_rule(emb):
    """The masked scan's pick (its torch kernel, in a 1-rank group) against the rule on the float64 rows: nearest
    unvisited node valid against the window (ties by index), else the nearest; random states, both metrics,
    equal rows (ties) and a threshold at a pair's exact distance."""
    from tfp_kernels.distributed import order as sharded
    from tfp_kernels.order.distance import distances_between, prepare

    g = torch.Generator().manual_seed(0)
    emb = emb.clone()
    emb[7] = emb[3]  # equal rows: a tie broken by index
    for metric in ("l2", "cosine"):
        x64 = prepare(emb, metric)
        sh = sharded._Shard(emb, 0, [emb.shape[0]], metric)
        masked = sharded._MaskedScan(sharded._Comm(None), sh, sharded.masked_scan_torch, 4)
        for trial in range(40):
            sh.visited = torch.rand(emb.shape[0], generator=g) < 0.5
            window = torch.nonzero(sh.visited).flatten()
            window = window[torch.randperm(window.numel(), generator=g)[: 1 + trial % 4]]
            unv = torch.nonzero(~sh.visited).flatten()
            d = distances_between(x64[unv], x64[window], metric)  # (last = window[-1])
            pick = d[:, -1].clone()
            # thresholds: a quantile, one exactly at a pair's distance, none valid (huge), all valid (0)
            t = [float(d.quantile(0.3)), float(d[0, -1]), 1e9, 0.0][trial % 4]
            valid = (d >= t).all(dim=1)
            pick[~valid] = torch.inf
            want = int(unv[int(torch.argmin(pick))]) if bool(valid.any()) else int(unv[int(torch.argmin(d[:, -1]))])
            got = masked.pick(x64[window], t)
            assert got == want, (metric, trial, t, got, want)
        assert masked.settled > 0


@pytest.mark.parametrize("rows", [0, 1, 2, 5])
def test_packed_lists_round_trip(rows):
    # the lists travel to rank 0 as one uint8 row per list row; a rebuild of the groups with an unvisited member
    # can be one row (the last group left), whose slices a dtype view refused
    from tfp_kernels.distributed import order as sharded

    g = torch.Generator().manual_seed(rows)
    k = 3
    tables = (torch.randint(-1, 50, (rows, k), generator=g, dtype=torch.int32), torch.rand(rows, k, generator=g),
              torch.rand(rows, generator=g, dtype=torch.float64), torch.randint(0, 9, (rows,), generator=g,
                                                                               dtype=torch.int32),
              torch.rand(rows, generator=g, dtype=torch.float64))
    packed = sharded._pack_lists(*tables)
    assert packed.shape == (rows, 8 * k + 20) and packed.dtype == torch.uint8
    for got, want in zip(sharded._unpack_lists(packed, k), tables):
        assert got.dtype == want.dtype and torch.equal(got, want)
