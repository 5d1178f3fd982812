"""Tests of the "fill_in_order" packing strategy and of the fill / intra-pack similarity trade-off helpers.

The C++ op (length-only buckets and the similarity-aware top-up), the pure-Python fallback and
pack_lengths are compared with the plain-Python reference of tfp_kernels.packing.reference, bit for bit.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tfp_kernels import _ext
from tfp_kernels.packing import (
    fill_in_order_pack,
    fill_in_order_pack_python,
    next_fit_pack_ids,
    pack_lengths,
)
from tfp_kernels.packing import fill_in_order as fill_in_order_module
from tfp_kernels.packing.reference import (
    fill_in_order_reference,
    next_fit_pack_ids_reference,
    pack_lengths_reference,
    sum4,
)
from tfp_kernels.report import (
    TRADE_OFF_STRATEGIES,
    fill_similarity_points,
    intra_pack_similarity,
    plot_fill_vs_similarity,
)
from tfp_kernels.testing import (
    assert_equal,
    check_packing_invariants,
    devices,
    lognormal_lengths,
    make_lengths,
)

needs_extension = pytest.mark.skipif(not _ext.has_extension(), reason="tfp_kernels._C is not built")

I64 = torch.int64
FIELDS = ("pack_id", "sample_index", "offset", "length", "pack_offsets", "dropped_index", "sample_lengths")
COUNTS = ("num_packs", "num_truncated", "num_dropped", "num_split")
KINDS = ["uniform", "lognormal", "all-max-len", "all-ones", "small", "bimodal"]


def tensor(values, device="cpu"):
    return torch.tensor(values, dtype=I64, device=device)


def pack_of_items(result) -> list[int]:
    """The pack of every item from an (order, pack_id, ...) result."""
    pack_of = [0] * result.order.numel()
    for item, pack in zip(result.order.tolist(), result.pack_id.tolist()):
        pack_of[item] = pack
    return pack_of


def assert_matches_reference(packing, lengths, max_len, *, overlong, window, embeddings=None, **kwargs):
    expected = pack_lengths_reference(
        lengths,
        max_len,
        strategy="fill_in_order",
        overlong=overlong,
        window=window,
        embeddings=None if embeddings is None else embeddings.tolist(),
        **kwargs,
    )
    for field in FIELDS:
        assert_equal(getattr(packing, field), tensor(expected[field], packing.device), field)
    for field in COUNTS:
        assert getattr(packing, field) == expected[field], field


# ================================================================================== hand-worked cases
# Worked out by hand from the rule (reference.py: fill_in_order_reference), not by running the code.
# A pack opens with the first unplaced item s, takes the next unplaced items while they fit (next fit),
# then the best fitting candidate of positions [s, s + window) until none fits.

# fmt: off
HAND_CASES = [
    # lengths, max_len, window, expected (sample_index, pack_id) in pack order
    pytest.param(
        [3, 4, 5, 1, 9, 2], 10, 1024,
        # 3+4 (next fit), room 3: longest fitting 2, then 1 | 5 (nothing fits) | 9
        ([0, 1, 3, 5, 2, 4], [0, 0, 0, 0, 1, 2]),
        id="docstring-example",
    ),
    pytest.param(
        [3, 4, 5, 1, 9, 2], 10, 1,
        ([0, 1, 2, 3, 4, 5], [0, 0, 1, 1, 2, 3]),  # no candidates but the first: next fit
        id="window-1-is-next-fit",
    ),
    pytest.param(
        [6, 5, 4, 3], 10, 3,
        # 6, room 4: 5 does not fit, candidate 4 (position 2 < 0 + 3) does | 5, next fit takes 3
        ([0, 2, 1, 3], [0, 0, 1, 1]),
        id="window-3-reaches-the-filler",
    ),
    pytest.param(
        [6, 5, 4, 3], 10, 2,
        # 6: candidate 5 does not fit | 5+4 (next fit) | 3
        ([0, 1, 2, 3], [0, 1, 1, 2]),
        id="window-2-does-not",
    ),
    pytest.param(
        [8, 5, 1, 1, 2, 2], 10, 6,
        # 8, room 2: longest fitting is 2, the earliest of the two (item 4) | 5+1+1, skips 4 (placed), +2
        ([0, 4, 1, 2, 3, 5], [0, 0, 1, 1, 1, 1]),
        id="ties-to-the-earliest",
    ),
    pytest.param(
        [2, 2, 2, 2, 2], 10, 1,
        ([0, 1, 2, 3, 4], [0, 0, 0, 0, 0]),  # next fit is not limited by the window
        id="next-fit-beyond-the-window",
    ),
    pytest.param(
        [4, 4, 4], 4, 1024,
        ([0, 1, 2], [0, 1, 2]),  # every item fills a pack
        id="all-max-len",
    ),
    pytest.param([7], 7, 1, ([0], [0]), id="one-item"),
]
# fmt: on


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("lengths, max_len, window, expected", HAND_CASES)
def test_hand_worked(lengths, max_len, window, expected, device):
    packing = pack_lengths(tensor(lengths, device), max_len, strategy="fill_in_order", window=window)
    sample_index, pack_id = expected
    assert_equal(packing.sample_index, tensor(sample_index, device), "sample_index")
    assert_equal(packing.pack_id, tensor(pack_id, device), "pack_id")
    assert_equal(packing.length, tensor([lengths[i] for i in sample_index], device), "length")
    assert_matches_reference(packing, lengths, max_len, overlong="error", window=window)


# rows: item 0 and 3 point the same way, items 1 and 2 at right angles to them
ROWS = [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]


@pytest.mark.parametrize(
    "lengths, rows, kwargs, expected_sample_index",
    [
        # 6, room 3: items 2 and 3 both fit with length 3; scores cos + 2 * 3/3: item 2: 0 + 2, item 3: 1 + 2
        pytest.param([6, 5, 3, 3], ROWS, {}, [0, 3, 1, 2], id="more-similar-wins"),
        pytest.param([6, 5, 3, 3], None, {}, [0, 2, 1, 3], id="length-only-takes-the-earliest"),
        # item 3 is at distance 0 from item 0: passed over while item 2 fits
        pytest.param([6, 5, 3, 3], ROWS, {"min_distance": 0.5}, [0, 2, 1, 3], id="too-close-passed-over"),
        pytest.param(
            [6, 5, 3, 3], ROWS, {"min_distance": 0.5, "metric": "cosine"}, [0, 2, 1, 3], id="cosine-distance"
        ),
        # rows times 3: item 2 is 3 * sqrt(2) = 4.24 < 5 from item 0: both candidates too close, the best
        # of them joins anyway
        pytest.param([6, 5, 3, 3], ROWS, {"min_distance": 5.0}, [0, 3, 1, 2], id="all-too-close"),
        # item 2 (2 tokens, cos 1): 1 + 2 * 2/3 = 2.33 beats item 3 (3 tokens, cos 0): 0 + 2 = 2
        pytest.param(
            [6, 5, 2, 3], [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]], {}, [0, 2, 1, 3], id="similar-short"
        ),
        # item 2 opposite (cos -1): -1 + 1.33 < 2: the longer, unrelated item 3 wins
        pytest.param(
            [6, 5, 2, 3],
            [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, 1.0]],
            {},
            [0, 3, 1, 2],
            id="opposite-short",
        ),
    ],
)
def test_hand_worked_with_embeddings(lengths, rows, kwargs, expected_sample_index):
    embeddings = None if rows is None else torch.tensor(rows) * 3.0  # norms are divided out
    packing = pack_lengths(lengths, 9, strategy="fill_in_order", window=4, embeddings=embeddings, **kwargs)
    assert packing.sample_index.tolist() == expected_sample_index
    assert packing.pack_id.tolist() == [0, 0, 1, 1]
    assert_matches_reference(packing, lengths, 9, overlong="error", window=4, embeddings=embeddings, **kwargs)


def test_reference_directly():
    assert fill_in_order_reference([3, 4, 5, 1, 9, 2], 10, 1024) == [0, 0, 1, 0, 2, 0]
    assert fill_in_order_reference([], 10, 3) == []
    for lengths, max_len in [([3, 4, 5, 1, 9, 2], 10), ([5, 5, 5, 1], 6), ([1] * 9, 4)]:
        assert fill_in_order_reference(lengths, max_len, 1) == next_fit_pack_ids_reference(lengths, max_len)
    assert sum4([1.0, 2.0, 3.0, 4.0, 5.0]) == (1.0 + 5.0 + 2.0) + (3.0 + 4.0)
    with pytest.raises(ValueError, match=r"lengths\[1\] = 11 is outside"):
        fill_in_order_reference([3, 11], 10, 4)
    with pytest.raises(ValueError, match="window must be >= 1"):
        fill_in_order_reference([3], 10, 0)
    with pytest.raises(ValueError, match="metric must be"):
        fill_in_order_reference([3], 10, 1, [[1.0]], metric="dot")
    with pytest.raises(ValueError, match="finite and non-zero"):
        fill_in_order_reference([3], 10, 1, [[0.0, 0.0]])
    with pytest.raises(ValueError, match="rows has 1 rows for 2 items"):
        fill_in_order_reference([3, 3], 10, 1, [[1.0]])


# ================================================================================== fast paths vs reference


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n, max_len", [(1, 1), (2, 3), (7, 10), (300, 64), (1000, 2048)], ids=str)
@pytest.mark.parametrize("window", [1, 3, 64, 5000])
def test_length_only_op_python_reference_agree(kind, n, max_len, window):
    lengths = make_lengths(kind, n, max_len, seed=n * 5 + max_len)
    expected = fill_in_order_reference(lengths.tolist(), max_len, window)
    assert fill_in_order_pack_python(lengths.tolist(), max_len, window) == expected
    python = fill_in_order_pack(lengths, max_len, window=window, backend="python")
    assert pack_of_items(python) == expected
    if not _ext.has_extension():
        return
    result = fill_in_order_pack(lengths, max_len, window=window, backend="op")
    assert pack_of_items(result) == expected
    for field in result._fields:
        assert_equal(getattr(result, field), getattr(python, field), field)
    assert_equal(result.length, lengths[result.order], "length")


@needs_extension
@pytest.mark.parametrize("max_len", [2048, 2**21, 2**40], ids=lambda m: f"max{m}")
@pytest.mark.parametrize("window", [1, 1024])
def test_length_only_op_matches_python_large(max_len, window):
    """Length buckets indexed by the length (dense) and by the rank among distinct lengths (sparse)."""
    lengths = lognormal_lengths(30_000, mean=512, max_len=2048, seed=max_len % 89)
    if max_len > 2048:
        lengths = lengths * (max_len // 4096) + 1  # spread the lengths over the large capacity
    result = fill_in_order_pack(lengths, max_len, window=window, backend="op")
    assert pack_of_items(result) == fill_in_order_pack_python(lengths.tolist(), max_len, window)


def random_rows(n: int, dim: int, kind: str, seed: int) -> torch.Tensor:
    """(n, dim) float32 rows: independent, few distinct (exact duplicates), or scaled copies (equal cosines)."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "independent":
        return torch.randn(n, dim, generator=generator)
    if kind == "duplicates":
        base = torch.randn(3, dim, generator=generator)
        return base[torch.randint(0, 3, (n,), generator=generator)]
    base = torch.randn(2, dim, generator=generator)  # "scaled": ties between candidates of equal length
    scale = torch.randint(1, 4, (n, 1), generator=generator).float()
    return base[torch.randint(0, 2, (n,), generator=generator)] * scale


