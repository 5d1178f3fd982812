"""The sharded path's Triton pieces on 2 gloo processes, run by the Triton interpreter on CPU tensors
(``TRITON_INTERPRET=1`` in the workers): the ring's lists by the fused band kernel (``band_backend="triton"``: the
own block square, the other rank's block as columns) and the masked scans by the Triton scan kernel
(``fallback="triton"``). What CUDA runs, at sizes the interpreter takes in a minute; each path must be
single-process ``tfp_order``'s (the data has no ties other than those of equal rows, broken by index).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from tfp_kernels import tfp_order, tfp_order_reference
from tfp_kernels.order.band_tiles_triton import HAVE_TRITON

_spec = importlib.util.spec_from_file_location("_helpers_order", Path(__file__).with_name("_helpers_order.py"))
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)

pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")

TRITON = {"band_backend": "triton", "fallback": "triton"}
CASES = {
    "l2": {"n": 150, "d": 12, "clusters": 6, "kwargs": {"k": 4, **TRITON}},
    # equal rows across the ranks (one list per group), cosine, a window of 2, spread
    "groups_cosine_spread": {"n": 150, "d": 12, "clusters": 6, "copies": 50, "seed": 1,
                             "kwargs": {"k": 4, "metric": "cosine", "window": 2, "policy": "spread", **TRITON}},
    # a cap: the steps where it can fire take the projection scan, the last ones the masked scan
    "cap": {"n": 120, "d": 12, "clusters": 6, "kwargs": {"k": 4, "max_rejections": 10, **TRITON}},
    # Triton lists with the torch masked scans (the CPU default), and the reverse
    "lists_only": {"n": 150, "d": 12, "clusters": 6, "kwargs": {"k": 4, "band_backend": "triton"}},
    "scans_only": {"n": 150, "d": 9, "clusters": 6, "dtype": torch.float16, "kwargs": {"k": 4, "fallback": "triton"}},
}


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    cases = [{**case, "direct": True} for case in CASES.values()]
    out = helpers.launch(2, cases, tmp_path_factory.mktemp("triton2"), env={"TRITON_INTERPRET": "1"})
    return {name: [out[r][i] for r in range(2)] for i, name in enumerate(CASES)}


@pytest.mark.parametrize("name", list(CASES))
def test_triton_pieces_give_the_single_process_path(world2, name):
    case = CASES[name]
    kwargs = {k: v for k, v in case["kwargs"].items() if k not in ("band_backend", "fallback")}
    emb = helpers.case_embeddings(case)
    path, single = tfp_order(emb, return_stats=True, **kwargs)
    ref = tfp_order_reference(emb, **{k: v for k, v in kwargs.items() if k != "k"})
    assert torch.equal(path, ref), "single-process fast and reference paths differ: the test data has ties"
    lists = case["kwargs"].get("band_backend", "auto")
    for r, res in enumerate(world2[name]):
        assert "error" not in res, f"rank {r}: {res.get('error')}"
        assert torch.equal(res["path"], path), f"rank {r}'s path differs from single-process tfp_order"
        stats = res["stats"]
        assert stats.band_backend == ("triton-ring" if lists == "triton" else "torch-ring")
        assert stats.num_fallbacks > 10  # (the scans ran)
        if case["kwargs"].get("policy") == "spread":
            assert stats.num_forced_steps == single.num_forced_steps
        if name == "groups_cosine_spread":
            assert stats.num_groups == single.num_groups < case["n"]
        # the masked scans measured rows in float64 (every rank's, summed), the capped steps none of theirs
        assert stats.scan_candidates > 0
