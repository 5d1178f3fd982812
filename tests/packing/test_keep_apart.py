"""Tests of ``keep_apart``: packs that keep samples closer than ``min_distance`` apart where they can.

The C++ op (``torch.ops.tfp_kernels.fill_in_order`` with ``keep_apart``), its Python fallback and
``pack_lengths`` (``"fill_in_order"`` and ``"next_fit"``) are compared with the plain-Python reference, bit for
bit, on odd sizes (N = 1, duplicates, ties, over-long samples under each policy); then what the option is for:
no sample lost, no close pair in a pack when every close sample may be held back, fewer near-duplicate pairs
than without it on a seeded duplicate-heavy set; its plumbing in ``pack_gpu`` and the report's count of the packs
that still hold a near-duplicate pair.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tfp_kernels import _ext, pack_gpu
from tfp_kernels.order.policy import exact_pair_distances
from tfp_kernels.packing import fill_in_order_pack, pack_lengths
from tfp_kernels.packing import fill_in_order as fill_in_order_module
from tfp_kernels.packing.reference import fill_in_order_reference, pack_lengths_reference
from tfp_kernels.report import near_duplicate_pair_fraction, near_duplicate_pairs, packing_summary
from tfp_kernels.testing import assert_equal, check_packing_invariants, make_lengths

needs_extension = pytest.mark.skipif(not _ext.has_extension(), reason="tfp_kernels._C is not built")

I64 = torch.int64
FIELDS = ("pack_id", "sample_index", "offset", "length", "pack_offsets", "dropped_index", "sample_lengths")
COUNTS = ("num_packs", "num_truncated", "num_dropped", "num_split")


def tensor(values):
    return torch.tensor(values, dtype=I64)


def pack_of_items(result) -> list[int]:
    pack_of = [0] * result.order.numel()
    for item, pack in zip(result.order.tolist(), result.pack_id.tolist()):
        pack_of[item] = pack
    return pack_of


def small_rows(n: int, dim: int, seed: int) -> torch.Tensor:
    """(n, dim) float32 rows of small integers: many exact duplicates and distance ties."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(-2, 3, (n, dim), generator=generator).float()
    rows[(rows == 0).all(1)] = 1.0
    return rows


def close_pairs(packing, embeddings, min_distance, metric="l2") -> int:
    """Brute force: pairs of distinct samples sharing a pack closer than ``min_distance``."""
    count = 0
    for pack in range(packing.num_packs):
        members = packing.sample_index[packing.pack_id == pack].unique()
        for a, b in itertools.combinations(members.tolist(), 2):
            d = exact_pair_distances(embeddings, tensor([a]), tensor([b]), metric)
            count += int(d[0] < min_distance)
    return count


# ================================================================================== hand-worked


def test_hand_worked_next_fit_holds_a_close_sample_back():
    # rows: 0 and 1 are copies, 2 and 3 far from both. max_len 10, lengths 3 each.
    rows = torch.tensor([[0.0, 1.0], [0.0, 1.0], [5.0, 1.0], [9.0, 1.0]])
    options = dict(embeddings=rows, min_distance=0.5)
    plain = pack_lengths([3, 3, 3, 3], 10, strategy="next_fit")
    assert plain.sample_index.tolist() == [0, 1, 2, 3] and plain.pack_id.tolist() == [0, 0, 0, 1]
    # next fit passes over 1 (a copy of 0): pack 0 = {0, 2, 3}; 1 opens pack 1
    apart = pack_lengths([3, 3, 3, 3], 10, strategy="next_fit", keep_apart=1, **options)
    assert apart.sample_index.tolist() == [0, 2, 3, 1] and apart.pack_id.tolist() == [0, 0, 0, 1]
    # three copies and K = 1: the second copy is held back, the third joins anyway (a forced join)
    rows3 = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [9.0, 1.0]])
    forced = pack_lengths([3, 3, 3, 3], 10, strategy="next_fit", keep_apart=1, embeddings=rows3, min_distance=0.5)
    assert forced.sample_index.tolist() == [0, 2, 3, 1] and forced.pack_id.tolist() == [0, 0, 0, 1]
    assert near_duplicate_pairs(forced, rows3, 0.5) == (1, 3, 1)  # {0, 2} of pack 0; pack 1 holds one sample
    # K = 2: both copies held back; the second pack opens with 1 and holds 2 back again (K per pack)
    two = pack_lengths([3, 3, 3, 3], 10, strategy="next_fit", keep_apart=2, embeddings=rows3, min_distance=0.5)
    assert two.sample_index.tolist() == [0, 3, 1, 2] and two.pack_id.tolist() == [0, 0, 1, 2]
    assert near_duplicate_pairs(two, rows3, 0.5).close == 0


