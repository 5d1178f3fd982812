"""Tests of the hashed token-bag embedder (tfp_kernels.embed.hashed_embed / HashedEmbedder).

The fast path (vectorised torch on the flat token buffer) is compared bit for bit (torch.equal) with the
plain-Python reference tfp_kernels.embed.reference.hashed_embed_reference on odd sizes: empty samples,
length-1 samples, n-grams longer than a sample, big ids, every token container.
"""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tfp_kernels.assembly import Jagged, Padded
from tfp_kernels.embed import HashedEmbedder, _inputs, hashed_embed
from tfp_kernels.embed import hashed as hashed_module
from tfp_kernels.embed.reference import hashed_counts_reference, hashed_embed_reference
from tfp_kernels.testing import assert_equal

I64 = torch.int64


def reference(samples, **kwargs) -> torch.Tensor:
    return torch.tensor(hashed_embed_reference(samples, **kwargs), dtype=torch.float64).to(torch.float32)


def as_list(samples, dtype=I64):
    return [torch.tensor(s, dtype=dtype) for s in samples]


def as_jagged(samples, dtype=I64, *, head=0, tail=0, fill=7):
    """Jagged with ``head`` / ``tail`` junk tokens outside the offsets."""
    lengths = torch.tensor([len(s) for s in samples], dtype=I64)
    offsets = torch.zeros(len(samples) + 1, dtype=I64)
    offsets[1:] = torch.cumsum(lengths, 0)
    flat = [x for s in samples for x in s]
    values = torch.tensor([fill] * head + flat + [fill] * tail, dtype=dtype)
    return Jagged(values, offsets + head)


def as_padded(samples, dtype=I64, *, extra=2, pad=-100):
    width = max([len(s) for s in samples], default=0) + extra
    tokens = torch.full((len(samples), width), pad, dtype=dtype)
    for i, s in enumerate(samples):
        tokens[i, : len(s)] = torch.tensor(s, dtype=dtype)
    return Padded(tokens, torch.tensor([len(s) for s in samples]))


ODD_SAMPLES = [
    [],
    [3],
    [3, 3],
    [1, 2, 3, 4, 5, 6, 7],
    [],
    [2**31 - 1, 2**31 - 2, 0, 2**31 - 1],
    [9],
    [5, 5, 5, 5, 5],
    [],
]


# ---------------------------------------------------------------------------------------- fast == reference


@pytest.mark.parametrize("dim", [1, 3, 16, 100, 256])
@pytest.mark.parametrize("ngram", [1, 2, 3, 9])
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_reference_odd_samples(dim, ngram, normalize):
    expected = reference(ODD_SAMPLES, dim=dim, ngram=ngram, normalize=normalize)
    actual = hashed_embed(as_list(ODD_SAMPLES), dim=dim, ngram=ngram, normalize=normalize)
    assert_equal(actual, expected, "hashed_embed")


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda s: as_list(s), id="list"),
        pytest.param(lambda s: as_list(s, torch.int32), id="list-int32"),
        pytest.param(lambda s: as_jagged(s), id="jagged"),
        pytest.param(lambda s: as_jagged(s, head=3, tail=5), id="jagged-junk-outside"),
        pytest.param(lambda s: tuple(as_jagged(s, torch.int32)), id="tuple-jagged-int32"),
        pytest.param(lambda s: as_padded(s), id="padded"),
        pytest.param(lambda s: as_padded(s, extra=0), id="padded-tight"),
        pytest.param(lambda s: tuple(as_padded(s, torch.int32, pad=-1)), id="tuple-padded-int32"),
        pytest.param(
            lambda s: _inputs.jagged_device_offsets(*as_jagged(s, head=2, tail=4)), id="device-offsets-path"
        ),
        pytest.param(
            lambda s: _inputs.padded_device_lengths(*as_padded(s, pad=-5)), id="device-lengths-path"
        ),
    ],
)
@pytest.mark.parametrize("ngram, min_ngram", [(1, 1), (2, 1), (3, 2), (4, 4)])
def test_containers_match_reference(make, ngram, min_ngram):
    samples = ODD_SAMPLES
    expected = reference(samples, dim=32, ngram=ngram, seed=11, min_ngram=min_ngram)
    tokens = make(samples)
    if isinstance(tokens, _inputs.FlatTokens):  # the GPU-offsets code path, run on CPU tensors
        _inputs.validate(tokens)
        counts = hashed_module.hashed_counts(tokens, dim=32, ngram=ngram, seed=11, min_ngram=min_ngram)
        actual = hashed_module._normalise(counts, True)
    else:
        actual = hashed_embed(tokens, dim=32, ngram=ngram, seed=11, min_ngram=min_ngram)
    assert_equal(actual, expected, "hashed_embed")


