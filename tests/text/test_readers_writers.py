"""Readers (JSON, JSONL, Parquet, saved datasets) and Parquet writers of tfp_kernels.text."""

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tfp_kernels import assemble, pack_lengths
from tfp_kernels.text import InputError, packed_table, read_records, records_table, unpack_records

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
    assert table.column_names == ["a", "b", "c", "original_index"]
    rows = table.to_pylist()
    assert [r["original_index"] for r in rows] == [2, 0, 1]
    assert rows[1]["b"] is None and rows[2]["b"] == "x"
    assert [r["a"] for r in rows] == ['"mixed"', "1", "2"]  # mixed types: stored as JSON text


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
    seq = table.column("seq_lengths").to_pylist()
    for c, n, s in zip(cu, lens, seq):
        assert c[0] == 0 and c[-1] == n and sum(s) == n
        if attention == "pack":
            assert c == [0, n]
        else:
            assert c == list(np.concatenate([[0], np.cumsum(s)]))
    flat_cu = np.concatenate(
        [np.array(c[:-1]) + off for c, off in zip(cu, np.cumsum([0] + lens[:-1]))] + [[sum(lens)]]
    )
    assert flat_cu.tolist() == batch.cu_seqlens_cpu.tolist()