@pytest.mark.parametrize("rows_kind", ["independent", "duplicates", "scaled"])
@pytest.mark.parametrize("dim", [1, 3, 8, 13])
@pytest.mark.parametrize("min_distance, metric", [(0.0, "l2"), (1.0, "l2"), (0.3, "cosine")])
@pytest.mark.parametrize("n, max_len, window", [(1, 5, 3), (40, 16, 7), (150, 64, 1000)], ids=str)
def test_rows_op_python_reference_agree(rows_kind, dim, min_distance, metric, n, max_len, window):
    lengths = make_lengths("uniform", n, max_len, seed=n + dim)
    rows = random_rows(n, dim, rows_kind, seed=dim * 31 + n)
    expected = fill_in_order_reference(
        lengths.tolist(), max_len, window, rows.tolist(), min_distance=min_distance, metric=metric
    )
    kwargs = {"window": window, "rows": rows, "min_distance": min_distance, "metric": metric}
    assert pack_of_items(fill_in_order_pack(lengths, max_len, backend="python", **kwargs)) == expected
    if _ext.has_extension():
        assert pack_of_items(fill_in_order_pack(lengths, max_len, backend="op", **kwargs)) == expected


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("overlong", ["truncate", "drop", "split"])
@pytest.mark.parametrize("with_embeddings", [False, True], ids=["length-only", "embeddings"])
@pytest.mark.parametrize("n, max_len", [(1, 1), (5, 3), (200, 16), (1500, 512)], ids=str)
def test_pack_lengths_matches_reference(overlong, with_embeddings, n, max_len, device, poison_empty):
    generator = torch.Generator().manual_seed(n + max_len)
    lengths = torch.randint(1, 2 * max_len + 1, (n,), generator=generator, dtype=I64)  # ~1/2 over-long
    if overlong == "drop":
        lengths[0] = 1  # at least one sample kept
    embeddings = torch.randn(n, 6, generator=generator, dtype=torch.float64) if with_embeddings else None
    if with_embeddings and n > 5:
        embeddings[1::3] = embeddings[0]  # exact duplicates
    extra = {"min_distance": 0.8} if with_embeddings else {}
    packing = pack_lengths(
        lengths.to(device),
        max_len,
        strategy="fill_in_order",
        overlong=overlong,
        window=7,
        embeddings=None if embeddings is None else embeddings.to(device),
        **extra,
    )
    rows = None if embeddings is None else embeddings.float()  # the values the packer compares
    assert_matches_reference(
        packing, lengths.tolist(), max_len, overlong=overlong, window=7, embeddings=rows, **extra
    )
    check_packing_invariants(packing, lengths.tolist(), max_len, overlong, strategy="fill_in_order")
    for field in FIELDS:
        assert not (getattr(packing, field) == poison_empty).any(), f"{field} holds the sentinel of torch.empty"


