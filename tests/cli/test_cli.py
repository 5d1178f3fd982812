"""The tfp-pack command line: runs end to end, reports honestly, fails with one clear line."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from tfp_kernels import check_path
from tfp_kernels.cli import main, run, _parser
from tfp_kernels.data import load_default


def test_default_dataset_shapes():
    data = load_default()
    assert data["embeddings"].shape == (2000, 64) and data["embeddings"].dtype == torch.float16
    assert data["lengths"].shape == (2000,) and int(data["lengths"].min()) >= 16
    assert int(data["lengths"].max()) <= 2048


def test_main_job_on_default_data(tmp_path, capsys):
    report_path = tmp_path / "report.json"
    assert main(["--report", str(report_path)]) == 0
    out = capsys.readouterr().out
    assert "path check: ok" in out
    report = json.loads(report_path.read_text())
    assert report["num_samples"] == 2000 and report["path_check"]["ok"]
    tfp, rnd = report["orders"]["tfp"], report["orders"]["random"]
    # TFP keeps near-duplicates apart and related samples together, compared with a random order
    assert tfp["near_duplicate_adjacent_fraction"] < rnd["near_duplicate_adjacent_fraction"]
    assert tfp["same_topic_adjacent_fraction"] > 2 * rnd["same_topic_adjacent_fraction"]
    assert tfp["mean_adjacent_distance"] < rnd["mean_adjacent_distance"]
    for row in report["orders"].values():
        assert 0 < row["fill_ratio"] <= 1


def test_npz_input_and_split_policy(tmp_path):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(50, 8)).astype(np.float32)
    lengths = rng.integers(1, 300, size=50)
    lengths[7] = 700  # over --max-len 256: split into 3 pieces
    path = tmp_path / "d.npz"
    np.savez(path, embeddings=emb, lengths=lengths)
    report = run(_parser().parse_args(["--data", str(path), "--max-len", "256", "--overlong", "split",
                                       "--metric", "cosine", "--window", "2"]))
    assert report["path_check"]["ok"] and report["num_samples"] == 50
    tokens = int(lengths.sum())
    for row in report["orders"].values():
        assert row["fill_ratio"] == pytest.approx(tokens / (row["packs"] * 256))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "/nonexistent/x.pt"], "no such file"),
        (["--data", "README.md"], "expected a .pt or .npz file"),
        (["--window", "0"], "window must be an integer >= 1"),
        (["--quantile", "2"], "quantile must be"),
        (["--max-len", "100"], "max_len"),  # default data has samples longer than 100 tokens
    ],
)
def test_errors_are_one_clear_line(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tfp-pack: error:") and message in err
    assert len(err.splitlines()) == 1


def test_missing_key(tmp_path, capsys):
    path = tmp_path / "d.pt"
    torch.save({"embeddings": torch.randn(5, 3)}, path)
    assert main(["--data", str(path)]) == 2
    assert "missing key 'lengths'" in capsys.readouterr().err


def test_module_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "tfp_kernels", "--help"], capture_output=True, text=True, check=True)
    assert "--max-rejections" in out.stdout and "Threshold Filtering Packing" in out.stdout


def test_reported_path_is_the_validated_one():
    data = load_default()
    args = _parser().parse_args(["--no-check"])
    report = run(args)
    assert "path_check" not in report
    # the threshold the CLI reports is the one a direct validation accepts
    from tfp_kernels import tfp_order

    path = tfp_order(data["embeddings"], threshold=report["threshold"])
    assert check_path(data["embeddings"], path, threshold=report["threshold"])
