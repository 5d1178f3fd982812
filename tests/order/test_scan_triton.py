"""The fused masked scan (Triton, under TRITON_INTERPRET=1 on the CPU) and the pick built on it vs exact_pick."""

import pytest
import torch

from tfp_kernels.order.band_topk import band_bounds, squared_distance_error_coef
from tfp_kernels.order.band_topk_triton import triton_available, triton_runs_on
from tfp_kernels.order.distance import distances_from, prepare
from tfp_kernels.order.float16_rows import half_rows
from tfp_kernels.order.host_scan import half_scan_slack
from tfp_kernels.order.scan import exact_pick, projection_basis
from tfp_kernels.order.scan_triton import SCAN_CHUNK, masked_scan_torch, masked_scan_triton, triton_exact_pick
from tfp_kernels.order.threshold import estimate_threshold, squared_threshold

needs_triton = pytest.mark.skipif(not triton_available(), reason="needs Triton (CUDA or TRITON_INTERPRET=1)")


def _masked_scan_triton_here(*args):
    """``masked_scan_triton`` on the test's CPU tensors: as they are under the interpreter, else on the GPU (its
    results brought back), so that the same tests check the compiled kernel on a GPU machine."""
    if triton_runs_on("cpu"):
        return masked_scan_triton(*args)
    def to_cuda(a):
        if isinstance(a, tuple):  # the float16 rows and their scales
            return tuple(to_cuda(b) for b in a)
        return a.cuda() if isinstance(a, torch.Tensor) else a

    return tuple(out.cpu() for out in masked_scan_triton(*map(to_cuda, args)))


SCANS = [
    pytest.param(masked_scan_torch, id="torch"),
    pytest.param(_masked_scan_triton_here, id="triton", marks=needs_triton),
]


#: What the scan reads and multiplies: float32 rows; float16 rows (float32 products); float16 rows with the
#: tensor-core products (query rows split as float16 hi + lo)
ROWS = [pytest.param(False, id="float32-rows"), pytest.param(True, id="float16-rows"),
        pytest.param("tensor_cores", id="float16-rows-tensor-cores")]


def _data(n, d, seed, duplicates=0, metric="l2", half=False):
    """Rows in 5 clusters; with ``half``, also the float16 rows the scan reads and their (wider) bound
    (``half="tensor_cores"``: the bound of the tensor-core products)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(5, d, generator=g) * 2
    emb = centers[torch.randint(0, 5, (n,), generator=g)] + 0.6 * torch.randn(n, d, generator=g)
    if duplicates:
        emb[:duplicates] = emb[duplicates : 2 * duplicates]
    x64 = prepare(emb, metric)
    x32 = x64.float()
    sq = x32.square().sum(dim=1)
    if half:
        chunk = SCAN_CHUNK if half == "tensor_cores" else None
        return emb, x64, x32, sq, half_scan_slack(sq, d, float32_norms=True, tensor_core_chunk=chunk), half_rows(x32)
    slack = squared_distance_error_coef(d, torch.float32) * (sq.double() + sq.max().double())
    return emb, x64, x32, sq, slack, None


@pytest.mark.parametrize("half", ROWS)
@pytest.mark.parametrize("scan", SCANS)
@pytest.mark.parametrize("n, d", [(1, 3), (7, 5), (130, 37), (300, 100)])
def test_status_agrees_with_exact_distances(scan, n, d, half):
    emb, x64, x32, sq, slack, rows16 = _data(n, d, seed=n, half=half)
    t = estimate_threshold(emb, quantile=0.2) if n > 1 else 1.0
    t2 = squared_threshold(t, "l2")
    g = torch.Generator().manual_seed(1)
    rows = torch.randperm(n, generator=g)[: max(1, n // 2)].sort().values
    queries = torch.randint(0, n, (min(5, n),), generator=g)
    lower = (t2 - slack[queries]).float()
    upper = (t2 + slack[queries]).float()
    s2_last, status = scan(x32, sq, rows, queries, lower, upper, None, rows16, half == "tensor_cores")
    exact = distances_from(x64, rows, queries, "l2") ** 2  # (U, W) exact squared distances
    assert s2_last.dtype == torch.float32 and status.dtype == torch.int8
    assert torch.all((s2_last.double() - exact[:, 0]).abs() <= slack[queries[0]] * 1.0001)
    valid = (exact >= t2).all(dim=1)
    assert torch.all(valid[status == 2]), "a row marked surely valid is exactly too close to a query"
    assert not torch.any(valid[status == 0]), "a row marked surely invalid is exactly far from every query"


def _random_step(x64, y64, t, metric, window, g):
    """A random set of visited nodes (the last of them first): the unvisited mask and list, ``last``, the other
    window nodes and :func:`exact_pick`'s answer."""
    n = x64.shape[0]
    visited = torch.randperm(n, generator=g)[: int(torch.randint(window, n - 1, (1,), generator=g))]
    mask = torch.ones(n, dtype=torch.bool)
    mask[visited] = False
    unvisited = torch.nonzero(mask).flatten()
    last, window_nodes = int(visited[0]), visited[1:window].tolist()
    expected = exact_pick(x64, y64, unvisited, last, window_nodes, threshold=t, max_rejections=None, metric=metric)
    return mask, unvisited, last, window_nodes, expected


