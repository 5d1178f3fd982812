"""Tests of the transformers attention function ``hf_varlen_attention_forward`` (``attn_implementation="tfp_varlen"``)
on its own, against the float32 oracle ``varlen_attention_reference`` applied to the segments each input
form describes: ``cu_seq_lens_q/k``, restarting ``position_ids``, a 2-D padding mask, or nothing (one segment
per row). Outputs and gradients; odd sizes (one-token segments, L not a multiple of anything, GQA).
"""

from __future__ import annotations

import itertools
import types

import pytest
import torch

from tfp_kernels.attention.reference import varlen_attention_reference
from tfp_kernels.integrations.training import hf_varlen_attention_forward

MODULE = types.SimpleNamespace(is_causal=True)
ATOL = RTOL = 1e-5


def qkv(batch, length, heads=4, kv_heads=2, dim=8, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads, length, dim), (batch, kv_heads, length, dim), (batch, kv_heads, length, dim)]
    return [torch.randn(s, generator=generator, dtype=dtype).requires_grad_() for s in shapes]


def reference(q, k, v, cu, scale=None):
    """The oracle on the flattened (B * L) tokens: (B, L, H, Dh)."""
    b, h, length, d = q.shape
    flat = [x.transpose(1, 2).reshape(b * length, x.shape[1], d) for x in (q, k, v)]
    out = varlen_attention_reference(*flat, torch.tensor(cu), softmax_scale=scale)
    return out.view(b, length, h, d)


CU = [0, 1, 4, 5, 11, 12, 13]  # one-token segments, a 6-token one, T = 13


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_cu_seq_lens_match_the_reference_with_gradients(dtype):
    q, k, v = qkv(1, 13)
    cu = torch.tensor(CU, dtype=dtype)
    out, weights = hf_varlen_attention_forward(
        MODULE, q, k, v, None, scaling=0.3, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=6, max_length_k=6
    )
    assert weights is None and out.shape == (1, 13, 4, 8)
    expected = reference(q, k, v, CU, scale=0.3)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(expected, (q, k, v), grad)
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=name)


def test_position_ids_restarts_give_the_same_segments():
    q, k, v = qkv(1, 13, seed=1)
    positions = torch.cat([torch.arange(b - a) for a, b in itertools.pairwise(CU)]).unsqueeze(0)
    out, _ = hf_varlen_attention_forward(MODULE, q, k, v, None, position_ids=positions)
    torch.testing.assert_close(out, reference(q, k, v, CU), atol=ATOL, rtol=RTOL)
    # the cached host copy follows an in-place change of the same tensor
    positions[0, 5:11] = torch.tensor([100, 101, 0, 1, 2, 3])  # segments [5, 7) (not from 0) and [7, 11)
    again, _ = hf_varlen_attention_forward(MODULE, q, k, v, None, position_ids=positions)
    torch.testing.assert_close(again, reference(q, k, v, [0, 1, 4, 5, 7, 11, 12, 13]), atol=ATOL, rtol=RTOL)


def test_rows_positions_and_no_hint():
    q, k, v = qkv(2, 7, heads=2, kv_heads=2, seed=2)
    out, _ = hf_varlen_attention_forward(MODULE, q, k, v, None)  # one segment per row
    torch.testing.assert_close(out, reference(q, k, v, [0, 7, 14]), atol=ATOL, rtol=RTOL)
    positions = torch.tensor(
        [[0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6]]
    )  # B > 1: rows also start segments
    out, _ = hf_varlen_attention_forward(MODULE, q, k, v, None, position_ids=positions)
    torch.testing.assert_close(out, reference(q, k, v, [0, 3, 7, 14]), atol=ATOL, rtol=RTOL)
    bidirectional, _ = hf_varlen_attention_forward(MODULE, q, k, v, None, is_causal=False)
    b, h, length, d = q.shape
    flat = [x.transpose(1, 2).reshape(b * length, x.shape[1], d) for x in (q, k, v)]
    expected = varlen_attention_reference(*flat, torch.tensor([0, 7, 14]), causal=False).view(b, length, h, d)
    torch.testing.assert_close(bidirectional, expected, atol=ATOL, rtol=RTOL)


def test_padding_mask_rows():
    q, k, v = qkv(3, 6, seed=3)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]])
    out, _ = hf_varlen_attention_forward(MODULE, q, k, v, mask)
    for row, (a, b) in enumerate([(0, 4), (0, 6), (3, 6)]):
        alone = reference(
            q[row : row + 1, :, a:b], k[row : row + 1, :, a:b], v[row : row + 1, :, a:b], [0, b - a]
        )
        torch.testing.assert_close(out[row, a:b], alone[0], atol=ATOL, rtol=RTOL)
    assert bool((out[0, 4:] == 0).all()) and bool((out[2, :3] == 0).all())  # padded queries: zeros


@pytest.mark.parametrize(
    "call, error, match",
    [
        (
            lambda q, k, v: hf_varlen_attention_forward(MODULE, q, k[:, :, :5], v[:, :, :5], None),
            NotImplementedError,
            "no cache",
        ),
        (
            lambda q, k, v: hf_varlen_attention_forward(MODULE, q, k, v, None, dropout=0.1),
            NotImplementedError,
            "dropout",
        ),
        (
            lambda q, k, v: hf_varlen_attention_forward(MODULE, q, k, v, None, sliding_window=4),
            NotImplementedError,
            "sliding window",
        ),
        (
            lambda q, k, v: hf_varlen_attention_forward(MODULE, q, k, v, torch.ones(1, 1, 13, 13)),
            ValueError,
            "2-D",
        ),
        (
            lambda q, k, v: hf_varlen_attention_forward(
                MODULE,
                q,
                k,
                v,
                None,
                cu_seq_lens_q=torch.tensor(CU, dtype=torch.int32),
                cu_seq_lens_k=torch.tensor([0, 13], dtype=torch.int32),
            ),
            ValueError,
            "cu_seq_lens_k differs",
        ),
        (
            lambda q, k, v: hf_varlen_attention_forward(
                MODULE, q, k, v, None, cu_seq_lens_q=torch.tensor(CU, dtype=torch.int32), max_length_q=3
            ),
            ValueError,
            "max_seqlen = 3 is smaller than the longest segment",
        ),
        (
            lambda q, k, v: hf_varlen_attention_forward(
                MODULE, q, k, v, None, cu_seq_lens_q=torch.tensor([0, 5, 12], dtype=torch.int32)
            ),
            ValueError,
            "must equal the number of tokens",
        ),
    ],
    ids=["cache", "dropout", "window", "4d-mask", "cu-k", "max-length", "cu-short"],
)
def test_refusals(call, error, match):
    q, k, v = qkv(1, 13)
    with pytest.raises(error, match=match):
        call(q, k, v)
