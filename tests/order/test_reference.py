"""The exact reference TFP order on hand-worked cases (paths worked out from docs/design.md, 'The rule')."""

import pytest
import torch

from tfp_kernels import check_path, tfp_order, tfp_order_reference


def line(*xs, dtype=torch.float64):
    """Points on a line as (N, 1) embeddings: D[i, j] = |x_i - x_j|."""
    return torch.tensor([[float(x)] for x in xs], dtype=dtype)


# Each case: (points on a line, threshold, window, max_rejections, start, expected path), worked by hand.
HAND_CASES = [
    # D from 0: 1 (.1, < t: rejected), then 2 (1.0, valid). From 2: 3 (.1) rejected, 1 is 0.1 from
    # node 0 (window 2) rejected, 4 valid. From 4: 3 is 0.1 from 2, rejected; 1 valid. Then 3.
    pytest.param((0, 0.1, 1.0, 1.1, 5.0), 0.5, 2, None, 0, [0, 2, 4, 1, 3], id="window2"),
    # window 1: only `last` matters. 0 -> 2 (1 too close); from 2: 3 too close, 1 at .9 valid; from 1:
    # 3 at 1.0 valid; then 4.
    pytest.param((0, 0.1, 1.0, 1.1, 5.0), 0.5, 1, None, 0, [0, 2, 1, 3, 4], id="window1"),
    # No cap: from 0 only node 4 (20) is >= 5 away; from 4: 3 (17) valid; from 3: 2 and 1 both closer
    # than t, so c_0 = 2 (nearest); then 1.
    pytest.param((0, 1, 2, 3, 20), 5.0, 1, None, 0, [0, 4, 3, 2, 1], id="nocap-c0-fallback"),
    # Cap M=1: from 0, c_0 = 1 is rejected, then c_1 = 2 is taken unchecked. From 2: nodes 1 and 3 tie
    # at distance 1 (lower index first): c_0 = 1 rejected, c_1 = 3 taken. From 3: c_0 = 1 (2)
    # rejected, c_1 = 4 taken. Then 1.
    pytest.param((0, 1, 2, 3, 20), 5.0, 1, 1, 0, [0, 2, 3, 4, 1], id="cap1-with-tie"),
    # Cap M=0: always the nearest node.
    pytest.param((0, 1, 2, 3, 20), 5.0, 1, 0, 0, [0, 1, 2, 3, 4], id="cap0-nearest"),
    # Cap M=2 with 3 candidates: c_0, c_1 rejected -> c_2 = 3. Then 2 candidates, so no c_2 exists and
    # the cap cannot fire: none valid -> c_0 = 2, then 1.
    pytest.param((0, 1, 2, 3), 5.0, 1, 2, 0, [0, 3, 2, 1], id="cap2-then-c0"),
    # Same without cap: nothing is ever valid, so the path is the nearest-neighbour walk.
    pytest.param((0, 1, 2, 3), 5.0, 1, None, 0, [0, 1, 2, 3], id="nothing-valid"),
    # Duplicates (distance 0) and ties. From 0: 1, 2 are duplicates of 0 (rejected), 3 valid. From 3:
    # 4 duplicate; 1, 2, 5 tie at 5 -> 1. From 1: 2 duplicate, 4 valid. From 4: 2 and 5 tie -> 2. Then 5.
    pytest.param((0, 0, 0, 5, 5, 10), 1.0, 1, None, 0, [0, 3, 1, 4, 2, 5], id="duplicates-window1"),
    # Same with window 2: 0 -> 3; from 3 (window {0, 3}): 4 dup of 3, 1 and 2 dups of 0, 5 valid. From 5
    # (window {3, 5}): 4 (5 away) is a dup of 3; 1 (10 away, 5 from 3) valid. From 1 (window {5, 1}):
    # 2 dup of 1; 4 valid. Then 2.
    pytest.param((0, 0, 0, 5, 5, 10), 1.0, 2, None, 0, [0, 3, 5, 1, 4, 2], id="duplicates-window2"),
    # Start elsewhere: from 2 (x=1.0): 3 (.1) rejected, 1 (.9) valid; from 1: 0 (.1) rejected, 3 (1.0)
    # valid; from 3: 0 (1.1) valid; then 4.
    pytest.param((0, 0.1, 1.0, 1.1, 5.0), 0.5, 1, None, 2, [2, 1, 3, 0, 4], id="start2"),
]