@pytest.mark.parametrize("half", ROWS)
@pytest.mark.parametrize("scan", SCANS)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("window", [1, 2, 4, 7])
@pytest.mark.parametrize("quantile", [0.02, 0.3, 0.9])
def test_pick_equals_exact_pick(scan, metric, window, quantile, half):
    n, d = 157, 23
    emb, x64, x32, sq, slack, rows16 = _data(n, d, seed=window + int(quantile * 100), duplicates=12, metric=metric,
                                             half=half)
    t = estimate_threshold(emb, metric=metric, quantile=quantile)
    y64 = x64 @ projection_basis(x64)
    g = torch.Generator().manual_seed(window)
    for trial in range(6):
        mask, unvisited, last, window_nodes, expected = _random_step(x64, y64, t, metric, window, g)
        got = triton_exact_pick(
            x64, x32, sq, slack, unvisited, last, window_nodes, threshold=t, metric=metric, scan=scan, half=rows16,
            tensor_cores=half == "tensor_cores",
        )
        assert got == expected, (trial, got, expected)
        # a stale list (every node) with the visited mask: the same pick
        stale = triton_exact_pick(
            x64, x32, sq, slack, torch.arange(n), last, window_nodes, threshold=t, metric=metric, scan=scan,
            visited=~mask, half=rows16, tensor_cores=half == "tensor_cores",
        )
        assert stale == expected, (trial, stale, expected)


@pytest.mark.parametrize("scan", SCANS)
def test_pick_with_no_valid_node_takes_the_nearest(scan):
    # every unvisited node is within t of the last node: c_0, the nearest (ties by index)
    emb = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, 0.5]])
    x64 = prepare(emb, "l2")
    x32 = x64.float()
    sq = x32.square().sum(dim=1)
    slack = squared_distance_error_coef(2, torch.float32) * (sq.double() + sq.max().double())
    unvisited = torch.tensor([1, 2, 3])
    got = triton_exact_pick(x64, x32, sq, slack, unvisited, 0, [], threshold=10.0, metric="l2", scan=scan)
    assert got == 1  # nodes 1 and 2 tie at distance 1: the lower index
    got = triton_exact_pick(x64, x32, sq, slack, unvisited, 4, [0], threshold=0.9, metric="l2", scan=scan)
    assert got == 1  # all three are 0.707 from node 4 (< 0.9): none valid, c_0 ties -> lowest index
    got = triton_exact_pick(x64, x32, sq, slack, unvisited, 0, [], threshold=1.2, metric="l2", scan=scan)
    assert got == 3  # only node 3 (1.414 away) is valid, although 1 and 2 are nearer
    # the same with a stale list: node 4 listed but visited, never read nor picked
    visited = torch.tensor([True, False, False, False, True])
    rows = torch.arange(5)
    assert triton_exact_pick(x64, x32, sq, slack, rows, 0, [], threshold=10.0, metric="l2", scan=scan,
                             visited=visited) == 1
    assert triton_exact_pick(x64, x32, sq, slack, rows, 0, [], threshold=0.6, metric="l2", scan=scan,
                             visited=visited) == 1  # node 4 (0.707 away) would be the nearest valid one


