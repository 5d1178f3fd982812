"""varlen_attention: every available backend against the float32 reference, gradients, and the checks of
cu_seqlens / max_seqlen."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tfp_kernels import assemble, pack_lengths
from tfp_kernels.attention import (
    available_backends,
    check_cu_seqlens,
    sdpa_varlen_attention,
    varlen_attention,
)
from tfp_kernels.attention.reference import varlen_attention_reference

CPU_BACKENDS = [b for b in available_backends("cpu") if b != "reference"]

# (segment lengths, query heads, kv heads, head dim); T is never a multiple of anything useful
CASES = [
    pytest.param([7], 2, 2, 8, id="one-segment"),
    pytest.param([1] * 13, 2, 1, 4, id="13-length-1"),
    pytest.param([5, 1, 17, 3, 2], 4, 2, 8, id="odd-gqa2"),
    pytest.param([3, 0, 4, 0, 0, 6], 3, 1, 5, id="empty-segments-gqa3"),
    pytest.param([600, 3, 1, 2], 2, 2, 4, id="long-segment"),
]

# dtype and tolerance against the float32 reference run on the same (rounded) inputs
DTYPES = [
    pytest.param(torch.float32, 2e-5, id="fp32"),
    pytest.param(torch.bfloat16, 3e-2, id="bf16"),
]


def _cu(lengths, device="cpu") -> torch.Tensor:
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0).to(torch.int32)
    return cu.to(device)


def _qkv(num_tokens, heads, kv_heads, dim, dtype=torch.float32, device="cpu", seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    tensors = [
        torch.randn(num_tokens, h, dim, generator=gen).to(device=device, dtype=dtype)
        for h in (heads, kv_heads, kv_heads)
    ]
    return [t.requires_grad_(requires_grad) for t in tensors]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype, atol", DTYPES)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("lengths, heads, kv_heads, dim", CASES)
def test_backend_matches_reference(backend, dtype, atol, causal, lengths, heads, kv_heads, dim):
    cu = _cu(lengths)
    q, k, v = _qkv(sum(lengths), heads, kv_heads, dim, dtype)
    out = varlen_attention(q, k, v, cu_seqlens=cu, max_seqlen=max(lengths), causal=causal, backend=backend)
    ref = varlen_attention_reference(q, k, v, cu, causal=causal)
    assert out.shape == q.shape and out.dtype == dtype and out.device == q.device
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=atol)


def test_segments_do_not_see_each_other():
    """Changing one segment's keys/values leaves every other segment's output unchanged, bit for bit."""
    lengths = [4, 6, 5]
    cu = _cu(lengths)
    q, k, v = _qkv(15, 2, 2, 8)
    out = varlen_attention(q, k, v, cu_seqlens=cu)
    k2, v2 = k.clone(), v.clone()
    k2[4:10] += 3.0
    v2[4:10] -= 5.0
    out2 = varlen_attention(q, k2, v2, cu_seqlens=cu)
    assert torch.equal(out[:4], out2[:4]) and torch.equal(out[10:], out2[10:])
    assert not torch.allclose(out[4:10], out2[4:10])


def test_causal_first_token_sees_itself_only():
    cu = _cu([3, 5, 2])
    q, k, v = _qkv(10, 2, 1, 4)
    out = varlen_attention(q, k, v, cu_seqlens=cu)
    for start in (0, 3, 8):  # the first token of a segment attends to itself: its output is its value
        torch.testing.assert_close(out[start], v[start].expand(2, 4), atol=1e-6, rtol=0)


def test_softmax_scale():
    cu = _cu([5, 4])
    q, k, v = _qkv(9, 2, 2, 8)
    out = varlen_attention(q, k, v, cu_seqlens=cu, softmax_scale=0.05)
    ref = varlen_attention_reference(q, k, v, cu, softmax_scale=0.05)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    assert not torch.allclose(out, varlen_attention(q, k, v, cu_seqlens=cu), atol=1e-3)


@pytest.mark.parametrize("block", [1, 3, 4, 1000])
def test_sdpa_chunking(block):
    """Every way the chunking can cut: long segments alone, short ones grouped, empty ones skipped."""
    lengths = [3, 1, 9, 2, 0, 2, 1, 4, 4, 1]
    cu = _cu(lengths)
    q, k, v = _qkv(sum(lengths), 4, 2, 8)
    out = sdpa_varlen_attention(q, k, v, cu, block_tokens=block)
    torch.testing.assert_close(out, varlen_attention_reference(q, k, v, cu), atol=2e-5, rtol=2e-5)


@given(
    lengths=st.lists(st.integers(0, 12), min_size=1, max_size=12).filter(lambda x: sum(x) > 0),
    block=st.integers(1, 16),
    causal=st.booleans(),
)
def test_sdpa_chunking_property(lengths, block, causal):
    cu = _cu(lengths)
    q, k, v = _qkv(sum(lengths), 2, 1, 4, seed=len(lengths))
    out = sdpa_varlen_attention(q, k, v, cu, block_tokens=block, causal=causal)
    ref = varlen_attention_reference(q, k, v, cu, causal=causal)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("lengths, heads, kv_heads, dim", CASES[1:4])
def test_gradients_match_reference(backend, lengths, heads, kv_heads, dim):
    cu = _cu(lengths)
    q, k, v = _qkv(sum(lengths), heads, kv_heads, dim, requires_grad=True)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    out = varlen_attention(q, k, v, cu_seqlens=cu, backend=backend)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref = varlen_attention_reference(q, k, v, cu)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    for name, g, r in zip("qkv", grads, ref_grads):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"grad {n}: {m}")


def test_gradcheck_sdpa_float64():
    cu = _cu([3, 1, 4])
    q, k, v = _qkv(8, 2, 1, 3, dtype=torch.float64, requires_grad=True)

    def fn(q, k, v):
        return sdpa_varlen_attention(q, k, v, cu, block_tokens=2)

    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("attention", ["pack", "sample"])
def test_packed_batch_input(attention):
    """``varlen_attention(q, k, v, batch)`` reads cu_seqlens / max_seqlen (and the host copy) from a PackedBatch."""
    samples = [torch.arange(n) for n in (5, 3, 7, 2, 6)]
    batch = assemble(samples, pack_lengths([5, 3, 7, 2, 6], max_len=10), attention=attention)
    q, k, v = _qkv(batch.num_tokens, 4, 2, 8)
    out = varlen_attention(q, k, v, batch)
    explicit = varlen_attention(q, k, v, cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen)
    assert torch.equal(out, explicit)
    torch.testing.assert_close(out, varlen_attention_reference(q, k, v, batch.cu_seqlens), atol=2e-5, rtol=0)


def test_validate_false():
    cu = _cu([4, 5])
    q, k, v = _qkv(9, 2, 2, 4)
    out = varlen_attention(q, k, v, cu_seqlens=cu, validate=False)
    assert torch.equal(out, varlen_attention(q, k, v, cu_seqlens=cu))


def test_available_backends():
    assert available_backends("cpu") == ["sdpa", "reference"]
    cuda = available_backends("cuda")
    assert cuda[-2:] == ["sdpa", "reference"]
    assert set(cuda) <= {"flash_attn", "torch_varlen", "sdpa", "reference"}


# ---------------------------------------------------------------------------------------- bad input


def _int32(values):
    return torch.tensor(values, dtype=torch.int32)


BAD_CU_SEQLENS = [
    pytest.param([0, 3, 9], TypeError, "torch.Tensor", id="list"),
    pytest.param(torch.tensor([0, 3, 9]), TypeError, "int32", id="int64"),
    pytest.param(torch.tensor([0.0, 3.0, 9.0]), TypeError, "int32", id="float"),
    pytest.param(_int32([[0, 3, 9]]), ValueError, "1-D", id="2d"),
    pytest.param(_int32([0]), ValueError, "at least 2", id="one-entry"),
    pytest.param(_int32([0, 0, 3, 3, 9, 9])[::2], ValueError, "contiguous", id="non-contiguous"),
    pytest.param(_int32([1, 3, 9]), ValueError, r"cu_seqlens\[0\] must be 0", id="not-from-0"),
    pytest.param(_int32([0, 3, 8]), ValueError, r"must equal the number of tokens \(9\)", id="ends-short"),
    pytest.param(_int32([0, 3, 10]), ValueError, r"must equal the number of tokens \(9\)", id="ends-past"),
    pytest.param(_int32([0, 5, 3, 9]), ValueError, "non-decreasing", id="decreasing"),
    pytest.param(
        torch.tensor([0, 3, 9], dtype=torch.int32, device="meta"), ValueError, "is on meta", id="device"
    ),
]


@pytest.mark.parametrize("cu, error, match", BAD_CU_SEQLENS)
def test_bad_cu_seqlens(cu, error, match):
    q, k, v = _qkv(9, 2, 2, 4)
    with pytest.raises(error, match=match):
        check_cu_seqlens(cu, 9, device="cpu")
    for backend in ("auto", "reference"):
        with pytest.raises(error, match=match):
            varlen_attention(q, k, v, cu_seqlens=cu, backend=backend)


BAD_MAX_SEQLEN = [
    pytest.param(5, ValueError, "smaller than the longest segment", id="too-small"),
    pytest.param(torch.tensor(6), TypeError, "got a tensor", id="tensor"),
    pytest.param(6.0, TypeError, "Python int", id="float"),
    pytest.param(True, TypeError, "bool", id="bool"),
    pytest.param(-1, ValueError, ">= 0", id="negative"),
]


@pytest.mark.parametrize("max_seqlen, error, match", BAD_MAX_SEQLEN)
def test_bad_max_seqlen(max_seqlen, error, match):
    cu = _int32([0, 3, 9])
    q, k, v = _qkv(9, 2, 2, 4)
    with pytest.raises(error, match=match):
        check_cu_seqlens(cu, 9, device="cpu", max_seqlen=max_seqlen)
    with pytest.raises(error, match=match):
        varlen_attention(q, k, v, cu_seqlens=cu, max_seqlen=max_seqlen)


def test_max_seqlen_larger_is_fine():
    cu = _int32([0, 3, 9])
    info = check_cu_seqlens(cu, 9, device="cpu", max_seqlen=100)
    assert (info.max_seqlen, info.longest, info.num_segments, info.num_empty) == (100, 6, 2, 0)


def test_zero_length_segments():
    cu = _int32([0, 3, 3, 9])
    info = check_cu_seqlens(cu, 9, device="cpu")
    assert info.num_empty == 1 and info.max_seqlen == 6
    with pytest.raises(ValueError, match="zero-length segment"):
        check_cu_seqlens(cu, 9, device="cpu", allow_empty=False)


def test_cu_seqlens_cpu_copy_is_used():
    cu = _int32([0, 3, 9])
    info = check_cu_seqlens(cu, 9, device="cpu", cu_seqlens_cpu=_int32([0, 4, 9]))
    assert info.longest == 5  # the values came from the host copy
    with pytest.raises(ValueError, match="cu_seqlens_cpu has shape"):
        check_cu_seqlens(cu, 9, device="cpu", cu_seqlens_cpu=_int32([0, 9]))


@pytest.mark.parametrize(
    "shapes, dtypes, error, match",
    [
        (((9, 2, 4), (9, 2, 4), (9, 2, 4, 1)), None, ValueError, "3-D"),
        (((9, 2, 4), (9, 2, 4), (9, 1, 4)), None, ValueError, "same shape"),
        (((9, 2, 4), (8, 2, 4), (8, 2, 4)), None, ValueError, "self-attention"),
        (((9, 2, 4), (9, 2, 5), (9, 2, 5)), None, ValueError, "head_dim"),
        (((9, 3, 4), (9, 2, 4), (9, 2, 4)), None, ValueError, "multiple"),
        (
            ((9, 2, 4), (9, 2, 4), (9, 2, 4)),
            (torch.float32, torch.float64, torch.float32),
            TypeError,
            "one dtype",
        ),
        (((9, 2, 4), (9, 2, 4), (9, 2, 4)), (torch.int64,) * 3, TypeError, "floating"),
    ],
)
def test_bad_qkv(shapes, dtypes, error, match):
    dtypes = dtypes or (torch.float32,) * 3
    q, k, v = (torch.zeros(s, dtype=d) for s, d in zip(shapes, dtypes))
    with pytest.raises(error, match=match):
        varlen_attention(q, k, v, cu_seqlens=_int32([0, 3, 9]))


def test_bad_call():
    q, k, v = _qkv(9, 2, 2, 4)
    cu = _int32([0, 3, 9])
    with pytest.raises(ValueError, match="needs batch"):
        varlen_attention(q, k, v)
    batch = assemble([torch.arange(3), torch.arange(6)], pack_lengths([3, 6], max_len=6), attention="sample")
    with pytest.raises(ValueError, match="not both"):
        varlen_attention(q, k, v, batch, cu_seqlens=cu)
    with pytest.raises(TypeError, match="PackedBatch"):
        varlen_attention(q, k, v, cu)  # a tensor in the batch slot
    with pytest.raises(ValueError, match="backend must be one of"):
        varlen_attention(q, k, v, cu_seqlens=cu, backend="xformers")
    with pytest.raises((RuntimeError, ValueError), match="flash"):
        varlen_attention(q, k, v, cu_seqlens=cu, backend="flash_attn")
    with pytest.raises(ValueError, match="CUDA tensors only"):
        varlen_attention(q, k, v, cu_seqlens=cu, backend="torch_varlen")
    with pytest.raises(ValueError, match="finite"):
        varlen_attention(q, k, v, cu_seqlens=cu, softmax_scale=float("nan"))


# ---------------------------------------------------------------------------------------- GPU


GPU_DTYPES = [pytest.param(torch.float16, 1e-2, id="fp16"), pytest.param(torch.bfloat16, 3e-2, id="bf16")]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, atol", GPU_DTYPES)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize(
    "lengths, heads, kv_heads, dim", [*CASES, pytest.param([1000, 37, 1, 130], 8, 2, 64)]
)
def test_gpu_backends_agree(dtype, atol, causal, lengths, heads, kv_heads, dim):
    if dim % 8:
        dim = 8 * (dim // 8 + 1)  # the fused kernels want head dims that are multiples of 8
    cu = _cu(lengths, "cuda")
    q, k, v = _qkv(sum(lengths), heads, kv_heads, dim, dtype, "cuda", requires_grad=True)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to("cuda", dtype)
    ref = varlen_attention_reference(q, k, v, cu, causal=causal)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    for backend in available_backends("cuda"):
        out = varlen_attention(q, k, v, cu_seqlens=cu, causal=causal, backend=backend)
        torch.testing.assert_close(
            out.float(), ref.float(), atol=atol, rtol=atol, msg=lambda m, b=backend: f"{b}: {m}"
        )
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        for name, g, r in zip("qkv", grads, ref_grads):
            torch.testing.assert_close(
                g.float(),
                r.float(),
                atol=4 * atol,
                rtol=4 * atol,
                msg=lambda m, b=backend, n=name: f"{b} d{n}: {m}",
            )


@pytest.mark.gpu
def test_gpu_auto_picks_fused_and_checks():
    cu = _cu([5, 7], "cuda")
    q, k, v = _qkv(12, 2, 2, 16, torch.bfloat16, "cuda")
    out = varlen_attention(q, k, v, cu_seqlens=cu)
    torch.testing.assert_close(
        out.float(), varlen_attention_reference(q, k, v, cu).float(), atol=3e-2, rtol=3e-2
    )
    for backend in available_backends("cuda"):  # a too-small max_seqlen is an error, never an illegal access
        with pytest.raises(ValueError, match="smaller than the longest segment"):
            varlen_attention(q, k, v, cu_seqlens=cu, max_seqlen=6, backend=backend)
    with pytest.raises(ValueError, match="is on cpu"):
        varlen_attention(q, k, v, cu_seqlens=cu.cpu())
    torch.cuda.synchronize()