@pytest.mark.parametrize("points, t, window, cap, start, expected", HAND_CASES)
def test_hand_worked_paths(points, t, window, cap, start, expected):
    emb = line(*points)
    path = tfp_order_reference(emb, threshold=t, window=window, max_rejections=cap, start=start)
    assert path.tolist() == expected
    # the public API (which may later run a fast path) gives the same
    assert tfp_order(emb, threshold=t, window=window, max_rejections=cap, start=start).tolist() == expected
    # and the validator accepts it exactly (no tolerance needed on these cases)
    assert check_path(emb, path, threshold=t, window=window, max_rejections=cap, atol=0, rtol=0)


def test_hand_worked_cosine():
    # Unit directions at 0, 10, 90, 100, 180 degrees with assorted norms (cosine ignores the norm).
    # 1 - cos: 10 deg apart = 0.015, 80 = 0.826, 90 = 1, 100 = 1.17, 170 = 1.98, 180 = 2. t = 0.5.
    # From 0: 1 too close, 2 (90) valid. From 2: 3 (10 away) rejected, 1 (80) valid. From 1: 3 (90)
    # valid. Then 4.
    angles = torch.tensor([0.0, 10.0, 90.0, 100.0, 180.0], dtype=torch.float64).deg2rad()
    norms = torch.tensor([1.0, 2.0, 3.0, 0.5, 4.0], dtype=torch.float64)
    emb = torch.stack([angles.cos(), angles.sin()], dim=1) * norms[:, None]
    path = tfp_order_reference(emb, metric="cosine", threshold=0.5, window=1)
    assert path.tolist() == [0, 2, 1, 3, 4]
    # with l2 the norms matter: from 0 (at (1, 0)) the nearest valid node differs
    assert tfp_order_reference(emb, metric="l2", threshold=0.5, window=1).tolist() != [0, 2, 1, 3, 4]


def test_single_and_two_nodes():
    assert tfp_order_reference(torch.randn(1, 3)).tolist() == [0]
    assert tfp_order(torch.randn(1, 3)).tolist() == [0]
    assert tfp_order_reference(torch.randn(2, 3), start=1).tolist() == [1, 0]
    assert tfp_order(torch.randn(2, 3)).tolist() == [0, 1]


def test_all_identical_embeddings_give_index_order():
    # All distances are 0: no threshold can be estimated (warning, t = 0), every node ties with every
    # other, so the walk takes the lowest unvisited index each time.
    emb = torch.ones(5, 4)
    with pytest.warns(UserWarning, match="distance 0"):
        path = tfp_order(emb, start=2)
    assert path.tolist() == [2, 0, 1, 3, 4]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_match_upcast(dtype):
    torch.manual_seed(1)
    emb = torch.randn(60, 7).to(dtype)
    a = tfp_order_reference(emb, threshold=3.0)
    b = tfp_order_reference(emb.double(), threshold=3.0)
    assert torch.equal(a, b)


def test_result_is_permutation_on_device_of_input():
    torch.manual_seed(2)
    emb = torch.randn(123, 9)
    path = tfp_order_reference(emb, quantile=0.05, window=3)
    assert path.dtype == torch.int64 and path.device == emb.device
    assert torch.equal(path.sort().values, torch.arange(123))


def test_cap_changes_path_on_clustered_data():
    # With a small cap the rule degrades to "the (M+1)-th nearest"; the validator knows both rules.
    torch.manual_seed(3)
    centres = torch.randn(4, 8) * 10
    emb = centres.repeat_interleave(30, dim=0) + 0.3 * torch.randn(120, 8)
    t = 2.0
    free = tfp_order_reference(emb, threshold=t)
    capped = tfp_order_reference(emb, threshold=t, max_rejections=3)
    assert not torch.equal(free, capped)
    assert check_path(emb, capped, threshold=t, max_rejections=3)
    assert check_path(emb, free, threshold=t)
    assert not check_path(emb, capped, threshold=t)  # the uncapped rule rejects the capped path