#: Where the settle kernel's tests run: the GPU, or the CPU under the interpreter
SETTLE_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_settle = pytest.mark.skipif(not triton_available() or not triton_runs_on(torch.device(SETTLE_DEVICE)),
                                  reason="needs Triton on CUDA, or TRITON_INTERPRET=1")


def _on(device, *tensors):
    return [None if t is None else tuple(u.to(device) for u in t) if isinstance(t, tuple) else t.to(device)
            for t in tensors]


@needs_settle
@pytest.mark.parametrize("half", ROWS)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("window", [1, 4, 7])
@pytest.mark.parametrize("quantile", [0.02, 0.3, 0.9])
def test_settle_kernel_pick_equals_exact_pick(metric, window, quantile, half):
    # the settle kernels (the candidates' float64 distances and the (distance, node) minimum on the device)
    # against exact_pick, and against the torch settling of the same scan: same node, same rows settled
    n, d = 157, 23
    emb, x64, x32, sq, slack, rows16 = _data(n, d, seed=window + int(quantile * 100), duplicates=12, metric=metric,
                                             half=half)
    t = estimate_threshold(emb, metric=metric, quantile=quantile)
    y64 = x64 @ projection_basis(x64)
    dx64, dx32, dsq, dslack, drows16 = _on(SETTLE_DEVICE, x64, x32, sq, slack, rows16)
    g = torch.Generator().manual_seed(window)
    for trial in range(4):
        mask, unvisited, last, window_nodes, expected = _random_step(x64, y64, t, metric, window, g)
        tallies = []
        for fused_settle in (True, False):
            tally = [0]
            got = triton_exact_pick(
                dx64, dx32, dsq, dslack, unvisited.to(SETTLE_DEVICE), last, window_nodes, threshold=t,
                metric=metric, scan=masked_scan_triton, half=drows16, tensor_cores=half == "tensor_cores",
                tally=tally, fused_settle=fused_settle,
            )
            assert got == expected, (trial, fused_settle, got, expected)
            tallies.append(tally[0])
        assert tallies[0] == tallies[1]
        # a stale list (every node) with the visited mask, and every node's bounds computed once: the same pick
        stale = triton_exact_pick(
            dx64, dx32, dsq, dslack, torch.arange(n, device=SETTLE_DEVICE), last, window_nodes, threshold=t,
            metric=metric, scan=masked_scan_triton, visited=(~mask).to(SETTLE_DEVICE), half=drows16,
            tensor_cores=half == "tensor_cores", fused_settle=True,
            bounds=band_bounds(squared_threshold(t, metric), dslack),
        )
        assert stale == expected, (trial, stale, expected)


@needs_settle
def test_settle_kernel_with_no_valid_node_and_ties():
    emb = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, 0.5]])
    x64 = prepare(emb, "l2")
    x32 = x64.float()
    sq = x32.square().sum(dim=1)
    slack = squared_distance_error_coef(2, torch.float32) * (sq.double() + sq.max().double())
    x64, x32, sq, slack = _on(SETTLE_DEVICE, x64, x32, sq, slack)
    unvisited = torch.tensor([1, 2, 3], device=SETTLE_DEVICE)

    def pick(rows, last, window_nodes, threshold, visited=None):
        return triton_exact_pick(x64, x32, sq, slack, rows, last, window_nodes, threshold=threshold, metric="l2",
                                 scan=masked_scan_triton, visited=visited, fused_settle=True)

    assert pick(unvisited, 0, [], 10.0) == 1  # none valid: c_0, nodes 1 and 2 tie -> the lower index
    assert pick(unvisited, 4, [0], 0.9) == 1
    assert pick(unvisited, 0, [], 1.2) == 3  # only node 3 is valid
    assert pick(unvisited, 0, [], 0.5) == 1  # all valid, 1 and 2 tie at distance 1 -> the lower index
    visited = torch.tensor([True, False, False, False, True], device=SETTLE_DEVICE)
    rows = torch.arange(5, device=SETTLE_DEVICE)
    assert pick(rows, 0, [], 0.6, visited) == 1  # node 4 (0.707 away) listed but visited


