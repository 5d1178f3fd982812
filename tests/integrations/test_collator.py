"""TFPDataCollator: parity with transformers' DataCollatorWithFlattening, TFP order, options and bad input."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from tfp_kernels import tfp_order
from tfp_kernels.integrations import TFPDataCollator
from tfp_kernels.testing import assert_equal

transformers = pytest.importorskip("transformers")

HF_KEYS = [
    "cu_seq_lens_k",
    "cu_seq_lens_q",
    "input_ids",
    "labels",
    "max_length_k",
    "max_length_q",
    "position_ids",
]


def _features(lengths, *, seed=0, labels=False, kind="list", vocab=50):
    gen = torch.Generator().manual_seed(seed)
    features = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=gen)
        feature = {"input_ids": ids.tolist() if kind == "list" else (ids.numpy() if kind == "numpy" else ids)}
        if labels:
            lab = ids.clone()
            lab[: n // 2] = -100  # a "prompt" outside the loss
            feature["labels"] = lab.tolist() if kind == "list" else (lab.numpy() if kind == "numpy" else lab)
        features.append(feature)
    return features


def _segments(out) -> list[tuple[int, ...]]:
    cu = out["cu_seq_lens_q"].tolist()
    ids = out["input_ids"][0].tolist()
    return [tuple(ids[a:b]) for a, b in itertools.pairwise(cu)]


@pytest.mark.parametrize("kind", ["list", "tensor", "numpy"])
@pytest.mark.parametrize("labels", [False, True], ids=["no-labels", "labels"])
@pytest.mark.parametrize("lengths", [[5], [3, 1, 7, 2, 9, 1], [1] * 11, [4, 0, 6]], ids=str)
@pytest.mark.parametrize("flash_kwargs", [True, False], ids=["flash-kwargs", "no-flash-kwargs"])
def test_keep_order_equals_data_collator_with_flattening(kind, labels, lengths, flash_kwargs):
    features = _features(lengths, labels=labels, kind=kind)
    expected = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)(features)
    out = TFPDataCollator(order="keep", attention="sample", return_flash_attn_kwargs=flash_kwargs)(features)
    assert out.pop("num_items_in_batch").item() == int((expected["labels"][:, 1:] != -100).sum())
    assert sorted(out) == sorted(expected)
    assert "attention_mask" not in out
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert_equal(out[key], value, key)
        else:
            assert type(out[key]) is int and out[key] == value, key


def test_separator_id_like_transformers():
    features = _features([3, 4, 2], labels=True)
    expected = transformers.DataCollatorWithFlattening(separator_id=-1)(features)
    out = TFPDataCollator(order="keep", separator_id=-1)(features)
    assert_equal(out["labels"], expected["labels"], "labels")
    assert_equal(
        TFPDataCollator(order="keep")(features, separator_id=-7)["labels"][0, [0, 3, 7]],
        torch.tensor([-7] * 3),
    )


@pytest.mark.parametrize("attention", ["sample", "pack"])
def test_tfp_order_is_a_permutation_and_equals_tfp_order(attention):
    from tfp_kernels.embed import HashedEmbedder

    lengths = [5, 17, 1, 8, 3, 12, 6, 2, 9, 4, 11, 7]
    features = _features(lengths, seed=3, vocab=20)
    collator = TFPDataCollator(order="tfp", attention=attention, return_flash_attn_kwargs=True)
    batch = collator.pack(features)
    tokens = [torch.tensor(f["input_ids"]) for f in features]
    expected_order = tfp_order(HashedEmbedder().embed_tokens(tokens), policy="spread")  # (pack_gpu's default)
    assert_equal(batch.order, expected_order, "order")
    assert sorted(batch.sample_index.tolist()) == list(range(len(features)))
    out = collator(features)
    flat = out["input_ids"][0].tolist()
    assert flat == [t for i in expected_order.tolist() for t in features[i]["input_ids"]]
    if attention == "sample":
        assert sorted(_segments(out)) == sorted(tuple(f["input_ids"]) for f in features)
        assert out["max_length_q"] == max(lengths)
    else:  # max_len=None: the whole batch is one causal segment
        assert out["cu_seq_lens_q"].tolist() == [0, sum(lengths)]
        assert out["position_ids"][0].tolist() == list(range(sum(lengths)))


def test_fixed_threshold_and_embedding_key():
    gen = torch.Generator().manual_seed(1)
    emb = torch.randn(10, 6, generator=gen)
    features = _features([4, 2, 7, 3, 5, 1, 6, 2, 3, 8])
    for f, e in zip(features, emb):
        f["emb"] = e.tolist()
    batch = TFPDataCollator(embedding_key="emb", threshold=0.5, attention="pack").pack(features)
    assert_equal(batch.order, tfp_order(emb, threshold=0.5), "order")
    assert batch.order_stats.threshold == 0.5


def test_random_order_changes_between_calls():
    features = _features([3] * 20)
    collator = TFPDataCollator(order="random", seed=5)
    first, second = collator.pack(features).order, collator.pack(features).order
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(20))
    assert not torch.equal(first, second)
    again = TFPDataCollator(order="random", seed=5).pack(features).order
    assert torch.equal(first, again)  # seeded: reproducible


@pytest.mark.parametrize("attention", ["sample", "pack"])
def test_max_len_packs(attention):
    lengths = [5, 17, 1, 8, 3, 12, 6, 2, 9, 4]
    features = _features(lengths, labels=True)
    collator = TFPDataCollator(max_len=20, attention=attention, return_flash_attn_kwargs=True)
    batch = collator.pack(features)
    out = collator(features)
    pack_lengths = torch.diff(batch.pack_offsets)
    assert int(pack_lengths.max()) <= 20 and int(pack_lengths.sum()) == sum(lengths)
    assert_equal(out["cu_seq_lens_q"], batch.cu_seqlens, "cu_seq_lens_q")
    expected_segments = len(lengths) if attention == "sample" else batch.num_packs
    assert out["cu_seq_lens_q"].numel() == expected_segments + 1
    starts = out["cu_seq_lens_q"][:-1].long()
    assert (out["position_ids"][0, starts] == 0).all() and (out["labels"][0, starts] == -100).all()
    assert out["max_length_q"] == int(torch.diff(out["cu_seq_lens_q"]).max())
    with pytest.raises(ValueError, match="more than max_len"):
        TFPDataCollator(max_len=10)(features)  # overlong="error" by default
    split = TFPDataCollator(max_len=10, overlong="split")(features)
    assert split["input_ids"].numel() == sum(lengths)


def test_labels_carried_through():
    features = _features([6, 4], labels=True)
    out = TFPDataCollator(order="keep")(features)
    expected = [-100] + features[0]["labels"][1:] + [-100] + features[1]["labels"][1:]
    assert out["labels"][0].tolist() == expected


def test_bad_input():
    with pytest.raises(ValueError, match="every example is empty"):
        TFPDataCollator()([{"input_ids": []}, {"input_ids": []}])
    with pytest.raises(ValueError, match="no 'input_ids'"):
        TFPDataCollator()([{"ids": [1, 2]}])
    with pytest.raises(ValueError, match="labels has 2 entries"):
        TFPDataCollator()([{"input_ids": [1, 2, 3], "labels": [1, 2]}])
    with pytest.raises(ValueError, match="has no 'labels'|has none"):
        TFPDataCollator()([{"input_ids": [1, 2], "labels": [1, 2]}, {"input_ids": [3]}])
    with pytest.raises(TypeError, match="sequence of ints"):
        TFPDataCollator()([{"input_ids": np.array([1.5, 2.0])}])
    # float ids from lists are refused too (not truncated: 3.7 is no token id), naming the feature
    with pytest.raises(TypeError, match="input_ids of feature 1 must be a sequence of ints"):
        TFPDataCollator()([{"input_ids": [5, 6]}, {"input_ids": [3.7, 4]}])
    with pytest.raises(TypeError, match="labels of feature 0 must be a sequence of ints"):
        TFPDataCollator()([{"input_ids": [5, 6], "labels": [-100, 6.0]}])
    with pytest.raises(TypeError, match="list of dicts"):
        TFPDataCollator()({"input_ids": [1, 2]})
    with pytest.raises(ValueError, match="return_tensors"):
        TFPDataCollator(return_tensors="np")
    with pytest.raises(ValueError, match="return_tensors"):
        TFPDataCollator()([{"input_ids": [1, 2]}], return_tensors="np")
    with pytest.raises(ValueError, match="attention"):
        TFPDataCollator(attention="causal")
    with pytest.raises(ValueError, match="order"):
        TFPDataCollator(order="sorted")
    with pytest.raises(ValueError, match="max_len"):
        TFPDataCollator(max_len=0)
    with pytest.raises(ValueError, match="threshold"):
        TFPDataCollator(threshold=float("nan"))


@pytest.mark.gpu
def test_gpu_device_matches_cpu():
    features = _features([5, 17, 1, 8, 3, 12, 6, 2], labels=True)
    cpu = TFPDataCollator(max_len=20, return_flash_attn_kwargs=True)(features)
    gpu = TFPDataCollator(max_len=20, return_flash_attn_kwargs=True, device="cuda")(features)
    for key, value in cpu.items():
        if isinstance(value, torch.Tensor):
            assert gpu[key].device.type == "cuda"
            assert_equal(gpu[key].cpu(), value, key)
        else:
            assert gpu[key] == value
