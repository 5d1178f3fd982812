"""Tests of packed-batch assembly (tfp_kernels.assembly): assemble, PackedBatch, the gather op and its fallbacks.

Every integer output is compared bit for bit (torch.equal via ``assert_equal``) with the plain-Python
reference tfp_kernels.assembly.reference.assemble_reference.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tfp_kernels import _ext
from tfp_kernels.assembly import (
    IGNORE_INDEX,
    Jagged,
    PackedBatch,
    Padded,
    assemble,
    assemble_pieces,
    assemble_pieces_torch,
)
from tfp_kernels.assembly import api as assemble_module
from tfp_kernels.assembly.reference import assemble_reference
from tfp_kernels.packing import Packing, pack_lengths, select_packs, shuffle_packs
from tfp_kernels.testing import assert_equal, devices, lognormal_lengths

needs_extension = pytest.mark.skipif(not _ext.has_extension(), reason="tfp_kernels._C is not built")

I64, I32 = torch.int64, torch.int32
STRATEGIES = ["stream", "next_fit", "window_best_fit", "bfd"]
HF_KEYS = [
    "cu_seq_lens_k",
    "cu_seq_lens_q",
    "input_ids",
    "labels",
    "max_length_k",
    "max_length_q",
    "position_ids",
]


def tensor(values, device="cpu", dtype=I64):
    return torch.tensor(values, dtype=dtype, device=device)


def make_samples(lengths, seed=0, vocab=50_000):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=generator, dtype=I64) for n in lengths]


def make_labels(samples, seed=1):
    """Labels with a prompt of -100 at the start of every sample (random length)."""
    generator = torch.Generator().manual_seed(seed)
    labels = []
    for sample in samples:
        label = sample.clone() + 7
        prompt = int(torch.randint(0, sample.numel() + 1, (1,), generator=generator))
        label[:prompt] = IGNORE_INDEX
        labels.append(label)
    return labels


def reference_packing(packing: Packing) -> dict:
    fields = ("pack_id", "sample_index", "offset", "length", "pack_offsets")
    return {**{f: getattr(packing, f).tolist() for f in fields}, "max_len": packing.max_len}


def assert_batch_matches_reference(
    batch: PackedBatch, samples, packing, *, attention, labels=None, pad_to=None
):
    expected = assemble_reference(
        [s.tolist() for s in samples],
        reference_packing(packing),
        attention=attention,
        labels=None if labels is None else [label.tolist() for label in labels],
        pad_to=pad_to,
    )
    device = batch.device
    for name in ("input_ids", "labels", "position_ids"):
        assert_equal(getattr(batch, name), tensor([expected[name]], device), name)
    assert_equal(batch.cu_seqlens, tensor(expected["cu_seqlens"], device, I32), "cu_seqlens")
    assert_equal(batch.cu_seqlens_cpu, tensor(expected["cu_seqlens"], "cpu", I32), "cu_seqlens_cpu")
    assert batch.cu_seqlens.is_contiguous() and batch.cu_seqlens_cpu.device.type == "cpu"
    assert batch.max_seqlen == expected["max_seqlen"] and type(batch.max_seqlen) is int
    assert batch.num_tokens == expected["num_tokens"]
    assert_equal(batch.sample_index, packing.sample_index.to(device), "sample_index")
    assert_equal(batch.pack_index, packing.pack_id.to(device), "pack_index")
    assert_equal(batch.pack_offsets, packing.pack_offsets.to(device), "pack_offsets")
    if pad_to is not None:
        for name in ("input_ids", "labels", "position_ids", "attention_mask"):
            rows = expected[f"padded_{name}"]
            want = tensor(rows, device) if rows else torch.empty(0, pad_to, dtype=I64, device=device)
            assert_equal(getattr(batch.padded, name), want, f"padded {name}")


# ================================================================================== hand-worked cases


def test_hand_worked_sample_and_pack_modes():
    samples = [tensor([11, 12, 13]), tensor([21, 22]), tensor([31, 32, 33, 34])]
    labels = [tensor([-100, -100, 13]), tensor([-100, 22]), tensor([31, 32, 33, 34])]
    packing = pack_lengths([3, 2, 4], 5)  # 3+2 | 4
    batch = assemble(samples, packing, attention="sample", labels=labels)
    assert_equal(batch.input_ids, tensor([[11, 12, 13, 21, 22, 31, 32, 33, 34]]), "input_ids")
    assert_equal(batch.labels, tensor([[-100, -100, 13, -100, 22, -100, 32, 33, 34]]), "labels")
    assert_equal(batch.position_ids, tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]]), "position_ids")
    assert_equal(batch.cu_seqlens, tensor([0, 3, 5, 9], dtype=I32), "cu_seqlens")
    assert batch.max_seqlen == 4 and batch.num_segments == 3
    packed = assemble(samples, packing, attention="pack", labels=labels)
    assert_equal(packed.labels, tensor([[-100, -100, 13, -100, 22, -100, 32, 33, 34]]), "labels")
    assert_equal(packed.position_ids, tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]]), "position_ids")
    assert_equal(packed.cu_seqlens, tensor([0, 5, 9], dtype=I32), "cu_seqlens")
    assert packed.max_seqlen == 5 and packed.num_segments == 2
    # pack mode keeps the first label of a sample that is not first in its pack
    default = assemble(samples, packing, attention="pack")
    assert_equal(default.labels, tensor([[-100, 12, 13, 21, 22, -100, 32, 33, 34]]), "labels default")


def test_hand_worked_split_sample():
    """A sample split by the stream: each piece carries its own token slice; in sample mode each is a segment."""
    samples = [tensor([1, 2, 3]), tensor([10, 11, 12, 13, 14, 15, 16])]
    packing = pack_lengths([3, 7], 4, strategy="stream", overlong="split")  # 1 2 3 10 | 11 12 13 14 | 15 16
    assert packing.offset.tolist() == [0, 0, 1, 5]
    batch = assemble(samples, packing, attention="sample")
    assert_equal(batch.input_ids, tensor([[1, 2, 3, 10, 11, 12, 13, 14, 15, 16]]), "input_ids")
    assert_equal(batch.position_ids, tensor([[0, 1, 2, 0, 0, 1, 2, 3, 0, 1]]), "position_ids")
    assert_equal(batch.labels, tensor([[-100, 2, 3, -100, -100, 12, 13, 14, -100, 16]]), "labels")
    assert_equal(batch.cu_seqlens, tensor([0, 3, 4, 8, 10], dtype=I32), "cu_seqlens")
    assert batch.max_seqlen == 4
    packed = assemble(samples, packing, attention="pack", pad_to=6, pad_id=-1)
    assert_equal(packed.position_ids, tensor([[0, 1, 2, 3, 0, 1, 2, 3, 0, 1]]), "position_ids")
    assert_equal(
        packed.padded.input_ids,
        tensor([[1, 2, 3, 10, -1, -1], [11, 12, 13, 14, -1, -1], [15, 16] + [-1] * 4]),
        "p",
    )
    assert_equal(packed.padded.position_ids, tensor([[0, 1, 2, 3, 4, 5]] * 3), "padded positions")
    assert_equal(
        packed.padded.attention_mask, tensor([[1, 1, 1, 1, 0, 0]] * 2 + [[1, 1, 0, 0, 0, 0]]), "mask"
    )
    sample_mode_padded = batch.to_padded(6)
    # padding continues the last segment of its row
    assert_equal(
        sample_mode_padded.position_ids,
        tensor([[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]]),
        "pos",
    )
    assert_equal(sample_mode_padded.labels[0], tensor([-100, 2, 3, -100, -100, -100]), "padded labels")


def test_stats_and_repr():
    packing = pack_lengths([3, 2, 4], 5)
    batch = assemble([torch.arange(3), torch.arange(2), torch.arange(4)], packing)
    assert batch.num_packs == 2 and batch.num_pieces == 3 and batch.num_tokens == 9
    assert batch.fill_ratio == pytest.approx(9 / 10) and batch.num_pad_tokens == 1
    stats = batch.stats()
    assert stats["num_packs"] == 2 and stats["max_seqlen"] == 5 and stats["attention"] == "pack"
    assert all(isinstance(v, (int, float, str)) for v in stats.values())
    assert "2 packs" in repr(batch) and len(repr(batch)) < 200
    assert batch.packing is packing and batch.padded is None and batch.max_pack_length == 5
    assert sorted(batch.to_hf_kwargs()) == HF_KEYS and "attention_mask" not in batch.to_hf_kwargs()
    kwargs = batch.to_hf_kwargs()
    assert kwargs["cu_seq_lens_q"] is batch.cu_seqlens and kwargs["max_length_k"] == 5


# ================================================================================== against the reference


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("attention", ["pack", "sample"])
@pytest.mark.parametrize("with_labels", [False, True], ids=["no-labels", "labels"])
@pytest.mark.parametrize("overlong", ["split", "truncate", "drop"])
def test_matches_reference(device, strategy, attention, with_labels, overlong, poison_empty):
    lengths = lognormal_lengths(200, mean=40, max_len=300, seed=3).tolist()
    samples = [s.to(device) for s in make_samples(lengths)]
    labels = [label.to(device) for label in make_labels(samples)] if with_labels else None
    packing = pack_lengths(lengths, 64, strategy=strategy, overlong=overlong, window=16)
    batch = assemble(samples, packing, attention=attention, labels=labels, pad_to=64)
    assert_batch_matches_reference(batch, samples, packing, attention=attention, labels=labels, pad_to=64)
    for name in ("input_ids", "position_ids", "sample_index", "pack_index", "pack_offsets"):
        assert not (getattr(batch, name) == poison_empty).any(), f"{name} holds the sentinel"
    assert not (batch.padded.input_ids == poison_empty).any()


@pytest.mark.parametrize(
    "form", ["list", "jagged", "jagged-tuple", "padded", "padded-tuple", "int32", "uint8"]
)
@pytest.mark.parametrize("attention", ["pack", "sample"])
def test_input_forms_agree(form, attention):
    lengths = [5, 1, 9, 3, 7, 2, 8]
    samples = make_samples(lengths, vocab=200)
    labels = make_labels(samples)
    packing = pack_lengths(lengths, 10, strategy="bfd")
    values, offsets = torch.cat(samples), torch.tensor([0, *itertools.accumulate(lengths)])
    padded = torch.full((len(lengths), 12), 999)
    padded_labels = torch.full((len(lengths), 12), 999)
    for i, (s, label) in enumerate(zip(samples, labels)):
        padded[i, : s.numel()], padded_labels[i, : s.numel()] = s, label
    if form == "list":
        tokens, form_labels = samples, labels
    elif form == "jagged":
        tokens, form_labels = Jagged(values, offsets.to(I32)), Jagged(torch.cat(labels), offsets)
    elif form == "jagged-tuple":
        tokens, form_labels = (values, offsets), torch.cat(labels)
    elif form == "padded":
        tokens, form_labels = (
            Padded(padded, torch.tensor(lengths)),
            Padded(padded_labels, torch.tensor(lengths)),
        )
    elif form == "padded-tuple":
        tokens, form_labels = (padded, torch.tensor(lengths, dtype=torch.int16)), padded_labels
    elif form == "int32":
        tokens, form_labels = [s.to(I32) for s in samples], [label.to(I32) for label in labels]
    else:
        tokens, form_labels = [s.to(torch.uint8) for s in samples], labels
    batch = assemble(tokens, packing, attention=attention, labels=form_labels)
    assert_batch_matches_reference(batch, samples, packing, attention=attention, labels=labels)


def test_non_contiguous_inputs():
    lengths = [4, 6, 3]
    base = make_samples([8, 12, 6])
    samples = [s[::2] for s in base]  # strided views
    packing = pack_lengths(lengths, 8)
    batch = assemble(samples, packing, attention="sample")
    assert_batch_matches_reference(batch, [s.contiguous() for s in samples], packing, attention="sample")
    padded = torch.arange(60).reshape(5, 12)[::2, ::2]  # (3, 6), non-contiguous
    packing = pack_lengths([6, 2, 5], 8)
    batch = assemble(Padded(padded, torch.tensor([6, 2, 5])), packing)
    expected_samples = [padded[0, :6], padded[1, :2], padded[2, :5]]
    assert_batch_matches_reference(batch, expected_samples, packing, attention="pack")


def test_selected_and_shuffled_packs_use_only_their_samples(monkeypatch):
    lengths = lognormal_lengths(500, mean=50, max_len=256, seed=8).tolist()
    samples = make_samples(lengths)
    packing = pack_lengths(lengths, 256, strategy="bfd")
    step = select_packs(shuffle_packs(packing, seed=0, epoch=1), range(5))
    concatenated = []
    real_cat = torch.cat
    monkeypatch.setattr(
        torch, "cat", lambda ts, *a, **k: (concatenated.append(len(ts)), real_cat(ts, *a, **k))[1]
    )
    batch = assemble(samples, step, attention="sample")
    monkeypatch.setattr(torch, "cat", real_cat)
    assert concatenated[0] == len(set(step.sample_index.tolist())) < len(samples)
    assert_batch_matches_reference(batch, samples, step, attention="sample")
    assert batch.num_packs == 5


def test_empty_packing():
    packing = pack_lengths([12, 11], 10, overlong="drop")
    batch = assemble([torch.arange(12), torch.arange(11)], packing, pad_to=10)
    assert batch.num_tokens == 0 and batch.input_ids.shape == (1, 0) and batch.max_seqlen == 0
    assert batch.cu_seqlens.tolist() == [0] and batch.padded.input_ids.shape == (0, 10)


# ================================================================================== gather implementations


def random_table(num_values: int, num_pieces: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    length = torch.randint(1, 20, (num_pieces,), generator=generator)
    src = (torch.rand(num_pieces, generator=generator) * (num_values - length + 1)).long()
    dst = torch.cumsum(length, 0) - length
    pos = torch.where(
        torch.rand(num_pieces, generator=generator) < 0.5, 0, torch.randint(0, 50, (num_pieces,))
    )
    return torch.stack([src, dst, length, pos]), int(length.sum())


def gather_reference(values, labels, table, ignore_index=IGNORE_INDEX):
    ids, out_labels, positions = [], [], []
    for src, _, length, pos in table.t().tolist():
        for t in range(length):
            ids.append(values[src + t])
            positions.append(pos + t)
            out_labels.append(ignore_index if pos + t == 0 else (labels or values)[src + t])
    return ids, out_labels, positions


@pytest.mark.parametrize("backend", [pytest.param("op", marks=needs_extension), "torch", "auto"])
@pytest.mark.parametrize(
    "value_dtype, label_dtype", [(I64, I64), (I64, I32), (I32, I64), (I32, I32), (I64, None), (I32, None)]
)
def test_gather_backends_agree(backend, value_dtype, label_dtype, poison_empty):
    generator = torch.Generator().manual_seed(5)
    values = torch.randint(-(2**30), 2**30, (500,), generator=generator, dtype=value_dtype)
    labels = (
        None
        if label_dtype is None
        else torch.randint(-100, 2**30, (500,), generator=generator, dtype=label_dtype)
    )
    table, num_tokens = random_table(500, 60, seed=2)
    ids, out_labels, positions = assemble_pieces(
        values, labels, table, num_tokens, ignore_index=-7, backend=backend
    )
    expected = gather_reference(values.tolist(), None if labels is None else labels.tolist(), table, -7)
    for name, got, want in zip(
        ("input_ids", "labels", "position_ids"), (ids, out_labels, positions), expected
    ):
        assert_equal(got, tensor(want), name)


def test_gather_bad_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        assemble_pieces(torch.zeros(1, dtype=I64), None, torch.zeros(4, 0, dtype=I64), 0, backend="cuda")


@needs_extension
@pytest.mark.parametrize(
    "args, match",
    [
        pytest.param(
            (torch.zeros(5, dtype=torch.int16), None, torch.zeros(4, 0, dtype=I64), 0),
            "values must have dtype",
            id="dtype",
        ),
        pytest.param(
            (torch.zeros(5, dtype=I64), None, torch.zeros(3, 1, dtype=I64), 0), r"shape \(4, M\)", id="shape"
        ),
        pytest.param(
            (torch.zeros(5, dtype=I64), None, tensor([[4], [0], [2], [0]]), 2),
            r"reads values\[4 : 6\]",
            id="oob",
        ),
        pytest.param(
            (torch.zeros(5, dtype=I64), None, tensor([[0], [1], [2], [0]]), 2),
            "must tile the output",
            id="tile",
        ),
        pytest.param(
            (torch.zeros(5, dtype=I64), None, tensor([[0], [0], [2], [0]]), 3), "hold 2 tokens", id="total"
        ),
        pytest.param(
            (torch.zeros(5, dtype=I64), torch.zeros(4, dtype=I64), torch.zeros(4, 0, dtype=I64), 0),
            "shape of values",
            id="labels",
        ),
    ],
)
def test_op_checks_its_inputs(args, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.tfp_kernels.assemble(*args, -100)


@needs_extension
def test_opcheck_assemble():
    table, num_tokens = random_table(100, 10, seed=1)
    values = torch.arange(100, dtype=I64)
    torch.library.opcheck(torch.ops.tfp_kernels.assemble.default, (values, None, table, num_tokens, -100))
    torch.library.opcheck(
        torch.ops.tfp_kernels.assemble.default, (values.to(I32), values.clone(), table, num_tokens, -100)
    )


def test_fallback_without_extension(monkeypatch):
    monkeypatch.setattr(assemble_module, "has_extension", lambda: False)
    monkeypatch.setattr(assemble_module, "has_cuda_ops", lambda: False)
    lengths = [5, 9, 3, 12, 1]
    samples = make_samples(lengths)
    packing = pack_lengths(lengths, 12, strategy="bfd")
    with pytest.warns(RuntimeWarning, match="pure-torch fallback"):
        batch = assemble(samples, packing, attention="sample")
    assert_batch_matches_reference(batch, samples, packing, attention="sample")


# ================================================================================== properties (hypothesis)


@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=40),
    max_len=st.integers(1, 30),
    strategy=st.sampled_from(STRATEGIES),
    overlong=st.sampled_from(["split", "truncate", "drop"]),
    attention=st.sampled_from(["pack", "sample"]),
    with_labels=st.booleans(),
)
def test_property_assembly(lengths, max_len, strategy, overlong, attention, with_labels):
    if overlong == "drop" and all(n > max_len for n in lengths):
        lengths = [*lengths, 1]
    samples = make_samples(lengths, seed=len(lengths), vocab=1000)
    labels = make_labels(samples) if with_labels else None
    packing = pack_lengths(lengths, max_len, strategy=strategy, overlong=overlong, window=5)
    batch = assemble(samples, packing, attention=attention, labels=labels, pad_to=max_len)
    assert_batch_matches_reference(
        batch, samples, packing, attention=attention, labels=labels, pad_to=max_len
    )
    # cu_seqlens: int32, from 0 to T, increasing; max_seqlen its largest step; every segment <= max_len
    cu = batch.cu_seqlens.tolist()
    assert batch.cu_seqlens.dtype == I32 and cu[0] == 0 and cu[-1] == batch.num_tokens
    steps = [b - a for a, b in itertools.pairwise(cu)]
    assert all(0 < s <= max_len for s in steps) and batch.max_seqlen == max(steps, default=0)
    # position ids restart exactly at the segment starts
    positions = batch.position_ids[0].tolist()
    assert [i for i, p in enumerate(positions) if p == 0] == cu[:-1]
    # every token of every sample exactly once (the kept part of it), in its own piece's slice
    ids = batch.input_ids[0].tolist()
    seen = [[] for _ in lengths]
    for (start, end), sample, offset in zip(
        itertools.pairwise(packing.piece_offsets.tolist()),
        packing.sample_index.tolist(),
        packing.offset.tolist(),
    ):
        assert ids[start:end] == samples[sample][offset : offset + end - start].tolist()
        seen[sample] += list(range(offset, offset + end - start))
    for s, n in enumerate(lengths):
        kept = 0 if (overlong == "drop" and n > max_len) else min(n, max_len) if overlong == "truncate" else n
        assert sorted(seen[s]) == list(range(kept))


# ================================================================================== transformers contract


def test_matches_data_collator_with_flattening():
    transformers = pytest.importorskip("transformers")
    lengths = [7, 3, 12, 1, 5]
    samples = make_samples(lengths, vocab=1000)
    labels = make_labels(samples)
    features = [{"input_ids": s.tolist(), "labels": label.tolist()} for s, label in zip(samples, labels)]
    collator = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)
    expected = collator(features, return_tensors="pt")
    packing = pack_lengths(lengths, sum(lengths))  # one pack, samples in order: what the collator flattens
    kwargs = assemble(samples, packing, attention="sample", labels=labels).to_hf_kwargs()
    assert sorted(kwargs) == sorted(expected) == HF_KEYS
    for key in HF_KEYS:
        if isinstance(expected[key], torch.Tensor):
            assert_equal(kwargs[key], expected[key], key)
        else:
            assert kwargs[key] == expected[key] and type(kwargs[key]) is int, key


def test_tiny_llama_sample_mode_equals_separate_samples():
    """With attention='sample', a packed forward pass (sdpa, no cache) gives each sample's own logits."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    lengths = [5, 9, 3, 7]
    samples = make_samples(lengths, vocab=97)
    packing = pack_lengths(lengths, 16, strategy="bfd")
    batch = assemble(samples, packing, attention="sample")
    kwargs = batch.to_hf_kwargs()
    with torch.no_grad():
        packed = model(
            input_ids=kwargs["input_ids"], position_ids=kwargs["position_ids"], use_cache=False
        ).logits[0]
        for (start, end), sample in zip(
            itertools.pairwise(batch.cu_seqlens_cpu.tolist()), batch.sample_index.tolist()
        ):
            alone = model(input_ids=samples[sample][None], use_cache=False).logits[0]
            torch.testing.assert_close(packed[start:end], alone, atol=1e-5, rtol=1e-5)


