"""Tests of pack selection and the seeded epoch shuffle (tfp_kernels.packing.shuffle)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tfp_kernels.packing import pack_lengths, pack_permutation, select_packs, shuffle_packs
from tfp_kernels.packing.reference import pack_lengths_reference, select_packs_reference
from tfp_kernels.testing import assert_equal, devices, lognormal_lengths

I64 = torch.int64
PIECE_FIELDS = ("pack_id", "sample_index", "offset", "length", "pack_offsets")


def tensor(values, device="cpu"):
    return torch.tensor(values, dtype=I64, device=device)


def assert_selected(selected, lengths, max_len, packs, *, strategy, overlong="error"):
    expected = select_packs_reference(
        pack_lengths_reference(lengths, max_len, strategy=strategy, overlong=overlong), packs
    )
    for field in PIECE_FIELDS:
        assert_equal(getattr(selected, field), tensor(expected[field], selected.device), field)
    assert selected.num_packs == len(packs)
    for field in ("num_truncated", "num_dropped", "num_split"):
        assert getattr(selected, field) == expected[field], field


@pytest.mark.parametrize("device", devices)
def test_select_hand_worked(device):
    packing = pack_lengths(tensor([3, 4, 5, 1, 9, 2], device), 10)  # 3+4 | 5+1 | 9 | 2
    picked = select_packs(packing, [2, 0])
    assert_equal(picked.sample_index, tensor([4, 0, 1], device), "sample_index")
    assert_equal(picked.pack_id, tensor([0, 1, 1], device), "pack_id")
    assert_equal(picked.pack_offsets, tensor([0, 9, 16], device), "pack_offsets")
    assert picked.num_packs == 2 and picked.max_len == 10
    assert picked.sample_lengths is packing.sample_lengths
    again = select_packs(packing, tensor([3, 3], device))  # repeats allowed
    assert again.sample_index.tolist() == [5, 5] and again.pack_offsets.tolist() == [0, 2, 4]
    none = select_packs(packing, [])
    assert none.num_packs == 0 and none.num_pieces == 0 and none.pack_offsets.tolist() == [0]
    assert select_packs(packing, range(4)).sample_index.tolist() == packing.sample_index.tolist()


@pytest.mark.parametrize("strategy", ["stream", "next_fit", "window_best_fit", "bfd"])
@pytest.mark.parametrize("packs", [[0], [1, 0], "all-reversed", "every-other"])
def test_select_matches_reference(strategy, packs, poison_empty):
    lengths = lognormal_lengths(300, mean=40, max_len=200, seed=1).tolist()
    packing = pack_lengths(lengths, 128, strategy=strategy, overlong="split")
    if packs == "all-reversed":
        packs = list(range(packing.num_packs))[::-1]
    elif packs == "every-other":
        packs = list(range(0, packing.num_packs, 2))
    selected = select_packs(packing, np.array(packs))
    assert_selected(selected, lengths, 128, packs, strategy=strategy, overlong="split")
    for field in PIECE_FIELDS:
        assert not (getattr(selected, field) == poison_empty).any(), field


def test_pack_permutation_deterministic_and_distinct():
    first = pack_permutation(1000, seed=3, epoch=0)
    assert sorted(first.tolist()) == list(range(1000)) and first.dtype == I64 and first.device.type == "cpu"
    assert_equal(pack_permutation(1000, seed=3, epoch=0), first, "same seed and epoch")
    assert not torch.equal(pack_permutation(1000, seed=3, epoch=1), first)
    assert not torch.equal(pack_permutation(1000, seed=4, epoch=0), first)
    assert not torch.equal(pack_permutation(1000, seed=0, epoch=3), first)  # (seed, epoch) is not symmetric
    assert pack_permutation(0, seed=1).tolist() == []


@pytest.mark.parametrize("device", devices)
def test_shuffle_keeps_pack_contents(device):
    lengths = lognormal_lengths(2000, mean=300, max_len=2048, seed=5, device=device)
    packing = pack_lengths(lengths, 2048, strategy="stream")
    shuffled = shuffle_packs(packing, seed=11, epoch=2)
    permutation = pack_permutation(packing.num_packs, 11, 2)
    assert_selected(shuffled, lengths.tolist(), 2048, permutation.tolist(), strategy="stream")
    assert shuffled.device.type == device

    # the same packs, each with its pieces in the same order
    def packs_of(p):
        cuts = p.pack_piece_offsets.tolist()
        pieces = list(zip(p.sample_index.tolist(), p.offset.tolist(), p.length.tolist()))
        return [tuple(pieces[a:b]) for a, b in itertools.pairwise(cuts)]

    before, after = packs_of(packing), packs_of(shuffled)
    assert sorted(before) == sorted(after) and before != after
    assert [before[i] for i in permutation.tolist()] == after
    assert_equal(shuffle_packs(packing, seed=11, epoch=2).sample_index, shuffled.sample_index, "determinism")


@given(
    lengths=st.lists(st.integers(1, 30), min_size=1, max_size=60),
    seed=st.integers(0, 2**32),
    epoch=st.integers(0, 1000),
)
def test_property_shuffle_is_a_permutation_of_packs(lengths, seed, epoch):
    packing = pack_lengths(lengths, 30, strategy="bfd")
    shuffled = shuffle_packs(packing, seed, epoch)
    assert shuffled.num_packs == packing.num_packs
    assert sorted(shuffled.pack_lengths.tolist()) == sorted(packing.pack_lengths.tolist())
    assert sorted(zip(shuffled.sample_index.tolist(), shuffled.offset.tolist())) == sorted(
        zip(packing.sample_index.tolist(), packing.offset.tolist())
    )
    assert_selected(
        shuffled, lengths, 30, pack_permutation(packing.num_packs, seed, epoch).tolist(), strategy="bfd"
    )


@pytest.mark.parametrize(
    "call, error, match",
    [
        pytest.param(
            lambda p: select_packs(p, [0, 4]),
            ValueError,
            r"packs holds 4, outside \[0, num_packs=4\)",
            id="high",
        ),
        pytest.param(lambda p: select_packs(p, [-1]), ValueError, r"packs holds -1, outside", id="negative"),
        pytest.param(lambda p: select_packs(p, [[0]]), ValueError, "packs must be 1-D", id="2-D"),
        pytest.param(lambda p: select_packs(p, [0.5]), TypeError, "packs must hold integers", id="float"),
        pytest.param(
            lambda p: select_packs(p, torch.tensor([1.0])), TypeError, "integer dtype", id="float-tensor"
        ),
        pytest.param(
            lambda p: select_packs("packing", [0]), TypeError, "packing must be a", id="not-a-packing"
        ),
        pytest.param(
            lambda p: shuffle_packs(p, seed=-1), ValueError, "seed must be a non-negative int", id="seed"
        ),
        pytest.param(
            lambda p: shuffle_packs(p, seed=1.5), TypeError, "seed must be a non-negative int", id="seed-f"
        ),
        pytest.param(
            lambda p: shuffle_packs(p, 0, epoch=-2), ValueError, "epoch must be a non-negative", id="epoch"
        ),
        pytest.param(
            lambda p: shuffle_packs(p, True), TypeError, "seed must be a non-negative int", id="seed-bool"
        ),
        pytest.param(
            lambda p: shuffle_packs([1], 0), TypeError, "packing must be a", id="shuffle-not-a-packing"
        ),
    ],
)
def test_bad_inputs(call, error, match):
    packing = pack_lengths([3, 4, 5, 1, 9, 2], 10)
    with pytest.raises(error, match=match):
        call(packing)


@pytest.mark.gpu
def test_cuda_shuffle_matches_cpu():
    lengths = lognormal_lengths(50_000, mean=512, max_len=2048, seed=9)
    cpu = shuffle_packs(pack_lengths(lengths, 2048, strategy="bfd"), seed=1, epoch=3)
    cuda = shuffle_packs(pack_lengths(lengths.cuda(), 2048, strategy="bfd"), seed=1, epoch=3)
    for field in PIECE_FIELDS:
        assert getattr(cuda, field).device.type == "cuda"
        assert_equal(getattr(cuda, field).cpu(), getattr(cpu, field), field)
