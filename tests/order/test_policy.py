"""Where the threshold runs out: forced steps (every backend against the reference's own count) and the "spread"
policy (its reference, check_path support, the fast path exact against it, and what it is for)."""

import dataclasses
import math

import pytest
import torch

from tfp_kernels import check_path, estimate_threshold, has_extension, pack_lengths, tfp_order, tfp_order_reference
from tfp_kernels.order.band_topk_triton import triton_runs_on
from tfp_kernels.order.distance import distances_from, prepare
from tfp_kernels.order.policy import WalkPolicy, count_forced_steps, near_duplicate_groups, urgent_group_tables
from tfp_kernels.order.reference import near_duplicate_groups_reference
from tfp_kernels.report import near_duplicate_pair_fraction

needs_extension = pytest.mark.skipif(not has_extension(), reason="the fast path needs tfp_kernels._C")
CPU_FALLBACKS = ["host", "device", pytest.param("triton", marks=pytest.mark.skipif(
    not triton_runs_on("cpu"), reason="CPU tensors in Triton need TRITON_INTERPRET=1"))]


def gaussian(n, d, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def with_group(n, d, copies, *, seed=0, spread=1.0):
    """(n, d) Gaussian rows of which ``copies`` (spread over the rows) equal one row: a dominating duplicate group."""
    x = spread * gaussian(n, d, seed)
    at = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))[:copies]
    x[at] = x[at[0]].clone()
    return x