def test_result_dtype_device_contiguous():
    packing = pack_lengths(
        torch.tensor([3, 12, 4, 9], dtype=torch.int32),
        10,
        strategy="fill_in_order",
        overlong="split",
        embeddings=torch.randn(4, 3, dtype=torch.float16),
    )
    for field in FIELDS:
        value = getattr(packing, field)
        assert value.dtype == I64 and value.dim() == 1 and value.is_contiguous(), field
    assert type(packing.num_packs) is int and packing.num_samples == 4


# ================================================================================== properties (hypothesis)


@given(
    lengths=st.lists(st.integers(min_value=1, max_value=120), min_size=1, max_size=100),
    max_len=st.integers(min_value=1, max_value=60),
    overlong=st.sampled_from(["truncate", "drop", "split"]),
    window=st.integers(min_value=1, max_value=40),
    dim=st.sampled_from([0, 1, 2, 5]),  # 0: no embeddings
    min_distance=st.sampled_from([None, 0.0, 0.5, 2.0]),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_property_every_sample_once_and_reference(lengths, max_len, overlong, window, dim, min_distance, seed):
    if overlong == "drop" and all(length > max_len for length in lengths):
        lengths = [*lengths, 1]
    embeddings = None
    if dim:
        generator = torch.Generator().manual_seed(seed)
        embeddings = torch.randint(-2, 3, (len(lengths), dim), generator=generator).float()  # ties, duplicates
        embeddings[(embeddings == 0).all(1)] = 1.0
    extra = {"min_distance": min_distance} if dim and min_distance is not None else {}
    options = {"overlong": overlong, "window": window, "embeddings": embeddings, **extra}
    packing = pack_lengths(lengths, max_len, strategy="fill_in_order", **options)
    check_packing_invariants(packing, lengths, max_len, overlong, strategy="fill_in_order")
    assert_matches_reference(
        packing, lengths, max_len, overlong=overlong, window=window, embeddings=embeddings, **extra
    )
    again = pack_lengths(lengths, max_len, strategy="fill_in_order", **options)
    for field in FIELDS:  # deterministic
        assert_equal(getattr(again, field), getattr(packing, field), field)


@given(
    lengths=st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=150),
    max_len=st.integers(min_value=50, max_value=120),
    window=st.integers(min_value=1, max_value=200),
)
def test_property_order_and_window(lengths, max_len, window):
    """Window 1 is next fit. Each pack opens with the earliest unplaced piece; a piece outside its pack's
    next-fit run (the following unplaced pieces) lies within ``window`` positions of the pack's first
    piece; a pack closes only when no unplaced piece of its window fits its room."""
    packing = pack_lengths(lengths, max_len, strategy="fill_in_order", window=window)
    if window == 1:
        assert_equal(packing.pack_id, next_fit_pack_ids(tensor(lengths), max_len), "window 1 vs next fit")
    members = [[] for _ in range(packing.num_packs)]
    for pack, item in zip(packing.pack_id.tolist(), packing.sample_index.tolist()):
        members[pack].append(item)
    firsts = [items[0] for items in members]
    assert firsts == sorted(firsts)
    placed: set[int] = set()
    for items in members:
        first = items[0]
        assert first == min(set(range(len(lengths))) - placed)  # the earliest unplaced piece opens the pack
        run_end = first + 1  # the next-fit run: consecutive pieces, skipping those placed before
        while run_end < len(lengths) and (run_end in placed or run_end in items):
            run_end += 1
        for item in items:
            assert item < run_end or item < first + window, (items, window)
        room = max_len - sum(lengths[i] for i in items)
        placed.update(items)
        candidates = [q for q in range(first, min(len(lengths), first + window)) if q not in placed]
        assert all(lengths[q] > room for q in candidates)  # closed because nothing in the window fit


