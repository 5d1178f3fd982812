"""A tiny randomly initialised Llama on the collator's packed batches (CPU, sdpa and eager), a short
``Trainer`` run with the collator, and ``attn_implementation="tfp_varlen"`` (``register_hf_attention``)
against sdpa on each sample / pack alone: logits and gradients.

Tolerance of the logit comparisons: float32, ``atol = rtol = 1e-5`` (measured max difference ~1e-7): the
packed and the separate runs do the same arithmetic up to summation order.
"""

from __future__ import annotations

import contextlib
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
    # the ordering changes nothing here, and the collator says so (it still applies it)
    warns = pytest.warns(UserWarning, match="changes nothing") if order == "tfp" else contextlib.nullcontext()
    with warns:
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


# ---------------------------------------------------------------------------------------- attn_implementation="tfp_varlen"


def _varlen_and_sdpa():
    """The same tiny Llama twice: with the package's attention (registered) and with transformers' sdpa."""
    from tfp_kernels import register_hf_attention

    name = register_hf_attention()
    varlen = _tiny_llama(name).train()
    sdpa = _tiny_llama("sdpa").train()
    sdpa.load_state_dict(varlen.state_dict())
    assert varlen.config._attn_implementation == "tfp_varlen"
    return varlen, sdpa


def _grads(model):
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


def _assert_grads_close(got, expected):
    for name, value in expected.items():
        scale = float(value.abs().max()) + 1e-12
        torch.testing.assert_close(got[name], value, atol=1e-5 * scale + 1e-9, rtol=1e-4, msg=name)


def _labels_with_prompts(features, seed):
    gen = torch.Generator().manual_seed(seed)
    for f in features:
        labels = list(f["input_ids"])
        cut = int(torch.randint(0, len(labels), (1,), generator=gen))
        f["labels"] = [-100] * cut + labels[cut:]
    return features


@pytest.mark.parametrize("segments_from", ["cu_seq_lens", "position_ids"])
def test_tfp_varlen_sample_mode_equals_each_sample_alone(segments_from):
    varlen, sdpa = _varlen_and_sdpa()
    features = _labels_with_prompts(_features(LENGTHS, seed=2), seed=3)
    inputs = TFPDataCollator(max_len=16, attention="sample", return_flash_attn_kwargs=True)(features)
    total = int(inputs["num_items_in_batch"])
    if segments_from == "position_ids":  # transformers' rule: a segment starts where the position restarts
        for key in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):
            del inputs[key]
    inputs["num_items_in_batch"] = total
    packed = varlen(**inputs, use_cache=False)
    packed.loss.backward()
    got = _grads(varlen)
    position = 0
    for f in features:  # the collator keeps the order with attention="sample"
        ids, labels = torch.tensor([f["input_ids"]]), torch.tensor([f["labels"]])
        alone = sdpa(input_ids=ids, labels=labels, num_items_in_batch=total, use_cache=False)
        alone.loss.backward()
        n = ids.shape[1]
        torch.testing.assert_close(packed.logits[0, position : position + n], alone.logits[0], atol=ATOL, rtol=RTOL)
        position += n
    assert position == packed.logits.shape[1]
    _assert_grads_close(got, _grads(sdpa))


def test_tfp_varlen_pack_mode_equals_each_pack_as_one_sequence():
    from tfp_kernels import PackedRowsCollator, assemble, pack_lengths
    from tfp_kernels.text.writers import packed_table

    varlen, sdpa = _varlen_and_sdpa()
    gen = torch.Generator().manual_seed(4)
    samples = [torch.randint(0, VOCAB, (n,), generator=gen) for n in LENGTHS + [6, 3, 8]]
    batch = assemble(samples, pack_lengths([s.numel() for s in samples], max_len=20), attention="pack")
    rows = packed_table(batch).to_pylist()  # the rows tfp-pack writes
    inputs = PackedRowsCollator()(rows)
    assert inputs["cu_seq_lens_q"].numel() - 1 == len(rows) > 2  # one segment per pack
    packed = varlen(**inputs, use_cache=False)
    packed.loss.backward()
    got = _grads(varlen)
    total = int(inputs["num_items_in_batch"])
    for row, (start, end) in zip(rows, itertools.pairwise(inputs["cu_seq_lens_q"].tolist())):
        ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
        alone = sdpa(input_ids=ids, labels=labels, num_items_in_batch=total, use_cache=False)
        alone.loss.backward()
        torch.testing.assert_close(packed.logits[0, start:end], alone.logits[0], atol=ATOL, rtol=RTOL)
    _assert_grads_close(got, _grads(sdpa))


