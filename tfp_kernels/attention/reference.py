"""Plain-torch reference of varlen attention: per segment, an explicit ``softmax(Q K^T * scale) V`` in float32.

The oracle the backends of :func:`~tfp_kernels.attention.varlen_attention` are tested against. One Python
step per segment and an explicit (L, L) score matrix per head: for tests, not for training.
"""

from __future__ import annotations

import itertools
import math

import torch


def varlen_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Varlen attention, segment by segment, in float32 with an explicit softmax.

    Segment ``s`` covers tokens ``cu_seqlens[s]:cu_seqlens[s + 1]``; its queries see only its own keys (and,
    with ``causal``, only those at or before their own position). Query head ``h`` reads key/value head
    ``h // (H / H_kv)`` (flash-attention's GQA mapping).

    Args:
        q: (T, H, Dh), floating, any device.
        k, v: (T, H_kv, Dh), same dtype and device as ``q``; ``H % H_kv == 0``.
        cu_seqlens: (S + 1,) integer tensor, any device; 0 = cu_seqlens[0] <= ... <= cu_seqlens[-1] = T
            (not checked here: see :func:`~tfp_kernels.attention.check_cu_seqlens`).
        causal: causal mask inside each segment.
        softmax_scale: scale of the scores; default ``1 / sqrt(Dh)``.

    Returns:
        (T, H, Dh), dtype of ``q`` (computed in float32), on the device of ``q``; differentiable.

    Examples::

        >>> import torch
        >>> from tfp_kernels.attention.reference import varlen_attention_reference
        >>> q = k = v = torch.randn(5, 2, 4)
        >>> out = varlen_attention_reference(q, k, v, torch.tensor([0, 2, 5], dtype=torch.int32))
        >>> out.shape, bool(torch.allclose(out[0], v[0]))  # the first token only sees itself
        (torch.Size([5, 2, 4]), True)
    """
    num_heads, num_kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[2]
    group = num_heads // num_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)
    bounds = cu_seqlens.detach().cpu().tolist()
    outs = []
    for start, end in itertools.pairwise(bounds):
        if end == start:
            continue
        qs = q[start:end].float().transpose(0, 1)  # (H, L, Dh)
        ks = k[start:end].float().transpose(0, 1).repeat_interleave(group, dim=0)
        vs = v[start:end].float().transpose(0, 1).repeat_interleave(group, dim=0)
        scores = torch.matmul(qs, ks.transpose(1, 2)) * scale  # (H, L, L)
        if causal:
            length = end - start
            allowed = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
            scores = scores.masked_fill(~allowed, float("-inf"))
        outs.append(torch.matmul(torch.softmax(scores, dim=-1), vs).transpose(0, 1))
    if not outs:
        return q.new_zeros(q.shape)
    return torch.cat(outs).to(q.dtype)
