"""``benchmarks/bench_distributed.py --data sft-duplicates`` on a tiny set: two gloo processes against one."""

from __future__ import annotations

import json

import torch

from benchmarks import bench_distributed


def test_sft_duplicates_option_orders_the_set_on_two_processes(tmp_path):
    bench_distributed.main(
        ["--data", "sft-duplicates", "--records", "300", "--procs", "2", "--timeout", "120", "--out-dir",
         str(tmp_path)]
    )
    (written,) = tmp_path.glob("distributed_sft_duplicates_*.json")
    document = json.loads(written.read_text())
    row = document["row"]
    assert row["records"] == 300 and row["largest_shared_text"] >= 60  # 0.2 of 300 share one instruction
    entry = row["policies"]["paper"]
    single, sharded = entry["single_process"], entry["runs"]["2"]
    assert single["check_path_ok"] is True
    assert single["groups"] <= row["distinct_texts"] < row["records"]  # exact duplicates share a group
    assert sharded["same_path_as_single_process"] is True and sharded["check_path_ok"] is None
    assert sharded["first_difference"] is None and sharded["groups"] == single["groups"]
    assert sharded["scans"] >= 0 and single["scans"] >= 0
    if single["scans"]:
        assert sharded["scans_ratio_to_single_process"] == sharded["scans"] / single["scans"]
    # the records the benchmark embeds are make_duplicate_heavy_records' (300, 0.2): the same N and distinct rows
    data = bench_distributed.sft_duplicate_embeddings(300, 0.2)
    assert data["embeddings"].shape == (300, row["dim"])
    assert torch.unique(data["embeddings"], dim=0).shape[0] == single["groups"]


def test_first_difference_names_the_step_and_the_distances():
    emb = torch.tensor([[0.0, 0.0], [3.0, 4.0], [4.0, 3.0], [0.0, 1.0]])
    single = torch.tensor([0, 1, 2, 3])
    assert bench_distributed.first_difference(emb, single, single.clone()) is None
    got = bench_distributed.first_difference(emb, single, torch.tensor([0, 2, 1, 3]))
    assert got["step"] == 1 and got["steps_differing"] == 2
    assert (got["single_node"], got["sharded_node"], got["equal_rows"]) == (1, 2, False)
    assert got["distance_single"] == got["distance_sharded"] == 5.0 and got["relative_gap"] == 0.0
