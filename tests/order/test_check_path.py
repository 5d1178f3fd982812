"""check_path: accepts correct paths, catches corrupted ones and names the first bad step."""

import pytest
import torch

from tfp_kernels import check_path, estimate_threshold, tfp_order_reference


def clustered(n_clusters=6, per=40, d=12, seed=0, spread=0.4, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_clusters, d, generator=g) * 6
    emb = centres.repeat_interleave(per, dim=0) + spread * torch.randn(n_clusters * per, d, generator=g)
    # planted near-duplicates, so the threshold really rejects candidates
    emb[1::7] = emb[0::7][: emb[1::7].shape[0]] + 1e-3 * torch.randn(emb[1::7].shape, generator=g)
    return emb.to(dtype)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_reference_paths_pass(metric):
    emb = clustered()
    t = estimate_threshold(emb, metric=metric, quantile=0.05)
    for cap in (None, 5):
        path = tfp_order_reference(emb, metric=metric, threshold=t, max_rejections=cap)
        res = check_path(emb, path, metric=metric, threshold=t, max_rejections=cap)
        assert res.ok, res.message
        assert res.num_steps_checked == emb.shape[0] - 1


def test_swapped_nodes_are_caught_at_the_right_step():
    emb = clustered(seed=1)
    t = estimate_threshold(emb, quantile=0.05)
    path = tfp_order_reference(emb, threshold=t)
    bad = path.clone()
    bad[[50, 120]] = bad[[120, 50]]
    res = check_path(emb, bad, threshold=t)
    assert not res.ok
    assert res.first_bad_step == 50
    assert res.got == int(path[120]) and res.expected == int(path[50])
    assert "step 50" in res.message
    with pytest.raises(AssertionError, match="step 50"):
        res.raise_if_failed()


def test_reversed_tail_is_caught():
    emb = clustered(seed=2)
    t = estimate_threshold(emb)
    path = tfp_order_reference(emb, threshold=t)
    bad = torch.cat([path[:100], path[100:].flip(0)])
    res = check_path(emb, bad, threshold=t)
    assert not res.ok and res.first_bad_step == 100


def test_wrong_parameters_are_caught():
    emb = clustered(seed=3)
    t = estimate_threshold(emb, quantile=0.05)
    path = tfp_order_reference(emb, threshold=t, window=4)
    assert check_path(emb, path, threshold=t, window=4)
    assert not check_path(emb, path, threshold=t, window=1)
    assert not check_path(emb, path, threshold=t * 0.5, window=4)


@pytest.mark.parametrize(
    "path, fragment",
    [
        ([0, 1, 2, 2, 4], "node 2 appears at steps"),
        ([0, 1, 2, 3], "has 4 entries"),
        ([0, 1, 2, 3, 9], "outside"),
    ],
)
def test_non_permutations_are_reported(path, fragment):
    emb = torch.randn(5, 3)
    res = check_path(emb, torch.tensor(path), threshold=0.1)
    assert not res.ok and fragment in res.message


def test_sampled_steps():
    emb = clustered(seed=4)
    t = estimate_threshold(emb)
    path = tfp_order_reference(emb, threshold=t)
    bad = path.clone()
    bad[[30, 31]] = bad[[31, 30]]
    assert check_path(emb, bad, threshold=t, steps=torch.tensor([5, 100, 200]))  # misses the damage
    res = check_path(emb, bad, threshold=t, steps=torch.tensor([5, 30, 200]))
    assert not res.ok and res.first_bad_step == 30
    with pytest.raises(ValueError, match="steps must lie in"):
        check_path(emb, path, threshold=t, steps=torch.tensor([0, 3]))


def test_float_ties_are_tolerated_but_not_with_zero_tolerance():
    # nodes 1 and 2 are both at distance 1 from node 0 but (1 + 1e-12) apart in float64: the rule picks 1;
    # a path taking 2 first is a floating-point tie, accepted with the default tolerance only.
    emb = torch.tensor([[0.0], [1.0], [-1.0 - 1e-12], [10.0]], dtype=torch.float64)
    good = tfp_order_reference(emb, threshold=0.5, window=1)
    assert good.tolist() == [0, 1, 2, 3]
    tie = torch.tensor([0, 2, 1, 3])
    res = check_path(emb, tie, threshold=0.5, window=1)
    assert res.ok and res.num_tolerated == 1
    assert not check_path(emb, tie, threshold=0.5, window=1, atol=0, rtol=0)


@pytest.mark.parametrize("block_elements", [1, 240 * 5 * 3, 1 << 23])
def test_blocks_of_steps_do_not_change_the_verdict(monkeypatch, block_elements):
    # blocks of 1 step, of 3 steps and of all steps (the CPU's and the GPU's budgets differ): the same outcome
    from tfp_kernels.order import check

    monkeypatch.setitem(check._BLOCK_ELEMENTS, "cpu", block_elements)
    emb = clustered(seed=1)
    t = estimate_threshold(emb, quantile=0.05)
    for cap in (None, 5):
        path = tfp_order_reference(emb, threshold=t, max_rejections=cap)
        assert check_path(emb, path, threshold=t, max_rejections=cap).ok
        bad = path.clone()
        bad[[50, 120]] = bad[[120, 50]]
        res = check_path(emb, bad, threshold=t, max_rejections=cap)
        assert not res.ok and res.first_bad_step == 50 and res.num_steps_checked == 50
        sampled = check_path(emb, bad, threshold=t, max_rejections=cap, steps=torch.tensor([7, 120, 30, 200]))
        assert not sampled.ok and sampled.first_bad_step == 120
