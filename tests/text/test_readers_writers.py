"""Readers (JSON, JSONL, Parquet, saved datasets) and Parquet writers of tfp_kernels.text."""

import gzip
import json
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tfp_kernels import assemble, pack_lengths
from tfp_kernels.text import InputError, packed_table, read_records, records_table, unpack_records
from tfp_kernels.text.readers import holds_token_ids, read_embeddings, read_token_records

RECORDS = [{"instruction": f"q{i}", "output": f"a{i}", "n": i} for i in range(5)]


def _write(tmp_path, name, records):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif name.endswith(".jsonl.gz"):
        path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode()))
    elif name.endswith(".json"):
        path.write_text(json.dumps(records))
    elif name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(records), path)
    return str(path)


@pytest.mark.parametrize("name", ["d.jsonl", "d.jsonl.gz", "d.json", "d.parquet"])
def test_read_each_file_kind(tmp_path, name):
    path = _write(tmp_path, name, RECORDS)
    assert read_records(path) == RECORDS
    assert read_records(path, limit=2) == RECORDS[:2]


def test_read_saved_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(RECORDS)
    ds.save_to_disk(str(tmp_path / "ds"))
    assert read_records(str(tmp_path / "ds")) == RECORDS
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    assert read_records(str(tmp_path / "dd"), limit=3) == RECORDS[:3]


def test_damaged_saved_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "ds"))
    for arrow in (tmp_path / "ds").glob("*.arrow"):
        arrow.write_bytes(b"garbage")
    with pytest.raises(InputError, match=r"ds: cannot read the saved dataset"):
        read_records(str(tmp_path / "ds"))


def test_json_object_with_data_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"data": RECORDS, "version": 1}))
    assert read_records(str(path)) == RECORDS


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.jsonl", '{"a": 1}\n\n{"a": 2,}\n', r"line 3 is not valid JSON"),
        ("bad.jsonl", '{"a": 1}\n[1, 2]\n', r"line 2 is a JSON list, expected an object"),
        ("bad.json", '[{"a": 1},\n {"a": }]', r"line 2 is not valid JSON"),
        ("bad.json", '"text"', r"expected a JSON list of records"),
        ("empty.jsonl", "\n\n", r"the dataset is empty"),
        ("empty.json", "[]", r"the dataset is empty"),
        ("data.csv", "a,b\n", r"unknown input type"),
    ],
)
def test_read_errors(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(InputError, match=message):
        read_records(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such file or directory"):
        read_records(str(tmp_path / "nope.jsonl"))


def test_records_table_keeps_every_field():
    records = [{"a": 1}, {"b": "x", "a": 2}, {"a": "mixed", "c": [1, 2]}]
    table = records_table(records, np.array([2, 0, 1]), "original_index")
    assert table.column_names == ["a", "a__str", "b", "c", "original_index"]
    rows = table.to_pylist()
    assert [r["original_index"] for r in rows] == [2, 0, 1]
    assert rows[1]["b"] is None and rows[2]["b"] == "x"
    # mixed types: one column per kind, the string as it was (not JSON-quoted)
    assert [r["a"] for r in rows] == [None, 1, 2] and [r["a__str"] for r in rows] == ["mixed", None, None]


@pytest.mark.parametrize("attention", ["pack", "sample"])
def test_packed_table_roundtrip(attention):
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 40, (30,), generator=gen)
    lengths[3] = 90  # split over 3 packs
    tokens = [torch.randint(3, 259, (int(n),), generator=gen) for n in lengths]
    packing = pack_lengths(lengths, 32, overlong="split")
    batch = assemble(tokens, packing, attention=attention)
    table = packed_table(batch)
    assert table.num_rows == packing.num_packs
    for got, want in zip(unpack_records(table, 30), tokens):
        assert torch.equal(got, want)
    cu = table.column("cu_seqlens").to_pylist()
    lens = table.column("length").to_pylist()
    pieces = table.column("sample_lengths").to_pylist()
    segments = table.column("seq_lengths").to_pylist()
    for c, n, p, s in zip(cu, lens, pieces, segments):
        assert c[0] == 0 and c[-1] == n and sum(p) == n
        assert s == np.diff(c).tolist()  # seq_lengths: the attention segments (what TRL reads)
        if attention == "pack":
            assert c == [0, n] and s == [n]
        else:
            assert s == p
    flat_cu = np.concatenate(
        [np.array(c[:-1]) + off for c, off in zip(cu, np.cumsum([0] + lens[:-1]))] + [[sum(lens)]]
    )
    assert flat_cu.tolist() == batch.cu_seqlens_cpu.tolist()


def test_packed_table_without_tokens():
    packing = pack_lengths(torch.tensor([3, 9, 4, 2]), 8, overlong="split")
    table = packed_table(packing=packing)
    assert table.column_names == ["sample_ids", "sample_lengths", "sample_starts", "length"]
    pieces = sorted(
        (s, st, n)
        for ids, lens, starts in zip(*(table.column(c).to_pylist() for c in table.column_names[:3]))
        for s, n, st in zip(ids, lens, starts)
    )
    assert pieces == [(0, 0, 3), (1, 0, 8), (1, 8, 1), (2, 0, 4), (3, 0, 2)]


def test_read_token_records():
    records = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        {"input_ids": (8,), "labels": [8]},
        {"input_ids": np.array([9, 10]), "labels": [-100, -100]},
    ]
    assert holds_token_ids(records) and not holds_token_ids(RECORDS) and not holds_token_ids([])
    tok = read_token_records(records)
    assert tok.input_ids.tolist() == [5, 6, 7, 8, 9, 10] and tok.offsets.tolist() == [0, 3, 4, 6]
    assert tok.labels.tolist() == [-100, 6, 7, 8, -100, -100] and tok.num_label_tokens == 3
    # no labels: the tokens where every mask is 1 (TRL's rule), else every token
    masked = [{"input_ids": [1, 2, 3], "completion_mask": [0, 1, 1], "assistant_masks": [1, 1, 0]}]
    assert read_token_records(masked).labels.tolist() == [-100, 2, -100]
    assert read_token_records([{"input_ids": [1, 2]}]).labels.tolist() == [1, 2]
    labelled = [dict(masked[0], labels=[7, 7, 7])]  # labels win over masks
    assert read_token_records(labelled).labels.tolist() == [7, 7, 7]