# ================================================================================== bad inputs


def meta(n):
    return torch.zeros(n, dtype=I64, device="meta")


PACKING = pack_lengths([3, 2, 4], 5)
SAMPLES = [torch.arange(3), torch.arange(2), torch.arange(4)]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        pytest.param({"tokens": []}, ValueError, "tokens is empty", id="empty-list"),
        pytest.param(
            {"tokens": [[1, 2, 3], [1, 2], [1, 2, 3, 4]]},
            TypeError,
            r"tokens\[0\] must be a torch.Tensor",
            id="lists",
        ),
        pytest.param(
            {"tokens": [torch.arange(3), torch.ones(2), torch.arange(4)]},
            TypeError,
            r"tokens\[1\] must have an integer dtype",
            id="float",
        ),
        pytest.param(
            {"tokens": [torch.arange(3), torch.ones(2, dtype=torch.bool), torch.arange(4)]},
            TypeError,
            "integer dtype, got torch.bool",
            id="bool",
        ),
        pytest.param(
            {"tokens": [torch.arange(3), torch.ones(1, 2, dtype=I64), torch.arange(4)]},
            ValueError,
            r"tokens\[1\] must be 1-D",
            id="2-D-sample",
        ),
        pytest.param(
            {"tokens": [torch.arange(3), meta(2), torch.arange(4)]},
            ValueError,
            r"tokens\[1\] is on meta but tokens\[0\] is on cpu",
            id="mixed-devices",
        ),
        pytest.param({"tokens": torch.arange(9)}, TypeError, "single tensor", id="single-tensor"),
        pytest.param({"tokens": {"input_ids": 1}}, TypeError, "tokens must be a list", id="dict"),
        pytest.param(
            {"tokens": SAMPLES[:2]},
            ValueError,
            "tokens has 2 samples but the packing was made for 3",
            id="fewer-samples",
        ),
        pytest.param(
            {"tokens": [torch.arange(3), torch.arange(3), torch.arange(4)]},
            ValueError,
            r"tokens\[1\] has 3 tokens but the packing was made for a length of 2",
            id="wrong-length",
        ),
        pytest.param(
            {"labels": SAMPLES[:2]}, ValueError, "labels has 2 samples but tokens has 3", id="labels-count"
        ),
        pytest.param(
            {"labels": [torch.arange(3), torch.arange(3), torch.arange(4)]},
            ValueError,
            r"labels\[1\] has 3 entries but tokens\[1\] has 2",
            id="labels-length",
        ),
        pytest.param(
            {"labels": [torch.arange(3), meta(2), torch.arange(4)]},
            ValueError,
            r"labels\[1\] is on meta but tokens is on cpu",
            id="labels-device",
        ),
        pytest.param(
            {"labels": [torch.arange(3), torch.ones(2), torch.arange(4)]},
            TypeError,
            r"labels\[1\] must have an integer dtype",
            id="labels-float",
        ),
        pytest.param(
            {"labels": torch.arange(9)}, TypeError, "labels must be a list", id="labels-tensor-for-list"
        ),
        pytest.param(
            {"attention": "causal"},
            ValueError,
            r"attention must be one of \['pack', 'sample'\], got 'causal'",
            id="attention",
        ),
        pytest.param(
            {"pad_to": 4},
            ValueError,
            r"pad_to=4 is shorter than the fullest pack \(5 tokens\)",
            id="pad-to-short",
        ),
        pytest.param({"pad_to": 0}, ValueError, "pad_to must be a positive int, got 0", id="pad-to-0"),
        pytest.param({"pad_to": 5.0}, TypeError, "pad_to must be an int, got float", id="pad-to-float"),
        pytest.param({"pad_id": None}, TypeError, "pad_id must be an int", id="pad-id"),
        pytest.param(
            {"packing": [0, 0, 1]},
            TypeError,
            "packing must be a tfp_kernels.packing.Packing",
            id="not-a-packing",
        ),
    ],
)
def test_bad_inputs(kwargs, error, match):
    arguments = {"tokens": SAMPLES, "packing": PACKING, **kwargs}
    tokens, packing = arguments.pop("tokens"), arguments.pop("packing")
    with pytest.raises(error, match=match):
        assemble(tokens, packing, **arguments)


