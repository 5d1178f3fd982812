"""order_dataset: every row exactly once, the same order as tfp_order on the same embeddings, from each
embedding source (tensor, column, text column, input_ids)."""

from __future__ import annotations

import pytest
import torch

from tfp_kernels import Jagged, tfp_order
from tfp_kernels.integrations import order_dataset

datasets = pytest.importorskip("datasets")

N = 57


def _clustered(n=N, d=8, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(5, d, generator=gen) * 4
    return centres[torch.arange(n) % 5] + torch.randn(n, d, generator=gen)


def _dataset(emb: torch.Tensor | None = None, n=N) -> datasets.Dataset:
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 12, (n,), generator=gen).tolist()
    rows = {
        "idx": list(range(n)),
        "input_ids": [torch.randint(0, 30, (m,), generator=gen).tolist() for m in lengths],
        "text": [f"sample {i % 7} " * (1 + i % 3) for i in range(n)],
    }
    if emb is not None:
        rows["emb"] = emb.tolist()
    return datasets.Dataset.from_dict(rows)


def _idx(dataset) -> list[int]:
    return list(dataset["idx"])


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_equals_tfp_order_on_the_same_embeddings(metric):
    emb = _clustered()
    dataset = _dataset(emb)
    expected = tfp_order(emb, metric=metric)
    ordered = order_dataset(dataset, embeddings=emb, metric=metric)
    assert _idx(ordered) == expected.tolist()
    assert sorted(_idx(ordered)) == list(range(N))  # every row exactly once
    assert ordered[0] == dataset[int(expected[0])]  # whole rows move together
    from_column = order_dataset(dataset, embeddings="emb", metric=metric)  # float64 column -> float32
    assert _idx(from_column) == tfp_order(emb.float(), metric=metric).tolist()
    from_numpy = order_dataset(dataset, embeddings=emb.numpy(), metric=metric)
    assert _idx(from_numpy) == expected.tolist()


def test_parameters_are_passed_through():
    emb = _clustered()
    dataset = _dataset()
    kwargs = {"quantile": 0.1, "window": 2, "max_rejections": 3, "start": 5, "k": 8}
    ordered, stats = order_dataset(dataset, embeddings=emb, return_stats=True, **kwargs)
    expected, expected_stats = tfp_order(emb, return_stats=True, **kwargs)
    assert _idx(ordered) == expected.tolist() and ordered[0]["idx"] == 5
    assert stats.threshold == expected_stats.threshold and stats.num_nodes == N
    fixed = order_dataset(dataset, embeddings=emb, threshold=0.75, return_stats=True)[1]
    assert fixed.threshold == 0.75 and fixed.threshold_source == "given"


def test_from_input_ids_with_the_default_embedder():
    from tfp_kernels.embed import HashedEmbedder

    dataset = _dataset()
    tokens = [torch.tensor(row) for row in dataset["input_ids"]]
    expected = tfp_order(HashedEmbedder().embed_tokens(tokens))
    assert _idx(order_dataset(dataset)) == expected.tolist()


def test_from_a_text_column():
    from tfp_kernels.embed import HashedEmbedder

    dataset = _dataset()
    expected = tfp_order(HashedEmbedder().embed_texts(list(dataset["text"])))
    assert _idx(order_dataset(dataset, embed_field="text")) == expected.tolist()


def test_custom_embedders_and_indices_mapping():
    """A callable embedder gets the tokens as Jagged, in the dataset's (shuffled) row order."""
    dataset = _dataset().shuffle(seed=3).select(range(40))
    seen = {}

    def embed(tokens):
        assert isinstance(tokens, Jagged)
        seen["offsets"] = tokens.offsets
        lengths = torch.diff(tokens.offsets).float()
        sums = torch.zeros(lengths.numel()).index_add_(
            0,
            torch.repeat_interleave(torch.arange(lengths.numel()), torch.diff(tokens.offsets)),
            tokens.values.float(),
        )
        return torch.stack([lengths, sums / lengths], dim=1)

    expected_lengths = [len(row) for row in dataset["input_ids"]]
    ordered = order_dataset(dataset, embedder=embed)
    assert torch.diff(seen["offsets"]).tolist() == expected_lengths
    rows = dataset["input_ids"]
    emb = torch.tensor([[len(r), sum(r) / len(r)] for r in rows], dtype=torch.float32)
    local = tfp_order(emb).tolist()
    assert _idx(ordered) == [dataset[i]["idx"] for i in local]

    class TextEmbedder:
        def embed_texts(self, texts):
            return torch.tensor([[len(t), t.count("1")] for t in texts], dtype=torch.float32)

    texts = list(dataset["text"])
    ordered = order_dataset(dataset, embed_field="text", embedder=TextEmbedder())
    local = tfp_order(TextEmbedder().embed_texts(texts)).tolist()
    assert _idx(ordered) == [dataset[i]["idx"] for i in local]


def test_single_row():
    dataset = _dataset(n=1)
    assert _idx(order_dataset(dataset, embeddings=torch.ones(1, 3))) == [0]


def test_bad_input():
    dataset = _dataset(_clustered())
    with pytest.raises(ValueError, match="empty"):
        order_dataset(dataset.select([]), embeddings=torch.zeros(0, 3))
    with pytest.raises(ValueError, match="57 rows"):
        order_dataset(dataset, embeddings=torch.zeros(N - 1, 3))
    with pytest.raises(ValueError, match="NaN"):
        order_dataset(dataset, embeddings=torch.full((N, 3), float("nan")))
    with pytest.raises(ValueError, match="no column 'nope'"):
        order_dataset(dataset, embeddings="nope")
    with pytest.raises(ValueError, match="no column 'nope'"):
        order_dataset(dataset, embed_field="nope")
    with pytest.raises(ValueError, match="same length"):
        order_dataset(dataset, embeddings="input_ids")  # ragged lists are not embeddings
    with pytest.raises(TypeError, match="must hold lists"):
        order_dataset(dataset, input_ids_field="idx")
    with pytest.raises(TypeError, match="strings"):
        order_dataset(dataset, embed_field="idx")
    with pytest.raises(TypeError, match="embeddings must be"):
        order_dataset(dataset, embeddings=[[0.0]] * N)
    with pytest.raises(TypeError, match="embedder"):
        order_dataset(dataset, embedder=object())
    with pytest.raises(TypeError, match="ints"):
        order_dataset(dataset, input_ids_field="emb")
