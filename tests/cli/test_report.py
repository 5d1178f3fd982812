"""Figures of tfp_kernels.report against plain-Python pair loops, on odd sizes and split samples."""

import itertools
import math

import pytest
import torch

from tfp_kernels import pack_lengths
from tfp_kernels.report import (
    intra_pack_similarity,
    near_duplicate_pair_fraction,
    packing_summary,
    plot_similarity,
    same_label_pair_fraction,
)


def _pack_members(packing):
    members = {}
    for p, s in zip(packing.pack_id.tolist(), packing.sample_index.tolist()):
        members.setdefault(p, [])
        if s not in members[p]:
            members[p].append(s)
    return [members[p] for p in range(packing.num_packs)]


@pytest.mark.parametrize(
    "n, max_len, strategy",
    [
        (1, 10, "next_fit"),
        (7, 13, "next_fit"),
        (33, 50, "stream"),
        (61, 97, "bfd"),
        (40, 30, "window_best_fit"),
        (45, 40, "fill_in_order"),
    ],
)
def test_against_pair_loops(n, max_len, strategy):
    gen = torch.Generator().manual_seed(n)
    lengths = torch.randint(1, 60, (n,), generator=gen)
    emb = torch.randn(n, 5, generator=gen)
    labels = torch.randint(0, 3, (n,), generator=gen)
    packing = pack_lengths(lengths, max_len, strategy=strategy, overlong="split")
    x = torch.nn.functional.normalize(emb.double(), dim=1)
    sims = intra_pack_similarity(packing, emb)
    same = total = 0
    for p, members in enumerate(_pack_members(packing)):
        pairs = list(itertools.combinations(members, 2))
        if not pairs:
            assert math.isnan(sims[p])
            continue
        want = sum(float(x[a] @ x[b]) for a, b in pairs) / len(pairs)
        assert sims[p].item() == pytest.approx(want, abs=1e-12)
        same += sum(int(labels[a] == labels[b]) for a, b in pairs)
        total += len(pairs)
    frac = same_label_pair_fraction(packing, labels)
    assert (math.isnan(frac) and total == 0) or frac == pytest.approx(same / total)
    summary = packing_summary(packing, emb, labels)
    assert summary["packs"] == packing.num_packs and summary["tokens"] == int(lengths.sum())


def test_summary_near_duplicate_pairs():
    emb = torch.tensor([[0.0, 1.0], [0.1, 1.0], [5.0, 1.0], [9.0, 1.0], [9.0, 1.2]])
    packing = pack_lengths([2, 2, 2, 4, 4], 6)  # packs {0, 1, 2} | {3} | {4}
    summary = packing_summary(packing, emb, threshold=0.5)
    assert summary["near_duplicate_pair_fraction"] == round(1 / 3, 6)  # (0, 1) of the pairs (0, 1), (0, 2), (1, 2)
    assert "near_duplicate_pair_fraction" not in packing_summary(packing, emb)  # no threshold: not computed
    single = pack_lengths([4, 4, 4, 4, 4], 6)  # one sample per pack: no pairs
    assert packing_summary(single, emb, threshold=0.5)["near_duplicate_pair_fraction"] is None
    cosine = packing_summary(packing, emb, threshold=0.01, metric="cosine")["near_duplicate_pair_fraction"]
    assert cosine == round(near_duplicate_pair_fraction(packing, emb, 0.01, "cosine"), 6)


def test_similarity_plot_legend(tmp_path):
    gen = torch.Generator().manual_seed(0)
    per_pack = {"a": torch.rand(30, generator=gen, dtype=torch.float64), "b": torch.tensor([float("nan"), 0.5])}
    path = tmp_path / "sim.png"
    labels = plot_similarity(per_pack, str(path), "title", {"a": 0.0123, "b": None})
    assert labels == [f"a: mean {float(per_pack['a'].mean()):.3f}, pairs closer than t: 1.2%",
                      "b: mean 0.500, pairs closer than t: no pairs"]
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert plot_similarity(per_pack, str(path), "title") == [f"a: mean {float(per_pack['a'].mean()):.3f}",
                                                             "b: mean 0.500"]