VALUES, OFFSETS = torch.arange(9), torch.tensor([0, 3, 5, 9])


@pytest.mark.parametrize(
    "tokens, labels, match",
    [
        pytest.param(Jagged(VALUES, torch.tensor([0])), None, "tokens is empty", id="jagged-empty"),
        pytest.param(
            Jagged(VALUES, torch.tensor([0, 3, 2, 9])),
            None,
            r"non-decreasing: offsets\[2\] = 2 < offsets\[1\] = 3",
            id="jagged-decreasing",
        ),
        pytest.param(
            Jagged(VALUES, torch.tensor([0, 3, 5, 10])),
            None,
            r"offsets\[-1\] = 10 is past the end",
            id="jagged-past-end",
        ),
        pytest.param(
            Jagged(VALUES, torch.tensor([-1, 3, 5, 9])),
            None,
            r"offsets\[0\] = -1 is negative",
            id="jagged-negative",
        ),
        pytest.param(
            Jagged(VALUES, meta(4)),
            None,
            "tokens.offsets is on meta but tokens.values is on cpu",
            id="jagged-device",
        ),
        pytest.param(
            Jagged(VALUES.float(), OFFSETS),
            None,
            "tokens.values must have an integer dtype",
            id="jagged-float",
        ),
        pytest.param(
            Jagged(VALUES, OFFSETS),
            torch.arange(8),
            r"labels has shape \(8,\) but tokens.values has \(9,\)",
            id="jagged-labels-shape",
        ),
        pytest.param(
            Jagged(VALUES, OFFSETS),
            Jagged(VALUES, torch.tensor([0, 4, 5, 9])),
            "labels.offsets differ",
            id="jagged-labels-offsets",
        ),
        pytest.param(
            Jagged(VALUES, OFFSETS),
            meta(9),
            "labels is on meta but tokens is on cpu",
            id="jagged-labels-device",
        ),
        pytest.param(
            Padded(torch.zeros(0, 5, dtype=I64), torch.zeros(0, dtype=I64)), None, "0 rows", id="padded-empty"
        ),
        pytest.param(
            Padded(torch.zeros(3, 5, dtype=I64), torch.tensor([3, 2])),
            None,
            "2 entries but tokens.tokens has 3 rows",
            id="padded-count",
        ),
        pytest.param(
            Padded(torch.zeros(3, 5, dtype=I64), torch.tensor([3, 2, 6])),
            None,
            r"tokens.lengths\[2\] = 6 is outside \[0, 5\]",
            id="padded-long",
        ),
        pytest.param(
            Padded(torch.zeros(3, 5, dtype=I64), torch.tensor([3, 2, 4])),
            torch.zeros(3, 4, dtype=I64),
            r"labels has shape \(3, 4\)",
            id="padded-labels",
        ),
        pytest.param(
            Padded(torch.zeros(3, 5, dtype=I64), torch.tensor([3, 2, 4])),
            Padded(torch.zeros(3, 5, dtype=I64), torch.tensor([3, 2, 5])),
            "labels.lengths differ",
            id="padded-labels-lengths",
        ),
        pytest.param(
            Padded(torch.zeros(3, 5, dtype=I64), torch.tensor([3, 2, 3])),
            None,
            r"tokens\[2\] has 3 tokens but the packing was made for a length of 4",
            id="padded-mismatch",
        ),
    ],
)
def test_bad_jagged_and_padded(tokens, labels, match):
    with pytest.raises((ValueError, TypeError), match=match):
        assemble(tokens, PACKING, labels=labels)