def sft_like(n, d, seed=0):
    """Rows like embedded SFT instructions: duplicate groups of every size (one of 20% of the rows, many pairs
    and triples), clustered."""
    g = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.randn(6, d, generator=g)
    texts = centres[torch.randint(0, 6, (n,), generator=g)] + torch.randn(n, d, generator=g)
    which = torch.randint(0, max(1, n // 3), (n,), generator=g)  # ~n/3 distinct texts, repeated at random
    which[torch.randperm(n, generator=g)[: n // 5]] = 0  # one text shared by 20% of the rows
    return texts[which]


def grid(n, seed=0):
    """Integer points: many exact distance ties, and ties at t."""
    return torch.randint(0, 4, (n, 3), generator=torch.Generator().manual_seed(seed)).float()


def jittered_clusters(n, d, *, clusters, radius, seed=0):
    """Rows around ``clusters`` centres (Gaussian, spread 10), each within ~``radius`` of its centre: groups of
    near-duplicates that are not equal rows."""
    g = torch.Generator().manual_seed(seed)
    centres = 10.0 * torch.randn(clusters, d, generator=g)
    which = torch.randint(0, clusters, (n,), generator=g)
    return centres[which] + radius * torch.randn(n, d, generator=g) / math.sqrt(d)


# ------------------------------------------------------------------------------------------------- forced steps


def brute_force_forced(emb, path, t, window, metric):
    x = prepare(emb, metric)
    steps = []
    for s in range(1, path.numel()):
        win = path[max(0, s - window) : s]
        if bool((distances_from(x, path[s : s + 1], win, metric) < t).any()):
            steps.append(s)
    return steps


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_count_forced_steps_against_brute_force(metric):
    emb = sft_like(120, 6, seed=3)
    t = estimate_threshold(emb, metric=metric, quantile=0.1)
    path = torch.randperm(120, generator=torch.Generator().manual_seed(0))
    expected = brute_force_forced(emb, path, t, 3, metric)
    assert expected  # (the random order puts duplicates within 3 positions of each other)
    assert count_forced_steps(emb, path, threshold=t, window=3, metric=metric) == (len(expected), expected[0])
    assert count_forced_steps(emb[:1], torch.tensor([0]), threshold=t, window=3, metric=metric) == (0, None)


FORCED_CASES = [
    pytest.param(gaussian(1, 4), {"threshold": 1.0}, id="n1"),
    pytest.param(gaussian(2, 4), {"threshold": 100.0}, id="n2-all-close"),
    pytest.param(torch.ones(9, 3), {"threshold": 1.0}, id="all-duplicates"),
    pytest.param(with_group(70, 6, 30), {}, id="dominating-group"),
    pytest.param(with_group(70, 6, 30), {"window": 1, "start": 5}, id="dominating-group-w1"),
    pytest.param(sft_like(200, 8), {"metric": "cosine"}, id="sft-like-cosine"),
    pytest.param(with_group(90, 6, 25), {"max_rejections": 4}, id="cap4"),
    pytest.param(with_group(90, 6, 25), {"max_rejections": 0}, id="cap0"),
    pytest.param(grid(80), {"window": 2}, id="grid-ties"),
]


@needs_extension
@pytest.mark.parametrize("emb, kwargs", FORCED_CASES)
def test_forced_steps_of_every_backend_equal_the_reference_count(emb, kwargs):
    # the reference counts the steps whose node is invalid in its walk; the fast backend counts them from the path
    kwargs = {"quantile": 0.05, **kwargs}
    ref, ref_stats = tfp_order_reference(emb, return_stats=True, **kwargs)
    path, stats = tfp_order(emb, return_stats=True, k=8, **kwargs)
    _, stats_ref_backend = tfp_order(emb, return_stats=True, backend="reference", **kwargs)
    assert torch.equal(path, ref)
    assert stats.backend == "fast" or emb.shape[0] == 1
    got = (stats.num_forced_steps, stats.first_forced_step)
    assert got == (ref_stats.num_forced_steps, ref_stats.first_forced_step)
    assert got == (stats_ref_backend.num_forced_steps, stats_ref_backend.first_forced_step)
    t, window = ref_stats.threshold, kwargs.get("window", 4)
    expected = brute_force_forced(emb, ref, t, window, kwargs.get("metric", "l2"))
    assert got == (len(expected), expected[0] if expected else None)
    assert ref_stats.policy == stats.policy == "paper" and ref_stats.backend == "reference"


def test_forced_steps_on_known_inputs():
    # all rows equal (t given): every step is forced; N = 1: none
    _, stats = tfp_order_reference(torch.ones(5, 2), threshold=1.0, return_stats=True)
    assert (stats.num_forced_steps, stats.first_forced_step) == (4, 1)
    _, stats = tfp_order_reference(torch.ones(1, 2), return_stats=True)
    assert (stats.num_forced_steps, stats.first_forced_step) == (0, None)
    # 1-D points 0, 1, 2, 10 with t = 1.5: 0 -> 2 (2.0) -> 3 (10.0), then node 1 (1.0) is left, 1.0 from node 2:
    # valid with window 1 (only 10.0 in the window), forced with window 2
    emb = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    for window, forced in ((1, (0, None)), (2, (1, 3))):
        path, stats = tfp_order_reference(emb, threshold=1.5, window=window, return_stats=True)
        assert path.tolist() == [0, 2, 3, 1] and (stats.num_forced_steps, stats.first_forced_step) == forced


# ------------------------------------------------------------------------------------------------- the spread rule


def test_spread_reference_on_a_small_example():
    # 1-D: node 0 and three copies of 5.0 (nodes 1, 2, 3), node 4 at 2.0 and 5 at 9.0; t = 1, window 1
    emb = torch.tensor([[0.0], [5.0], [5.0], [5.0], [2.0], [9.0]])
    # paper: 0 -> 4 (2.0) -> 1 (5.0) -> 5 (9.0) -> 2 (5.0) -> 3 forced (the copy of 2)
    paper = tfp_order_reference(emb, threshold=1.0, window=1)
    assert paper.tolist() == [0, 4, 1, 5, 2, 3]
    # spread: at step 1, u = 5 and the copies' m = 3 with 3 * 2 >= 5: urgent, and valid: 1 is taken; at step 2,
    # u = 4, m = 2, 2 * 2 >= 4: urgent but not valid (1 is the window): the rule takes 4 (D[1, 4] = 3 < D[1, 5]
    # = 4); at step 3 (u = 3, m = 2) the copy 2 is valid: taken; then 5, then 3 (valid: 9.0 is the window)
    spread, stats = tfp_order_reference(emb, threshold=1.0, window=1, policy="spread", return_stats=True)
    assert spread.tolist() == [0, 1, 4, 2, 5, 3] and stats.num_forced_steps == 0 and stats.policy == "spread"
    assert check_path(emb, spread, threshold=1.0, window=1, policy="spread", atol=0, rtol=0)
    assert not check_path(emb, paper, threshold=1.0, window=1, policy="spread")
    assert not check_path(emb, spread, threshold=1.0, window=1)  # (not the paper's path)


def test_spread_takes_the_farthest_node_at_a_forced_step():
    # 1-D: 0, 0.5, 0.6, 3.0, 3.2 with t = 1 and window 2: 0 -> 3 (3.0), then every node is within t of the window
    # {0.0, 3.0}: forced
    emb = torch.tensor([[0.0], [0.5], [0.6], [3.0], [3.2]])
    paper = tfp_order_reference(emb, threshold=1.0, window=2)
    spread = tfp_order_reference(emb, threshold=1.0, window=2, policy="spread")
    # paper: 0 -> 3 (3.0) -> forced: candidates 1, 2, 4 all within t of the window {0, 3}: nearest to 3.0 is 4
    assert paper.tolist() == [0, 3, 4, 2, 1]
    # spread: forced at step 2: min distance to {0.0, 3.0}: node 1: 0.5, node 2: 0.6, node 4: 0.2 -> node 2
    assert spread.tolist() == [0, 3, 2, 4, 1]
    for path, policy in ((paper, "paper"), (spread, "spread")):
        assert check_path(emb, path, threshold=1.0, window=2, policy=policy, atol=0, rtol=0)


SPREAD_CASES = [
    pytest.param(sft_like(150, 8), {}, id="sft-like"),
    pytest.param(sft_like(150, 8, seed=4), {"metric": "cosine", "start": 7}, id="sft-like-cosine"),
    pytest.param(with_group(97, 6, 30), {"window": 6}, id="group-too-big-w6"),
    pytest.param(with_group(101, 6, 20), {}, id="group-just-separable"),
    pytest.param(with_group(64, 5, 12, spread=0.3), {"window": 1}, id="tight-w1"),
    pytest.param(torch.ones(7, 3), {"threshold": 1.0}, id="all-duplicates"),
    pytest.param(gaussian(1, 3), {}, id="n1"),
    pytest.param(torch.tensor([[0.0], [0.0]]), {"threshold": 1.0}, id="n2-duplicates"),
    pytest.param(torch.tensor([[0.0], [0.0], [0.1]]), {"threshold": 1.0, "start": 2}, id="n3"),
    pytest.param(grid(90, seed=2), {"window": 3}, id="grid-ties"),
    pytest.param(sft_like(130, 6, seed=5), {"threshold": 0.0}, id="t0"),
    pytest.param(jittered_clusters(120, 6, clusters=4, radius=1.0, seed=7), {"threshold": 3.0}, id="near-clusters"),
    pytest.param(jittered_clusters(90, 5, clusters=3, radius=1.0, seed=8), {"threshold": 0.1, "metric": "cosine"},
                 id="near-clusters-cosine"),
]


@needs_extension
@pytest.mark.parametrize("emb, kwargs", SPREAD_CASES)
@pytest.mark.parametrize("fallback", CPU_FALLBACKS)
def test_spread_fast_equals_reference(emb, kwargs, fallback):
    from tests.order.engine_options import fast_tfp_order

    kwargs = {"quantile": 0.05, **kwargs}
    ref, stats = tfp_order_reference(emb, policy="spread", return_stats=True, **kwargs)
    t, metric = stats.threshold, kwargs.get("metric", "l2")
    window, start = kwargs.get("window", 4), kwargs.get("start", 0)
    for k, group_duplicates in ((4, True), (64, False)) if emb.shape[0] > 1 else ():
        path, _ = fast_tfp_order(emb, metric=metric, threshold=t, window=window, max_rejections=None, start=start,
                                 k=k, fallback=fallback, band_backend="torch", group_duplicates=group_duplicates,
                                 policy="spread")
        assert torch.equal(path, ref), (k, group_duplicates)
    assert check_path(emb, ref, threshold=t, metric=metric, window=window, policy="spread")
    fast, fast_stats = tfp_order(emb, policy="spread", return_stats=True, **kwargs)
    assert torch.equal(fast, ref) and fast_stats.num_forced_steps == stats.num_forced_steps
    assert fast_stats.first_forced_step == stats.first_forced_step and fast_stats.policy == "spread"
    if kwargs.get("threshold") == 0.0:  # no duplicate is kept apart at t = 0: the paper's path
        assert torch.equal(ref, tfp_order_reference(emb, **kwargs))


@needs_extension
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fallback", ["host", "device", "triton"])
def test_cuda_spread_equals_reference(fallback):
    emb = sft_like(300, 24, seed=9)
    t = estimate_threshold(emb, quantile=0.05)
    ref, stats = tfp_order_reference(emb, threshold=t, policy="spread", return_stats=True)
    path, got = tfp_order(emb.cuda(), threshold=t, policy="spread", fallback=fallback, k=8, return_stats=True)
    assert torch.equal(path.cpu(), ref) and got.num_forced_steps == stats.num_forced_steps


@needs_extension
def test_spread_with_rebuilds_and_scans_equals_reference():
    # enough rows for list rebuilds (>= 1024 nodes) and short lists: the walk returns for scans and rebuilds
    # while groups are urgent
    emb = sft_like(1100, 6, seed=8)
    t = estimate_threshold(emb, quantile=0.02)
    ref = tfp_order_reference(emb, threshold=t, policy="spread")
    path, stats = tfp_order(emb, threshold=t, policy="spread", k=4, fallback="device", return_stats=True)
    assert torch.equal(path, ref) and stats.num_fallbacks > 0 and stats.num_rebuilds > 0


def test_spread_separates_a_group_the_window_can_separate():
    # 20 copies among 101 rows, window 4: (20 - 1) * 5 + 1 = 96 <= 101 positions: no forced step, and no two
    # copies within 4 steps of each other; the paper's rule strings them together at the end. (t below every
    # distance between distinct rows: only the copies are near-duplicates; with the 2% quantile a few random pairs
    # are too, and can meet in the last steps under either policy.)
    emb = with_group(101, 6, 20)
    t = 0.5 * float(torch.pdist(torch.unique(emb, dim=0).double()).min())
    _, inverse, counts = torch.unique(emb, dim=0, return_inverse=True, return_counts=True)
    copies = torch.nonzero(counts[inverse] > 1).flatten()
    assert copies.numel() == 20
    gaps = {}
    for policy in ("paper", "spread"):
        path, stats = tfp_order_reference(emb, threshold=t, policy=policy, return_stats=True)
        pos = torch.empty(101, dtype=torch.long)
        pos[path] = torch.arange(101)
        gaps[policy] = (int(pos[copies].sort().values.diff().min()), stats.num_forced_steps)
    assert gaps["spread"][0] >= 5 and gaps["spread"][1] == 0
    assert gaps["paper"][0] < 5 and gaps["paper"][1] > 0


@pytest.mark.parametrize("backend", ["reference", pytest.param("fast", marks=needs_extension)])
def test_spread_separates_a_near_duplicate_group(backend):
    # as above, but the 20 rows are near-duplicates, not equal rows (jittered by 0.01, t ~0.29): one group of
    # near_duplicate_groups, kept 5 steps apart with no forced step; the paper's rule strings them together
    emb = gaussian(101, 6)
    near = torch.randperm(101, generator=torch.Generator().manual_seed(1))[:20]
    emb[near] = emb[near[0]] + 0.01 * gaussian(20, 6, seed=9)
    others = torch.ones(101, dtype=torch.bool)
    others[near] = False
    t = 0.5 * float(torch.pdist(emb[others].double()).min())
    assert torch.unique(emb, dim=0).shape[0] == 101 and float(torch.pdist(emb[near].double()).max()) < t
    group_of, counts = near_duplicate_groups(emb, threshold=t, metric="l2")
    assert sorted(counts.tolist())[-2:] == [1, 20] and group_of[near].unique().numel() == 1
    order = tfp_order_reference if backend == "reference" else tfp_order
    gaps = {}
    for policy in ("paper", "spread"):
        path, stats = order(emb, threshold=t, policy=policy, return_stats=True)
        assert check_path(emb, path, threshold=t, policy=policy)
        pos = torch.empty(101, dtype=torch.long)
        pos[path] = torch.arange(101)
        gaps[policy] = (int(pos[near].sort().values.diff().min()), stats.num_forced_steps)
    assert gaps["spread"] == (5, 0)
    assert gaps["paper"][0] < 5 and gaps["paper"][1] > 0


def test_check_path_spread_names_the_step():
    emb = with_group(60, 5, 15)
    t = estimate_threshold(emb, quantile=0.05)
    paper = tfp_order_reference(emb, threshold=t)
    spread = tfp_order_reference(emb, threshold=t, policy="spread")
    assert not torch.equal(paper, spread)
    res = check_path(emb, paper, threshold=t, policy="spread")
    first_diff = int(torch.nonzero(paper != spread)[0])
    assert not res and res.first_bad_step == first_diff and res.expected == int(spread[first_diff])
    assert "policy 'spread'" in res.message


def test_policy_arguments_are_checked():
    emb = gaussian(10, 3)
    for call in (lambda: tfp_order(emb, policy="nearest"), lambda: tfp_order_reference(emb, policy=None),
                 lambda: check_path(emb, torch.arange(10), threshold=0.5, policy="Spread")):
        with pytest.raises(ValueError, match="policy must be one of"):
            call()
    for call in (lambda: tfp_order(emb, policy="spread", max_rejections=5),
                 lambda: tfp_order_reference(emb, policy="spread", max_rejections=5),
                 lambda: check_path(emb, torch.arange(10), threshold=0.5, policy="spread", max_rejections=5)):
        with pytest.raises(ValueError, match="takes no rejection cap"):
            call()


@needs_extension
def test_walk_op_checks_the_policy():
    from tfp_kernels.order.walk_op import WalkCounters, WalkOp, WalkTables

    emb = gaussian(6, 3)
    path, visited = torch.zeros(6, dtype=torch.long), torch.zeros(6, dtype=torch.bool)
    visited[0] = True

    def walk(max_rejections, policy):
        tables = WalkTables(emb, torch.empty(0, dtype=torch.float64), torch.full((6, 2), -1, dtype=torch.int32),
                            torch.zeros(6, 2), torch.zeros(6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64),
                            torch.zeros(6, dtype=torch.int32), path, visited, policy=policy)
        return WalkOp(tables, threshold=1.0, window=2, max_rejections=max_rejections, cosine=False,
                      counters=WalkCounters())

    with pytest.raises(RuntimeError, match="policy must be 'paper' or 'spread'"):
        walk(None, WalkPolicy("near"))(1, -1)
    with pytest.raises(RuntimeError, match="takes no rejection cap"):
        walk(3, WalkPolicy("spread"))(1, -1)
    groups = urgent_group_tables(torch.tensor([0, 1, 0, 2, 1, 0]), torch.tensor([3, 2, 1]))
    for name, bad, match in (
        ("paper", groups, "policy_groups go with policy 'spread'"),
        ("spread", groups[:2], "must be \\[group_of, offsets, members\\]"),
        ("spread", (groups[0][:5], *groups[1:]), "group_of must have N = 6"),
    ):
        with pytest.raises(RuntimeError, match=match):
            walk(None, WalkPolicy(name, bad))(1, -1)


def test_urgent_group_tables():
    # groups: 0 -> nodes {0, 2, 5}, 1 -> {1, 4}, 2 -> {3}, 3 -> {6, 7} (a tie in size with group 1: lower first
    # member first)
    group_of, offsets, members = urgent_group_tables(torch.tensor([0, 1, 0, 2, 1, 0, 3, 3]),
                                                     torch.tensor([3, 2, 1, 2]))
    assert group_of.dtype == torch.int32 and offsets.dtype == members.dtype == torch.int64
    assert group_of.tolist() == [0, 1, 0, -1, 1, 0, 2, 2]
    assert offsets.tolist() == [0, 3, 5, 7] and members.tolist() == [0, 2, 5, 1, 4, 6, 7]
    assert urgent_group_tables(torch.arange(4), torch.ones(4, dtype=torch.long)) is None
    emb = torch.tensor([[1.0, 2.0], [0.0, 0.0], [1.0, 2.0]])
    found = near_duplicate_groups(emb, threshold=1.0, metric="l2")
    assert [t.tolist() for t in urgent_group_tables(*found)] == [[0, -1, 0], [0, 2], [0, 2]]
    assert near_duplicate_groups(emb[:2], threshold=1.0, metric="l2") is None


# ------------------------------------------------------------------------------------------------- near-duplicate groups


GROUP_CASES = [
    (gaussian(1, 3), 0.5, "l2"),
    (gaussian(37, 5, seed=2), None, "l2"),
    (gaussian(37, 5, seed=2), None, "cosine"),
    (with_group(70, 7, 12, seed=3), None, "l2"),
    (sft_like(130, 9, seed=4), None, "cosine"),
    (grid(90, seed=5), 1.0, "l2"),  # integer points at distance exactly 1 (not < t): ties at t decided exactly
    (grid(90, seed=5), 2.0 ** 0.5, "l2"),
    (jittered_clusters(101, 6, clusters=5, radius=1.0, seed=6), 3.0, "l2"),
    (jittered_clusters(101, 6, clusters=5, radius=1.0, seed=6).double() * 2.0 ** -60, 3.0 * 2.0 ** -60, "l2"),
]


@pytest.mark.parametrize("emb, t, metric", GROUP_CASES)
@pytest.mark.parametrize("block_elements", [1 << 22, 7, 1])
def test_near_duplicate_groups_against_reference(emb, t, metric, block_elements):
    t = float(estimate_threshold(emb, quantile=0.05, metric=metric)) if t is None else t
    got = near_duplicate_groups(emb, threshold=t, metric=metric, block_elements=block_elements)
    want = near_duplicate_groups_reference(emb, threshold=t, metric=metric)
    assert (got is None) == (want is None)
    if want is not None:
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        group_of, counts = got
        assert group_of.dtype == torch.int64 and int(counts.sum()) == emb.shape[0]
        _, inverse = torch.unique(emb, dim=0, return_inverse=True)
        for rows in range(int(inverse.max()) + 1):  # equal rows share a group
            assert group_of[inverse == rows].unique().numel() == 1


def brute_force_alone(emb, t, metric):
    """(N,) bool: rows with no other row at exact distance < t."""
    x = prepare(emb, metric)
    l2 = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")
    d = l2 if metric == "l2" else 0.5 * l2.square()
    d.fill_diagonal_(torch.inf)
    return (d >= t).all(dim=1)


@pytest.mark.parametrize("emb, t, metric", GROUP_CASES[1:])
def test_near_duplicate_groups_skip_the_alone_nodes(emb, t, metric):
    t = float(estimate_threshold(emb, quantile=0.05, metric=metric)) if t is None else t
    alone = brute_force_alone(emb, t, metric)
    some = alone & (torch.arange(emb.shape[0]) % 2 == 0)  # any true subset will do
    want = near_duplicate_groups_reference(emb, threshold=t, metric=metric)
    for hint in (alone, some):
        got = near_duplicate_groups(emb, threshold=t, metric=metric, alone=hint, block_elements=7)
        assert (got is None) == (want is None)
        if want is not None:
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@needs_extension
@pytest.mark.parametrize("emb, t, metric", [
    (jittered_clusters(300, 8, clusters=6, radius=1.0, seed=3), 1.0, "l2"),  # t small: most rows alone
    (sft_like(200, 6, seed=2), None, "cosine"),  # equal rows: list rows are groups
    (with_group(150, 5, 30, seed=1), None, "l2"),
])
def test_fast_path_alone_nodes_are_alone(emb, t, metric):
    from tfp_kernels.order.builders import ListTables
    from tfp_kernels.order.fast import Kernels, PreparedRows, list_builder
    from tfp_kernels.order.options import OrderOptions

    t = float(estimate_threshold(emb, quantile=0.02, metric=metric)) if t is None else t
    o = OrderOptions(metric=metric, threshold=t, window=4, policy="spread")
    rows = PreparedRows.of(emb, o)
    builder, _ = list_builder(rows, o, emb.shape[1], Kernels())
    lists = ListTables(builder.build_all(may_fall_back=True), long_k=None)
    alone = lists.alone(rows.groups)
    truth = brute_force_alone(emb, t, metric)
    assert alone.dtype == torch.bool and alone.shape == truth.shape
    assert not bool((alone & ~truth).any())  # never claims a node with a near neighbour
    assert int(alone.sum()) >= 3 * int(truth.sum()) // 4  # and finds most of those without one (24 of 25, 6, 28)


def test_near_duplicate_groups_edges():
    emb = gaussian(20, 4)
    assert near_duplicate_groups(emb, threshold=0.0, metric="l2") is None  # t = 0: nothing is closer than t
    assert near_duplicate_groups(emb, threshold=1e-9, metric="l2") is None  # all rows distinct and far apart
    group_of, counts = near_duplicate_groups(emb, threshold=1e9, metric="l2")  # node 0 leads everything
    assert group_of.tolist() == [0] * 20 and counts.tolist() == [20]
    # a leader takes what is near it, not what is near its members: a chain 0 - 1 - 2 at spacing 1, t = 1.5
    chain = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    assert near_duplicate_groups(chain, threshold=1.5, metric="l2")[0].tolist() == [0, 0, 1, 1]


# ------------------------------------------------------------------------------------------------- what it is for


def sft_embeddings(n, fraction, seed=0):
    """The duplicate-heavy SFT set of make_sft, embedded as tfp-pack does (hashed embedder, instruction text)."""
    from tfp_kernels.data.make_sft import make_duplicate_heavy_records
    from tfp_kernels.embed import load_embedder

    records = make_duplicate_heavy_records(n, fraction, seed=seed)
    emb = load_embedder("hashed").embed_texts([r["instruction"] for r in records])
    lengths = torch.tensor([len((r["instruction"] + r["input"] + r["output"]).encode()) for r in records])
    return emb, lengths


@needs_extension
def test_spread_meets_its_goal_on_a_duplicate_heavy_set():
    # 400 records, 20% sharing one instruction: the walk under the paper's rule runs out of valid nodes and ends
    # with the shared records in a row; under "spread" the shared records stay 5 steps apart, no step is forced
    # (the templated instructions that the hashed embedder puts closer than t are near-duplicate groups too, and
    # are spread as well), and the packs of the TFP order hold fewer near-duplicate pairs than random order's
    emb, lengths = sft_embeddings(400, 0.2, seed=1)
    paper, paper_stats = tfp_order(emb, return_stats=True)
    spread, stats = tfp_order(emb, return_stats=True, policy="spread")
    t = stats.threshold
    assert check_path(emb, spread, threshold=t, policy="spread")
    assert paper_stats.num_forced_steps > 40 and stats.num_forced_steps == 0
    _, inverse, counts = torch.unique(emb, dim=0, return_inverse=True, return_counts=True)
    shared = torch.nonzero(inverse == int(counts.argmax())).flatten()
    assert shared.numel() == 80
    for path, apart in ((spread, True), (paper, False)):
        pos = torch.empty(400, dtype=torch.long)
        pos[path] = torch.arange(400)
        assert (int(pos[shared].sort().values.diff().min()) >= 5) == apart
        for lag in range(1, 5):  # no exact duplicates within the window (paper: many)
            same = (inverse[path[lag:]] == inverse[path[:-lag]]).any()
            assert bool(same) != apart or lag > 1

    def fraction(order):
        packing = pack_lengths(lengths[order], 1024)  # (next_fit)
        return near_duplicate_pair_fraction(dataclasses.replace(packing, sample_index=order[packing.sample_index]),
                                            emb, t)

    random = torch.randperm(400, generator=torch.Generator().manual_seed(0))
    assert fraction(spread) <= fraction(random) < fraction(paper)


# ------------------------------------------------------------------------------------------------- report


def brute_force_pair_fraction(packing, emb, t, metric):
    x = prepare(emb, metric)
    close = total = 0
    for p in range(packing.num_packs):
        samples = sorted(set(packing.sample_index[packing.pack_id == p].tolist()))
        for a in range(len(samples)):
            for b in range(a + 1, len(samples)):
                d = float(distances_from(x, torch.tensor([samples[a]]), torch.tensor([samples[b]]), metric)[0, 0])
                close += d < t
                total += 1
    return close / total if total else float("nan")


@pytest.mark.parametrize("strategy", ["next_fit", "stream", "bfd"])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_near_duplicate_pair_fraction_against_brute_force(strategy, metric):
    emb = sft_like(90, 5, seed=6)
    lengths = torch.randint(1, 40, (90,), generator=torch.Generator().manual_seed(2))
    packing = pack_lengths(lengths, 64, strategy=strategy)  # (stream splits samples across packs)
    t = estimate_threshold(emb, metric=metric, quantile=0.1)
    got = near_duplicate_pair_fraction(packing, emb, t, metric)
    assert 0 < got < 1 and got == pytest.approx(brute_force_pair_fraction(packing, emb, t, metric), abs=1e-12)


def test_near_duplicate_pair_fraction_edges():
    emb = torch.tensor([[0.0], [0.1], [5.0], [9.0]])
    assert near_duplicate_pair_fraction(pack_lengths([2, 2, 2, 2], 6), emb, 0.5) == pytest.approx(1 / 3)
    assert math.isnan(near_duplicate_pair_fraction(pack_lengths([2, 2, 2, 2], 2), emb, 0.5))  # no pack holds two
    with pytest.raises(ValueError, match="threshold"):
        near_duplicate_pair_fraction(pack_lengths([2, 2], 6), emb[:2], None)
    with pytest.raises(ValueError, match="embeddings has 2 rows"):
        near_duplicate_pair_fraction(pack_lengths([2, 2, 2], 6), emb[:2], 0.5)