@given(
    samples=st.lists(st.lists(st.integers(0, 2**40), max_size=12), min_size=1, max_size=12),
    dim=st.integers(1, 40),
    ngram=st.integers(1, 4),
    seed=st.integers(-(2**63), 2**64),
    kind=st.sampled_from(["list", "jagged", "padded"]),
)
def test_random_samples_match_reference(samples, dim, ngram, seed, kind):
    tokens = {"list": as_list, "jagged": as_jagged, "padded": as_padded}[kind](samples)
    expected = reference(samples, dim=dim, ngram=ngram, seed=seed)
    assert_equal(hashed_embed(tokens, dim=dim, ngram=ngram, seed=seed), expected, "hashed_embed")


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_integer_dtypes_agree(dtype):
    samples = [[1, 2, 3, 4], [100, 5], [], [7]]
    expected = reference(samples, dim=64)
    assert_equal(hashed_embed(as_list(samples, dtype), dim=64), expected, f"{dtype} list")
    assert_equal(hashed_embed(as_jagged(samples, dtype), dim=64), expected, f"{dtype} jagged")
    mixed = [torch.tensor(s, dtype=d) for s, d in zip(samples, [dtype, I64, torch.int32, dtype])]
    assert_equal(hashed_embed(mixed, dim=64), expected, "mixed integer dtypes")


def test_big_ids():
    samples = [[2**31 - 1, 2**31, 2**32 - 1], [2**32, 2**32 + 5, 2**62], [2**63 - 1, 0]]
    assert_equal(
        hashed_embed(as_list(samples), dim=50, ngram=3), reference(samples, dim=50, ngram=3), "big ids"
    )


def test_cpu_table_path_equals_direct_path(monkeypatch):
    """Many tokens over a small vocabulary take the lookup-table path on the CPU: same result."""
    generator = torch.Generator().manual_seed(0)
    values = torch.randint(0, 1000, (70_000,), generator=generator)
    tokens = Jagged(values, torch.tensor([0, 10, 10, 40_000, 70_000]))
    table = hashed_embed(tokens, ngram=3)
    monkeypatch.setattr(hashed_module, "_TABLE_MIN_TOKENS", 10**12)
    assert_equal(table, hashed_embed(tokens, ngram=3), "table path")


# ---------------------------------------------------------------------------------------- properties


def test_samples_are_independent_and_boundaries_never_crossed():
    """Each row depends on its own sample only: embedding a sample alone gives the same row."""
    generator = torch.Generator().manual_seed(1)
    samples = [torch.randint(0, 50, (int(n),), generator=generator) for n in torch.randint(0, 9, (40,))]
    together = hashed_embed(samples, ngram=4)
    for i, sample in enumerate(samples):
        assert_equal(together[i], hashed_embed([sample], ngram=4)[0], f"sample {i}")
    # two samples [1, 2] + [3] have no bigram (2, 3): their counts sum to those of [1, 2, 3] minus it
    counts = hashed_embed(as_list([[1, 2], [3]]), dim=64, normalize=False).sum(0)
    whole = hashed_embed(as_list([[1, 2, 3]]), dim=64, normalize=False)[0]
    bigram = torch.zeros(64)
    for bucket, count in hashed_counts_reference([2, 3], dim=64, min_ngram=2).items():
        bigram[bucket] += count
    assert_equal(counts, whole - bigram, "counts across a boundary")


def test_counts_norms_and_zero_rows():
    samples = as_list([[], [4], [4, 5, 6], [1] * 10])
    raw = hashed_embed(samples, dim=8, ngram=2, normalize=False)
    grams = torch.tensor([0, 1, 5, 19])  # unigrams + bigrams of each sample
    assert bool((raw.abs().sum(1) <= grams).all())
    assert torch.equal(raw.sum(1).remainder(2), grams.remainder(2).float())  # a sum of +-1 terms
    assert raw[2].abs().sum() > 0 and raw[3].abs().max() >= 10  # repeated unigram piles up in one bucket
    unit = hashed_embed(samples, dim=8, ngram=2)
    assert torch.equal(unit[0], torch.zeros(8))
    torch.testing.assert_close(unit[1:].norm(dim=1), torch.ones(3), rtol=0, atol=1e-6)


