"""Each distinct text embedded once: unique_texts, embed_unique, the hashed embedder's own dedup, and the
counts and warning about empty or shared texts.

The oracle of "the same result as embedding every text" is the embedder run on one text at a time
(``torch.cat`` of single-text calls), compared bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tfp_kernels.embed import (
    HashedEmbedder,
    embed_text_stats,
    embed_text_warning,
    embed_unique,
    hashed,
    unique_texts,
)


class CountingEmbedder:
    """A deterministic fake: row = (length, sum of code points, first code point or -1); records calls."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def embed_texts(self, texts, **kwargs):
        self.calls.append((list(texts), kwargs))
        return torch.tensor(
            [[len(t), sum(map(ord, t)), ord(t[0]) if t else -1] for t in texts], dtype=torch.float64
        )


def one_at_a_time(embed, texts) -> torch.Tensor:
    return torch.cat([embed([t]) for t in texts])


CASES = [
    ["only"],  # N = 1
    ["a", "a", "a"],  # one distinct text
    ["a", "b", "c"],  # all distinct
    ["", "x", "", " ", "x", "é", "e\u0301"],  # empty, whitespace, composed vs decomposed (different texts)
    [f"t{i % 7}" for i in range(100)],  # 7 distinct of 100
]


@pytest.mark.parametrize("texts", CASES, ids=["n1", "all-same", "all-distinct", "empty-unicode", "7-of-100"])
def test_unique_texts(texts):
    distinct = unique_texts(texts)
    assert distinct.texts == list(dict.fromkeys(texts))  # first-occurrence order, each once
    assert distinct.inverse.dtype == torch.int64 and distinct.inverse.shape == (len(texts),)
    assert [distinct.texts[i] for i in distinct.inverse.tolist()] == texts


@pytest.mark.parametrize("texts", CASES, ids=["n1", "all-same", "all-distinct", "empty-unicode", "7-of-100"])
def test_embed_unique_calls_the_embedder_once_with_the_distinct_texts(texts):
    embedder = CountingEmbedder()
    rows = embed_unique(texts, embedder, flag=7)
    assert len(embedder.calls) == 1
    assert embedder.calls[0] == (list(dict.fromkeys(texts)), {"flag": 7})  # kwargs passed through
    assert torch.equal(rows, one_at_a_time(CountingEmbedder().embed_texts, texts))
    assert rows.dtype == torch.float64  # the embedder's dtype


def test_embed_unique_with_a_plain_callable():
    seen = []

    def embed(texts):
        seen.append(list(texts))
        return torch.tensor([[float(len(t))] for t in texts])

    rows = embed_unique(("ab", "c", "ab"), embed)
    assert seen == [["ab", "c"]] and rows.tolist() == [[2.0], [1.0], [2.0]]


@pytest.mark.parametrize("texts", CASES, ids=["n1", "all-same", "all-distinct", "empty-unicode", "7-of-100"])
def test_hashed_embedder_dedups_and_stays_bit_identical(texts, monkeypatch):
    embedder = HashedEmbedder(dim=64)
    expected = one_at_a_time(embedder.embed_texts, texts)
    hashed_texts = []
    original = hashed.texts_to_bytes

    def recording(texts_in, device):
        hashed_texts.append(list(texts_in))
        return original(texts_in, device)

    monkeypatch.setattr(hashed, "texts_to_bytes", recording)
    got = embedder.embed_texts(texts)
    assert hashed_texts == [list(dict.fromkeys(texts))]  # only the distinct texts were hashed
    assert torch.equal(got, expected)
    assert torch.equal(embed_unique(texts, embedder), expected)
    assert torch.equal(embedder(texts), expected)  # __call__ on texts


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet="ab é", max_size=4), min_size=1, max_size=40))
def test_embed_unique_equals_embedding_every_text(texts):
    embedder = HashedEmbedder(dim=16, seed=3)
    expected = one_at_a_time(embedder.embed_texts, texts)
    assert torch.equal(embed_unique(texts, embedder), expected)
    fake = CountingEmbedder()
    assert torch.equal(embed_unique(texts, fake), one_at_a_time(CountingEmbedder().embed_texts, texts))
    assert fake.calls[0][0] == list(dict.fromkeys(texts))


def test_embed_unique_bad_input():
    with pytest.raises(ValueError, match="texts is empty"):
        embed_unique([], CountingEmbedder())
    with pytest.raises(TypeError, match="single str"):
        embed_unique("abc", CountingEmbedder())
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str"):
        embed_unique(["a", None], CountingEmbedder())
    with pytest.raises(TypeError, match="embed_texts"):
        embed_unique(["a"], object())
    with pytest.raises(ValueError, match="returned 1 rows for 2 texts"):
        embed_unique(["a", "b", "a"], lambda texts: torch.zeros(1, 3))
    with pytest.raises(TypeError, match="2-D tensor"):
        embed_unique(["a"], lambda texts: [[0.0]])
    with pytest.raises(TypeError, match=r"2-D tensor .*\(1,\)"):
        embed_unique(["a"], lambda texts: torch.zeros(1))


def test_embed_text_stats():
    stats = embed_text_stats(["b", "a", "", "a", "b", "  \n"])
    assert stats == {
        "num_texts": 6,
        "num_distinct": 4,
        "num_empty": 2,  # "" and whitespace only
        "most_common_count": 2,
        "most_common_text": "b",  # a tie: the first text seen
    }
    assert embed_text_stats(["x"])["most_common_count"] == 1
    with pytest.raises(ValueError, match="texts is empty"):
        embed_text_stats([])


def test_embed_text_warning_thresholds():
    distinct = [f"text {i}" for i in range(198)]  # 198 distinct texts
    # 1% of 200 = 2: two empty texts or two copies of one text do not warn, three do
    assert embed_text_warning(embed_text_stats(distinct + ["", ""])) is None
    assert embed_text_warning(embed_text_stats(distinct + ["text 0", "text 1"])) is None
    three_empty = embed_text_warning(embed_text_stats(distinct[:197] + ["", "", ""]), source="input")
    assert three_empty.startswith("warning: 3 of 200 embedded texts (input) are empty (1.5%)")
    assert "embed the same text" not in three_empty  # the shared empty text is reported once, as empty
    shared = embed_text_warning(embed_text_stats(distinct[1:] + ["text 0"] * 3), hint="do X")
    assert "3 of 200 records (1.5%) embed the same text 'text 0' (198 distinct texts)" in shared
    assert shared.endswith("do X") and len(shared.splitlines()) == 1
    # small sets: a text seen once never counts as shared; the fraction is a parameter
    assert embed_text_warning(embed_text_stats(["a", "b"])) is None
    assert embed_text_warning(embed_text_stats(distinct + ["", ""]), fraction=0.005) is not None
    long_text = "word " * 40
    assert "..." in embed_text_warning(embed_text_stats([long_text] * 3))