def test_packing_without_sample_lengths_is_bounds_checked():
    handmade = Packing(
        pack_id=tensor([0, 0]),
        sample_index=tensor([0, 1]),
        offset=tensor([0, 1]),
        length=tensor([3, 2]),
        pack_offsets=tensor([0, 5]),
        max_len=5,
        num_packs=1,
    )
    batch = assemble([torch.arange(3), torch.arange(10, 13)], handmade, attention="sample")
    assert batch.input_ids.tolist() == [[0, 1, 2, 11, 12]]
    with pytest.raises(
        ValueError, match=r"piece 1 of the packing takes tokens\[1\]\[1:3\], but tokens\[1\] has 2 tokens"
    ):
        assemble([torch.arange(3), torch.arange(2)], handmade)
    with pytest.raises(ValueError, match="refers to sample 1 but tokens has 1 samples"):
        assemble([torch.arange(3)], handmade)


# ================================================================================== CUDA (run on a GPU machine)


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["list", "jagged-cpu-offsets", "jagged-gpu-offsets", "padded"])
@pytest.mark.parametrize("attention", ["pack", "sample"])
@pytest.mark.parametrize("packing_device", ["cpu", "cuda"])
def test_cuda_matches_cpu(form, attention, packing_device):
    lengths = lognormal_lengths(3000, mean=300, max_len=4096, seed=2).tolist()
    samples = make_samples(lengths)
    labels = make_labels(samples)
    packing = pack_lengths(
        torch.tensor(lengths, device=packing_device), 2048, strategy="stream", overlong="split"
    )
    expected = assemble(
        samples,
        pack_lengths(lengths, 2048, strategy="stream", overlong="split"),
        attention=attention,
        labels=labels,
        pad_to=2048,
    )
    gpu_samples = [s.cuda() for s in samples]
    gpu_labels = [label.cuda() for label in labels]
    offsets = torch.tensor([0, *itertools.accumulate(lengths)])
    if form == "list":
        tokens, form_labels = gpu_samples, gpu_labels
    elif form.startswith("jagged"):
        tokens = Jagged(torch.cat(gpu_samples), offsets if form.endswith("cpu-offsets") else offsets.cuda())
        form_labels = torch.cat(gpu_labels)
    else:
        width = max(lengths)
        padded = torch.zeros(len(lengths), width, dtype=I64)
        padded_labels = torch.zeros(len(lengths), width, dtype=I64)
        for i, (s, label) in enumerate(zip(samples, labels)):
            padded[i, : s.numel()], padded_labels[i, : s.numel()] = s, label
        tokens, form_labels = Padded(padded.cuda(), torch.tensor(lengths)), padded_labels.cuda()
    batch = assemble(tokens, packing, attention=attention, labels=form_labels, pad_to=2048)
    for name in (
        "input_ids",
        "labels",
        "position_ids",
        "cu_seqlens",
        "sample_index",
        "pack_index",
        "pack_offsets",
    ):
        value = getattr(batch, name)
        assert value.device.type == "cuda", name
        assert_equal(value.cpu(), getattr(expected, name), name)
    assert batch.cu_seqlens.dtype == I32 and batch.cu_seqlens.is_contiguous()
    assert_equal(batch.cu_seqlens_cpu, expected.cu_seqlens_cpu, "cu_seqlens_cpu")
    assert batch.max_seqlen == expected.max_seqlen
    for name in ("input_ids", "labels", "position_ids", "attention_mask"):
        assert_equal(getattr(batch.padded, name).cpu(), getattr(expected.padded, name), f"padded {name}")