def test_deterministic_and_seeded():
    samples = as_list([[1, 2, 3], [4, 5, 6, 7]])
    first = hashed_embed(samples, seed=5)
    assert torch.equal(first, hashed_embed(samples, seed=5))
    assert torch.equal(first, HashedEmbedder(seed=5)(samples))
    assert not torch.equal(first, hashed_embed(samples, seed=6))


def test_uses_all_buckets():
    """Consecutive ids spread evenly over the buckets (a hash, not id mod dim), with balanced signs."""
    rows = hashed_embed(torch.arange(20_000).view(-1, 1).unbind(0), dim=64, ngram=1, normalize=False)
    assert torch.equal(rows.abs().sum(1), torch.ones(20_000))  # one +-1 per single-token sample
    per_bucket = (rows != 0).sum(0)
    assert int(per_bucket.min()) > 200 and int(per_bucket.max()) < 450, per_bucket  # 312.5 expected
    assert abs(int(rows.sum())) < 600  # sum of 20,000 random signs: sd 141


# ---------------------------------------------------------------------------------------- texts


TOPICS = [
    [
        "Write a Python function that sorts a list of integers.",
        "Write a Python function that reverses a list of strings.",
        "How do I sort a list of tuples in Python by the second element?",
        "Fix this Python function: it should return the largest integer in a list.",
    ],
    [
        "Translate the following sentence into French: the weather is nice today.",
        "Translate this English paragraph into French.",
        "How do you say 'good morning' in French? Translate it.",
        "Translate the sentence into Spanish and French.",
    ],
    [
        "Summarize the following news article about the election results.",
        "Give a short summary of this article about the national election.",
        "Summarize the article in three sentences.",
        "Write a one-paragraph summary of the news article below.",
    ],
    [
        "What is the capital of France? Answer with one word.",
        "What is the capital city of Japan?",
        "Name the capital of Australia.",
        "Which city is the capital of Canada?",
    ],
    [
        "Solve for x: 2x + 3 = 11.",
        "Solve the equation 5x - 7 = 18 for x.",
        "If 3x + 4 = 19, what is x? Solve step by step.",
        "Solve for x in the equation x / 4 + 2 = 6.",
    ],
]
TEXTS = [text for topic in TOPICS for text in topic]
LABELS = torch.tensor([i for i, topic in enumerate(TOPICS) for _ in topic])


