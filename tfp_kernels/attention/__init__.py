"""Varlen attention over packed batches: flash-attention, torch's varlen attention or SDPA, one entry point.

Public API:

- :func:`varlen_attention` ``(q, k, v, batch=None, *, cu_seqlens=None, max_seqlen=None, causal=True,
  softmax_scale=None, backend="auto", validate=True) -> (T, H, Dh)``: attention within each segment of a
  :class:`~tfp_kernels.PackedBatch` (or of explicit ``cu_seqlens``), GQA when ``H_kv < H``; backends
  ``"flash_attn"`` > ``"torch_varlen"`` > ``"sdpa"`` (chosen by ``"auto"``), and ``"reference"``;
- :func:`available_backends` ``(device=None)``: the backends usable on a device;
- :func:`check_cu_seqlens` ``(cu_seqlens, num_tokens, *, device, max_seqlen=None)``: flash-attention's varlen
  contract, with a clear error instead of an illegal memory access.

Lower level: :func:`sdpa_varlen_attention` (the chunked SDPA backend) and the float32 oracle
:func:`tfp_kernels.attention.reference.varlen_attention_reference`.
"""

from .api import (
    BACKENDS,
    SDPA_BLOCK_TOKENS,
    available_backends,
    sdpa_varlen_attention,
    varlen_attention,
)
from .checks import SeqlensCheck, check_cu_seqlens, check_max_seqlen
from .reference import varlen_attention_reference

__all__ = [
    "BACKENDS",
    "SDPA_BLOCK_TOKENS",
    "SeqlensCheck",
    "available_backends",
    "check_cu_seqlens",
    "check_max_seqlen",
    "sdpa_varlen_attention",
    "varlen_attention",
    "varlen_attention_reference",
]