@pytest.mark.parametrize(
    "records, message",
    [
        ([], "the dataset is empty"),
        ([{"input_ids": [1]}, {"text": "a"}], r"record 1 has no field 'input_ids'; its fields: \['text'\]"),
        ([{"input_ids": None}], "record 0: 'input_ids' is null, expected a list of token ids"),
        ([{"input_ids": "abc"}], "record 0: 'input_ids' must be a list of token ids, got str"),
        (
            [{"input_ids": [1.5, 2.0]}],
            "record 0: 'input_ids' must be a list of token ids, got float64 values",
        ),
        ([{"input_ids": [[1, 2]]}], r"record 0: 'input_ids' must be a list of token ids, got shape \(1, 2\)"),
        ([{"input_ids": [1]}, {"input_ids": []}], "record 1: 'input_ids' is empty"),
        ([{"input_ids": [1, -2]}], r"record 0: 'input_ids' holds a negative token id \(-2\)"),
        ([{"input_ids": [1, 2], "labels": [1]}], "record 0: 'labels' has 1 entries, 'input_ids' 2"),
        (
            [{"input_ids": [1], "labels": [1]}, {"input_ids": [2]}],
            r"record 1 has no field 'labels' \(record 0 has it\)",
        ),
        (
            [{"input_ids": [1]}, {"input_ids": [2], "labels": [2]}],
            "record 1 has a field 'labels' that record 0 has not",
        ),
        (
            [{"input_ids": [1, 2], "completion_mask": [0, 2]}],
            "record 0: 'completion_mask' must hold 0 or 1 only",
        ),
        (
            [{"input_ids": [1, 2], "assistant_masks": [1]}],
            "record 0: 'assistant_masks' has 1 entries, 'input_ids' 2",
        ),
        (["abc"], "record 0 is a str, expected an object"),
    ],
)
def test_read_token_records_errors(records, message):
    with pytest.raises(InputError, match=message):
        read_token_records(records)


# ------------------------------------------------------------------------------ bad bytes, bad archives


GOOD_LINES = "".join(json.dumps(r) + "\n" for r in RECORDS).encode()


@pytest.mark.parametrize(
    "name, content, message",
    [
        (
            "d.jsonl",
            GOOD_LINES + b'{"a": "caf\xe9"}\n',
            r"d.jsonl: line 6 is not valid UTF-8 \(byte 0xe9 at byte column 11\)",
        ),
        (
            "d.json",
            b'[{"a": 1},\n {"a": "\xff"}]',
            r"d.json: line 2 is not valid UTF-8 \(byte 0xff at byte column 9\)",
        ),
        (
            "d.jsonl.gz",
            gzip.compress(GOOD_LINES)[:-30],
            r"d.jsonl.gz: the compressed data ends early, after line \d",
        ),
        ("d.json.gz", gzip.compress(GOOD_LINES)[:-30], r"d.json.gz: the compressed data ends early"),
        ("d.jsonl.gz", GOOD_LINES, r"d.jsonl.gz: not a gzip file"),
        ("d.jsonl", b'{"a": "\\ud800 alone"}\n', r"d.jsonl: line 1 holds a lone UTF-16 surrogate escape"),
        ("d.json", b'[{"a": 1}, {"a": ["x", "\\udc00"]}]', r"d.json: record 1 holds a lone UTF-16 surrogate"),
        ("d.parquet", b"PAR1 not really parquet", r"d.parquet: cannot read as Parquet"),
    ],
)
def test_unreadable_bytes_name_the_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputError, match=message):
        read_records(str(path))


