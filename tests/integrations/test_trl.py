"""TFP packs in TRL's SFTTrainer and transformers' Trainer: the attention segments that reach the model.

The packs come from ``tfp-pack`` (its packed.parquet) and from ``pack_dataset``, with ``attention="pack"``
(one segment per pack, the TFP paper) and ``"sample"`` (one segment per sample). A tiny Llama (sdpa, CPU)
trains on them for one epoch with

- TRL ``SFTTrainer(padding_free=True, max_length=None, dataset_kwargs={"skip_prepare_dataset": True})``;
- ``Trainer`` + :class:`~tfp_kernels.PackedRowsCollator`;
- ``Trainer`` + transformers' ``DataCollatorWithFlattening`` (one segment per row: pack attention only).

Oracles: a forward pre-hook records what every training step passes to the model. The segments the model
receives are read with transformers' own rule (a segment starts where a position id is not its predecessor's
+ 1); over the epoch, the token runs of those segments must be exactly the token runs of the segments the
file asks for (its ``cu_seqlens``), and ``cu_seq_lens_q``, when passed, must agree. Then the recorded call
is replayed: the model's logits must equal those of each segment run alone, i.e. the model attends within
those segments (with sdpa this holds only without a cache: the Trainer runs set ``model.config.use_cache =
False``, as the README says; a test shows the samples mix otherwise).
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch

datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from tfp_kernels import PackedRowsCollator, pack_dataset

VOCAB = 259  # the byte tokenizer of tfp-pack and pack_dataset
MAX_LEN = 256
RECORDS = [
    {
        "instruction": f"{verb} the word '{word}'.",
        "input": "",
        "output": f"{word[::-1] if verb == 'Reverse' else word.upper()}" + " ok" * (k % 4),
    }
    for k, (verb, word) in enumerate(
        (verb, word)
        for word in ("tree", "house", "river", "cloud", "stone", "light")
        for verb in ("Reverse", "Shout", "Spell", "Echo")
    )
]


def tiny_llama():
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        max_position_embeddings=2048,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )  # use_cache=True, as a pretrained model's config usually has it
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa")


def byte_tokenizer():
    """A transformers tokenizer over UTF-8 bytes (byte-level BPE without merges, ids 3..258; 0 pad, 1 BOS,
    2 EOS): the same vocabulary size as the package's byte tokenizer, so the tiny Llama fits both."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(alphabet)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    """{(source, attention): Dataset of packs}: tfp-pack's packed.parquet and pack_dataset's output."""
    from tfp_kernels.cli import main

    folder = tmp_path_factory.mktemp("tfp_pack")
    (folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    out = {}
    for attention in ("pack", "sample"):
        output = folder / attention
        argv = [str(folder / "records.jsonl"), "--output", str(output), "--max-len", str(MAX_LEN)]
        assert main([*argv, "--attention", attention, "--no-plots", "--no-progress"]) == 0
        out["tfp-pack", attention] = datasets.load_dataset(
            "parquet", data_files=str(output / "packed.parquet"), split="train"
        )
        out["pack_dataset", attention] = pack_dataset(
            datasets.Dataset.from_list(RECORDS), max_len=MAX_LEN, attention=attention
        )
    return out


def file_segments(packed) -> list[tuple[int, ...]]:
    """The token runs of the attention segments the packs ask for (their cu_seqlens), sorted."""
    runs = []
    for row in packed:
        cu = row["cu_seqlens"]
        assert row["seq_lengths"] == [b - a for a, b in itertools.pairwise(cu)]
        runs += [tuple(row["input_ids"][a:b]) for a, b in itertools.pairwise(cu)]
    return sorted(runs)


def received_segments(call) -> list[tuple[int, int]]:
    """(start, end) of the segments in one recorded forward, by transformers' rule on position_ids."""
    positions = call["position_ids"].reshape(-1)
    starts = [0] + (torch.nonzero(positions[1:] - positions[:-1] != 1).reshape(-1) + 1).tolist()
    bounds = list(itertools.pairwise([*starts, positions.numel()]))
    if call.get("cu_seq_lens_q") is not None:
        cu = call["cu_seq_lens_q"].tolist()
        assert list(itertools.pairwise(cu)) == bounds, "cu_seq_lens_q disagrees with position_ids"
    return bounds


def record_forwards(model) -> list[dict]:
    calls = []

    def hook(module, args, kwargs):
        assert not args, "the trainers pass the batch as keyword arguments"
        calls.append({k: v.detach().clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def check_replay(model, call) -> float:
    """Max |logits of the recorded call - logits of each received segment alone|."""
    kwargs = {k: v for k, v in call.items() if k in ("input_ids", "position_ids", "use_cache")}
    model.eval()
    with torch.no_grad():
        packed = model(**kwargs).logits[0]
        worst = 0.0
        for a, b in received_segments(call):
            alone = model(input_ids=call["input_ids"][:, a:b], use_cache=False).logits[0]
            worst = max(worst, float((packed[a:b] - alone).abs().max()))
    return worst


def train(packed, trainer_kind, tmp_path, *, remove_unused_columns=False):
    model = tiny_llama()
    calls = record_forwards(model)
    common = {
        "output_dir": str(tmp_path / trainer_kind),
        "per_device_train_batch_size": 2,
        "num_train_epochs": 1,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "report_to": [],
        "save_strategy": "no",
        "use_cpu": True,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": 0,
    }
    if trainer_kind == "trl":
        pytest.importorskip("trl")
        from trl import SFTConfig, SFTTrainer

        config = SFTConfig(
            padding_free=True,
            max_length=None,
            dataset_kwargs={"skip_prepare_dataset": True},
            bf16=False,
            **common,
        )
        trainer = SFTTrainer(
            model=model, args=config, train_dataset=packed, processing_class=byte_tokenizer()
        )
    else:
        model.config.use_cache = (
            False  # sdpa / eager read the segments from position_ids only without a cache
        )
        collator = (
            PackedRowsCollator()
            if trainer_kind == "collator"
            else transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)
        )
        args = transformers.TrainingArguments(remove_unused_columns=remove_unused_columns, **common)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=packed, data_collator=collator)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    return model, calls


def segments_of_calls(calls) -> list[tuple[int, ...]]:
    runs = []
    for call in calls:
        ids = call["input_ids"].reshape(-1).tolist()
        runs += [tuple(ids[a:b]) for a, b in received_segments(call)]
    return sorted(runs)


CASES = [
    pytest.param(trainer, source, attention, id=f"{trainer}-{source}-{attention}")
    for trainer in ("trl", "collator")
    for source in ("tfp-pack", "pack_dataset")
    for attention in ("pack", "sample")
]


@pytest.mark.parametrize("trainer_kind, source, attention", CASES)
def test_the_model_receives_the_segments_of_the_file(packs, tmp_path, trainer_kind, source, attention):
    packed = packs[source, attention]
    asked = file_segments(packed)
    assert len(asked) == (len(packed) if attention == "pack" else len(RECORDS))
    model, calls = train(packed, trainer_kind, tmp_path)
    assert len(calls) == (len(packed) + 1) // 2  # one epoch, 2 packs per step
    received = segments_of_calls(calls)
    print(f"\n{trainer_kind} {source} {attention}: {len(received)} segments received, {len(asked)} asked")
    assert received == asked
    if trainer_kind == "trl":
        assert all(call.get("use_cache") is False for call in calls)  # TRL turns the cache off itself
    assert check_replay(model, calls[0]) < 1e-4


def test_trainer_with_default_columns_reads_the_segments_from_position_ids(packs, tmp_path):
    """remove_unused_columns=True (Trainer's default) leaves input_ids, labels and position_ids."""
    packed = packs["pack_dataset", "sample"]
    model, calls = train(packed, "collator", tmp_path, remove_unused_columns=True)
    assert segments_of_calls(calls) == file_segments(packed)
    assert check_replay(model, calls[0]) < 1e-4


@pytest.mark.parametrize("attention", ["pack", "sample"])
def test_flattening_collator_makes_each_row_one_segment(packs, tmp_path, attention):
    """transformers' DataCollatorWithFlattening: one segment per row, i.e. the pack attention of the file,
    and pack attention too for rows written with per-sample attention."""
    packed = packs["pack_dataset", attention]
    model, calls = train(packed, "flattening", tmp_path)
    received = segments_of_calls(calls)
    print(
        f"\nflattening pack_dataset {attention}: {len(received)} segments received, {len(file_segments(packed))} asked"
    )
    assert received == sorted(tuple(row["input_ids"]) for row in packed)
    if attention == "sample":
        assert len(received) < len(file_segments(packed))
    assert check_replay(model, calls[0]) < 1e-4


def test_sdpa_with_a_cache_mixes_the_segments(packs):
    """Why the Trainer recipes set model.config.use_cache = False: with a cache (the config's default),
    transformers' sdpa / eager mask ignores the restarting position ids and the samples attend to each other."""
    packed = packs["pack_dataset", "sample"]
    batch = PackedRowsCollator()([packed[0]])
    model = tiny_llama().train()
    call = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    assert len(received_segments(call)) > 1
    assert check_replay(model, call) > 1e-2  # use_cache from the config (True): segments mix
    assert check_replay(model, dict(call, use_cache=False)) < 1e-4