# ================================================================================== fill on realistic lengths


@pytest.mark.parametrize(
    "n, max_len, seed", [(1000, 2048, 0), (20_000, 2048, 1), (20_000, 8192, 2), (5000, 512, 3)]
)
def test_fill_on_long_tailed_lengths(n, max_len, seed):
    """Near-BFD fill with the default window: more than next fit, within 1% of bfd and above 0.98."""
    lengths = lognormal_lengths(n, mean=min(512, max_len / 4), max_len=max_len, seed=seed)
    strategies = ("next_fit", "fill_in_order", "bfd")
    fill = {s: pack_lengths(lengths, max_len, strategy=s).fill_ratio for s in strategies}
    assert fill["next_fit"] < fill["fill_in_order"]
    assert fill["fill_in_order"] > 0.98 and fill["fill_in_order"] > fill["bfd"] - 0.01


# ================================================================================== bad inputs


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        pytest.param(
            {"embeddings": torch.ones(3, 2), "strategy": "bfd"},
            ValueError,
            "embeddings= is used by strategy='fill_in_order' only",
            id="embeddings-with-bfd",
        ),
        pytest.param(
            {"embeddings": torch.ones(2, 2)}, ValueError, r"shape \(N, D\) = \(3, D >= 1\)", id="rows"
        ),
        pytest.param({"embeddings": torch.ones(3)}, ValueError, r"got \(3,\)", id="1-d"),
        pytest.param({"embeddings": torch.ones(3, 0)}, ValueError, r"got \(3, 0\)", id="no-columns"),
        pytest.param({"embeddings": torch.ones(3, 2, dtype=I64)}, TypeError, "floating dtype", id="int"),
        pytest.param({"embeddings": [[1.0, 0.0]] * 3}, TypeError, "must be a torch.Tensor", id="list"),
        pytest.param(
            {"embeddings": torch.tensor([[1.0, 0.0], [float("nan"), 1.0], [1.0, 1.0]])},
            ValueError,
            r"embeddings\[1\] is not finite",
            id="nan",
        ),
        pytest.param(
            {"embeddings": torch.tensor([[1.0, 0.0], [1.0, 1.0], [1e-50, 0.0]], dtype=torch.float64)},
            ValueError,
            r"embeddings\[2\] is all zeros in float32",
            id="zero-in-float32",
        ),
        pytest.param(
            {"embeddings": torch.tensor([[1e39, 0.0], [1.0, 1.0], [1.0, 0.0]], dtype=torch.float64)},
            ValueError,
            r"embeddings\[0\] is not finite in float32",
            id="overflow-in-float32",
        ),
        pytest.param({"min_distance": 0.5}, ValueError, "min_distance= needs embeddings=", id="distance-alone"),
        pytest.param(
            {"embeddings": torch.ones(3, 2), "min_distance": -1.0},
            ValueError,
            "min_distance must be a finite number >= 0, got -1.0",
            id="negative-distance",
        ),
        pytest.param(
            {"embeddings": torch.ones(3, 2), "min_distance": float("inf")},
            ValueError,
            "min_distance must be a finite number",
            id="inf-distance",
        ),
        pytest.param(
            {"embeddings": torch.ones(3, 2), "min_distance": True},
            TypeError,
            "min_distance must be a non-negative number, got bool",
            id="bool-distance",
        ),
        pytest.param(
            {"embeddings": torch.ones(3, 2), "min_distance": "0.5"},
            TypeError,
            "min_distance must be a non-negative number, got str",
            id="str-distance",
        ),
        pytest.param({"metric": "dot"}, ValueError, "metric must be one of", id="bad-metric"),
    ],
)
def test_bad_inputs(kwargs, error, match):
    kwargs = {"strategy": "fill_in_order", **kwargs}
    with pytest.raises(error, match=match):
        pack_lengths([3, 4, 5], 10, **kwargs)


