"""Tests of ``PackedBatch.micro_batches`` and ``PackedBatch.num_items_in_batch``.

The oracle of a micro-batch is an independent computation: ``assemble`` of the same samples over
``select_packs(packing, its packs)``, i.e. the batch those packs make alone. Every integer field must match
it bit for bit (``torch.equal``), and the micro-batches concatenated must give back the whole batch.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tfp_kernels.assembly import IGNORE_INDEX, assemble
from tfp_kernels.packing import pack_lengths, select_packs
from tfp_kernels.testing import assert_equal

FIELDS = (
    "input_ids",
    "labels",
    "position_ids",
    "cu_seqlens",
    "cu_seqlens_cpu",
    "sample_index",
    "pack_index",
    "pack_offsets",
)
PACKING_FIELDS = ("pack_id", "sample_index", "offset", "length", "pack_offsets")


def make_samples(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 1000, (n,), generator=generator) for n in lengths]


def make_labels(samples):
    labels = [s + 5000 for s in samples]
    for label in labels[::3]:
        label[: max(1, label.numel() // 2)] = IGNORE_INDEX  # a prompt outside the loss
    return labels


def expected_groups(num_packs, n):
    return [t.tolist() for t in torch.arange(num_packs).tensor_split(n)]


def assert_micro_batches(batch, samples, labels, n, pad_to=None):
    parts = batch.micro_batches(n)
    groups = expected_groups(batch.num_packs, n)
    assert len(parts) == n
    for part, packs in zip(parts, groups):
        alone = assemble(
            samples,
            select_packs(batch.packing, packs),
            attention=batch.attention,
            labels=labels,
            pad_to=pad_to,
        )
        assert type(part) is type(batch)
        for name in FIELDS:
            assert_equal(getattr(part, name), getattr(alone, name), name)
        for name in PACKING_FIELDS:
            assert_equal(getattr(part.packing, name), getattr(alone.packing, name), f"packing.{name}")
        assert part.packing.num_packs == alone.packing.num_packs == len(packs)
        assert part.cu_seqlens.dtype == torch.int32 and part.cu_seqlens.is_contiguous()
        assert (part.max_seqlen, part.max_pack_length, part.max_len, part.attention) == (
            alone.max_seqlen,
            alone.max_pack_length,
            alone.max_len,
            alone.attention,
        )
        assert part.num_items_in_batch.item() == alone.num_items_in_batch.item()
        if pad_to is not None:
            for name, mine, theirs in zip(alone.padded._fields, part.padded, alone.padded):
                assert_equal(mine, theirs, f"padded.{name}")
    # back to back, the micro-batches are the batch
    for name in ("input_ids", "labels", "position_ids"):
        assert_equal(torch.cat([getattr(p, name) for p in parts], dim=1), getattr(batch, name), name)
    assert_equal(torch.cat([p.sample_index for p in parts]), batch.sample_index, "sample_index")
    assert sum(int(p.num_items_in_batch) for p in parts) == int(batch.num_items_in_batch)
    return parts


@pytest.mark.parametrize("attention", ["pack", "sample"])
@pytest.mark.parametrize("strategy", ["next_fit", "bfd"])
@pytest.mark.parametrize("n", [1, 2, 3, 5, "P"])
def test_micro_batches_equal_their_packs_alone(attention, strategy, n):
    lengths = [5, 17, 1, 8, 3, 12, 6, 2, 9, 4, 11, 7, 13, 2, 2]
    samples = make_samples(lengths)
    labels = make_labels(samples)
    packing = pack_lengths(lengths, max_len=20, strategy=strategy)
    assert packing.num_packs in (6, 7)  # n = 2, 3, 5: P not a multiple of n (for one strategy or the other)
    n = packing.num_packs if n == "P" else n  # one pack each
    batch = assemble(samples, packing, attention=attention, labels=labels)
    assert_micro_batches(batch, samples, labels, n)


@pytest.mark.parametrize("attention", ["pack", "sample"])
def test_split_samples_and_padded_view(attention):
    lengths = [30, 4, 9, 25, 1, 1, 14]
    samples = make_samples(lengths, seed=2)
    packing = pack_lengths(lengths, max_len=12, overlong="split", strategy="next_fit")
    assert packing.num_split == 3
    batch = assemble(samples, packing, attention=attention, pad_to=16)
    parts = assert_micro_batches(batch, samples, None, 4, pad_to=16)
    assert sum(p.num_packs for p in parts) == batch.num_packs


def test_one_pack_and_one_sample():
    samples = make_samples([3])
    batch = assemble(samples, pack_lengths([3], max_len=4), attention="sample")
    (only,) = assert_micro_batches(batch, samples, None, 1)
    assert only.num_items_in_batch.item() == 2  # the first label of the segment is -100
    with pytest.raises(ValueError, match=r"n must be an int in \[1, 1\]"):
        batch.micro_batches(2)


@pytest.mark.parametrize("n", [0, -1, 4, 2.0, True, "2", None])
def test_bad_n(n):
    batch = assemble(make_samples([3, 4, 5]), pack_lengths([3, 4, 5], max_len=5))
    assert batch.num_packs == 3
    with pytest.raises(ValueError, match="n must be an int"):
        batch.micro_batches(n)


def test_duplicate_samples_and_repeated_packs():
    """A batch that lists a pack twice (select_packs): each copy goes to its own micro-batch."""
    lengths = [4, 4, 6, 2]
    samples = make_samples(lengths)
    packing = select_packs(pack_lengths(lengths, max_len=8), [1, 0, 1])
    batch = assemble(samples, packing, attention="sample")
    parts = assert_micro_batches(batch, samples, None, 3)
    assert_equal(parts[0].input_ids, parts[2].input_ids, "the same pack twice")


def test_num_items_in_batch_counts_shifted_labels():
    samples = [torch.tensor([1, 2, 3]), torch.tensor([4, 5])]
    labels = [torch.tensor([-100, -100, 3]), torch.tensor([4, 5])]
    batch = assemble(samples, pack_lengths([3, 2], max_len=8), attention="sample", labels=labels)
    assert batch.labels.tolist() == [[-100, -100, 3, -100, 5]]
    count = batch.num_items_in_batch
    assert count.dtype == torch.int64 and count.dim() == 0 and count.item() == 2
    assert batch.to_hf_kwargs()["labels"] is batch.labels
    assert "num_items_in_batch" not in batch.to_hf_kwargs()
    assert batch.to_hf_kwargs(num_items_in_batch=7)["num_items_in_batch"] == 7


@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=25),
    max_len=st.integers(8, 48),
    attention=st.sampled_from(["pack", "sample"]),
    data=st.data(),
)
def test_property_micro_batches(lengths, max_len, attention, data):
    samples = make_samples(lengths, seed=len(lengths))
    labels = make_labels(samples)
    packing = pack_lengths(lengths, max_len=max_len, overlong="split", strategy="next_fit")
    batch = assemble(samples, packing, attention=attention, labels=labels)
    n = data.draw(st.integers(1, batch.num_packs))
    assert_micro_batches(batch, samples, labels, n)
