"""Figures of tfp_kernels.report against plain-Python pair loops, on odd sizes and split samples."""

import itertools
import math

import pytest
import torch

from tfp_kernels import pack_lengths
from tfp_kernels.report import intra_pack_similarity, packing_summary, same_label_pair_fraction


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
