"""Tests of tfp_kernels.packing: pack_lengths, the three next-fit implementations, the over-long policies.

The other strategies (stream, window_best_fit, bfd) are tested in test_strategies.py, pack shuffling in
test_shuffle.py.

Integer outputs are compared bit for bit (torch.equal via ``assert_equal``), never with a tolerance.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tfp_kernels import _ext
from tfp_kernels.packing import (
    OVERLONG_POLICIES,
    Packing,
    expand_overlong,
    next_fit_pack_ids,
    next_fit_pack_ids_torch,
    pack_lengths,
)
from tfp_kernels.packing import next_fit as next_fit_module
from tfp_kernels.packing.reference import (
    expand_overlong_reference,
    next_fit_pack_ids_reference,
    pack_lengths_reference,
)
from tfp_kernels.testing import (
    assert_equal,
    check_packing_invariants,
    devices,
    int_dtypes,
    lognormal_lengths,
    make_lengths,
    non_int_dtypes,
)

needs_extension = pytest.mark.skipif(not _ext.has_extension(), reason="tfp_kernels._C is not built")

I64 = torch.int64


def tensor(values, device="cpu"):
    return torch.tensor(values, dtype=I64, device=device)


def assert_packing_matches_reference(
    packing: Packing, lengths: list[int], max_len: int, overlong: str
) -> None:
    expected = pack_lengths_reference(lengths, max_len, overlong=overlong)
    device = packing.device
    for field in ("pack_id", "sample_index", "offset", "length", "pack_offsets", "dropped_index"):
        assert_equal(getattr(packing, field), tensor(expected[field], device), field)
    for field in ("num_packs", "num_truncated", "num_dropped", "num_split"):
        assert getattr(packing, field) == expected[field], field
    assert packing.max_len == max_len
    assert_equal(packing.sample_lengths, tensor(lengths, device), "sample_lengths")


# ================================================================================== hand-worked cases
# Each expectation below was worked out by hand from the definition of next fit (items in order, a new
# pack when the next item does not fit) and of the over-long policies, not by running the code.

# fmt: off
HAND_CASES = [
    # lengths, max_len, overlong, expected fields (sample_index/offset/length default to one whole piece per sample)
    pytest.param(
        [3, 4, 5, 1, 9, 2], 10, "error",
        {"pack_id": [0, 0, 1, 1, 2, 3], "pack_offsets": [0, 7, 13, 22, 24]},
        id="brief-example",  # 3+4=7 | 5+1=6 (+9 > 10) | 9 (+2 > 10) | 2
    ),
    pytest.param(
        [6, 5, 4], 10, "error",
        {"pack_id": [0, 1, 1], "pack_offsets": [0, 6, 15]},
        id="no-looking-back",  # 4 would fit after 6, but next fit only looks at the open pack
    ),
    pytest.param(
        [6, 4, 1], 10, "error",
        {"pack_id": [0, 0, 1], "pack_offsets": [0, 10, 11]},
        id="exact-fill",  # 6+4 == 10 still fits
    ),
    pytest.param(
        [5, 5, 5], 5, "error",
        {"pack_id": [0, 1, 2], "pack_offsets": [0, 5, 10, 15]},
        id="all-max-len",
    ),
    pytest.param(
        [1] * 7, 3, "error",
        {"pack_id": [0, 0, 0, 1, 1, 1, 2], "pack_offsets": [0, 3, 6, 7]},
        id="all-ones",
    ),
    pytest.param([4], 10, "error", {"pack_id": [0], "pack_offsets": [0, 4]}, id="one-sample"),
    pytest.param([1, 1], 1, "error", {"pack_id": [0, 1], "pack_offsets": [0, 1, 2]}, id="max-len-1"),
    pytest.param(
        [2, 3], 2**63 - 1, "error",
        {"pack_id": [0, 0], "pack_offsets": [0, 5]},
        id="max-len-int64-max",
    ),
    pytest.param(
        [3, 12, 4], 10, "truncate",
        {
            "pack_id":      [0, 1, 2],
            "sample_index": [0, 1, 2],
            "offset":       [0, 0, 0],
            "length":       [3, 10, 4],
            "pack_offsets": [0, 3, 13, 17],
            "num_truncated": 1,
        },
        id="truncate",  # 3 | 10 | 4
    ),
    pytest.param(
        [3, 12, 4, 11, 2], 10, "drop",
        {
            "pack_id":       [0, 0, 0],
            "sample_index":  [0, 2, 4],
            "offset":        [0, 0, 0],
            "length":        [3, 4, 2],
            "pack_offsets":  [0, 9],
            "num_dropped":   2,
            "dropped_index": [1, 3],
        },
        id="drop",  # 3+4+2 = 9
    ),
    pytest.param(
        [3, 25, 4], 10, "split",
        {
            "pack_id":      [0, 1, 2, 3, 3],
            "sample_index": [0, 1, 1, 1, 2],
            "offset":       [0, 0, 10, 20, 0],
            "length":       [3, 10, 10, 5, 4],
            "pack_offsets": [0, 3, 13, 23, 32],
            "num_split":    1,
        },
        id="split",  # 3 | 10 | 10 | 5+4
    ),
    pytest.param(
        [20], 10, "split",
        {
            "pack_id":      [0, 1],
            "sample_index": [0, 0],
            "offset":       [0, 10],
            "length":       [10, 10],
            "pack_offsets": [0, 10, 20],
            "num_split":    1,
        },
        id="split-exact-multiple",
    ),
    pytest.param(
        [11, 1, 7, 23], 10, "split",
        {
            "pack_id":      [0, 1, 1, 1, 2, 3, 4],
            "sample_index": [0, 0, 1, 2, 3, 3, 3],
            "offset":       [0, 10, 0, 0, 0, 10, 20],
            "length":       [10, 1, 1, 7, 10, 10, 3],
            "pack_offsets": [0, 10, 19, 29, 39, 42],
            "num_split":    2,
        },
        id="split-two",  # 10 | 1+1+7 | 10 | 10 | 3
    ),
    pytest.param(
        [11, 12], 10, "drop",
        {
            "pack_id": [], "sample_index": [], "offset": [], "length": [], "pack_offsets": [0],
            "num_dropped": 2, "dropped_index": [0, 1],
        },
        id="drop-everything",
    ),
    pytest.param(
        [2, 3], 5, "split",
        {"pack_id": [0, 0], "pack_offsets": [0, 5]},
        id="policy-unused",
    ),
]
# fmt: on


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("lengths, max_len, overlong, expected", HAND_CASES)
def test_hand_worked(lengths, max_len, overlong, expected, device):
    packing = pack_lengths(tensor(lengths, device), max_len, overlong=overlong)
    n = len(lengths)
    defaults = {"sample_index": list(range(n)), "offset": [0] * n, "length": lengths, "dropped_index": []}
    for field in ("pack_id", "sample_index", "offset", "length", "pack_offsets", "dropped_index"):
        values = expected.get(field, defaults.get(field))
        assert_equal(getattr(packing, field), tensor(values, device), field)
    for field in ("num_truncated", "num_dropped", "num_split"):
        assert getattr(packing, field) == expected.get(field, 0), field
    assert packing.num_packs == len(expected["pack_offsets"]) - 1
    assert_packing_matches_reference(packing, lengths, max_len, overlong)


def test_hand_worked_reference_directly():
    assert next_fit_pack_ids_reference([3, 4, 5, 1, 9, 2], 10) == [0, 0, 1, 1, 2, 3]
    assert next_fit_pack_ids_reference([], 10) == []
    split = expand_overlong_reference([3, 25], 10, "split")
    assert (split["sample_index"], split["offset"], split["length"]) == (
        [0, 1, 1, 1],
        [0, 0, 10, 20],
        [3, 10, 10, 5],
    )
    with pytest.raises(ValueError, match=r"lengths\[1\] = 25"):
        expand_overlong_reference([3, 25], 10, "error")


def test_packing_properties():
    packing = pack_lengths([3, 4, 5, 1, 9, 2], 10)
    assert packing.num_pieces == 6
    assert packing.num_tokens == 24
    assert packing.fill_ratio == pytest.approx(24 / 40)
    assert_equal(packing.pack_lengths, tensor([7, 6, 9, 2]), "pack_lengths")
    assert_equal(packing.piece_offsets, tensor([0, 3, 7, 12, 13, 22, 24]), "piece_offsets")
    assert_equal(packing.pack_piece_offsets, tensor([0, 2, 4, 5, 6]), "pack_piece_offsets")
    assert packing.device == torch.device("cpu")
    text = repr(packing)
    assert len(text) < 200 and "4 packs" in text and "fill 0.6000" in text
    with pytest.raises(dataclasses.FrozenInstanceError):
        packing.num_packs = 3  # type: ignore[misc]
    empty = pack_lengths([11], 10, overlong="drop")
    assert empty.num_packs == 0 and empty.num_tokens == 0 and empty.fill_ratio == 0.0
    assert_equal(empty.pack_piece_offsets, tensor([0]), "pack_piece_offsets")


# ================================================================================== three implementations agree

KINDS = ["uniform", "lognormal", "all-max-len", "all-ones", "mostly-small"]


SIZES = [1, 2, 3, 7, 64, 1023, 1024, 1025, 4097]
MAX_LENS = [1, 2, 10, 2048]


@needs_extension
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"n{n}")
@pytest.mark.parametrize("max_len", MAX_LENS, ids=lambda m: f"max{m}")
def test_op_torch_reference_agree(kind, n, max_len):
    lengths = make_lengths(kind, n, max_len, seed=n * 31 + max_len)
    expected = tensor(next_fit_pack_ids_reference(lengths.tolist(), max_len))
    assert_equal(torch.ops.tfp_kernels.next_fit_pack_ids(lengths, max_len), expected, "C++ op")
    assert_equal(next_fit_pack_ids_torch(lengths, max_len), expected, "pure-torch pointer jumping")


@needs_extension
@pytest.mark.parametrize("n", [100_000, 300_001])
def test_op_torch_agree_large(n):
    lengths = lognormal_lengths(n, mean=512, max_len=2048, seed=n)
    op_ids = torch.ops.tfp_kernels.next_fit_pack_ids(lengths, 2048)
    assert_equal(next_fit_pack_ids_torch(lengths, 2048), op_ids, "pure-torch vs C++ op")
    if n == 100_000:
        assert_equal(
            op_ids, tensor(next_fit_pack_ids_reference(lengths.tolist(), 2048)), "C++ op vs reference"
        )


def test_torch_implementation_empty_and_noncontiguous():
    assert next_fit_pack_ids_torch(torch.empty(0, dtype=I64), 5).shape == (0,)
    lengths = torch.tensor([3, 99, 4, 99, 5, 99, 1, 99], dtype=I64)[::2]
    assert_equal(next_fit_pack_ids_torch(lengths, 8), tensor([0, 0, 1, 1]), "strided input")


@pytest.mark.parametrize("backend", ["auto", "torch", pytest.param("op", marks=needs_extension)])
def test_next_fit_pack_ids_backends(backend):
    lengths = make_lengths("uniform", 500, 50, seed=1)
    expected = tensor(next_fit_pack_ids_reference(lengths.tolist(), 50))
    assert_equal(next_fit_pack_ids(lengths, 50, backend=backend), expected, backend)


def test_next_fit_pack_ids_bad_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        next_fit_pack_ids(tensor([1]), 5, backend="triton")


def test_fallback_without_extension(monkeypatch):
    """pack_lengths works (with a RuntimeWarning) when the compiled extension is missing."""
    monkeypatch.setattr(next_fit_module, "has_extension", lambda: False)
    monkeypatch.setattr(next_fit_module, "has_cuda_ops", lambda: False)
    lengths = make_lengths("lognormal", 2000, 256, seed=3)
    with pytest.warns(RuntimeWarning, match="pure-torch fallback"):
        packing = pack_lengths(lengths, 256)
    assert_equal(
        packing.pack_id, tensor(next_fit_pack_ids_reference(lengths.tolist(), 256)), "fallback pack_id"
    )


def test_no_warning_with_extension():
    if not _ext.has_extension():
        pytest.skip("tfp_kernels._C is not built")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pack_lengths([1, 2, 3], 4)


# ================================================================================== pack_lengths vs reference


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("overlong", ["truncate", "drop", "split"])
@pytest.mark.parametrize("n, max_len", [(1, 1), (1, 7), (5, 3), (200, 16), (3000, 512)], ids=str)
def test_pack_lengths_matches_reference(overlong, n, max_len, device, poison_empty):
    generator = torch.Generator().manual_seed(n + max_len)
    lengths = torch.randint(1, 3 * max_len + 1, (n,), generator=generator, dtype=I64)  # ~2/3 over-long
    packing = pack_lengths(lengths.to(device), max_len, overlong=overlong)
    assert_packing_matches_reference(packing, lengths.tolist(), max_len, overlong)
    for field in ("pack_id", "sample_index", "offset", "length", "pack_offsets", "dropped_index"):
        assert not (getattr(packing, field) == poison_empty).any(), (
            f"{field} holds the sentinel of torch.empty"
        )


def test_expand_overlong_computes_missing_counts():
    lengths = tensor([3, 25, 4, 10, 11])
    result = expand_overlong(lengths, 10, "split")
    expected = expand_overlong_reference(lengths.tolist(), 10, "split")
    assert_equal(result.pieces.sample_index, tensor(expected["sample_index"]), "sample_index")
    assert_equal(result.pieces.offset, tensor(expected["offset"]), "offset")
    assert_equal(result.pieces.length, tensor(expected["length"]), "length")
    assert result.num_split == 2
    with pytest.raises(ValueError, match="overlong"):
        expand_overlong(lengths, 10, "error")


# ================================================================================== input types


@pytest.mark.parametrize("dtype", int_dtypes, ids=str)
def test_integer_dtypes(dtype):
    packing = pack_lengths(torch.tensor([3, 4, 5, 1, 9, 2], dtype=dtype), 10)
    assert_equal(packing.pack_id, tensor([0, 0, 1, 1, 2, 3]), "pack_id")
    assert packing.length.dtype == I64


@pytest.mark.parametrize(
    "lengths",
    [
        pytest.param([3, 4, 5, 1, 9, 2], id="list"),
        pytest.param((3, 4, 5, 1, 9, 2), id="tuple"),
        pytest.param(np.array([3, 4, 5, 1, 9, 2], dtype=np.int32), id="numpy-int32"),
        pytest.param(np.array([3, 4, 5, 1, 9, 2], dtype=np.uint16), id="numpy-uint16"),
        pytest.param(torch.tensor([3, 99, 4, 99, 5, 99, 1, 99, 9, 99, 2, 99])[::2], id="non-contiguous"),
    ],
)
def test_input_containers(lengths):
    packing = pack_lengths(lengths, 10)
    assert_equal(packing.pack_id, tensor([0, 0, 1, 1, 2, 3]), "pack_id")
    assert_equal(packing.pack_offsets, tensor([0, 7, 13, 22, 24]), "pack_offsets")


@pytest.mark.parametrize("max_len", [10, np.int64(10), torch.tensor(10)], ids=["int", "numpy", "tensor-0d"])
def test_max_len_integer_types(max_len):
    packing = pack_lengths([3, 4, 5, 1, 9, 2], max_len)
    assert packing.max_len == 10 and type(packing.max_len) is int


@pytest.mark.parametrize("device", devices)
def test_result_device_and_dtype(device):
    packing = pack_lengths(torch.tensor([3, 12, 4], dtype=torch.int32, device=device), 10, overlong="drop")
    for field in ("pack_id", "sample_index", "offset", "length", "pack_offsets", "dropped_index"):
        value = getattr(packing, field)
        assert value.device.type == device and value.dtype == I64 and value.dim() == 1, field
        assert value.is_contiguous(), field


# ================================================================================== bad inputs


@pytest.mark.parametrize(
    "lengths, error, match",
    [
        pytest.param(torch.tensor([], dtype=I64), ValueError, "lengths is empty", id="empty-tensor"),
        pytest.param([], ValueError, "lengths is empty", id="empty-list"),
        pytest.param(np.array([], dtype=np.int64), ValueError, "lengths is empty", id="empty-numpy"),
        pytest.param([3, 0, 2], ValueError, r"lengths\[1\] = 0 is not positive \(1 of 3", id="zero"),
        pytest.param(
            tensor([3, 2, -4, 0]), ValueError, r"lengths\[2\] = -4 is not positive \(2 of 4", id="negative"
        ),
        pytest.param(torch.ones(2, 3, dtype=I64), ValueError, r"lengths must be 1-D.*\(2, 3\)", id="2-D"),
        pytest.param(torch.tensor(5), ValueError, r"lengths must be 1-D.*\(\)", id="0-D"),
        pytest.param([[1, 2], [3, 4]], ValueError, "lengths must be 1-D", id="nested-list"),
        pytest.param(
            [1.5, 2.0], TypeError, "lengths must have an integer dtype, got torch.float32", id="float-list"
        ),
        pytest.param(
            [True, False], TypeError, "lengths must have an integer dtype, got torch.bool", id="bool-list"
        ),
        pytest.param(
            np.array([1.0, 2.0]), TypeError, "lengths must hold integers.*float64", id="numpy-float"
        ),
        pytest.param(np.array([True]), TypeError, "lengths must hold integers.*bool", id="numpy-bool"),
        pytest.param(["a", "b"], TypeError, "lengths must be a 1-D integer tensor", id="strings"),
        pytest.param(None, TypeError, "lengths must be", id="none"),
    ],
)
def test_bad_lengths(lengths, error, match):
    with pytest.raises(error, match=match):
        pack_lengths(lengths, 10)


@pytest.mark.parametrize("dtype", non_int_dtypes, ids=str)
def test_non_integer_dtypes(dtype):
    with pytest.raises(TypeError, match=f"lengths must have an integer dtype, got {dtype}"):
        pack_lengths(torch.ones(3, dtype=dtype), 10)


@pytest.mark.parametrize(
    "max_len, error, match",
    [
        pytest.param(0, ValueError, "max_len must be a positive int, got 0", id="zero"),
        pytest.param(-3, ValueError, "max_len must be a positive int, got -3", id="negative"),
        pytest.param(2**63, ValueError, "max_len must fit in int64", id="too-big"),
        pytest.param(10.0, TypeError, "max_len must be a positive int, got float", id="float"),
        pytest.param(True, TypeError, "max_len must be a positive int, got True", id="bool"),
        pytest.param("10", TypeError, "max_len must be a positive int, got str", id="str"),
        pytest.param(None, TypeError, "max_len must be a positive int, got NoneType", id="none"),
        pytest.param(torch.tensor(10.0), TypeError, "max_len must be a positive int", id="float-tensor"),
    ],
)
def test_bad_max_len(max_len, error, match):
    with pytest.raises(error, match=match):
        pack_lengths([1, 2, 3], max_len)


def test_overlong_error_names_first_sample_and_count():
    with pytest.raises(ValueError, match=r"lengths\[1\] = 12 is longer than max_len=10 \(2 of 4 samples"):
        pack_lengths([3, 12, 4, 15], 10)
    with pytest.raises(ValueError, match=r"lengths\[1\] = 12 is longer than max_len=10"):
        pack_lengths([3, 12, 4, 15], 10, overlong="error")


def test_bad_policy_and_strategy():
    with pytest.raises(
        ValueError, match=r"overlong must be one of \['error', 'truncate', 'drop', 'split'\], got 'clip'"
    ):
        pack_lengths([1, 2], 10, overlong="clip")
    with pytest.raises(
        ValueError,
        match=r"strategy must be one of \['stream', 'next_fit', 'window_best_fit', 'bfd', 'fill_in_order'\], "
        r"got 'first_fit'",
    ):
        pack_lengths([1, 2], 10, strategy="first_fit")
    with pytest.raises(ValueError, match="strategy must be one of"):
        pack_lengths([1, 2], 10, strategy=None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        pack_lengths([1, 2], 10, "next_fit")  # type: ignore[misc]  # options are keyword-only


# ================================================================================== properties (hypothesis)

lengths_strategy = st.lists(st.integers(min_value=1, max_value=120), min_size=1, max_size=120)
max_len_strategy = st.integers(min_value=1, max_value=60)


def check_invariants(packing: Packing, lengths: list[int], max_len: int, overlong: str) -> None:
    check_packing_invariants(packing, lengths, max_len, overlong, strategy="next_fit")


@given(
    lengths=lengths_strategy,
    max_len=max_len_strategy,
    overlong=st.sampled_from(["truncate", "drop", "split"]),
)
def test_property_invariants(lengths, max_len, overlong):
    packing = pack_lengths(lengths, max_len, overlong=overlong)
    check_invariants(packing, lengths, max_len, overlong)
    assert_packing_matches_reference(packing, lengths, max_len, overlong)
    again = pack_lengths(lengths, max_len, overlong=overlong)  # determinism
    for field in ("pack_id", "sample_index", "offset", "length", "pack_offsets", "dropped_index"):
        assert_equal(getattr(again, field), getattr(packing, field), field)


@given(
    lengths=st.lists(st.integers(min_value=1, max_value=60), min_size=1, max_size=300),
    max_len=st.integers(60, 200),
)
def test_property_no_overlong(lengths, max_len):
    packing = pack_lengths(lengths, max_len)
    check_invariants(packing, lengths, max_len, "error")
    assert packing.sample_index.tolist() == list(range(len(lengths)))


@needs_extension
@given(
    lengths=st.lists(st.integers(min_value=1, max_value=2**40), min_size=1, max_size=60),
    max_len=st.integers(min_value=2**40, max_value=2**63 - 1),
)
def test_property_three_implementations_agree_large_values(lengths, max_len):
    lengths_tensor = tensor(lengths)
    expected = tensor(next_fit_pack_ids_reference(lengths, max_len))
    assert_equal(torch.ops.tfp_kernels.next_fit_pack_ids(lengths_tensor, max_len), expected, "C++ op")
    assert_equal(next_fit_pack_ids_torch(lengths_tensor, max_len), expected, "pure torch")


@needs_extension
@given(
    lengths=st.lists(st.integers(min_value=1, max_value=30), min_size=1, max_size=400),
    max_len=st.integers(30, 100),
)
def test_property_op_torch_reference_agree(lengths, max_len):
    lengths_tensor = tensor(lengths)
    expected = tensor(next_fit_pack_ids_reference(lengths, max_len))
    assert_equal(torch.ops.tfp_kernels.next_fit_pack_ids(lengths_tensor, max_len), expected, "C++ op")
    assert_equal(next_fit_pack_ids_torch(lengths_tensor, max_len), expected, "pure torch")


def test_overlong_policies_constant():
    assert OVERLONG_POLICIES == ("error", "truncate", "drop", "split")


# ================================================================================== CUDA (run on a GPU machine)

GPU_CASES = [
    pytest.param(kind, n, max_len, id=f"{kind}-n{n}-max{max_len}")
    for kind, n, max_len in [
        ("uniform", 1, 1),
        ("uniform", 1, 2048),
        ("all-ones", 5, 1),
        ("all-max-len", 1000, 7),
        ("all-ones", 100_003, 2048),
        ("uniform", 4097, 10),
        ("mostly-small", 65_537, 4096),
        ("lognormal", 1_000_000, 2048),
        ("uniform", 1_000_000, 3),
    ]
]


@pytest.mark.gpu
@pytest.mark.parametrize("kind, n, max_len", GPU_CASES)
def test_cuda_op_matches_cpu(kind, n, max_len):
    if not _ext.has_cuda_ops():
        pytest.skip("tfp_kernels._C was built without CUDA ops")
    lengths = make_lengths(kind, n, max_len, seed=n + max_len)
    expected = torch.ops.tfp_kernels.next_fit_pack_ids(lengths, max_len)
    actual = torch.ops.tfp_kernels.next_fit_pack_ids(lengths.cuda(), max_len)
    assert actual.device.type == "cuda"
    assert_equal(actual.cpu(), expected, "CUDA op vs CPU op")


@pytest.mark.gpu
@pytest.mark.parametrize("kind, n, max_len", GPU_CASES)
def test_cuda_torch_implementation_matches_cpu(kind, n, max_len):
    lengths = make_lengths(kind, n, max_len, seed=n + max_len)
    expected = next_fit_pack_ids_torch(lengths, max_len)
    assert_equal(
        next_fit_pack_ids_torch(lengths.cuda(), max_len).cpu(), expected, "pure torch on CUDA vs CPU"
    )


@pytest.mark.gpu
@pytest.mark.parametrize("overlong", OVERLONG_POLICIES)
def test_cuda_pack_lengths_matches_cpu(overlong):
    lengths = lognormal_lengths(200_000, mean=512, max_len=4096, seed=5)
    max_len = 4096 if overlong == "error" else 1024
    expected = pack_lengths(lengths, max_len, overlong=overlong)
    actual = pack_lengths(lengths.cuda(), max_len, overlong=overlong)
    assert actual.device.type == "cuda"
    for field in ("pack_id", "sample_index", "offset", "length", "pack_offsets", "dropped_index"):
        assert_equal(getattr(actual, field).cpu(), getattr(expected, field), field)
    for field in ("num_packs", "num_truncated", "num_dropped", "num_split"):
        assert getattr(actual, field) == getattr(expected, field), field


@pytest.mark.gpu
def test_cuda_op_rejects_bad_lengths():
    if not _ext.has_cuda_ops():
        pytest.skip("tfp_kernels._C was built without CUDA ops")
    with pytest.raises(RuntimeError, match="max_len"):
        torch.ops.tfp_kernels.next_fit_pack_ids(tensor([1, 11], "cuda"), 10)
    assert torch.ops.tfp_kernels.next_fit_pack_ids(torch.empty(0, dtype=I64, device="cuda"), 10).shape == (0,)


def test_import_and_pack_without_extension():
    """In a fresh interpreter where tfp_kernels._C cannot be imported, pack_lengths falls back to pure torch."""
    import subprocess
    import sys

    code = (
        "import sys, warnings\n"
        "sys.modules['tfp_kernels._C'] = None\n"  # makes `from . import _C` raise ImportError
        "from tfp_kernels import _ext\n"
        "from tfp_kernels.packing import pack_lengths\n"
        "assert not _ext.has_extension()\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    packing = pack_lengths([3, 4, 5, 1, 9, 2], 10)\n"
        "assert packing.pack_id.tolist() == [0, 0, 1, 1, 2, 3], packing.pack_id\n"
        "assert any('pure-torch fallback' in str(w.message) for w in caught), [str(w.message) for w in caught]\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.gpu
def test_cuda_bad_lengths_named():
    with pytest.raises(ValueError, match=r"lengths\[1\] = 0 is not positive"):
        pack_lengths(tensor([3, 0, 2], "cuda"), 10)
    with pytest.raises(ValueError, match=r"lengths\[2\] = 12 is longer than max_len=10 \(1 of 3"):
        pack_lengths(tensor([3, 1, 12], "cuda"), 10)
    with pytest.raises(TypeError, match="integer dtype"):
        pack_lengths(torch.ones(3, device="cuda"), 10)
    packing = pack_lengths(torch.tensor([3, 12, 4], dtype=torch.int32, device="cuda"), 10, overlong="drop")
    assert packing.dropped_index.device.type == "cuda" and packing.dropped_index.tolist() == [1]
