"""What tfp-pack tells about the order and the packs: --policy, forced steps and their warning, near-duplicate
pairs per packing, the embedded text's facts, --strategy fill_in_order and --pack-window, the fill-against-
similarity points and plot. Every figure of report.json is recomputed here with the library's functions on the
same order and packings."""

import dataclasses
import json

import pyarrow.parquet as pq
import pytest
import torch

from tfp_kernels import cli, pack_lengths, tfp_order
from tfp_kernels.cli import MANIFEST, main
from tfp_kernels.data.make_sft import SHARED_INSTRUCTION, make_duplicate_heavy_records
from tfp_kernels.embed import HashedEmbedder, embed_text_stats
from tfp_kernels.order.policy import count_forced_steps
from tfp_kernels.report import fill_similarity_points, near_duplicate_pair_fraction, packing_summary
from tfp_kernels.text import ByteTokenizer, tokenize_records


def _write(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _run(argv, tmp_path, name="out", plots=False):
    out = tmp_path / name
    rc = main([*argv, "--output", str(out), "--no-progress", *([] if plots else ["--no-plots"])])
    report = json.loads((out / "report.json").read_text()) if rc == 0 else None
    return rc, out, report


def _embeddings(records, field="instruction"):
    return HashedEmbedder().embed_texts([r[field] for r in records])


def _lengths(records):
    return torch.from_numpy(tokenize_records(records, "alpaca", ByteTokenizer()).lengths).long()


def _order(out) -> torch.Tensor:
    return torch.tensor(pq.read_table(out / "ordered.parquet").column("original_index").to_pylist())


def _packed_members(out) -> list[list[int]]:
    return pq.read_table(out / "packed.parquet").column("sample_ids").to_pylist()


def _members(packing) -> list[list[int]]:
    """The samples of each pack, as packed.parquet's sample_ids lists them (one entry per piece)."""
    members = [[] for _ in range(packing.num_packs)]
    for pack, sample in zip(packing.pack_id.tolist(), packing.sample_index.tolist()):
        members[pack].append(sample)
    return members


def _pack(lengths, order, max_len, strategy, **options):
    packing = pack_lengths(lengths[order], max_len, strategy=strategy, overlong="split", **options)
    return dataclasses.replace(packing, sample_index=order[packing.sample_index])


@pytest.fixture(scope="module")
def duplicate_heavy():
    """1,000 alpaca records, 200 of them with the instruction "Summarize the following text." (seeded)."""
    return make_duplicate_heavy_records(1000, 0.2)


def test_policy_argument(tmp_path, capsys):
    parse = cli._parser().parse_args
    assert parse([]).policy is None
    for argv, policy in (([], "spread"), (["--max-rejections", "100"], "paper"), (["--policy", "paper"], "paper")):
        assert cli._resolve_policy(parse(argv)) == policy
    with pytest.raises(SystemExit) as exit_info:
        parse(["--policy", "nearest"])
    assert exit_info.value.code == 2 and "invalid choice: 'nearest'" in capsys.readouterr().err
    # checked before anything is read: the input does not even exist
    missing = str(tmp_path / "missing.jsonl")
    for argv, message in (
        (["--policy", "spread", "--max-rejections", "10"], "--policy spread takes no --max-rejections (got 10)"),
        (["--pack-window", "0"], "--pack-window must be an integer >= 1, got 0"),
    ):
        rc, out, _ = _run([missing, *argv], tmp_path)
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.startswith("tfp-pack: error: ") and message in err
        assert len(err.splitlines()) == 1 and not out.exists()


def test_report_figures_are_the_library_functions(tmp_path, capsys):
    records = make_duplicate_heavy_records(300, 0.2, seed=5)
    path = _write(tmp_path / "d.jsonl", records)
    rc, out, report = _run([path, "--max-len", "1024", "--policy", "paper", "--seed", "3"], tmp_path)
    assert rc == 0
    printed = capsys.readouterr().out
    emb, lengths, n = _embeddings(records), _lengths(records), len(records)

    # the order: the paper's rule, its forced steps as count_forced_steps finds them on the written order
    want_path, stats = tfp_order(emb, policy="paper", return_stats=True)
    path_t = _order(out)
    assert torch.equal(path_t, want_path)
    order = report["order"]
    t = order["threshold"]
    assert t == stats.threshold and order["policy"] == "paper"
    forced, first = count_forced_steps(emb, path_t, threshold=t, window=4, metric="l2")
    assert forced > 0.05 * (n - 1)  # 60 copies of one text: the paper's rule leaves them to the end
    assert (order["forced_steps"], order["first_forced_step"]) == (forced, first)
    assert order["forced_step_rate"] == round(forced / (n - 1), 6)
    assert f"policy paper, window 4, " in printed
    assert f"{forced} forced steps ({100 * forced / (n - 1):.1f}% of steps, first at step {first})" in printed
    assert report["path_check"]["ok"]

    # the packing and every compared packing: near-duplicate pairs (and the rest) as packing_summary gives them
    gen = torch.Generator().manual_seed(3)
    orders = {"tfp": path_t, "random": torch.randperm(n, generator=gen), "original": torch.arange(n)}
    fill_options = dict(window=1024, embeddings=emb[path_t], min_distance=t, metric="l2")
    packings = {
        "tfp + next_fit": _pack(lengths, path_t, 1024, "next_fit"),
        "tfp + fill_in_order": _pack(lengths, path_t, 1024, "fill_in_order", **fill_options),
        "random + next_fit": _pack(lengths, orders["random"], 1024, "next_fit"),
        "original + next_fit": _pack(lengths, orders["original"], 1024, "next_fit"),
        "bfd (length only)": _pack(lengths, orders["original"], 1024, "bfd"),
    }
    assert _packed_members(out) == _members(packings["tfp + next_fit"])
    assert list(report["comparison"]) == list(packings)
    topics = cli._topics(records)
    for name, packing in packings.items():
        want = packing_summary(packing, emb, topics, threshold=t)
        assert report["comparison"][name] == want, name
        near = near_duplicate_pair_fraction(packing, emb, t)
        assert want["near_duplicate_pair_fraction"] == round(near, 6)
    assert report["packing"]["near_duplicate_pair_fraction"] == report["comparison"]["tfp + next_fit"][
        "near_duplicate_pair_fraction"
    ]
    # the printed table has the column, with each row's figure
    head = next(line for line in printed.splitlines() if line.strip().startswith("packing "))
    assert "near-dup pairs" in head
    for name, row in report["comparison"].items():
        line = next(line for line in printed.splitlines() if line.strip().startswith(name + " "))
        assert f"{row['near_duplicate_pair_fraction']:.3f}" in line.split()

    # fill against similarity: the library's points, TFP and random order
    want_points = fill_similarity_points(
        lengths, emb, 1024, {"tfp": path_t, "random": orders["random"]}, cli.TRADE_OFF_POINTS, overlong="split",
        min_distance=t, metric="l2",
    )
    assert report["fill_vs_similarity"] == want_points
    assert {p["strategy"] for p in want_points} == {"next_fit", "fill_in_order", "window_best_fit", "bfd"}
    assert set(report["fill_ratio_per_strategy"]["tfp"]) == set(cli.STRATEGIES)

    # the embedded text
    stats_text = embed_text_stats([r["instruction"] for r in records])
    assert report["input"]["embed_text"] == stats_text  # the shared text is short: not cut
    assert stats_text["most_common_text"] == SHARED_INSTRUCTION and stats_text["most_common_count"] == 60


def test_forced_step_warning_under_paper_not_spread(tmp_path, capsys, duplicate_heavy):
    # 200 of 1,000 records share one instruction: the paper's rule takes their copies last, in a row (about 16%
    # of the steps forced, the warning says so and names --policy spread); spread takes them while they can be
    # kept apart and is left with the walk's last few steps (< 1%)
    path = _write(tmp_path / "d.jsonl", duplicate_heavy)
    reports, warnings = {}, {}
    for policy in ("paper", "spread"):
        rc, out, reports[policy] = _run([path, "--policy", policy], tmp_path, policy)
        assert rc == 0
        printed = capsys.readouterr().out
        warnings[policy] = [line for line in printed.splitlines() if "found no sample" in line]
        # the shared-text warning is printed either way, on one line
        shared = [line for line in printed.splitlines() if "embed the same text" in line]
        assert len(shared) == 1 and "200 of 1000 records (20.0%)" in shared[0]
    paper, spread = reports["paper"]["order"], reports["spread"]["order"]
    assert paper["forced_steps"] > 0.1 * 999 and len(warnings["paper"]) == 1
    line = warnings["paper"][0]
    assert line.startswith(f"  warning: {paper['forced_steps']} of 999 steps (")
    assert f"first at step {paper['first_forced_step']}, policy paper" in line and "--policy spread" in line
    assert spread["forced_steps"] <= 0.01 * 999 and warnings["spread"] == []
    # and the packs: spread's TFP order puts fewer near-duplicate pairs into a pack than the paper's
    near = {p: reports[p]["packing"]["near_duplicate_pair_fraction"] for p in reports}
    assert near["spread"] < near["paper"]
    assert near["paper"] > reports["paper"]["comparison"]["random + next_fit"]["near_duplicate_pair_fraction"]


def test_spread_warning_points_at_the_embedded_text(tmp_path, capsys):
    # 30 identical (empty) texts of 40: no window keeps them apart, whatever the policy
    records = [{"instruction": f"Task {i}: explain topic {i % 5}.", "input": "" if i >= 10 else f"text {i}",
                "output": f"Answer {i}."} for i in range(40)]
    path = _write(tmp_path / "d.jsonl", records)
    rc, out, report = _run([path, "--embed-field", "input"], tmp_path)
    assert rc == 0 and report["order"]["policy"] == "spread" and report["order"]["forced_steps"] >= 2
    (line,) = [line for line in capsys.readouterr().out.splitlines() if "found no sample" in line]
    assert "policy spread" in line and "--embed-field a,b or --embed-template" in line
    assert report["input"]["embed_text"]["num_empty"] == 30


def test_fill_in_order_strategy_and_pack_window(tmp_path, capsys):
    records = make_duplicate_heavy_records(200, 0.1, seed=2)
    path = _write(tmp_path / "d.jsonl", records)
    rc, out, report = _run([path, "--strategy", "fill_in_order", "--pack-window", "16", "--max-len", "1024",
                            "--metric", "cosine"], tmp_path)
    assert rc == 0
    emb, lengths = _embeddings(records), _lengths(records)
    path_t, t = _order(out), report["order"]["threshold"]
    want = _pack(lengths, path_t, 1024, "fill_in_order", window=16, embeddings=emb[path_t], min_distance=t,
                 metric="cosine")
    assert _packed_members(out) == _members(want)
    assert report["packing"]["strategy"] == "fill_in_order" and report["packing"]["pack_window"] == 16
    assert list(report["comparison"]) == [
        "tfp + fill_in_order", "tfp + next_fit", "random + fill_in_order", "original + fill_in_order",
        "bfd (length only)",
    ]
    assert report["comparison"]["tfp + fill_in_order"]["near_duplicate_pair_fraction"] == round(
        near_duplicate_pair_fraction(want, emb, t, "cosine"), 6
    )
    # --pack-window joins the windows of the fill-against-similarity points
    windows = {(p["strategy"], p["window"]) for p in report["fill_vs_similarity"]}
    assert {("fill_in_order", 16), ("window_best_fit", 16), ("fill_in_order", 1024)} <= windows
    assert "packing: fill_in_order, max_len 1024" in capsys.readouterr().out

    rc, out, report = _run([path, "--strategy", "window_best_fit", "--pack-window", "32", "--max-len", "1024"],
                           tmp_path, "wbf")
    assert rc == 0
    want = _pack(lengths, _order(out), 1024, "window_best_fit", window=32)
    assert _packed_members(out) == _members(want) and report["packing"]["pack_window"] == 32


def test_fill_in_order_and_empty_embedded_texts(tmp_path, capsys):
    # an empty text embeds as an all-zero row: fill_in_order's cosine similarity has nothing to compare
    records = [{"instruction": f"Task {i}.", "input": "" if i % 4 == 3 else f"text {i}", "output": "x" * (i + 1)}
               for i in range(24)]
    path = _write(tmp_path / "d.jsonl", records)
    rc, out, _ = _run([path, "--embed-field", "input", "--strategy", "fill_in_order"], tmp_path)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and not out.exists() and len(err.splitlines()) == 1
    assert f"{path}: record 3 embeds an empty text, its embedding is all zeros (6 of 24 are)" in err
    # the default strategy runs; the comparison's fill_in_order row says it tops up by length only
    rc, out, report = _run([path, "--embed-field", "input"], tmp_path, "default")
    assert rc == 0 and "tfp + fill_in_order (length only)" in report["comparison"]
    lengths = _lengths(records)
    want = _pack(lengths, _order(out), 2048, "fill_in_order", window=1024)
    assert report["comparison"]["tfp + fill_in_order (length only)"]["packs"] == want.num_packs


def test_plots_written_listed_and_marking_near_duplicates(tmp_path, monkeypatch):
    from tfp_kernels import report as report_module

    labels = []
    plot_similarity = report_module.plot_similarity

    def recording(*args, **kwargs):
        labels.extend(plot_similarity(*args, **kwargs))

    monkeypatch.setattr(report_module, "plot_similarity", recording)
    records = make_duplicate_heavy_records(120, 0.2, seed=1)
    path = _write(tmp_path / "d.jsonl", records)
    rc, out, report = _run([path, "--max-len", "1024"], tmp_path, plots=True)
    assert rc == 0
    png = b"\x89PNG\r\n\x1a\n"
    for name in ("fill_vs_similarity.png", "intra_pack_similarity.png"):
        assert (out / name).read_bytes()[:8] == png
    manifest = json.loads((out / MANIFEST).read_text())
    assert "fill_vs_similarity.png" in manifest["files"] and "fill_vs_similarity.png" in report["outputs"]
    assert set(manifest["files"]) | {MANIFEST} == set(report["outputs"])
    # the legend's near-duplicate shares are the report's
    cmp = report["comparison"]
    assert len(labels) == 3
    for label, name in zip(labels, ["tfp + next_fit", "random + next_fit", "bfd (length only)"]):
        near = cmp[name]["near_duplicate_pair_fraction"]
        assert label.startswith(f"{name}: mean ")
        assert label.endswith(f"pairs closer than t: {100 * near:.1f}%")