def test_corrupt_gzip_data(tmp_path):
    data = bytearray(gzip.compress(GOOD_LINES))
    data[-8] ^= 0xFF  # the CRC-32 of the trailer: every line decodes, the check at the end fails
    (tmp_path / "d.jsonl.gz").write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"d.jsonl.gz: corrupt gzip data after line 5 \(CRC check failed"):
        read_records(str(tmp_path / "d.jsonl.gz"))
    assert read_records(str(tmp_path / "d.jsonl.gz"), limit=2) == RECORDS[:2]  # the first records only


def test_byte_order_mark_and_paired_surrogates_are_read(tmp_path):
    (tmp_path / "d.jsonl").write_bytes(b"\xef\xbb\xbf" + GOOD_LINES + b'{"a": "\\ud83d\\ude00"}\n')
    assert read_records(str(tmp_path / "d.jsonl")) == RECORDS + [{"a": "\U0001f600"}]
    (tmp_path / "d.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(RECORDS).encode())
    assert read_records(str(tmp_path / "d.json")) == RECORDS


def test_read_embeddings(tmp_path):
    emb = torch.randn(7, 3, dtype=torch.float64)
    lengths = torch.arange(1, 8, dtype=torch.int32)
    torch.save(
        {"embeddings": emb, "lengths": lengths, "topic": torch.arange(7) % 2, "other": [1]}, tmp_path / "d.pt"
    )
    np.savez(
        tmp_path / "d.npz",
        embeddings=emb.numpy(),
        lengths=lengths.numpy().astype(np.uint16),
        note=np.array(["x"]),
    )
    for name in ("d.pt", "d.npz"):
        data = read_embeddings(str(tmp_path / name))
        assert torch.equal(data["embeddings"], emb) and data["lengths"].dtype == torch.int64
        assert data["lengths"].tolist() == list(range(1, 8))
        part = read_embeddings(str(tmp_path / name), limit=3)
        assert part["embeddings"].shape == (3, 3) and part["lengths"].tolist() == [1, 2, 3]
    assert read_embeddings(str(tmp_path / "d.pt"))["topic"].tolist() == [0, 1, 0, 1, 0, 1, 0]


def _save(path, **arrays):
    if str(path).endswith(".npz"):
        np.savez(path, **arrays)
    else:
        torch.save(
            {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in arrays.items()}, path
        )
    return str(path)


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"embeddings": np.zeros((3, 2), np.float32)}, r"missing key 'lengths' \(found: \['embeddings'\]\)"),
        (
            {"embeddings": np.zeros((3, 2), np.float32), "lengths": np.array([1.0, 2.0, 3.7])},
            r"'lengths' must hold integers \(token counts\), got torch.float64",
        ),
        (
            {"embeddings": np.zeros((3, 2), np.float32), "lengths": np.array([True, True, False])},
            r"'lengths' must hold integers \(token counts\), got torch.bool",
        ),
        (
            {"embeddings": np.zeros((3, 2), np.float32), "lengths": np.array([1, 2])},
            r"'lengths' must have shape \(3,\)",
        ),
        (
            {"embeddings": np.zeros((3, 2), np.float32), "lengths": np.array([1, -2, 0])},
            r"record 1 has 'lengths'\[1\] = -2: every record needs at least one token \(2 of 3",
        ),
        (
            {
                "embeddings": np.array([[0.0, 1.0], [np.nan, 0.0], [0.0, np.inf]]),
                "lengths": np.array([1, 2, 3]),
            },
            r"record 1 has NaN or infinite values in 'embeddings'\[1\] \(2 records do\)",
        ),
        (
            {"embeddings": np.zeros((3,), np.float32), "lengths": np.array([1, 2, 3])},
            r"'embeddings' must have shape \(N, D\)",
        ),
        (
            {"embeddings": np.zeros((3, 2), np.int64), "lengths": np.array([1, 2, 3])},
            r"'embeddings' must hold floating-point",
        ),
        (
            {"embeddings": np.zeros((0, 2), np.float32), "lengths": np.zeros(0, np.int64)},
            r"the dataset is empty",
        ),
        (
            {
                "embeddings": np.zeros((3, 2), np.float32),
                "lengths": np.array([1, 2, 3]),
                "topic": np.array([0.5] * 3),
            },
            r"'topic' must hold integers \(labels\)",
        ),
    ],
)
def test_read_embeddings_errors(tmp_path, suffix, arrays, message):
    path = _save(tmp_path / f"d{suffix}", **arrays)
    with pytest.raises(InputError, match=re.escape(path) + ": " + message):
        read_embeddings(path)


