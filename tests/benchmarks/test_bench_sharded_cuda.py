"""``benchmarks/bench_sharded_cuda.py`` on CPU tensors (gloo, the Triton variants in the interpreter) at a tiny
size: the script a lent GPU runs must not fail there for a reason a CPU could have shown."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_sharded_cuda
from tfp_kernels.order.band_topk_triton import triton_runs_on


@pytest.mark.skipif(not triton_runs_on("cpu"), reason="needs Triton's interpreter (TRITON_INTERPRET=1)")
def test_every_variant_runs_and_matches_one_process(tmp_path):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    bench_sharded_cuda.main(["--device", "cpu", "--sizes", "80", "--dim", "8", "--k", "4", "--out-dir", str(tmp_path)])
    (written,) = tmp_path.glob("sharded_cuda_*.json")
    (row,) = json.loads(written.read_text())["rows"]
    assert row["n"] == 80 and row["single_process"]["scans"] >= 0
    assert [(v["band_backend"], v["fallback"]) for v in row["sharded"]] == [
        (v["band_backend"], v["fallback"]) for v in bench_sharded_cuda.VARIANTS]
    for variant in row["sharded"]:
        assert variant["same_path"] is True and variant["check_path_ok"] is True
        assert variant["band_backend_used"] == f"{variant['band_backend']}-ring"
        assert variant["scans"] > 0 and variant["scan_candidates"] > 0  # (K = 4 lists: the masked scans ran)