def topic_separation(embeddings: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Per text: mean cosine to its topic minus mean cosine to the other topics; and the fraction of
    (same-topic pair, cross-topic pair) comparisons won by the same-topic pair."""
    e = torch.nn.functional.normalize(embeddings.double(), dim=1)
    cos = e @ e.T
    same = LABELS[:, None] == LABELS[None, :]
    off_diagonal = ~torch.eye(len(LABELS), dtype=torch.bool)
    within = (cos * (same & off_diagonal)).sum(1) / (same & off_diagonal).sum(1)
    across = (cos * ~same).sum(1) / (~same).sum(1)
    upper = torch.triu(torch.ones_like(same), 1)
    w, a = cos[same & upper], cos[~same & upper]
    return within - across, (w[:, None] > a[None, :]).double().mean().item()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_related_texts_are_closer(seed):
    margin, auc = topic_separation(HashedEmbedder(seed=seed).embed_texts(TEXTS))
    assert bool((margin > 0).all()), margin
    assert auc > 0.9, auc


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_related_token_ids_are_closer(seed):
    """The token path on word ids (words and punctuation marks, as an LLM tokenizer splits them)."""
    vocabulary: dict[str, int] = {}
    words = [re.findall(r"\w+|[^\w\s]", text.lower()) for text in TEXTS]
    samples = [torch.tensor([vocabulary.setdefault(w, len(vocabulary)) for w in ws]) for ws in words]
    margin, auc = topic_separation(HashedEmbedder(seed=seed)(samples))
    assert bool((margin > 0).all()), margin
    assert auc > 0.85, auc


def test_embed_texts_is_the_byte_path():
    texts = ["héllo wörld", "", "a", "日本語"]
    data = [list(t.encode("utf-8")) for t in texts]
    embedder = HashedEmbedder(dim=32)
    expected = reference(data, dim=32, ngram=3, min_ngram=2)
    assert_equal(embedder.embed_texts(texts), expected, "embed_texts")
    assert_equal(embedder(tuple(texts)), expected, "__call__ on a tuple of str")
    single = HashedEmbedder(dim=32, text_ngram=(1, 1)).embed_texts(["ab"])
    assert_equal(single, reference([[97, 98]], dim=32, ngram=1), "text_ngram=(1, 1)")


# ---------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "tokens, error, match",
    [
        ([], ValueError, r"N = 0"),
        ((), ValueError, r"N = 0"),
        (Jagged(torch.tensor([1, 2]), torch.tensor([0])), ValueError, r"N = 0"),
        (Padded(torch.zeros(0, 3, dtype=I64), torch.zeros(0, dtype=I64)), ValueError, r"N = 0"),
        ([torch.tensor([1.0, 2.0])], TypeError, r"integer dtype"),
        ([torch.tensor([True])], TypeError, r"integer dtype"),
        ([torch.tensor([1, 2]), [3, 4]], TypeError, r"tokens\[1\] must be a torch.Tensor"),
        ([torch.tensor([[1, 2]])], ValueError, r"1-D"),
        (torch.tensor([1, 2, 3]), TypeError, r"single tensor"),
        ("abc", TypeError, r"tokens must be"),
        ([torch.tensor([1, -2, 3])], ValueError, r"non-negative.*sample 0.*-2"),
        (
            [torch.tensor([1]), torch.tensor([4, -1], dtype=torch.int8)],
            ValueError,
            r"sample 1 holds the id -1",
        ),
        (Jagged(torch.tensor([1, 2, 3]), torch.tensor([0, 2, 1])), ValueError, r"non-decreasing"),
        (Jagged(torch.tensor([1, 2, 3]), torch.tensor([0, 4])), ValueError, r"past the end"),
        (Jagged(torch.tensor([1, 2, 3]), torch.tensor([-1, 2])), ValueError, r"negative"),
        (Padded(torch.zeros(2, 3, dtype=I64), torch.tensor([1, 4])), ValueError, r"outside \[0, 3\]"),
        (Padded(torch.zeros(2, 3, dtype=I64), torch.tensor([1])), ValueError, r"1 entries"),
        (Padded(torch.zeros(2, 3), torch.tensor([1, 1])), TypeError, r"integer dtype"),
    ],
)
def test_bad_tokens(tokens, error, match):
    with pytest.raises(error, match=match):
        hashed_embed(tokens)


def test_negative_ids_unchecked_and_in_padding():
    assert hashed_embed([torch.tensor([1, -2])], check=False).shape == (1, 256)  # hashed like any value
    padded = Padded(torch.tensor([[1, 2, -100], [-1, -1, -1]]), torch.tensor([2, 0]))
    assert_equal(hashed_embed(padded, dim=16), reference([[1, 2], []], dim=16), "negative padding ignored")


def test_mixed_devices():
    meta = torch.empty(3, dtype=I64, device="meta")
    with pytest.raises(ValueError, match=r"tokens\[1\] is on meta"):
        hashed_embed([torch.tensor([1, 2]), meta])
    with pytest.raises(ValueError, match=r"tokens.offsets is on meta"):
        hashed_embed(Jagged(torch.tensor([1, 2]), torch.tensor([0, 2], device="meta")))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"dim": 0}, ValueError, r"dim must be >= 1"),
        ({"dim": 2.0}, TypeError, r"dim must be an int"),
        ({"dim": True}, TypeError, r"dim must be an int"),
        ({"ngram": 0}, ValueError, r"ngram must be >= 1"),
        ({"ngram": "2"}, TypeError, r"ngram must be an int"),
        ({"ngram": 2, "min_ngram": 3}, ValueError, r"min_ngram=3 is more than ngram=2"),
        ({"seed": 0.5}, TypeError, r"seed must be an int"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        hashed_embed([torch.tensor([1, 2])], **kwargs)
    with pytest.raises(error, match=match):
        HashedEmbedder(**kwargs)


@pytest.mark.parametrize(
    "texts, error, match",
    [
        ("one text", TypeError, r"single str"),
        ([], ValueError, r"N = 0"),
        (["ok", 3], TypeError, r"texts\[1\] must be a str"),
        (5, TypeError, r"sequence of str"),
    ],
)
def test_bad_texts(texts, error, match):
    with pytest.raises(error, match=match):
        HashedEmbedder().embed_texts(texts)


def test_bad_text_ngram():
    with pytest.raises(ValueError, match=r"text_ngram\[0\]=4 is more than text_ngram\[1\]=3"):
        HashedEmbedder(text_ngram=(4, 3))
    with pytest.raises(TypeError, match=r"text_ngram must be a pair"):
        HashedEmbedder(text_ngram=3)


def test_device_offsets_checks():
    """The checks of offsets / lengths that live on a GPU, run here on CPU tensors through the same code."""
    values = torch.tensor([1, 2, 3, 4])
    with pytest.raises(ValueError, match=r"non-decreasing"):
        _inputs.validate(_inputs.jagged_device_offsets(values, torch.tensor([0, 3, 2, 4])))
    with pytest.raises(ValueError, match=r"past the end"):
        _inputs.validate(_inputs.jagged_device_offsets(values, torch.tensor([0, 2, 6])))
    with pytest.raises(ValueError, match=r"non-negative"):
        _inputs.validate(_inputs.jagged_device_offsets(torch.tensor([5, -3, 1]), torch.tensor([1, 3])))
    _inputs.validate(_inputs.jagged_device_offsets(torch.tensor([-5, 3, 1, -9]), torch.tensor([1, 2, 3])))
    for lengths in ([1, 5], [-1, 2]):
        flat = _inputs.padded_device_lengths(torch.zeros(2, 3, dtype=I64), torch.tensor(lengths))
        with pytest.raises(ValueError, match=r"outside \[0, 3\]"):
            _inputs.validate(flat)


# ---------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("ngram", [1, 2, 3])
def test_cuda_bit_identical_to_cpu(ngram):
    generator = torch.Generator().manual_seed(3)
    lengths = torch.randint(0, 300, (500,), generator=generator)
    lengths[:5] = torch.tensor([0, 1, 2, 0, 1])
    samples = [torch.randint(0, 2**31 - 1, (int(n),), generator=generator) for n in lengths]
    cpu = hashed_embed(samples, ngram=ngram)
    cuda = [s.cuda() for s in samples]
    assert_equal(hashed_embed(cuda, ngram=ngram).cpu(), cpu, "list on CUDA")
    values, offsets = torch.cat(samples), torch.cat([torch.zeros(1, dtype=I64), torch.cumsum(lengths, 0)])
    for offs in (offsets, offsets.cuda()):
        out = hashed_embed(Jagged(values.cuda(), offs), ngram=ngram)
        assert out.device.type == "cuda"
        assert_equal(out.cpu(), cpu, f"Jagged, offsets on {offs.device}")
        assert_equal(
            hashed_embed(Jagged(values.cuda(), offs), ngram=ngram, check=False).cpu(), cpu, "no check"
        )
    padded = torch.nn.utils.rnn.pad_sequence(samples, batch_first=True, padding_value=-100)
    for lens in (lengths, lengths.cuda()):
        assert_equal(
            hashed_embed(Padded(padded.cuda(), lens), ngram=ngram).cpu(), cpu, f"Padded {lens.device}"
        )
    texts = TEXTS + ["", "日本語"]
    embedder = HashedEmbedder()
    assert_equal(embedder.embed_texts(texts, device="cuda").cpu(), embedder.embed_texts(texts), "texts")


@pytest.mark.gpu
def test_cuda_bad_device_offsets():
    values = torch.tensor([1, 2, 3, 4], device="cuda")
    with pytest.raises(ValueError, match=r"non-decreasing"):
        hashed_embed(Jagged(values, torch.tensor([0, 3, 2, 4], device="cuda")))
    with pytest.raises(ValueError, match=r"non-negative"):
        hashed_embed(Jagged(torch.tensor([1, -1], device="cuda"), torch.tensor([0, 2], device="cuda")))
    with pytest.raises(ValueError, match=r"outside \[0, 2\]"):
        hashed_embed(Padded(values.view(2, 2), torch.tensor([1, 3], device="cuda")))