def test_bad_backend_and_metric_names():
    with pytest.raises(ValueError, match="backend must be one of"):
        fill_in_order_pack(tensor([1]), 5, window=3, backend="cuda")
    with pytest.raises(ValueError, match="metric must be one of"):
        fill_in_order_pack(tensor([1]), 5, window=3, metric="dot")


@needs_extension
@pytest.mark.parametrize(
    "args, match",
    [
        pytest.param((tensor([1, 0, 2]), 10, 5), r"lengths\[1\] = 0 is outside", id="zero"),
        pytest.param((tensor([1, 11]), 10, 5), r"lengths\[1\] = 11 is outside", id="long"),
        pytest.param((tensor([1]), 0, 5), "max_len must be positive", id="max-len"),
        pytest.param((tensor([1]), 10, 0), "window must be positive", id="window"),
        pytest.param((torch.tensor([1], dtype=torch.int32), 10, 5), "dtype Long", id="int32"),
        pytest.param((torch.ones(2, 2, dtype=I64), 10, 5), "1-D", id="2d"),
        pytest.param((tensor([1, 2]), 10, 5, torch.ones(3, 2)), r"one row per item \(2\)", id="rows-count"),
        pytest.param(
            (tensor([1, 2]), 10, 5, torch.ones(2, 2, dtype=torch.float64)), "dtype Float", id="rows-f64"
        ),
        pytest.param((tensor([1, 2]), 10, 5, torch.ones(2)), "2-D", id="rows-1d"),
        pytest.param(
            (tensor([1, 2]), 10, 5, torch.tensor([[1.0], [0.0]])), r"rows\[1\] must be finite", id="rows-zero"
        ),
        pytest.param((tensor([1]), 10, 5, None, float("nan")), "fill_weight must be finite", id="fill-weight"),
    ],
)
def test_op_checks_its_inputs(args, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.tfp_kernels.fill_in_order(*args)


@needs_extension
def test_op_empty_non_contiguous_and_registration():
    order, pack_id, length, pack_offsets = torch.ops.tfp_kernels.fill_in_order(torch.empty(0, dtype=I64), 5, 3)
    assert order.shape == pack_id.shape == length.shape == (0,) and pack_offsets.tolist() == [0]
    strided = torch.tensor([6, 99, 5, 99, 4, 99, 3, 99])[::2]  # [6, 5, 4, 3]
    result = fill_in_order_pack(strided, 10, window=3, backend="op")
    assert result.order.tolist() == [0, 2, 1, 3] and result.pack_offsets.tolist() == [0, 10, 18]
    rows = torch.tensor([[1.0, 9.0, 0.0], [0.0, 9.0, 1.0], [0.0, 9.0, 1.0], [1.0, 9.0, 0.0]])[:, ::2]
    result = fill_in_order_pack(tensor([6, 5, 3, 3]), 9, window=4, rows=rows, backend="op")
    assert result.order.tolist() == [0, 3, 1, 2]
    assert torch._C._dispatch_has_kernel_for_dispatch_key("tfp_kernels::fill_in_order", "CPU")
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("tfp_kernels::fill_in_order", "CUDA")


@needs_extension
@pytest.mark.parametrize(
    "args",
    [
        pytest.param((tensor([3, 4, 5, 1, 9, 2]), 10, 1024), id="length-only"),
        pytest.param((tensor(list(range(1, 60))), 64, 7), id="window"),
        pytest.param((tensor([6, 5, 3, 3]), 9, 4, torch.tensor(ROWS), 2.0, 0.5, True), id="rows"),
    ],
)
def test_opcheck(args):
    torch.library.opcheck(
        torch.ops.tfp_kernels.fill_in_order.default, args, test_utils=("test_schema", "test_faketensor")
    )


# ================================================================================== without the extension


@pytest.mark.parametrize("with_embeddings", [False, True], ids=["length-only", "embeddings"])
def test_fallback_without_extension(monkeypatch, with_embeddings):
    monkeypatch.setattr(fill_in_order_module, "has_extension", lambda: False)
    lengths = make_lengths("lognormal", 300 if with_embeddings else 1500, 256, seed=4)
    embeddings = None
    if with_embeddings:
        embeddings = torch.randn(lengths.numel(), 4, generator=torch.Generator().manual_seed(0))
    with pytest.warns(RuntimeWarning, match="pure-torch fallback"):
        packing = pack_lengths(
            lengths, 256, strategy="fill_in_order", window=100, overlong="split", embeddings=embeddings
        )
    assert_matches_reference(
        packing, lengths.tolist(), 256, overlong="split", window=100, embeddings=embeddings
    )


# ================================================================================== trade-off points and plot


def test_fill_similarity_points_tiny_case():
    """Worked by hand. Lengths [3, 3, 2, 2], max_len 5; rows: samples 0 and 2 along x, 1 and 3 along y.

    given order 0 1 2 3: next_fit 3 | 3+2 | 2 -> 3 packs, fill 10/15; the one pack of two ({1, 2}) has
    cosine 0. fill_in_order (window 4, with embeddings): 3, room 2: candidates 2 and 3 (length 2);
    scores cos + 2 * 2/2: sample 2: 1 + 2, sample 3: 0 + 2 -> {0, 2} | 3+2 {1, 3}: fill 1, similarity 1.
    reversed order 3 2 1 0: next_fit 2+2 | 3 | 3: {3, 2} cosine 0, fill 10/15; fill_in_order: 2+2 (next
    fit), room 1: nothing fits | 3 | 3 -> the same packs.
    """
    lengths = torch.tensor([3, 3, 2, 2])
    embeddings = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, 1.0]])
    orders = {"given": torch.arange(4), "reversed": torch.tensor([3, 2, 1, 0])}
    points = fill_similarity_points(lengths, embeddings, 5, orders, ["next_fit", ("fill_in_order", 4)])
    expected = [
        ("given", "next_fit", None, 3, 0.666667, 0.0),
        ("given", "fill_in_order", 4, 2, 1.0, 1.0),
        ("reversed", "next_fit", None, 3, 0.666667, 0.0),
        ("reversed", "fill_in_order", 4, 3, 0.666667, 0.0),
    ]
    keys = ("order", "strategy", "window", "packs", "fill_ratio", "mean_intra_pack_similarity")
    assert [tuple(p[k] for k in keys) for p in points] == expected