def test_read_embeddings_bad_files(tmp_path):
    (tmp_path / "g.pt").write_bytes(b"garbage")
    (tmp_path / "g.npz").write_bytes(b"garbage")
    torch.save([torch.zeros(2, 2)], tmp_path / "list.pt")
    torch.save({"embeddings": [[0.0, 1.0]], "lengths": [1]}, tmp_path / "lists.pt")
    torch.save({"embeddings": np.zeros((2, 2)), "lengths": np.ones(2, np.int64)}, tmp_path / "numpy.pt")
    np.save(tmp_path / "single.npy", np.zeros(3))
    os.rename(tmp_path / "single.npy", tmp_path / "single.npz")
    np.savez(tmp_path / "obj.npz", embeddings=np.zeros((2, 2)), lengths=np.array([1, None], dtype=object))
    np.savez(tmp_path / "str.npz", embeddings=np.zeros((2, 2)), lengths=np.array(["1", "2"]))
    cases = {
        "g.pt": "cannot read as a torch.save file",
        "g.npz": "cannot read as an .npz archive",
        "list.pt": "expected a dict with 'embeddings' and 'lengths', got list",
        "lists.pt": "key 'embeddings' must be a tensor, got list",
        "numpy.pt": "holds numpy arrays",
        "single.npz": "holds a single array",
        "obj.npz": "key 'lengths' holds Python objects",
        "str.npz": "key 'lengths' must hold numbers, got a numpy array of dtype <U1",
    }
    for name, message in cases.items():
        with pytest.raises(InputError) as info:
            read_embeddings(str(tmp_path / name))
        assert str(info.value).startswith(str(tmp_path / name) + ": ") and message in str(info.value), name


# ------------------------------------------------------------------------------ fields of several types


def _rebuild(table, field_notes):
    """The records' values back from a records_table: per row, the one non-null column of each field."""
    rows = table.to_pylist()
    out = []
    for row in rows:
        record = {}
        for field, columns in field_notes.items():
            values = [(c, row[c]) for c in columns if row[c] is not None]
            assert len(values) <= 1, row
            if values:
                column, value = values[0]
                record[field] = json.loads(value) if columns[column].endswith("as JSON text") else value
            else:
                record[field] = None
        out.append(record)
    return out


def test_mixed_fields_keep_every_value_exactly():
    records = [
        {"a": 'quote " and\nnewline', "b": 1.5, "c": [1, 2], "d": True},
        {"a": 7, "b": 2, "c": "text", "d": 0.5},
        {"a": "plain", "b": 2**60, "c": [1, "x"], "d": None},
        {"a": ["x"], "b": None, "c": {"k": 1}, "d": False},
        {"a": "é ✓", "b": 3, "e": 1},
    ]
    order = np.array([4, 2, 0, 3, 1])
    notes = {}
    table = records_table(records, order, "original_index", notes=notes)
    assert notes == {
        "a": {"a": "str", "a__number": "number", "a__list": "list"},
        "b": {"b": "number", "b__int": "int"},  # 2**60 is not exact in a float64: kept as an int
        "c": {"c": "list as JSON text", "c__str": "str", "c__dict": "dict"},  # [1, "x"]: no arrow type
        "d": {"d": "bool", "d__number": "number"},  # a bool is not a number (True would become 1.0)
    }
    assert str(table.schema.field("c").type) == "string" and str(table.schema.field("b").type) == "double"
    fields = {**notes, "e": {"e": "number"}}
    got = _rebuild(table, fields)
    for row, i in zip(got, order.tolist()):
        want = {k: records[i].get(k) for k in fields}
        assert row == want  # ints in the float64 column "b" come back as equal floats (2 -> 2.0)
        for k in ("a", "c", "d"):
            assert type(row[k]) is type(want[k]), (k, row[k], want[k])


def test_split_column_names_do_not_clash():
    records = [{"a": "x", "a__number": "taken"}, {"a": 1, "a__number": "also"}]
    notes = {}
    table = records_table(records, np.array([0, 1]), "original_index", notes=notes)
    assert notes == {"a": {"a": "str", "a__number_2": "number"}}
    assert table.column_names == ["a", "a__number_2", "a__number", "original_index"]
    assert table.column("a__number").to_pylist() == ["taken", "also"]


def test_one_kind_columns_are_unchanged():
    records = [
        {"s": "x", "n": 1, "f": 0.5, "l": [1, 2], "m": {"k": "v"}},
        {"s": None, "n": 2, "f": 1, "l": [], "m": None},
    ]
    notes = {}
    table = records_table(records, np.array([1, 0]), "original_index", notes=notes)
    assert notes == {}
    assert table.to_pylist() == [dict(records[1], original_index=1), dict(records[0], original_index=0)]