def test_tfp_varlen_padded_rows_with_a_padding_mask():
    """B > 1 rows, padded left and right, with a 2-D attention_mask: each row's tokens are one segment."""
    varlen, sdpa = _varlen_and_sdpa()
    varlen.eval()
    sdpa.eval()
    rows = [f["input_ids"] for f in _features([5, 9, 3], seed=5)]
    width = 9
    input_ids = torch.zeros(3, width, dtype=torch.int64)
    mask = torch.zeros(3, width, dtype=torch.int64)
    spans = [(0, 5), (0, 9), (6, 9)]  # right padding, none, left padding
    for i, (row, (a, b)) in enumerate(zip(rows, spans)):
        input_ids[i, a:b] = torch.tensor(row)
        mask[i, a:b] = 1
    position_ids = (mask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        out = varlen(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
        for i, (row, (a, b)) in enumerate(zip(rows, spans)):
            alone = sdpa(input_ids=torch.tensor([row]), use_cache=False).logits
            torch.testing.assert_close(out[i, a:b], alone[0], atol=ATOL, rtol=RTOL)


def test_tfp_varlen_refuses_what_it_cannot_do():
    varlen, _ = _varlen_and_sdpa()
    varlen.eval()
    with torch.no_grad(), pytest.raises(NotImplementedError, match="set_attn_implementation"):
        varlen.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False, use_cache=True)
    varlen.train()
    varlen.config.attention_dropout = 0.1
    for layer in varlen.model.layers:
        layer.self_attn.attention_dropout = 0.1
    with pytest.raises(NotImplementedError, match="no attention dropout"):
        varlen(input_ids=torch.tensor([[1, 2, 3]]), use_cache=False)
    from tfp_kernels import register_hf_attention

    with pytest.raises(ValueError, match="backend must be one of"):
        register_hf_attention(backend="fast")


def test_trainer_on_packed_rows_with_tfp_varlen(tmp_path):
    """Trainer + PackedRowsCollator (pack attention rows, as tfp-pack writes them) + tfp_varlen attention."""
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("accelerate")
    from tfp_kernels import PackedRowsCollator, assemble, pack_lengths, register_hf_attention
    from tfp_kernels.text.writers import packed_table

    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(0, VOCAB, (96,), generator=gen).tolist()
    lengths = torch.randint(4, 24, (96,), generator=gen).tolist()
    samples = [torch.tensor([(s + i) % VOCAB for i in range(n)]) for s, n in zip(starts, lengths)]
    batch = assemble(samples, pack_lengths(lengths, max_len=64), attention="pack")
    packs = datasets.Dataset.from_list(packed_table(batch).to_pylist())
    model = _tiny_llama(register_hf_attention()).train()
    received, own = [], []  # num_items_in_batch the model gets, and each batch's own count
    forward = model.forward

    def recording_forward(*args, **kwargs):
        received.append(int(kwargs["num_items_in_batch"]))
        own.append(int((kwargs["labels"][:, 1:] != -100).sum()))
        return forward(*args, **kwargs)

    model.forward = recording_forward
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=12,
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
    trainer = transformers.Trainer(model=model, args=args, train_dataset=packs, data_collator=PackedRowsCollator())
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    # the Trainer replaces the collator's per-batch count by the count of the whole step (2 micro-batches)
    assert len(received) == 24 and own[0] != own[1]
    for step in range(12):
        assert received[2 * step] == received[2 * step + 1] == own[2 * step] + own[2 * step + 1]