@pytest.mark.gpu
def test_cuda_assemble_does_not_sync():
    """CPU packing + GPU tokens (the training-loop case): no host-device synchronisation at all."""
    lengths = lognormal_lengths(4096, mean=512, max_len=2048, seed=0).tolist()
    samples = [s.cuda() for s in make_samples(lengths)]
    packing = pack_lengths(lengths, 2048, strategy="bfd")
    assemble(samples, packing, attention="sample")  # warm-up (pinned memory pool, kernels)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        batch = assemble(samples, packing, attention="sample", pad_to=2048)
        kwargs = batch.to_hf_kwargs()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert kwargs["max_length_q"] == max(lengths)
    assert_equal(
        batch.input_ids.cpu(),
        assemble([s.cpu() for s in samples], packing, attention="sample").input_ids,
        "ids",
    )


@pytest.mark.gpu
def test_cuda_gather_op_matches_cpu_op():
    if not _ext.has_cuda_ops():
        pytest.skip("tfp_kernels._C was built without CUDA ops")
    for value_dtype, label_dtype in [(I64, I64), (I32, I32), (I64, None), (I32, I64)]:
        generator = torch.Generator().manual_seed(3)
        values = torch.randint(0, 2**30, (100_000,), generator=generator, dtype=value_dtype)
        labels = (
            None
            if label_dtype is None
            else torch.randint(-100, 2**30, (100_000,), generator=generator, dtype=label_dtype)
        )
        table, num_tokens = random_table(100_000, 5000, seed=4)
        expected = assemble_pieces(values, labels, table, num_tokens, backend="op")
        actual = assemble_pieces(
            values.cuda(), None if labels is None else labels.cuda(), table.cuda(), num_tokens, backend="op"
        )
        for name, a, b in zip(("input_ids", "labels", "position_ids"), actual, expected):
            assert_equal(a.cpu(), b, name)
        torch_result = assemble_pieces_torch(
            values.cuda(), None if labels is None else labels.cuda(), table.cuda(), num_tokens
        )
        for name, a, b in zip(("input_ids", "labels", "position_ids"), torch_result, expected):
            assert_equal(a.cpu(), b, f"torch {name}")
    empty = assemble_pieces(
        torch.zeros(3, dtype=I64, device="cuda"),
        None,
        torch.zeros(4, 0, dtype=I64, device="cuda"),
        0,
        backend="op",
    )
    assert all(t.shape == (0,) for t in empty)
    torch.library.opcheck(
        torch.ops.tfp_kernels.assemble.default, (values.cuda(), None, table.cuda(), num_tokens, -100)
    )


@pytest.mark.gpu
def test_cuda_mixed_devices_rejected():
    with pytest.raises(ValueError, match=r"tokens\[1\] is on cuda:0 but tokens\[0\] is on cpu"):
        assemble([torch.arange(3), torch.arange(2, device="cuda"), torch.arange(4)], PACKING)
    with pytest.raises(ValueError, match=r"labels\[0\] is on cpu but tokens is on cuda:0"):
        assemble([s.cuda() for s in SAMPLES], PACKING, labels=SAMPLES)
    with pytest.raises(ValueError, match="tokens.offsets is on cuda:0 but tokens.values is on cpu"):
        assemble(Jagged(VALUES, OFFSETS.cuda()), PACKING)
