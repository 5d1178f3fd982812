"""tfp-pack --keep-apart K: the packs are pack_lengths(..., keep_apart=K) of the TFP order with the threshold t, the
report says so and counts the packs holding a near-duplicate pair; bad values are refused before reading."""

import dataclasses
import json

import pyarrow.parquet as pq
import pytest
import torch

from tfp_kernels import pack_lengths
from tfp_kernels.cli import main
from tfp_kernels.data.make_sft import make_duplicate_heavy_records
from tfp_kernels.embed import HashedEmbedder
from tfp_kernels.report import near_duplicate_pairs, packing_summary
from tfp_kernels.text import ByteTokenizer, tokenize_records


def _run(argv, tmp_path, name="out"):
    out = tmp_path / name
    rc = main([*argv, "--output", str(out), "--no-progress", "--no-plots"])
    report = json.loads((out / "report.json").read_text()) if rc == 0 else None
    return rc, out, report


def _pack(lengths, order, strategy, **options):
    packing = pack_lengths(lengths[order], 1024, strategy=strategy, overlong="split", **options)
    return dataclasses.replace(packing, sample_index=order[packing.sample_index])


@pytest.mark.parametrize("strategy", ["fill_in_order", "next_fit"])
def test_keep_apart_packs_and_report(tmp_path, capsys, strategy):
    records = make_duplicate_heavy_records(300, 0.2, seed=7)
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    rc, out, report = _run([str(path), "--max-len", "1024", "--strategy", strategy, "--keep-apart", "3"], tmp_path)
    assert rc == 0
    printed = capsys.readouterr().out
    emb = HashedEmbedder().embed_texts([r["instruction"] for r in records])
    lengths = torch.from_numpy(tokenize_records(records, "alpaca", ByteTokenizer()).lengths).long()
    order = torch.tensor(pq.read_table(out / "ordered.parquet").column("original_index").to_pylist())
    t = report["order"]["threshold"]

    window = {"window": 1024} if strategy == "fill_in_order" else {}
    want = _pack(lengths, order, strategy, embeddings=emb[order], min_distance=t, keep_apart=3, **window)
    members = [[] for _ in range(want.num_packs)]
    for pack, sample in zip(want.pack_id.tolist(), want.sample_index.tolist()):
        members[pack].append(sample)
    assert pq.read_table(out / "packed.parquet").column("sample_ids").to_pylist() == members
    assert report["packing"]["keep_apart"] == 3 and report["packing"]["strategy"] == strategy
    summary = packing_summary(want, emb, threshold=t)
    assert report["packing"]["near_duplicate_packs"] == summary["near_duplicate_packs"]
    assert summary["near_duplicate_packs"] == near_duplicate_pairs(want, emb, t).packs
    chosen = f"tfp + {strategy} + keep-apart 3"
    assert list(report["comparison"])[:2] == [chosen, f"tfp + {strategy}"]
    plain = _pack(lengths, order, strategy, **({"embeddings": emb[order], "min_distance": t, **window}
                                               if strategy == "fill_in_order" else {}))
    assert report["comparison"][f"tfp + {strategy}"]["near_duplicate_packs"] == near_duplicate_pairs(plain, emb, t).packs
    # held back, not lost: every record in the packs once
    assert sorted(s for pack in members for s in pack) == list(range(300))
    assert f"packing: {strategy} + keep-apart 3, max_len 1024" in printed
    line = next(line for line in printed.splitlines() if line.strip().startswith(chosen + " "))
    assert str(summary["near_duplicate_packs"]) in line.split()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--keep-apart", "-1"], "--keep-apart must be an integer >= 0, got -1"),
        (["--keep-apart", "2", "--strategy", "bfd"], "--keep-apart works with --strategy fill_in_order or next_fit"),
    ],
)
def test_bad_keep_apart_refused_before_reading(tmp_path, capsys, argv, message):
    missing = str(tmp_path / "missing.jsonl")  # checked before anything is read: the input does not exist
    rc, out, _ = _run([missing, *argv], tmp_path)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("tfp-pack: error: ") and message in err
    assert len(err.splitlines()) == 1 and not out.exists()