def test_fill_similarity_points_match_pack_lengths():
    lengths = lognormal_lengths(400, mean=100, max_len=512, seed=5)
    embeddings = torch.randn(400, 8, generator=torch.Generator().manual_seed(1))
    perm = torch.randperm(400, generator=torch.Generator().manual_seed(2))
    points = fill_similarity_points(
        lengths, embeddings, 512, {"perm": perm}, TRADE_OFF_STRATEGIES, min_distance=3.0
    )
    assert len(points) == len(TRADE_OFF_STRATEGIES)
    for point, spec in zip(points, TRADE_OFF_STRATEGIES):
        name, window = (spec, None) if isinstance(spec, str) else spec
        assert (point["strategy"], point["window"]) == (name, window)
        extra = {"window": window} if window else {}
        if name == "fill_in_order":
            extra.update(embeddings=embeddings[perm], min_distance=3.0)
        packing = pack_lengths(lengths[perm], 512, strategy=name, overlong="split", **extra)
        assert point["packs"] == packing.num_packs
        assert point["fill_ratio"] == round(packing.fill_ratio, 6)
        in_sample_order = dataclasses.replace(packing, sample_index=perm[packing.sample_index])
        sim = intra_pack_similarity(in_sample_order, embeddings)
        assert math.isclose(point["mean_intra_pack_similarity"], float(sim.nanmean()), abs_tol=1e-6)