def test_window_limit():
    x32 = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="query rows"):
        masked_scan_triton(
            x32,
            torch.zeros(3),
            torch.arange(3),
            torch.zeros(65, dtype=torch.int64),
            torch.zeros(65),
            torch.zeros(65),
        )


@pytest.mark.parametrize("tensor_cores", [False, True])
@pytest.mark.parametrize("scan", SCANS)
def test_float16_rows_bound_where_the_rounding_errors_add_up(scan, tensor_cores):
    """Entries just below the midpoint between 1 and the next float16 all round down by ~2^-11 relative: a row's
    scanned distance to itself is off by ~94% of the float16 bound (which must hold: a bound 4x smaller fails)."""
    d = 250
    value = 1.0 + 2.0**-11 - 2.0**-20
    x32 = torch.full((2, d), value)
    x32[1, ::2] = -value
    sq = x32.square().sum(dim=1)
    slack = half_scan_slack(sq, d, float32_norms=True, tensor_core_chunk=SCAN_CHUNK if tensor_cores else None)
    rows = torch.arange(2)
    for i in range(2):
        queries = torch.tensor([i])
        s2_last, _ = scan(x32, sq, rows, queries, torch.zeros(1), torch.zeros(1), None, half_rows(x32), tensor_cores)
        err = float(s2_last[i])  # exactly 0
        assert err <= float(slack[i])
        assert err > 0.8 * float(slack[i])


@pytest.mark.parametrize("tensor_cores", [False, True])
@pytest.mark.parametrize("scan", SCANS)
def test_float16_rows_within_the_bound_at_every_magnitude(scan, tensor_cores):
    """Rows scaled by 1e-14 .. 1e14 (entries over six decades, a zero row, a row of one entry; squared norms
    within float32's range, as the scan needs), each row as a
    query: the scanned squared distances stay within the bound (a query row left unscaled, or scaled twice, by
    the tensor-core path's float16 split breaks it by orders of magnitude)."""
    g = torch.Generator().manual_seed(3)
    n, d = 24, 45
    x = torch.randn(n, d, generator=g) * torch.logspace(-3, 3, d)[torch.randperm(d, generator=g)]
    x = x * torch.logspace(-14, 14, n)[:, None]
    x[5] = 0.0
    x[7] = 0.0
    x[7, 3] = 2.5e-20
    x64 = x.double()
    x32 = x64.float()
    sq = x32.double().square().sum(dim=1).float()
    slack = half_scan_slack(sq, d, float32_norms=True, tensor_core_chunk=SCAN_CHUNK if tensor_cores else None)
    rows = torch.arange(n)
    exact = distances_from(x64, rows, rows, "l2") ** 2
    for i in range(n):
        queries = torch.tensor([i, (i + 1) % n])
        s2_last, _ = scan(x32, sq, rows, queries, torch.zeros(2), torch.zeros(2), None, half_rows(x32), tensor_cores)
        err = (s2_last.double() - exact[:, i]).abs()
        assert torch.all(err <= slack[i]), (i, int(err.argmax()), float(err.max()), float(slack[i]))


def test_tensor_core_products_need_the_float16_rows_and_their_bound():
    x32 = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="tensor_cores needs the float16 rows"):
        masked_scan_triton(x32, torch.zeros(3), torch.arange(3), torch.zeros(1, dtype=torch.int64), torch.zeros(1),
                           torch.zeros(1), None, None, True)
    from tfp_kernels.order.host_scan import half_scan_error_coef

    with pytest.raises(ValueError, match="float32_norms"):
        half_scan_error_coef(768, tensor_core_chunk=SCAN_CHUNK)
    # the chunked tensor-core sum replaces the float32 accumulation's gamma_D: below it for long rows
    assert half_scan_error_coef(768, float32_norms=True, tensor_core_chunk=SCAN_CHUNK) < half_scan_error_coef(
        768, float32_norms=True)
