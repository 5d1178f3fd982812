"""The pickers (tfp_kernels/order/pickers.py) against a brute-force rule in plain torch, without the walk."""

import pytest
import torch

from tfp_kernels.order.distance import prepare
from tfp_kernels.order.pickers import (
    CloseSetPicker,
    DeviceScanPicker,
    FusedScanPicker,
    PolicyPicker,
    Rule,
    WalkState,
    add_counts,
)
from tfp_kernels.order.policy import WalkPolicy


def brute_force_pick(x64, visited, last, window, *, threshold, max_rejections):
    """The TFP rule by hand (l2 on prepared rows): candidates by (distance to last, index); the first at
    distance >= t from every window node; with the cap, the (M+1)-th candidate once M were rejected; none
    valid: the nearest."""
    cand = torch.nonzero(~visited).flatten()
    d_last = (x64[cand] - x64[last]).norm(dim=1)
    order = sorted(range(cand.numel()), key=lambda i: (float(d_last[i]), int(cand[i])))
    rejected = 0
    for i in order:
        node = int(cand[i])
        if all(float((x64[node] - x64[w]).norm()) >= threshold for w in window):
            return node
        rejected += 1
        if max_rejections is not None and cand.numel() > max_rejections and rejected > max_rejections:
            return node
    return int(cand[order[0]])


def state_after(n, path, window):
    state = WalkState(n, path[0], torch.device("cpu"), window)
    for i, node in enumerate(path[1:], start=1):
        state.path[i] = node
        state.visited[node] = True
    return state


@pytest.mark.parametrize("n, d, cap", [(2, 3, None), (41, 7, None), (41, 7, 3), (97, 5, 10)])
def test_device_scan_equals_the_brute_force_rule(n, d, cap):
    g = torch.Generator().manual_seed(n + d)
    emb = torch.randn(n, d, generator=g)
    emb[5 % n] = emb[0]  # an exact duplicate: ties
    x64 = prepare(emb, "l2", torch.float64)
    t = float(torch.pdist(x64).quantile(0.1)) if n > 2 else 0.5
    rule = Rule("l2", t, 4, cap)
    for steps in range(1, min(n, 12)):
        path = torch.randperm(n, generator=g)[:steps].tolist()
        state = state_after(n, path, 4)
        node = DeviceScanPicker(x64, state, rule).pick(steps)
        want = brute_force_pick(x64, state.visited, path[-1], path[max(0, steps - 4):],
                                threshold=t, max_rejections=cap)
        assert node == want


def test_close_set_picker_settles_over_the_set_or_hands_on():
    emb = torch.randn(30, 4, generator=torch.Generator().manual_seed(2))
    x64 = prepare(emb, "l2", torch.float64)
    rule = Rule("l2", 0.8, 4, 5)
    state = state_after(30, [0, 7, 3], 4)

    class Inner:
        calls = 0

        def pick(self, step):
            Inner.calls += 1
            return -1

        def counts(self):
            return {"num_close_set_scans": 2}

    # node 3's set holds every other node, its band list none: the set decides, as the brute force does
    offsets = torch.zeros(31, dtype=torch.int64)
    offsets[4:] = 29
    members = torch.tensor([i for i in range(30) if i != 3], dtype=torch.int32)
    band_index = torch.full((30, 4), -1, dtype=torch.int32)
    limit2 = torch.full((30,), float("inf"), dtype=torch.float64)
    picker = CloseSetPicker(Inner(), x64, (offsets, members), band_index, limit2, state, rule)
    want = brute_force_pick(x64, state.visited, 3, [0, 7, 3], threshold=0.8, max_rejections=5)
    assert picker.pick(3) == want and Inner.calls == 0
    assert picker.counts() == {"num_close_set_scans": 3}
    # no set for `last`: the inner picker's
    state = state_after(30, [0, 7, 3, 12], 4)
    picker = CloseSetPicker(Inner(), x64, (offsets, members), band_index, limit2, state, rule)
    assert picker.pick(4) == -1 and Inner.calls == 1
    # the cap cannot fire any more (5 or fewer unvisited): the inner picker's
    state = state_after(30, list(range(25)), 4)
    offsets = torch.arange(31, dtype=torch.int64)
    picker = CloseSetPicker(Inner(), x64, (offsets, torch.arange(30, dtype=torch.int32)), band_index, limit2,
                            state, rule)
    assert picker.pick(25) == -1 and Inner.calls == 2


class Fixed:
    def __init__(self, node):
        self.node = node

    def pick(self, step):
        return self.node

    def counts(self):
        return {}


def test_policy_picker_takes_the_farthest_node_at_a_forced_step_under_spread():
    # five points on a line, t = 2.5: after 0, 1 every unvisited node is closer than t to 1 or 0 ... except 4
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0]], dtype=torch.float64)
    state = state_after(5, [0, 1], 4)
    spread = PolicyPicker(Fixed(2), WalkPolicy("spread", None, 2.5, "l2"), x, state)
    paper = PolicyPicker(Fixed(2), WalkPolicy("paper", None, 2.5, "l2"), x, state)
    assert paper.pick(2) == 2 and paper.forced.count == 1 and paper.forced.first == 2
    assert spread.pick(2) == 4 and spread.forced.count == 1  # (2 is invalid; 4 is the farthest from the window)
    valid = PolicyPicker(Fixed(4), WalkPolicy("spread", None, 2.5, "l2"), x, state)
    assert valid.pick(2) == 4 and valid.forced.count == 0


def test_fused_scan_tries_its_modes_and_hands_capped_steps_on():
    x32 = torch.randn(20, 6, generator=torch.Generator().manual_seed(0))
    x64 = x32.double()
    sq = x32.double().square().sum(1).float()
    tried = []

    def kernel(*args, tensor_cores, fused_settle, tally, **kwargs):
        tried.append((tensor_cores, fused_settle))
        if fused_settle:
            raise RuntimeError("compile failure (simulated)")
        tally[0] += 3
        return 11

    state = state_after(20, [0, 1], 4)
    capped = Fixed(7)
    picker = FusedScanPicker(x64, x32, sq, 1.0, state, Rule("l2", 1.0, 4, None), capped, kernel=kernel)
    with pytest.warns(RuntimeWarning, match="float64 settle kernel failed .*simulated.* trying the torch settle"):
        assert picker.pick(2) == 11
    assert tried == [(True, True), (True, False)] and picker.mode == (True, False)
    assert picker.pick(2) == 11 and tried[-1] == (True, False)  # the mode that worked, kept
    assert picker.counts() == {"scan_candidates": 6}
    # with a cap that can still fire (more unvisited nodes than it): the capped picker's
    picker = FusedScanPicker(x64, x32, sq, 1.0, state, Rule("l2", 1.0, 4, 5), capped, kernel=kernel)
    assert picker.pick(2) == 7


def test_walk_state_window_and_device_mask():
    state = state_after(10, [4, 2, 9, 0, 7], 3)
    assert state.last(5) == 7 and state.older_window(5) == [9, 0] and state.window_nodes(5) == [9, 0, 7]
    assert state.unvisited_on_device(5).tolist() == [1, 3, 5, 6, 8]
    assert add_counts({"a": 1}, {"a": 2, "b": 1}) == {"a": 3, "b": 1}