def test_fill_similarity_points_bad_order():
    with pytest.raises(ValueError, match=r"orders\['bad'\] must be a permutation of the 3 samples"):
        fill_similarity_points(torch.tensor([1, 2, 3]), torch.ones(3, 2), 4, {"bad": torch.tensor([0, 0, 1])})


def test_plot_fill_vs_similarity_writes_png(tmp_path):
    points = [
        {"order": o, "strategy": s, "window": w, "packs": 9, "fill_ratio": f, "mean_intra_pack_similarity": m}
        for o, s, w, f, m in [
            ("tfp", "next_fit", None, 0.90, 0.38),
            ("tfp", "fill_in_order", 16, 0.97, 0.39),
            ("tfp", "fill_in_order", 1024, 0.99, 0.36),
            ("random", "next_fit", None, 0.90, 0.19),
            ("random", "bfd", None, 0.995, None),  # no pack of two samples: not drawn
        ]
    ]
    path = tmp_path / "fill_vs_similarity.png"
    plot_fill_vs_similarity(points, str(path), "fill against intra-pack similarity")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    again = tmp_path / "again.png"
    plot_fill_vs_similarity(points, str(again), "fill against intra-pack similarity")
    assert again.read_bytes() == data  # no time stamps: same points, same bytes


# ================================================================================== CUDA (run on a GPU machine)


@pytest.mark.gpu
@pytest.mark.parametrize("overlong", ["error", "split"])
@pytest.mark.parametrize("with_embeddings", [False, True], ids=["length-only", "embeddings"])
def test_cuda_pack_lengths_matches_cpu(overlong, with_embeddings):
    n = 3000 if with_embeddings else 50_000
    lengths = lognormal_lengths(n, mean=512, max_len=4096, seed=7)
    max_len = 4096 if overlong == "error" else 1024
    extra = {}
    if with_embeddings:
        embeddings = torch.randn(n, 8, generator=torch.Generator().manual_seed(3))
        extra = {"embeddings": embeddings, "min_distance": 4.0}
    expected = pack_lengths(lengths, max_len, strategy="fill_in_order", overlong=overlong, window=256, **extra)
    if with_embeddings:
        extra["embeddings"] = extra["embeddings"].cuda()
    actual = pack_lengths(
        lengths.cuda(), max_len, strategy="fill_in_order", overlong=overlong, window=256, **extra
    )
    for field in FIELDS:
        value = getattr(actual, field)
        assert value.device.type == "cuda", field
        assert_equal(value.cpu(), getattr(expected, field), field)
