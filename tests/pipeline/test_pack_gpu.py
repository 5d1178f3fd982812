"""pack_gpu: composition of order + pack_lengths + assemble, input kinds, policies and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import tfp_kernels
from tfp_kernels import Jagged, Padded, assemble, pack_gpu, pack_lengths, tfp_order
from tfp_kernels.testing import check_packing_invariants, devices


def _buffer(n: int, seed: int, low: int = 1, high: int = 60, vocab: int = 500):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (n,), generator=g)
    samples = [torch.randint(0, vocab, (int(x),), generator=g) for x in lengths]
    return samples, lengths


def _clustered(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(6, d, generator=g) * 4
    return centers[torch.randint(0, 6, (n,), generator=g)] + torch.randn(n, d, generator=g)


def _sample_tokens(batch) -> dict[int, list[int]]:
    """Tokens of each input sample as found in the batch (its pieces put back in offset order)."""
    pieces: dict[int, list] = {}
    flat = batch.input_ids[0].tolist()
    p = batch.packing
    pos = 0
    for s, o, n in zip(batch.sample_index.tolist(), p.offset.tolist(), p.length.tolist()):
        pieces.setdefault(s, []).append((o, flat[pos : pos + n]))
        pos += n
    return {s: [t for _, toks in sorted(parts) for t in toks] for s, parts in pieces.items()}


def _check_invariants(batch, lengths: list[int], max_len: int, overlong: str, strategy: str) -> None:
    """check_packing_invariants on the packing seen in path order (pack_gpu reports input indices)."""
    import dataclasses

    order = batch.order.cpu()
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    p = batch.packing
    in_path_order = dataclasses.replace(
        p,
        sample_index=rank[p.sample_index.cpu()],
        dropped_index=rank[p.dropped_index.cpu()].sort().values,
        sample_lengths=None,
    )
    path_lengths = [lengths[i] for i in order.tolist()]
    check_packing_invariants(in_path_order, path_lengths, max_len, overlong, strategy=strategy)


def _assert_batches_equal(a, b):
    for name in ("input_ids", "labels", "position_ids", "cu_seqlens", "sample_index", "pack_offsets"):
        torch.testing.assert_close(getattr(a, name).cpu(), getattr(b, name).cpu(), rtol=0, atol=0, msg=name)
    assert a.max_seqlen == b.max_seqlen


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_tfp_order_in_buffer_equals_tfp_order(device, metric):
    samples, lengths = _buffer(97, seed=1)
    emb = _clustered(97, 24, seed=2)
    samples = [s.to(device) for s in samples]
    emb = emb.to(device)
    batch = pack_gpu(samples, max_len=100, embeddings=emb, metric=metric, window=3)
    path = tfp_order(emb, metric=metric, window=3, policy="spread")  # (pack_gpu's default policy)
    assert torch.equal(batch.order.cpu(), path.cpu())
    assert batch.order_stats is not None and batch.order_stats.num_nodes == 97
    # next_fit keeps the order: the pieces list the samples in path order
    assert batch.sample_index.cpu().tolist() == path.cpu().tolist()
    # and the batch is exactly assemble() of the packing of the reordered lengths
    expected_packing = pack_lengths(lengths[path.cpu()], 100)
    reordered = [samples[i] for i in path.cpu().tolist()]
    expected = assemble(reordered, expected_packing)
    for name in ("input_ids", "labels", "position_ids", "cu_seqlens", "pack_offsets"):
        assert torch.equal(getattr(batch, name), getattr(expected, name)), name
    assert batch.cu_seqlens.device == emb.device and batch.cu_seqlens.dtype == torch.int32


def test_fixed_threshold_is_used():
    samples, _ = _buffer(60, seed=3)
    emb = _clustered(60, 16, seed=4)
    t = tfp_kernels.estimate_threshold(emb, quantile=0.1)
    batch = pack_gpu(samples, max_len=80, embeddings=emb, threshold=t)
    assert batch.order_stats.threshold == t and batch.order_stats.threshold_source == "given"
    assert torch.equal(batch.order, tfp_order(emb, threshold=t, policy="spread"))


def test_keep_order_is_plain_pack_and_assemble():
    samples, lengths = _buffer(50, seed=5)
    batch = pack_gpu(samples, max_len=90, order="keep", attention="sample")
    expected = assemble(samples, pack_lengths(lengths, 90), attention="sample")
    _assert_batches_equal(batch, expected)
    assert batch.order_stats is None and torch.equal(batch.order, torch.arange(50))


def test_random_order_is_seeded():
    samples, _ = _buffer(50, seed=6)
    a = pack_gpu(samples, max_len=90, order="random", seed=3)
    b = pack_gpu(samples, max_len=90, order="random", seed=3)
    c = pack_gpu(samples, max_len=90, order="random", seed=4)
    _assert_batches_equal(a, b)
    assert not torch.equal(a.order, c.order)
    assert sorted(a.order.tolist()) == list(range(50))


def test_embedder_is_called_on_the_samples():
    samples, _ = _buffer(30, seed=7)
    emb = _clustered(30, 8, seed=8)
    seen = []

    def embedder(tokens):
        seen.append(tokens)
        return emb

    batch = pack_gpu(samples, max_len=90, embedder=embedder)
    assert len(seen) == 1 and len(seen[0]) == 30
    assert torch.equal(batch.order, tfp_order(emb, policy="spread"))


class _TokensEmbedder:
    def __init__(self, emb):
        self.emb = emb

    def embed_tokens(self, tokens):
        return self.emb


def test_embedder_object_with_embed_tokens():
    samples, _ = _buffer(30, seed=9)
    emb = _clustered(30, 8, seed=10)
    batch = pack_gpu(samples, max_len=90, embedder=_TokensEmbedder(emb))
    assert torch.equal(batch.order, tfp_order(emb, policy="spread"))


def test_input_kinds_agree():
    samples, lengths = _buffer(40, seed=11)
    emb = _clustered(40, 12, seed=12)
    ref = pack_gpu(samples, max_len=70, embeddings=emb)
    values = torch.cat(samples)
    offsets = torch.zeros(41, dtype=torch.int64)
    offsets[1:] = lengths.cumsum(0)
    padded = torch.zeros(40, int(lengths.max()), dtype=torch.int64)
    for i, s in enumerate(samples):
        padded[i, : len(s)] = s
    kinds = [
        Jagged(values, offsets),
        (values, offsets),
        Padded(padded, lengths),
        (padded, lengths),
        [s.numpy() for s in samples],
        [s.tolist() for s in samples],
        [s.to(torch.int32) for s in samples],
        Jagged(values.numpy(), offsets.numpy()),
    ]
    for kind in kinds:
        _assert_batches_equal(pack_gpu(kind, max_len=70, embeddings=emb), ref)
    _assert_batches_equal(pack_gpu(samples, max_len=70, embeddings=emb.numpy()), ref)


def test_labels_follow_their_samples():
    samples, _ = _buffer(40, seed=13)
    labels = [torch.where(torch.arange(len(s)) < len(s) // 2, -100, s + 7) for s in samples]
    emb = _clustered(40, 12, seed=14)
    batch = pack_gpu(samples, labels=labels, max_len=70, embeddings=emb, attention="sample")
    flat_labels = batch.labels[0].tolist()
    pos = 0
    for s, n in zip(batch.sample_index.tolist(), batch.packing.length.tolist()):
        expected = labels[s].tolist()
        expected[0] = -100  # first token of every segment
        assert flat_labels[pos : pos + n] == expected
        pos += n


@pytest.mark.parametrize("overlong", ["truncate", "drop", "split"])
@pytest.mark.parametrize("strategy", ["next_fit", "stream", "bfd", "window_best_fit"])
def test_overlong_policies_are_counted_and_lose_nothing(overlong, strategy):
    samples, lengths = _buffer(45, seed=15, high=120)
    max_len = 64
    emb = _clustered(45, 10, seed=16)
    batch = pack_gpu(samples, max_len=max_len, embeddings=emb, overlong=overlong, strategy=strategy)
    packing = batch.packing
    _check_invariants(batch, lengths.tolist(), max_len, overlong, strategy)
    over = (lengths > max_len).nonzero().flatten().tolist()
    assert over, "the buffer must hold over-long samples"
    got = _sample_tokens(batch)
    if overlong == "drop":
        assert packing.num_dropped == len(over) and packing.dropped_index.tolist() == over
        assert sorted(got) == sorted(set(range(45)) - set(over))
    elif overlong == "truncate":
        assert packing.num_truncated == len(over)
    elif strategy != "stream":
        assert packing.num_split == len(over)
    for s, toks in got.items():
        full = samples[s].tolist()
        assert toks == (full[:max_len] if overlong == "truncate" else full), s
    if overlong != "drop":
        assert sorted(got) == list(range(45))


@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=40),
    max_len=st.integers(40, 100),
    order=st.sampled_from(["tfp", "keep", "random"]),
    attention=st.sampled_from(["pack", "sample"]),
    strategy=st.sampled_from(["next_fit", "stream", "window_best_fit", "bfd"]),
    seed=st.integers(0, 2**16),
)
def test_properties(lengths, max_len, order, attention, strategy, seed):
    g = torch.Generator().manual_seed(seed)
    samples = [torch.randint(0, 50, (n,), generator=g) for n in lengths]
    emb = torch.randn(len(lengths), 5, generator=g)
    batch = pack_gpu(
        samples,
        max_len=max_len,
        embeddings=emb,
        order=order,
        attention=attention,
        strategy=strategy,
        seed=seed,
    )
    _check_invariants(batch, lengths, max_len, "error", strategy)
    got = _sample_tokens(batch)
    assert sorted(got) == list(range(len(lengths)))
    assert all(got[i] == samples[i].tolist() for i in got)
    cu = batch.cu_seqlens
    assert cu.dtype == torch.int32 and cu.is_contiguous() and int(cu[0]) == 0
    assert int(cu[-1]) == sum(lengths) and bool((cu[1:] >= cu[:-1]).all())
    assert batch.max_seqlen == int((cu[1:] - cu[:-1]).max())
    assert sorted(batch.order.tolist()) == list(range(len(lengths)))
    again = pack_gpu(
        samples,
        max_len=max_len,
        embeddings=emb,
        order=order,
        attention=attention,
        strategy=strategy,
        seed=seed,
    )
    _assert_batches_equal(batch, again)


# ------------------------------------------------------------------------------------------------ bad input


def test_empty_buffer():
    with pytest.raises(ValueError, match="empty"):
        pack_gpu([], max_len=10)
    with pytest.raises(ValueError, match="empty"):
        pack_gpu(Jagged(torch.zeros(0, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)), max_len=10)


def test_empty_sample():
    samples = [torch.arange(3), torch.zeros(0, dtype=torch.int64), torch.arange(2)]
    with pytest.raises(ValueError, match="sample 1 has length 0"):
        pack_gpu(samples, max_len=10, order="keep")


def test_overlong_error_names_the_sample_before_ordering():
    samples = [torch.arange(3), torch.arange(20), torch.arange(2)]

    def embedder(tokens):  # pragma: no cover - must not be reached
        raise AssertionError("embedded before the length check")

    with pytest.raises(ValueError, match="sample 1 has 20 tokens, more than max_len=10"):
        pack_gpu(samples, max_len=10, embedder=embedder)


def test_embeddings_with_wrong_n():
    samples, _ = _buffer(10, seed=17)
    with pytest.raises(ValueError, match="9 rows but there are 10 samples"):
        pack_gpu(samples, max_len=100, embeddings=torch.randn(9, 4))


def test_nan_embeddings():
    samples, _ = _buffer(10, seed=18)
    emb = torch.randn(10, 4)
    emb[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        pack_gpu(samples, max_len=100, embeddings=emb)


def test_embeddings_on_another_device():
    samples, _ = _buffer(10, seed=19)
    with pytest.raises(ValueError, match="embeddings are on meta but the samples are on cpu"):
        pack_gpu(samples, max_len=100, embeddings=torch.randn(10, 4, device="meta"))


@pytest.mark.gpu
def test_mixed_devices():
    samples, _ = _buffer(10, seed=20)
    samples[4] = samples[4].cuda()
    with pytest.raises(ValueError, match="device"):
        pack_gpu(samples, max_len=100, order="keep")
    with pytest.raises(ValueError, match="device"):
        pack_gpu([s.cuda() for s in _buffer(10, seed=20)[0]], max_len=100, embeddings=torch.randn(10, 4))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"order": "sorted"}, "order must be one of"),
        ({"strategy": "ffd"}, "strategy must be one of"),
        ({"attention": "causal"}, "attention must be one of"),
        ({"overlong": "wrap"}, "overlong must be one of"),
        ({"metric": "dot"}, "metric must be one of"),
        ({"max_len": 0}, "max_len must be a positive int"),
        ({"max_len": 2.5}, "max_len must be a positive int"),
    ],
)
def test_bad_options(kwargs, match):
    samples, _ = _buffer(5, seed=21)
    kwargs = {"max_len": 100, **kwargs}
    with pytest.raises(ValueError, match=match):
        pack_gpu(samples, **kwargs)


def test_policy_default_and_choice():
    # a buffer where 12 of 40 samples have one embedding: the policies' paths differ; the default is "spread",
    # and "paper" with a cap (the only policy that has one)
    samples, _ = _buffer(40, seed=22)
    emb = _clustered(40, 8, seed=23)
    emb[::3] = emb[0]
    spread = tfp_order(emb, policy="spread")
    assert not torch.equal(spread, tfp_order(emb))
    batch = pack_gpu(samples, max_len=90, embeddings=emb)
    assert torch.equal(batch.order, spread) and batch.order_stats.policy == "spread"
    batch = pack_gpu(samples, max_len=90, embeddings=emb, policy="paper")
    assert torch.equal(batch.order, tfp_order(emb)) and batch.order_stats.policy == "paper"
    batch = pack_gpu(samples, max_len=90, embeddings=emb, max_rejections=3)
    assert torch.equal(batch.order, tfp_order(emb, max_rejections=3)) and batch.order_stats.policy == "paper"
    assert batch.order_stats.num_forced_steps >= 0
    with pytest.raises(ValueError, match="takes no rejection cap"):
        pack_gpu(samples, max_len=90, embeddings=emb, max_rejections=3, policy="spread")
    with pytest.raises(ValueError, match="policy must be one of"):
        pack_gpu(samples, max_len=90, embeddings=emb, policy="far")


def test_bad_sample_kinds():
    with pytest.raises(TypeError, match="single array"):
        pack_gpu(torch.arange(10), max_len=10)
    with pytest.raises(TypeError, match=r"samples\[1\]"):
        pack_gpu([torch.arange(3), "abc"], max_len=10)
    with pytest.raises(TypeError):
        pack_gpu([torch.rand(3), torch.rand(2)], max_len=10, order="keep")
    with pytest.raises(ValueError, match=r"samples\[0\] must be 1-D"):
        pack_gpu([torch.zeros(2, 3, dtype=torch.int64)], max_len=10, order="keep")


def test_readonly_numpy_input():
    arrays = [np.arange(5), np.arange(7)]
    for a in arrays:
        a.setflags(write=False)
    batch = pack_gpu(arrays, max_len=20, order="keep")
    assert batch.input_ids[0].tolist() == list(range(5)) + list(range(7))