def test_hand_worked_top_up_never_takes_a_close_candidate():
    # lengths 6, 5, 3 at max_len 9: next fit {0} (5 does not fit), top-up from the window: 2 fits (3 <= 3)
    # but is a copy of 0. Without keep_apart it joins (no other fits); with it, it does not.
    rows = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    options = dict(window=3, embeddings=rows, min_distance=0.5)
    soft = pack_lengths([6, 5, 3], 9, strategy="fill_in_order", **options)
    assert soft.pack_id.tolist() == [0, 0, 1] and soft.sample_index.tolist() == [0, 2, 1]
    strict = pack_lengths([6, 5, 3], 9, strategy="fill_in_order", keep_apart=1, **options)
    assert strict.pack_id.tolist() == [0, 1, 1] and strict.sample_index.tolist() == [0, 1, 2]


# ================================================================================== op == fallback == reference


@pytest.mark.parametrize("dim", [1, 3, 8])
@pytest.mark.parametrize("keep_apart", [1, 2, 5])
@pytest.mark.parametrize("min_distance, metric", [(0.0, "l2"), (1.5, "l2"), (3.0, "l2"), (0.3, "cosine")])
@pytest.mark.parametrize("n, max_len, window", [(1, 5, 3), (2, 4, 1), (37, 16, 1), (40, 16, 7), (150, 64, 1000)],
                         ids=str)
def test_op_python_reference_agree(dim, keep_apart, min_distance, metric, n, max_len, window):
    lengths = make_lengths("uniform", n, max_len, seed=n + dim)
    rows = small_rows(n, dim, seed=dim * 31 + n + keep_apart)
    expected = fill_in_order_reference(
        lengths.tolist(), max_len, window, rows.tolist(), min_distance=min_distance, metric=metric,
        keep_apart=keep_apart,
    )
    kwargs = dict(window=window, rows=rows, min_distance=min_distance, metric=metric, keep_apart=keep_apart)
    assert pack_of_items(fill_in_order_pack(lengths, max_len, backend="python", **kwargs)) == expected
    if _ext.has_extension():
        assert pack_of_items(fill_in_order_pack(lengths, max_len, backend="op", **kwargs)) == expected


@pytest.mark.parametrize("strategy", ["fill_in_order", "next_fit"])
@pytest.mark.parametrize("overlong", ["error", "truncate", "drop", "split"])
@pytest.mark.parametrize("n, max_len", [(1, 1), (1, 7), (5, 3), (200, 16)], ids=str)
def test_pack_lengths_matches_reference(strategy, overlong, n, max_len):
    generator = torch.Generator().manual_seed(n + max_len)
    top = max_len if overlong == "error" else 2 * max_len  # ~1/2 over-long except with "error"
    lengths = torch.randint(1, top + 1, (n,), generator=generator, dtype=I64)
    lengths[0] = 1  # at least one sample kept by "drop"
    embeddings = small_rows(n, 3, seed=n)
    embeddings[1::3] = embeddings[0]  # exact duplicates
    options = dict(strategy=strategy, overlong=overlong, window=7, min_distance=1.2, keep_apart=2)
    packing = pack_lengths(lengths, max_len, embeddings=embeddings.double(), **options)
    expected = pack_lengths_reference(lengths.tolist(), max_len, embeddings=embeddings.tolist(), **options)
    for field in FIELDS:
        assert_equal(getattr(packing, field), tensor(expected[field]), field)
    for field in COUNTS:
        assert getattr(packing, field) == expected[field], field
    check_packing_invariants(packing, lengths.tolist(), max_len, overlong, strategy="fill_in_order")


