"""Tests of the packing strategies stream, window_best_fit and bfd (and of all five through pack_lengths;
fill_in_order has its own module, test_fill_in_order.py).

Every fast path (C++ ops, pure-torch / pure-Python fallbacks) is compared with the plain-Python references
of tfp_kernels.packing.reference; integer outputs bit for bit (torch.equal via ``assert_equal``).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tfp_kernels import _ext
from tfp_kernels.packing import (
    DEFAULT_WINDOW,
    OVERLONG_POLICIES,
    STRATEGIES,
    Packing,
    best_fit_decreasing,
    best_fit_decreasing_python,
    pack_lengths,
    stream_pack,
    stream_pack_torch,
)
from tfp_kernels.packing import best_fit as best_fit_module
from tfp_kernels.packing import fill_in_order as fill_in_order_module
from tfp_kernels.packing import stream as stream_module
from tfp_kernels.packing.reference import (
    best_fit_decreasing_reference,
    next_fit_pack_ids_reference,
    pack_lengths_reference,
    stream_reference,
    window_best_fit_reference,
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
ALL_STRATEGIES = ["stream", "next_fit", "window_best_fit", "bfd", "fill_in_order"]
FIELDS = ("pack_id", "sample_index", "offset", "length", "pack_offsets", "dropped_index", "sample_lengths")
COUNTS = ("num_packs", "num_truncated", "num_dropped", "num_split")


def tensor(values, device="cpu"):
    return torch.tensor(values, dtype=I64, device=device)


def assert_matches_reference(
    packing: Packing, lengths, max_len, *, strategy, overlong, window=DEFAULT_WINDOW
):
    expected = pack_lengths_reference(lengths, max_len, strategy=strategy, overlong=overlong, window=window)
    for field in FIELDS:
        assert_equal(getattr(packing, field), tensor(expected[field], packing.device), field)
    for field in COUNTS:
        assert getattr(packing, field) == expected[field], field


def test_strategy_names():
    assert list(STRATEGIES) == ALL_STRATEGIES
    assert DEFAULT_WINDOW == 1024


# ================================================================================== hand-worked cases
# Worked out by hand from the definitions (reference.py docstrings), not by running the code.
# bfd: items by decreasing length (ties: lower index first), each into the open pack with the smallest
# remaining capacity that fits (ties: the pack changed last), packs numbered by their first item.

# fmt: off
HAND_CASES = [
    # lengths, max_len, strategy, overlong, window, expected
    pytest.param(
        [3, 4, 5, 1, 9, 2], 10, "bfd", "error", DEFAULT_WINDOW,
        # 9->A(1) 5->B(5) 4->B(1) 3->C(7) 2->C(5) 1->B (A and B have 1 left; B changed last)
        {"sample_index": [0, 5, 1, 2, 3, 4], "pack_id": [0, 0, 1, 1, 1, 2], "pack_offsets": [0, 5, 15, 24]},
        id="bfd-brief-example",
    ),
    pytest.param(
        [8, 8, 1], 10, "bfd", "error", DEFAULT_WINDOW,
        # 8->A(2) 8->B(2) 1->B: the pack whose load changed last wins the tie
        {"sample_index": [0, 1, 2], "pack_id": [0, 1, 1], "pack_offsets": [0, 8, 17]},
        id="bfd-tie-most-recent-pack",
    ),
    pytest.param(
        [5, 5, 5], 10, "bfd", "error", DEFAULT_WINDOW,
        {"sample_index": [0, 1, 2], "pack_id": [0, 0, 1], "pack_offsets": [0, 10, 15]},
        id="bfd-equal-lengths-in-index-order",
    ),
    pytest.param(
        [1, 9, 2, 8], 10, "bfd", "error", DEFAULT_WINDOW,
        # 9->A(1) 8->B(2) 2->B(0) 1->A(0); A holds items 0,1 and B items 2,3
        {"sample_index": [0, 1, 2, 3], "pack_id": [0, 0, 1, 1], "pack_offsets": [0, 10, 20]},
        id="bfd-perfect-pairs",
    ),
    pytest.param(
        [3, 25, 4], 10, "bfd", "split",  DEFAULT_WINDOW,
        # pieces p0=3, p1=10, p2=10, p3=5, p4=4: 10->A 10->B 5->C(5) 4->C(1) 3->D(7); numbered D, A, B, C
        {
            "sample_index": [0, 1, 1, 1, 2], "offset": [0, 0, 10, 20, 0], "length": [3, 10, 10, 5, 4],
            "pack_id": [0, 1, 2, 3, 3], "pack_offsets": [0, 3, 13, 23, 32], "num_split": 1,
        },
        id="bfd-split",
    ),
    pytest.param(
        [3, 25, 4, 6], 10, "bfd", "drop", DEFAULT_WINDOW,
        # kept 3, 4, 6: 6->A(4) 4->A(0) 3->B(7); B holds sample 0 so comes first
        {
            "sample_index": [0, 2, 3], "length": [3, 4, 6], "pack_id": [0, 1, 1], "pack_offsets": [0, 3, 13],
            "num_dropped": 1, "dropped_index": [1],
        },
        id="bfd-drop",
    ),
    pytest.param(
        [3, 4, 5, 1, 9, 2], 10, "window_best_fit", "error", 3,
        # window [3,4,5]: 5->P(5) 4->P(1) 3->Q(7) | window [1,9,2]: 9->R(1) 2->S(8) 1->R(0)
        {"sample_index": [0, 1, 2, 3, 4, 5], "pack_id": [0, 1, 1, 2, 2, 3], "pack_offsets": [0, 3, 12, 22, 24]},
        id="window-3",
    ),
    pytest.param(
        [3, 4, 5, 1, 9, 2], 10, "window_best_fit", "error", 1,
        {"pack_id": [0, 1, 2, 3, 4, 5], "pack_offsets": [0, 3, 7, 12, 13, 22, 24]},
        id="window-1-is-one-pack-per-sample",
    ),
    pytest.param(
        [3, 4, 5, 1, 9, 2], 10, "window_best_fit", "error", 6,
        {"sample_index": [0, 5, 1, 2, 3, 4], "pack_id": [0, 0, 1, 1, 1, 2], "pack_offsets": [0, 5, 15, 24]},
        id="window-N-is-bfd",
    ),
    pytest.param(
        [3, 4, 5, 1, 9, 2], 10, "stream", "error", DEFAULT_WINDOW,
        # 3 4 3|2 1 7|2 2
        {
            "sample_index": [0, 1, 2, 2, 3, 4, 4, 5], "offset": [0, 0, 0, 3, 0, 0, 7, 0],
            "length": [3, 4, 3, 2, 1, 7, 2, 2], "pack_id": [0, 0, 0, 1, 1, 1, 2, 2], "pack_offsets": [0, 10, 20, 24],
        },
        id="stream-brief-example",
    ),
    pytest.param(
        [3, 25, 4], 10, "stream", "split", DEFAULT_WINDOW,
        # 3 7|10|8 2|2: the over-long sample is cut where the packs end, not at multiples of max_len
        {
            "sample_index": [0, 1, 1, 1, 2, 2], "offset": [0, 0, 7, 17, 0, 2], "length": [3, 7, 10, 8, 2, 2],
            "pack_id": [0, 0, 1, 2, 2, 3], "pack_offsets": [0, 10, 20, 30, 32], "num_split": 1,
        },
        id="stream-split",
    ),
    pytest.param(
        [3, 25, 4], 10, "stream", "truncate", DEFAULT_WINDOW,
        # 3 7|3 4 (the over-long sample keeps 10 tokens)
        {
            "sample_index": [0, 1, 1, 2], "offset": [0, 0, 7, 0], "length": [3, 7, 3, 4],
            "pack_id": [0, 0, 1, 1], "pack_offsets": [0, 10, 17], "num_truncated": 1,
        },
        id="stream-truncate",
    ),
    pytest.param(
        [3, 25, 4], 10, "stream", "drop", DEFAULT_WINDOW,
        {
            "sample_index": [0, 2], "length": [3, 4], "pack_id": [0, 0], "pack_offsets": [0, 7],
            "num_dropped": 1, "dropped_index": [1],
        },
        id="stream-drop",
    ),
    pytest.param(
        [5, 5, 10], 5, "stream", "split", DEFAULT_WINDOW,
        {
            "sample_index": [0, 1, 2, 2], "offset": [0, 0, 0, 5], "length": [5, 5, 5, 5],
            "pack_id": [0, 1, 2, 3], "pack_offsets": [0, 5, 10, 15, 20], "num_split": 1,
        },
        id="stream-exact-cuts",
    ),
    pytest.param(
        [2, 3], 2**63 - 1, "stream", "error", DEFAULT_WINDOW,
        {"pack_id": [0, 0], "pack_offsets": [0, 5]},
        id="stream-max-len-int64-max",
    ),
    pytest.param(
        [2, 3], 2**63 - 1, "bfd", "error", DEFAULT_WINDOW,
        {"sample_index": [0, 1], "pack_id": [0, 0], "pack_offsets": [0, 5]},
        id="bfd-max-len-int64-max",
    ),
]
# fmt: on


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("lengths, max_len, strategy, overlong, window, expected", HAND_CASES)
def test_hand_worked(lengths, max_len, strategy, overlong, window, expected, device):
    packing = pack_lengths(
        tensor(lengths, device), max_len, strategy=strategy, overlong=overlong, window=window
    )
    num_pieces = len(expected["pack_id"])
    defaults = {"offset": [0] * num_pieces, "dropped_index": []}
    if "sample_index" not in expected:
        defaults["sample_index"] = list(range(num_pieces))
    index = expected.get("sample_index", defaults.get("sample_index"))
    defaults["length"] = [lengths[i] for i in index]
    for field in ("pack_id", "sample_index", "offset", "length", "pack_offsets", "dropped_index"):
        assert_equal(getattr(packing, field), tensor(expected.get(field, defaults.get(field)), device), field)
    for field in ("num_truncated", "num_dropped", "num_split"):
        assert getattr(packing, field) == expected.get(field, 0), field
    assert packing.num_packs == len(expected["pack_offsets"]) - 1
    assert_matches_reference(packing, lengths, max_len, strategy=strategy, overlong=overlong, window=window)


def test_references_directly():
    assert best_fit_decreasing_reference([3, 4, 5, 1, 9, 2], 10) == [0, 1, 1, 1, 2, 0]
    assert best_fit_decreasing_reference([], 10) == []
    assert window_best_fit_reference([3, 4, 5, 1, 9, 2], 10, 3) == [0, 1, 1, 2, 2, 3]
    assert window_best_fit_reference([3, 4, 5, 1, 9, 2], 10, 100) == best_fit_decreasing_reference(
        [3, 4, 5, 1, 9, 2], 10
    )
    assert stream_reference([3, 12], 10) == {
        "pack_id": [0, 0, 1],
        "item": [0, 1, 1],
        "offset": [0, 0, 7],
        "length": [3, 7, 5],
    }
    with pytest.raises(ValueError, match=r"lengths\[1\] = 11 is outside"):
        best_fit_decreasing_reference([3, 11], 10)
    with pytest.raises(ValueError, match="window must be >= 1"):
        window_best_fit_reference([3], 10, 0)
    with pytest.raises(ValueError, match=r"lengths\[0\] = 0 is not positive"):
        stream_reference([0], 10)
    with pytest.raises(ValueError, match="strategy must be one of"):
        pack_lengths_reference([1], 10, strategy="ffd")


def test_bfd_is_not_always_better_than_next_fit():
    """A known fact, kept here so that nobody "fixes" it: BFD is a heuristic, not optimal.

    Next fit packs 4+6+2 | 2+7+3 perfectly; BFD takes 7, 6, 4 -> (7+4) (6+3+2) and the last 2 opens a third pack.
    """
    lengths = [4, 6, 2, 2, 7, 3]
    assert max(next_fit_pack_ids_reference(lengths, 12)) + 1 == 2
    assert pack_lengths(lengths, 12, strategy="next_fit").num_packs == 2
    assert pack_lengths(lengths, 12, strategy="bfd").num_packs == 3


# ================================================================================== fast paths vs references

KINDS = ["uniform", "lognormal", "all-max-len", "all-ones", "small", "bimodal"]


def best_fit_expected(lengths: list[int], max_len: int, window: int | None):
    pack_of = (
        best_fit_decreasing_reference(lengths, max_len)
        if window is None or window >= len(lengths)
        else window_best_fit_reference(lengths, max_len, window)
    )
    order = sorted(range(len(lengths)), key=lambda i: (pack_of[i], i))
    return order, [pack_of[i] for i in order]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n, max_len", [(1, 1), (2, 3), (7, 10), (300, 64), (1000, 2048)], ids=str)
@pytest.mark.parametrize("window", [None, 1, 3, 64], ids=lambda w: f"window{w}")
def test_best_fit_op_python_reference_agree(kind, n, max_len, window):
    lengths = make_lengths(kind, n, max_len, seed=n * 7 + max_len)
    expected_order, expected_pack = best_fit_expected(lengths.tolist(), max_len, window)
    python_order, python_pack = best_fit_decreasing_python(lengths.tolist(), max_len, window)
    assert (python_order, python_pack) == (expected_order, expected_pack)
    if not _ext.has_extension():
        return
    result = best_fit_decreasing(lengths, max_len, window=window, backend="op")
    assert_equal(result.order, tensor(expected_order), "order")
    assert_equal(result.pack_id, tensor(expected_pack), "pack_id")
    assert_equal(result.length, lengths[result.order], "length")
    expected_offsets = torch.zeros(expected_pack[-1] + 2, dtype=I64)
    expected_offsets.index_add_(0, result.pack_id + 1, result.length)
    assert_equal(result.pack_offsets, torch.cumsum(expected_offsets, 0), "pack_offsets")


@needs_extension
@pytest.mark.parametrize("max_len", [2048, 2**21, 2**40], ids=lambda m: f"max{m}")
@pytest.mark.parametrize("window", [None, 1024])
def test_best_fit_op_matches_python_large(max_len, window):
    """Dense (counting sort + bitmask tree) and sparse (std::map) buckets, global and windowed."""
    lengths = lognormal_lengths(30_000, mean=512, max_len=2048, seed=max_len % 97)
    if max_len > 2048:
        lengths = lengths * (max_len // 4096)  # spread the lengths over the large capacity
    result = best_fit_decreasing(lengths, max_len, window=window, backend="op")
    order, pack_id = best_fit_decreasing_python(lengths.tolist(), max_len, window)
    assert_equal(result.order, tensor(order), "order")
    assert_equal(result.pack_id, tensor(pack_id), "pack_id")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n, max_len", [(1, 1), (2, 3), (7, 10), (300, 64), (1000, 2048)], ids=str)
def test_stream_op_torch_reference_agree(kind, n, max_len):
    lengths = make_lengths(kind, n, max_len, seed=n * 11 + max_len)
    if kind == "uniform":
        lengths = lengths * 3  # over-long items too: the stream cuts them
    expected = stream_reference(lengths.tolist(), max_len)
    implementations = [("torch", stream_pack_torch(lengths, max_len))]
    if _ext.has_extension():
        implementations.append(("op", stream_pack(lengths, max_len, backend="op")))
    for name, cut in implementations:
        assert_equal(cut.item, tensor(expected["item"]), f"{name} item")
        assert_equal(cut.offset, tensor(expected["offset"]), f"{name} offset")
        assert_equal(cut.length, tensor(expected["length"]), f"{name} length")
        assert_equal(cut.pack_id, tensor(expected["pack_id"]), f"{name} pack_id")


@needs_extension
def test_stream_op_matches_torch_large():
    lengths = lognormal_lengths(200_003, mean=700, max_len=5000, seed=2)
    op, torch_cut = stream_pack(lengths, 2048, backend="op"), stream_pack_torch(lengths, 2048)
    for field, a, b in zip(op._fields, op, torch_cut):
        assert_equal(a, b, field)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
@pytest.mark.parametrize("overlong", ["truncate", "drop", "split"])
@pytest.mark.parametrize("n, max_len", [(1, 1), (5, 3), (200, 16), (2000, 512)], ids=str)
def test_pack_lengths_matches_reference(strategy, overlong, n, max_len, device, poison_empty):
    generator = torch.Generator().manual_seed(n + max_len)
    lengths = torch.randint(1, 2 * max_len + 1, (n,), generator=generator, dtype=I64)  # ~1/2 over-long
    if overlong == "drop":
        lengths[0] = 1  # at least one sample kept
    packing = pack_lengths(lengths.to(device), max_len, strategy=strategy, overlong=overlong, window=7)
    assert_matches_reference(
        packing, lengths.tolist(), max_len, strategy=strategy, overlong=overlong, window=7
    )
    for field in FIELDS:
        assert not (getattr(packing, field) == poison_empty).any(), (
            f"{field} holds the sentinel of torch.empty"
        )


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_result_dtype_device_contiguous(strategy):
    packing = pack_lengths(
        torch.tensor([3, 12, 4, 9], dtype=torch.int32), 10, strategy=strategy, overlong="split"
    )
    for field in FIELDS:
        value = getattr(packing, field)
        assert value.dtype == I64 and value.dim() == 1 and value.is_contiguous(), field
    assert type(packing.num_packs) is int and packing.num_samples == 4


# ================================================================================== fill ratios


@pytest.mark.parametrize(
    "n, max_len, seed", [(1000, 2048, 0), (20_000, 2048, 1), (20_000, 8192, 2), (5000, 512, 3)]
)
def test_fill_ratios_on_long_tailed_lengths(n, max_len, seed):
    """On realistic SFT lengths: bfd >= window_best_fit >= next_fit and fill_in_order > next_fit in fill;
    stream fills every pack but the last."""
    lengths = lognormal_lengths(n, mean=min(512, max_len / 4), max_len=max_len, seed=seed)
    fill = {s: pack_lengths(lengths, max_len, strategy=s).fill_ratio for s in ALL_STRATEGIES}
    assert fill["bfd"] >= fill["window_best_fit"] >= fill["next_fit"]
    assert fill["fill_in_order"] > fill["next_fit"]
    assert fill["bfd"] > 0.99
    stream = pack_lengths(lengths, max_len, strategy="stream")
    assert (stream.pack_lengths[:-1] == max_len).all()
    total = int(lengths.sum())
    assert stream.num_packs == -(-total // max_len)  # the fewest possible


# ================================================================================== properties (hypothesis)

lengths_strategy = st.lists(st.integers(min_value=1, max_value=120), min_size=1, max_size=100)


def check_invariants(
    packing: Packing, lengths: list[int], max_len: int, strategy: str, overlong: str
) -> None:
    check_packing_invariants(packing, lengths, max_len, overlong, strategy=strategy)


@given(
    lengths=lengths_strategy,
    max_len=st.integers(min_value=1, max_value=60),
    strategy=st.sampled_from(ALL_STRATEGIES),
    overlong=st.sampled_from(["truncate", "drop", "split"]),
    window=st.integers(min_value=1, max_value=40),
)
def test_property_invariants(lengths, max_len, strategy, overlong, window):
    if overlong == "drop" and all(length > max_len for length in lengths):
        lengths = [*lengths, 1]
    packing = pack_lengths(lengths, max_len, strategy=strategy, overlong=overlong, window=window)
    check_invariants(packing, lengths, max_len, strategy, overlong)
    assert_matches_reference(packing, lengths, max_len, strategy=strategy, overlong=overlong, window=window)
    again = pack_lengths(lengths, max_len, strategy=strategy, overlong=overlong, window=window)  # determinism
    for field in FIELDS:
        assert_equal(getattr(again, field), getattr(packing, field), field)


@given(
    lengths=st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=200),
    max_len=st.integers(min_value=50, max_value=120),
)
def test_property_bfd_fill_bound(lengths, max_len):
    """BFD <= 11/9 OPT + 4 packs (Johnson 1973) and OPT <= next fit, so BFD <= 11/9 NF + 4; all >= ceil(T/max_len).

    (BFD is not always at least as full as next fit: see test_bfd_is_not_always_better_than_next_fit.)
    """
    packs = {s: pack_lengths(lengths, max_len, strategy=s).num_packs for s in ALL_STRATEGIES}
    lower = -(-sum(lengths) // max_len)
    assert packs["stream"] == lower
    assert lower <= packs["bfd"] <= 11 * packs["next_fit"] / 9 + 4
    assert lower <= packs["window_best_fit"] and lower <= packs["next_fit"]
    assert lower <= packs["fill_in_order"]


@needs_extension
@given(
    lengths=st.lists(st.integers(min_value=1, max_value=2**40), min_size=1, max_size=40),
    max_len=st.integers(min_value=2**40, max_value=2**63 - 1),
    window=st.integers(min_value=1, max_value=50),
)
def test_property_large_values(lengths, max_len, window):
    """Sparse buckets (std::map) and stream arithmetic near the int64 limit."""
    for strategy in ALL_STRATEGIES:
        packing = pack_lengths(lengths, max_len, strategy=strategy, window=window)
        assert_matches_reference(
            packing, lengths, max_len, strategy=strategy, overlong="error", window=window
        )


# ================================================================================== bad inputs


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
@pytest.mark.parametrize(
    "lengths, max_len, kwargs, error, match",
    [
        pytest.param([], 10, {}, ValueError, "lengths is empty", id="empty"),
        pytest.param([3, 0, 2], 10, {}, ValueError, r"lengths\[1\] = 0 is not positive", id="zero"),
        pytest.param([3, -2], 10, {}, ValueError, r"lengths\[1\] = -2 is not positive", id="negative"),
        pytest.param([1.5, 2.0], 10, {}, TypeError, "integer dtype, got torch.float32", id="float"),
        pytest.param([1, 2], 0, {}, ValueError, "max_len must be a positive int, got 0", id="max-len-0"),
        pytest.param(
            [1, 2], -5, {}, ValueError, "max_len must be a positive int, got -5", id="max-len-negative"
        ),
        pytest.param(
            [1, 2], 2.0, {}, TypeError, "max_len must be a positive int, got float", id="max-len-float"
        ),
        pytest.param(
            [1, 12], 10, {}, ValueError, r"lengths\[1\] = 12 is longer than max_len=10", id="overlong"
        ),
        pytest.param(
            [1], 10, {"window": 0}, ValueError, "window must be a positive int, got 0", id="window-0"
        ),
        pytest.param(
            [1], 10, {"window": -1}, ValueError, "window must be a positive int, got -1", id="window-neg"
        ),
        pytest.param(
            [1], 10, {"window": 2.5}, TypeError, "window must be a positive int, got float", id="window-float"
        ),
        pytest.param(
            [1], 10, {"window": True}, TypeError, "window must be a positive int, got True", id="window-bool"
        ),
        pytest.param([1], 10, {"overlong": "wrap"}, ValueError, "overlong must be one of", id="bad-overlong"),
    ],
)
def test_bad_inputs(strategy, lengths, max_len, kwargs, error, match):
    with pytest.raises(error, match=match):
        pack_lengths(lengths, max_len, strategy=strategy, **kwargs)


def test_bad_backend_names():
    with pytest.raises(ValueError, match="backend must be one of"):
        best_fit_decreasing(tensor([1]), 5, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        stream_pack(tensor([1]), 5, backend="triton")


@needs_extension
@pytest.mark.parametrize(
    "op, args, match",
    [
        pytest.param(
            "best_fit_decreasing", (tensor([1, 0, 2]), 10, 5), r"lengths\[1\] = 0 is outside", id="bfd-zero"
        ),
        pytest.param(
            "best_fit_decreasing", (tensor([1, 11]), 10, 5), r"lengths\[1\] = 11 is outside", id="bfd-long"
        ),
        pytest.param(
            "best_fit_decreasing", (tensor([1]), 0, 5), "max_len must be positive", id="bfd-max-len"
        ),
        pytest.param("best_fit_decreasing", (tensor([1]), 10, 0), "window must be positive", id="bfd-window"),
        pytest.param(
            "best_fit_decreasing", (torch.tensor([1], dtype=torch.int32), 10, 5), "dtype Long", id="bfd-int32"
        ),
        pytest.param("best_fit_decreasing", (torch.ones(2, 2, dtype=I64), 10, 5), "1-D", id="bfd-2d"),
        pytest.param(
            "stream_pack", (tensor([1, 0]), 10), r"lengths\[1\] = 0 is not positive", id="stream-zero"
        ),
        pytest.param("stream_pack", (tensor([1]), 0), "max_len must be positive", id="stream-max-len"),
        pytest.param("stream_pack", (torch.ones(2, 2, dtype=I64), 10), "1-D", id="stream-2d"),
    ],
)
def test_ops_check_their_inputs(op, args, match):
    with pytest.raises(RuntimeError, match=match):
        getattr(torch.ops.tfp_kernels, op)(*args)


@needs_extension
def test_ops_empty_and_non_contiguous():
    order, pack_id, length, pack_offsets = torch.ops.tfp_kernels.best_fit_decreasing(
        torch.empty(0, dtype=I64), 5, 3
    )
    assert order.shape == pack_id.shape == length.shape == (0,) and pack_offsets.tolist() == [0]
    assert all(t.numel() == 0 for t in torch.ops.tfp_kernels.stream_pack(torch.empty(0, dtype=I64), 5))
    strided = torch.tensor([9, 99, 1, 99, 2, 99, 8, 99])[::2]  # [9, 1, 2, 8]
    result = best_fit_decreasing(strided, 10, backend="op")
    assert result.order.tolist() == [0, 1, 2, 3] and result.pack_id.tolist() == [0, 0, 1, 1]
    assert stream_pack(strided, 10, backend="op").pack_id.tolist() == [0, 0, 1, 1]  # 9+1 | 2+8


@needs_extension
@pytest.mark.parametrize(
    "op, args",
    [
        pytest.param("best_fit_decreasing", (tensor([3, 4, 5, 1, 9, 2]), 10, 1024), id="bfd"),
        pytest.param("best_fit_decreasing", (tensor(list(range(1, 60))), 64, 7), id="window"),
        pytest.param("stream_pack", (tensor([3, 25, 4]), 10), id="stream"),
    ],
)
def test_opcheck(op, args):
    torch.library.opcheck(
        getattr(torch.ops.tfp_kernels, op).default, args, test_utils=("test_schema", "test_faketensor")
    )


# ================================================================================== without the extension


@pytest.mark.parametrize("strategy", ["bfd", "window_best_fit", "stream", "fill_in_order"])
def test_fallback_without_extension(monkeypatch, strategy):
    monkeypatch.setattr(best_fit_module, "has_extension", lambda: False)
    monkeypatch.setattr(stream_module, "has_extension", lambda: False)
    monkeypatch.setattr(fill_in_order_module, "has_extension", lambda: False)
    lengths = make_lengths("lognormal", 1500, 256, seed=4)
    with pytest.warns(RuntimeWarning, match="pure-torch fallback"):
        packing = pack_lengths(lengths, 256, strategy=strategy, window=100, overlong="split")
    assert_matches_reference(packing, lengths.tolist(), 256, strategy=strategy, overlong="split", window=100)


# ================================================================================== CUDA (run on a GPU machine)


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
@pytest.mark.parametrize("overlong", OVERLONG_POLICIES)
def test_cuda_pack_lengths_matches_cpu(strategy, overlong):
    lengths = lognormal_lengths(100_000, mean=512, max_len=4096, seed=7)
    max_len = 4096 if overlong == "error" else 1024
    expected = pack_lengths(lengths, max_len, strategy=strategy, overlong=overlong, window=256)
    actual = pack_lengths(lengths.cuda(), max_len, strategy=strategy, overlong=overlong, window=256)
    for field in FIELDS:
        value = getattr(actual, field)
        assert value.device.type == "cuda", field
        assert_equal(value.cpu(), getattr(expected, field), field)
    for field in COUNTS:
        assert getattr(actual, field) == getattr(expected, field), field


@pytest.mark.gpu
@pytest.mark.parametrize("n, max_len", [(1, 1), (1000, 7), (300_001, 2048)], ids=str)
def test_cuda_stream_torch_matches_cpu(n, max_len):
    lengths = make_lengths("uniform", n, max_len, seed=n) * 2
    expected = stream_pack_torch(lengths, max_len)
    actual = stream_pack_torch(lengths.cuda(), max_len)
    for field, a, b in zip(expected._fields, actual, expected):
        assert a.device.type == "cuda"
        assert_equal(a.cpu(), b, field)
    assert_equal(stream_pack(lengths.cuda(), max_len).pack_id.cpu(), expected.pack_id, "auto on CUDA")


@pytest.mark.gpu
def test_cuda_best_fit_runs_on_host_copy():
    lengths = make_lengths("bimodal", 5000, 100, seed=3)
    expected = best_fit_decreasing(lengths, 100, window=64)
    actual = best_fit_decreasing(lengths.cuda(), 100, window=64)
    for field, a, b in zip(expected._fields, actual, expected):
        assert a.device.type == "cuda"
        assert_equal(a.cpu(), b, field)


@pytest.mark.gpu
def test_cuda_bad_lengths_named():
    for strategy in ALL_STRATEGIES:
        with pytest.raises(ValueError, match=r"lengths\[1\] = 0 is not positive"):
            pack_lengths(tensor([3, 0, 2], "cuda"), 10, strategy=strategy)
