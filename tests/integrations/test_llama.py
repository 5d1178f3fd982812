"""A tiny randomly initialised Llama on the collator's packed batches (CPU, sdpa and eager), and a short
``Trainer`` run with the collator.

Tolerance of the logit comparisons: float32, ``atol = rtol = 1e-5`` (measured max difference ~1e-7): the
packed and the separate runs do the same arithmetic up to summation order.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from tfp_kernels.integrations import TFPDataCollator

transformers = pytest.importorskip("transformers")

ATOL = RTOL = 1e-5
VOCAB = 61


def _tiny_llama(attn_implementation: str):
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        use_cache=False,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM._from_config(config, attn_implementation=attn_implementation).eval()


def _features(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCAB, (n,), generator=gen).tolist()} for n in lengths]


LENGTHS = [5, 9, 1, 13, 4, 7, 2, 11]


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request):
    return _tiny_llama(request.param)


@pytest.mark.parametrize("max_len", [None, 16], ids=["one-row", "max_len-16"])
@pytest.mark.parametrize("order", ["tfp", "keep"])
def test_sample_mode_equals_each_sample_alone(model, max_len, order):
    features = _features(LENGTHS)
    collator = TFPDataCollator(
        max_len=max_len, order=order, attention="sample", return_flash_attn_kwargs=True
    )
    batch = collator.pack(features)
    inputs = collator(features)
    with torch.no_grad():
        packed = model(**inputs, use_cache=False)
        cu = batch.cu_seqlens_cpu.tolist()
        total_loss, total_count = 0.0, 0
        for segment, (start, end) in enumerate(itertools.pairwise(cu)):
            ids = torch.tensor([features[int(batch.sample_index[segment])]["input_ids"]])
            alone = model(input_ids=ids, labels=ids, use_cache=False)
            torch.testing.assert_close(packed.logits[0, start:end], alone.logits[0], atol=ATOL, rtol=RTOL)
            if ids.shape[1] > 1:
                total_loss += float(alone.loss) * (ids.shape[1] - 1)
                total_count += ids.shape[1] - 1
    # the packed loss is the token-weighted mean of the per-sample losses
    assert abs(float(packed.loss) - total_loss / total_count) < 1e-5


@pytest.mark.parametrize("max_len", [None, 20], ids=["one-row", "max_len-20"])
def test_pack_mode_equals_each_pack_as_one_sequence(model, max_len):
    features = _features(LENGTHS, seed=1)
    collator = TFPDataCollator(max_len=max_len, attention="pack")
    batch = collator.pack(features)
    inputs = collator(features)
    with torch.no_grad():
        packed = model(**inputs, use_cache=False).logits
        offsets = batch.pack_offsets.tolist()
        assert len(offsets) - 1 == (1 if max_len is None else batch.num_packs)
        for start, end in itertools.pairwise(offsets):
            ordinary = model(input_ids=inputs["input_ids"][:, start:end], use_cache=False).logits
            torch.testing.assert_close(packed[0, start:end], ordinary[0], atol=ATOL, rtol=RTOL)


def test_sample_mode_differs_from_pack_mode(model):
    """The check above can fail: without per-sample masking later samples see earlier ones."""
    features = _features(LENGTHS)
    with torch.no_grad():
        sample = model(**TFPDataCollator(order="keep")(features), use_cache=False).logits
        pack = model(**TFPDataCollator(order="keep", attention="pack")(features), use_cache=False).logits
    assert torch.allclose(sample[0, :5], pack[0, :5], atol=ATOL)  # the first sample sees only itself
    assert not torch.allclose(sample[0, 5:], pack[0, 5:], atol=1e-3)


def test_trainer_loss_falls(tmp_path):
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("accelerate")
    # learnable data: runs of consecutive ids (mod VOCAB) of assorted lengths
    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(0, VOCAB, (64,), generator=gen).tolist()
    lengths = torch.randint(4, 24, (64,), generator=gen).tolist()
    rows = [[(s + i) % VOCAB for i in range(n)] for s, n in zip(starts, lengths)]
    dataset = datasets.Dataset.from_dict({"input_ids": rows})
    model = _tiny_llama("sdpa").train()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=24,
        learning_rate=1e-2,
        warmup_steps=0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    collator = TFPDataCollator(max_len=64, attention="sample", return_flash_attn_kwargs=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 24 and all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.7 * first, losses
    assert collator.num_calls >= 24