@given(
    lengths=st.lists(st.integers(min_value=1, max_value=120), min_size=1, max_size=80),
    max_len=st.integers(min_value=1, max_value=60),
    overlong=st.sampled_from(["truncate", "drop", "split"]),
    strategy=st.sampled_from(["fill_in_order", "next_fit"]),
    window=st.integers(min_value=1, max_value=40),
    dim=st.sampled_from([1, 2, 5]),
    min_distance=st.sampled_from([0.0, 0.5, 2.0, 3.5]),
    keep_apart=st.integers(min_value=1, max_value=6),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_property_every_sample_once_and_reference(
    lengths, max_len, overlong, strategy, window, dim, min_distance, keep_apart, seed
):
    if overlong == "drop" and all(length > max_len for length in lengths):
        lengths = [*lengths, 1]
    embeddings = small_rows(len(lengths), dim, seed)
    options = dict(strategy=strategy, overlong=overlong, window=window, min_distance=min_distance,
                   keep_apart=keep_apart)
    packing = pack_lengths(lengths, max_len, embeddings=embeddings, **options)
    check_packing_invariants(packing, lengths, max_len, overlong, strategy="fill_in_order")
    expected = pack_lengths_reference(lengths, max_len, embeddings=embeddings.tolist(), **options)
    for field in FIELDS:
        assert_equal(getattr(packing, field), tensor(expected[field]), field)


@given(
    lengths=st.lists(st.integers(min_value=1, max_value=30), min_size=1, max_size=60),
    max_len=st.integers(min_value=30, max_value=90),
    strategy=st.sampled_from(["fill_in_order", "next_fit"]),
    window=st.integers(min_value=1, max_value=80),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_property_no_close_pair_when_every_close_sample_may_wait(lengths, max_len, strategy, window, seed):
    """keep_apart >= N: next fit never has to take a close sample and the top-up never does, so no pack holds
    a close pair; and each pack's first sample is the first unplaced one (nothing waits past its turn)."""
    n = len(lengths)
    embeddings = small_rows(n, 2, seed)
    packing = pack_lengths(lengths, max_len, strategy=strategy, window=window, embeddings=embeddings,
                           min_distance=2.0, keep_apart=n)
    check_packing_invariants(packing, lengths, max_len, "error", strategy="fill_in_order")
    assert close_pairs(packing, embeddings, 2.0) == 0
    assert near_duplicate_pairs(packing, embeddings, 2.0).close == 0
    first = packing.sample_index[packing.pack_piece_offsets[:-1]].tolist()
    placed = set()
    for pack in range(packing.num_packs):
        assert first[pack] == min(set(range(n)) - placed)  # opens with the first unplaced sample
        placed |= set(packing.sample_index[packing.pack_id == pack].tolist())


def test_keep_apart_zero_is_the_strategy_itself():
    lengths = make_lengths("lognormal", 300, 128, seed=2)
    rows = small_rows(300, 3, seed=2)
    options = dict(window=50, embeddings=rows, min_distance=1.5)
    a = pack_lengths(lengths, 128, strategy="fill_in_order", **options)
    b = pack_lengths(lengths, 128, strategy="fill_in_order", keep_apart=0, **options)
    for field in FIELDS:
        assert_equal(getattr(a, field), getattr(b, field), field)
    # next_fit with keep_apart and a threshold below every distance: plain next fit
    far = pack_lengths(lengths, 128, strategy="next_fit", keep_apart=3, embeddings=rows, min_distance=0.0)
    plain = pack_lengths(lengths, 128, strategy="next_fit")
    for field in FIELDS:
        assert_equal(getattr(far, field), getattr(plain, field), field)


def test_fallback_without_extension(monkeypatch):
    monkeypatch.setattr(fill_in_order_module, "has_extension", lambda: False)
    lengths = make_lengths("lognormal", 200, 256, seed=4)
    rows = small_rows(200, 4, seed=0)
    with pytest.warns(RuntimeWarning, match="pure-torch fallback"):
        packing = pack_lengths(lengths, 256, strategy="fill_in_order", window=60, embeddings=rows,
                               min_distance=2.0, keep_apart=3)
    expected = pack_lengths_reference(lengths.tolist(), 256, strategy="fill_in_order", window=60,
                                      embeddings=rows.tolist(), min_distance=2.0, keep_apart=3)
    for field in FIELDS:
        assert_equal(getattr(packing, field), tensor(expected[field]), field)


@needs_extension
def test_opcheck_with_keep_apart():
    rows = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    args = (tensor([6, 5, 3, 3]), 9, 4, rows, 2.0, 0.5, False, 2)
    torch.library.opcheck(
        torch.ops.tfp_kernels.fill_in_order.default, args, test_utils=("test_schema", "test_faketensor")
    )
    with pytest.raises(RuntimeError, match="keep_apart must be >= 0"):
        torch.ops.tfp_kernels.fill_in_order(tensor([1, 2]), 4, 2, rows[:2], 2.0, 0.5, False, -1)
    with pytest.raises(RuntimeError, match="keep_apart needs rows"):
        torch.ops.tfp_kernels.fill_in_order(tensor([1, 2]), 4, 2, None, 2.0, 0.5, False, 1)


# ================================================================================== what it is for


def duplicate_heavy(num: int, seed: int):
    """Seeded duplicate-heavy SFT records (a fifth share one instruction), embedded and tokenized as tfp-pack
    does by default: (embeddings, lengths)."""
    from tfp_kernels.data.make_sft import make_duplicate_heavy_records
    from tfp_kernels.embed import load_embedder
    from tfp_kernels.text import formats, tokenize

    records = make_duplicate_heavy_records(num, 0.2, seed=seed)
    fmt = formats.detect_format(records)
    tok = tokenize.tokenize_records(records, fmt, tokenize.load_tokenizer("byte"))
    texts = [formats.embed_text(r, fmt, None, i) for i, r in enumerate(records)]
    return load_embedder("hashed").embed_texts(texts), torch.from_numpy(tok.lengths).long()


@pytest.mark.parametrize("seed", [1, 2])
def test_fewer_near_duplicate_pairs_on_duplicate_heavy_data(seed):
    from tfp_kernels import tfp_order

    emb, lengths = duplicate_heavy(600, seed)
    path, stats = tfp_order(emb, return_stats=True)  # spread policy
    t = stats.threshold
    max_len = 1024

    def packed(strategy, **options):
        if options:
            options.update(embeddings=emb[path], min_distance=t)
        packing = pack_lengths(lengths[path], max_len, strategy=strategy, overlong="split", **options)
        return dataclasses.replace(packing, sample_index=path[packing.sample_index])

    next_fit = packed("next_fit")
    fill = packed("fill_in_order", window=1024)
    apart = packed("fill_in_order", window=1024, keep_apart=4)
    assert sorted(apart.sample_index.tolist()) == list(range(600))  # none lost, none twice (no split here)
    near = {name: near_duplicate_pair_fraction(p, emb, t) for name, p in
            [("next_fit", next_fit), ("fill", fill), ("apart", apart)]}
    assert near["apart"] < near["fill"] and near["apart"] < near["next_fit"]
    assert apart.fill_ratio > next_fit.fill_ratio
    assert near_duplicate_pairs(apart, emb, t).packs < near_duplicate_pairs(fill, emb, t).packs


# ================================================================================== report and pack_gpu


def test_near_duplicate_pairs_against_brute_force():
    generator = torch.Generator().manual_seed(0)
    emb = small_rows(90, 2, seed=3)
    lengths = torch.randint(1, 20, (90,), generator=generator)
    for strategy in ("next_fit", "bfd"):
        packing = pack_lengths(lengths, 40, strategy=strategy)
        got = near_duplicate_pairs(packing, emb, 1.5)
        assert got.close == close_pairs(packing, emb, 1.5)
        packs = 0
        for p in range(packing.num_packs):
            members = packing.sample_index[packing.pack_id == p].unique().tolist()
            packs += any(
                float(exact_pair_distances(emb, tensor([a]), tensor([b]), "l2")[0]) < 1.5
                for a, b in itertools.combinations(members, 2)
            )
        assert got.packs == packs
        k = torch.bincount(packing.pack_id).tolist()
        assert got.pairs == sum(c * (c - 1) // 2 for c in k)
        summary = packing_summary(packing, emb, threshold=1.5)
        assert summary["near_duplicate_packs"] == packs
        assert summary["near_duplicate_pair_fraction"] == round(got.close / got.pairs, 6)
    assert near_duplicate_pairs(pack_lengths([2, 2], 2), emb[:2], 1.5) == (0, 0, 0)


def test_pack_gpu_keep_apart_is_pack_lengths_in_tfp_order():
    from tfp_kernels import tfp_order

    emb, lengths = duplicate_heavy(200, 3)
    g = torch.Generator().manual_seed(0)
    samples = [torch.randint(0, 255, (int(n),), generator=g) for n in lengths]
    batch = pack_gpu(samples, max_len=1024, embeddings=emb, strategy="fill_in_order", overlong="split", keep_apart=4)
    path, stats = tfp_order(emb, return_stats=True, policy="spread")
    assert torch.equal(batch.order, path)
    want = pack_lengths(lengths[path], 1024, strategy="fill_in_order", embeddings=emb[path], overlong="split",
                        min_distance=stats.threshold, keep_apart=4)
    assert torch.equal(batch.sample_index, path[want.sample_index])
    assert torch.equal(batch.packing.pack_offsets, want.pack_offsets)
    # another order needs the threshold and the embeddings
    with pytest.raises(ValueError, match="keep_apart with order='random' needs embeddings= and threshold="):
        pack_gpu(samples, max_len=1024, order="random", keep_apart=4)
    rand = pack_gpu(samples, max_len=1024, order="random", embeddings=emb, threshold=stats.threshold,
                    strategy="next_fit", overlong="split", keep_apart=2)
    assert sorted(set(rand.sample_index.tolist())) == list(range(200))
    with pytest.raises(ValueError, match="keep_apart needs strategy='fill_in_order' or 'next_fit'"):
        pack_gpu(samples, max_len=1024, embeddings=emb, strategy="bfd", keep_apart=4)


# ================================================================================== bad input


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(keep_apart=2), ValueError, "keep_apart= needs embeddings= and min_distance="),
        (dict(keep_apart=2, embeddings=torch.ones(3, 2)), ValueError, "needs embeddings= and min_distance="),
        (dict(keep_apart=2, strategy="bfd", embeddings=torch.ones(3, 2), min_distance=1.0), ValueError,
         "keep_apart= is used by strategy='fill_in_order' and 'next_fit' only"),
        (dict(keep_apart=-1), ValueError, r"keep_apart must be an int in \[0"),
        (dict(keep_apart=True), TypeError, "keep_apart must be an int >= 0, got True"),
        (dict(keep_apart=2.0), TypeError, "keep_apart must be an int >= 0, got float"),
        (dict(strategy="next_fit", embeddings=torch.ones(3, 2), min_distance=1.0), ValueError,
         "or 'next_fit' with keep_apart="),
    ],
)
def test_bad_inputs(kwargs, error, match):
    kwargs = {"strategy": "fill_in_order", **kwargs}
    with pytest.raises(error, match=match):
        pack_lengths([1, 2, 3], 4, **kwargs)


def test_pack_dataset_passes_keep_apart():
    import datasets

    from tfp_kernels import pack_dataset

    emb, lengths = duplicate_heavy(120, 4)
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, 255, (int(n),), generator=g).tolist() for n in lengths]
    ds = datasets.Dataset.from_dict({"input_ids": rows})
    packed = pack_dataset(ds, max_len=1024, strategy="fill_in_order", overlong="split", embeddings=emb,
                          keep_apart=4)
    batch = pack_gpu([torch.tensor(r) for r in rows], max_len=1024, embeddings=emb, strategy="fill_in_order",
                     overlong="split", keep_apart=4)
    members = [[] for _ in range(batch.packing.num_packs)]
    for pack, sample in zip(batch.packing.pack_id.tolist(), batch.sample_index.tolist()):
        members[pack].append(sample)
    assert packed["sample_ids"][:] == members
    assert '"keep_apart": 4' in packed.info.description
