"""``varlen_attention``: attention over a packed batch, one backend call for all its segments.

Backends (``backend=``), in the order ``"auto"`` prefers them:

- ``"flash_attn"``: ``flash_attn.flash_attn_varlen_func`` (flash-attn installed, CUDA, fp16/bf16);
- ``"torch_varlen"``: ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10, CUDA, fp16/bf16);
- ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention`` on chunks of whole segments, any device
  and floating dtype (see :func:`sdpa_varlen_attention` for the chunking and its memory bound);
- ``"reference"``: :func:`~tfp_kernels.attention.reference.varlen_attention_reference` (float32, explicit
  softmax, one step per segment; the test oracle).

``"auto"`` takes the first of flash_attn > torch_varlen > sdpa that can run the inputs (the fused kernels
only take CUDA fp16/bf16 tensors); :func:`available_backends` lists what is installed.
"""

from __future__ import annotations

import functools
import inspect
import math

import torch
import torch.nn.functional as F

from .checks import check_cu_seqlens, check_max_seqlen
from .reference import varlen_attention_reference

BACKENDS = ("auto", "flash_attn", "torch_varlen", "sdpa", "reference")
FUSED_DTYPES = (torch.float16, torch.bfloat16)

SDPA_BLOCK_TOKENS = 512
"""Chunk size of the ``"sdpa"`` backend: segments shorter than this are grouped into chunks of fewer than
``2 * SDPA_BLOCK_TOKENS`` tokens (one SDPA call with a block-diagonal mask each); longer segments get a call
of their own with ``is_causal`` and no mask."""

_SDPA_HAS_GQA = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


# ---------------------------------------------------------------------------------------- optional kernels


@functools.cache
def _flash_attn_varlen_func():
    """``flash_attn.flash_attn_varlen_func``, or None when flash-attn is not importable."""
    try:
        from flash_attn import flash_attn_varlen_func
    except (
        ImportError,
        OSError,
        RuntimeError,
    ):  # absent, or a broken build (undefined symbol, CUDA mismatch)
        return None
    return flash_attn_varlen_func


@functools.cache
def _torch_varlen_attn():
    """``(torch.nn.attention.varlen.varlen_attn, its parameter names)``, or ``(None, frozenset())``."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, frozenset()
    try:
        params = frozenset(inspect.signature(varlen_attn).parameters)
    except (TypeError, ValueError):  # pragma: no cover - a builtin without a signature
        params = frozenset()
    return varlen_attn, params


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """The backends of :func:`varlen_attention` that can run on ``device``, in the order ``"auto"`` prefers them.

    Args:
        device: ``"cpu"``, ``"cuda"``, a ``torch.device``, or None (CUDA when a CUDA device is available,
            else the CPU).

    Returns:
        A list drawn from ``["flash_attn", "torch_varlen", "sdpa", "reference"]``: ``"flash_attn"`` when
        flash-attn is importable and the device is CUDA, ``"torch_varlen"`` when torch has
        ``torch.nn.attention.varlen.varlen_attn`` and the device is CUDA; ``"sdpa"`` and ``"reference"``
        always. (The fused ones also need fp16/bf16 inputs.)

    Examples::

        >>> from tfp_kernels.attention import available_backends
        >>> available_backends("cpu")
        ['sdpa', 'reference']
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    names = []
    if device.type == "cuda":
        if _flash_attn_varlen_func() is not None:
            names.append("flash_attn")
        if _torch_varlen_attn()[0] is not None:
            names.append("torch_varlen")
    return names + ["sdpa", "reference"]


# ---------------------------------------------------------------------------------------- backends


def _expand_kv(x: torch.Tensor, group: int, dim: int) -> torch.Tensor:
    return x if group == 1 else x.repeat_interleave(group, dim=dim)


def sdpa_varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_cpu: torch.Tensor,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    block_tokens: int = SDPA_BLOCK_TOKENS,
) -> torch.Tensor:
    """Varlen attention with torch's ``scaled_dot_product_attention``, chunk by chunk (the ``"sdpa"`` backend).

    Memory: never a (T, T) mask. The segments are cut into chunks of consecutive whole segments:

    - a segment of ``>= block_tokens`` tokens is a chunk of its own: one SDPA call with ``is_causal`` and no
      mask, so SDPA can use its fused (flash / memory-efficient) kernels;
    - shorter segments are grouped by ``start // block_tokens``; each group (fewer than ``2 * block_tokens``
      tokens) is one SDPA call with a boolean block-diagonal (causal) mask of (L, L), L < 2 * block_tokens.

    So the masks and, in SDPA's math fallback, the (H, L, L) scores stay below ``(2 * block_tokens)^2``
    entries per head, and the number of SDPA calls is about ``T / block_tokens`` plus the long segments.
    Zero-length segments contribute nothing.

    Args:
        q: (T, H, Dh), floating, any device.
        k, v: (T, H_kv, Dh), same dtype and device; ``H % H_kv == 0``.
        cu_seqlens_cpu: (S + 1,) integer tensor on the CPU: the checked segment boundaries (0 ... T).
        causal: causal mask inside each segment.
        softmax_scale: default ``1 / sqrt(Dh)``.
        block_tokens: the chunk size (>= 1).

    Returns:
        (T, H, Dh), dtype and device of ``q``; differentiable.
    """
    num_tokens, num_heads, head_dim = q.shape
    group = num_heads // k.shape[1]
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)
    cu = cu_seqlens_cpu.to(torch.int64)
    lengths = cu[1:] - cu[:-1]
    starts = cu[:-1]
    keep = lengths > 0
    lengths, starts = lengths[keep], starts[keep]
    num_segments = lengths.numel()
    if num_segments == 0:
        return q.new_zeros(q.shape)
    long = lengths >= block_tokens
    key = torch.div(starts, block_tokens, rounding_mode="floor")
    new_chunk = torch.ones(num_segments, dtype=torch.bool)
    new_chunk[1:] = (key[1:] != key[:-1]) | long[1:] | long[:-1]
    first = torch.nonzero(new_chunk).reshape(-1)
    chunk_starts = starts[first].tolist()
    chunk_ends = chunk_starts[1:] + [num_tokens]
    chunk_segments = torch.diff(first, append=torch.tensor([num_segments])).tolist()
    segment_id = None
    if any(n > 1 for n in chunk_segments):  # segment id of every token, copied to the device once
        segment_id = torch.repeat_interleave(
            torch.arange(num_segments, dtype=torch.int32), lengths, output_size=num_tokens
        ).to(q.device, non_blocking=True)

    use_gqa = group > 1 and _SDPA_HAS_GQA
    if group > 1 and not _SDPA_HAS_GQA:
        k, v = _expand_kv(k, group, 1), _expand_kv(v, group, 1)
    extra = {"enable_gqa": True} if use_gqa else {}
    outs = []
    for a, b, n in zip(chunk_starts, chunk_ends, chunk_segments):
        qc = q[a:b].transpose(0, 1).unsqueeze(0)  # (1, H, L, Dh)
        kc = k[a:b].transpose(0, 1).unsqueeze(0)
        vc = v[a:b].transpose(0, 1).unsqueeze(0)
        if n == 1:
            out = F.scaled_dot_product_attention(qc, kc, vc, is_causal=causal, scale=scale, **extra)
        else:
            seg = segment_id[a:b]
            mask = seg.unsqueeze(1) == seg.unsqueeze(0)
            if causal:
                mask = mask.tril_()
            out = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask, scale=scale, **extra)
        outs.append(out.squeeze(0).transpose(0, 1))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _torch_varlen_call(q, k, v, cu_seqlens, max_seqlen, *, causal, scale):
    fn, params = _torch_varlen_attn()
    kwargs = {}
    if "scale" in params:
        kwargs["scale"] = scale
    elif scale != 1.0 / math.sqrt(q.shape[2]):  # pragma: no cover - older torch
        raise RuntimeError("this torch's varlen_attn takes no scale; use backend='sdpa' for softmax_scale")
    if "window_size" in params:  # torch >= 2.11: (-1, 0) is causal
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
    elif "is_causal" in params:  # torch 2.10
        kwargs["is_causal"] = causal
    elif causal:  # pragma: no cover
        raise RuntimeError("this torch's varlen_attn has no causal option; use backend='sdpa'")
    group = q.shape[1] // k.shape[1]
    if group > 1:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:  # pragma: no cover - torch 2.10
            k, v = _expand_kv(k, group, 1), _expand_kv(v, group, 1)
    return fn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)


# ---------------------------------------------------------------------------------------- public entry


def _check_qkv(q, k, v) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(
                f"{name} must be 3-D (T, heads, head_dim) as flash-attention's varlen layout, got shape "
                f"{tuple(x.shape)}"
            )
        if not x.dtype.is_floating_point:
            raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(
            f"q has {q.shape[0]} tokens but k/v have {k.shape[0]}: varlen_attention is self-attention over "
            "one packed batch (the same cu_seqlens for queries and keys)"
        )
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q has head_dim {q.shape[2]} but k/v have {k.shape[2]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"the number of query heads ({q.shape[1]}) must be a multiple of the number of key/value heads "
            f"({k.shape[1]}) (grouped-query attention)"
        )


def _resolve_backend(backend, q: torch.Tensor) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    fused_ok = q.device.type == "cuda" and q.dtype in FUSED_DTYPES
    if backend == "auto":
        if fused_ok and _flash_attn_varlen_func() is not None:
            return "flash_attn"
        if fused_ok and _torch_varlen_attn()[0] is not None:
            return "torch_varlen"
        return "sdpa"
    if backend in ("flash_attn", "torch_varlen"):
        if backend == "flash_attn" and _flash_attn_varlen_func() is None:
            raise RuntimeError(
                "backend='flash_attn' but flash-attn is not importable (pip install flash-attn); "
                f"available here: {available_backends(q.device)}"
            )
        if backend == "torch_varlen" and _torch_varlen_attn()[0] is None:
            raise RuntimeError(
                f"backend='torch_varlen' needs torch.nn.attention.varlen.varlen_attn (torch >= 2.10); this is "
                f"torch {torch.__version__}"
            )
        if q.device.type != "cuda":
            raise ValueError(f"backend={backend!r} runs on CUDA tensors only, q is on {q.device}")
        if q.dtype not in FUSED_DTYPES:
            raise TypeError(f"backend={backend!r} takes float16/bfloat16 inputs only, got {q.dtype}")
    return backend


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    batch=None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    causal: bool = True,
    softmax_scale: float | None = None,
    backend: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """Attention over a packed batch: each segment of ``cu_seqlens`` attends only to itself.

    Segment ``s`` covers tokens ``cu_seqlens[s]:cu_seqlens[s + 1]`` of q/k/v (flash-attention's varlen
    layout). With ``causal`` each token sees the tokens of its segment up to itself. Query head ``h`` reads
    key/value head ``h // (H / H_kv)`` (grouped-query attention when ``H_kv < H``).

    Args:
        q: (T, H, Dh), floating (fused backends: float16/bfloat16), CPU or CUDA.
        k, v: (T, H_kv, Dh), same dtype and device as ``q``; ``H % H_kv == 0``.
        batch: a :class:`~tfp_kernels.PackedBatch` (or any object with ``cu_seqlens``, ``max_seqlen`` and
            optionally ``cu_seqlens_cpu``): the segments are taken from it, and its host copy
            ``cu_seqlens_cpu`` makes the validation free of device syncs. Give either ``batch`` or
            ``cu_seqlens``.
        cu_seqlens: (S + 1,), torch.int32, contiguous, on the device of ``q``: 0 = cu_seqlens[0] <= ... <=
            cu_seqlens[-1] = T. Zero-length segments are allowed (removed before a fused kernel is called).
        max_seqlen: Python int >= the longest segment; None computes it (from the host copy).
        causal: causal attention inside each segment (default True, as a decoder LM).
        softmax_scale: scale of ``Q K^T``; default ``1 / sqrt(Dh)``.
        backend: ``"auto"`` | ``"flash_attn"`` | ``"torch_varlen"`` | ``"sdpa"`` | ``"reference"`` (see the
            module docstring; :func:`available_backends`).
        validate: check ``cu_seqlens`` / ``max_seqlen`` with
            :func:`~tfp_kernels.attention.check_cu_seqlens` (default). ``False`` skips the checks (q/k/v
            shapes are still checked): a wrong ``cu_seqlens`` may then crash a fused kernel.

    Returns:
        (T, H, Dh), dtype and device of ``q``; differentiable with respect to q, k, v on every backend.

    Raises:
        TypeError / ValueError: bad q/k/v (not 3-D, dtypes or devices differ, heads not a multiple),
            bad ``cu_seqlens`` / ``max_seqlen`` (see :func:`~tfp_kernels.attention.check_cu_seqlens`),
            both or neither of ``batch`` and ``cu_seqlens``, an unknown backend, a fused backend on a CPU or
            float32 tensor.
        RuntimeError: a fused backend that is not installed.

    Host syncs: none when ``batch`` carries ``cu_seqlens_cpu`` (a PackedBatch does); else one copy of
    ``cu_seqlens`` to the host (on CUDA a sync) for the checks, for ``max_seqlen=None`` and for the
    ``"sdpa"`` chunking. With ``validate=False``, ``max_seqlen`` given and a fused backend: none.

    Examples::

        >>> import torch
        >>> from tfp_kernels.attention import varlen_attention
        >>> q, k, v = torch.randn(9, 4, 8), torch.randn(9, 2, 8), torch.randn(9, 2, 8)  # GQA: 4 query heads, 2 kv
        >>> cu = torch.tensor([0, 3, 5, 9], dtype=torch.int32)
        >>> out = varlen_attention(q, k, v, cu_seqlens=cu, max_seqlen=4)  # "sdpa" on the CPU
        >>> ref = varlen_attention(q, k, v, cu_seqlens=cu, backend="reference")
        >>> out.shape, bool(torch.allclose(out, ref, atol=1e-5))
        (torch.Size([9, 4, 8]), True)
    """
    _check_qkv(q, k, v)
    cu_seqlens_cpu = None
    if batch is not None:
        if cu_seqlens is not None:
            raise ValueError("give either batch or cu_seqlens, not both")
        if not hasattr(batch, "cu_seqlens"):
            raise TypeError(
                f"batch must be a tfp_kernels.PackedBatch (with cu_seqlens and max_seqlen), got {type(batch).__name__}"
            )
        cu_seqlens = batch.cu_seqlens
        cu_seqlens_cpu = getattr(batch, "cu_seqlens_cpu", None)
        if max_seqlen is None:
            max_seqlen = getattr(batch, "max_seqlen", None)
    elif cu_seqlens is None:
        raise ValueError("varlen_attention needs batch (a PackedBatch) or cu_seqlens")
    if softmax_scale is not None:
        softmax_scale = float(softmax_scale)
        if not math.isfinite(softmax_scale):
            raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")
    scale = 1.0 / math.sqrt(q.shape[2]) if softmax_scale is None else softmax_scale
    backend = _resolve_backend(backend, q)
    causal = bool(causal)

    if validate:
        info = check_cu_seqlens(
            cu_seqlens, q.shape[0], device=q.device, max_seqlen=max_seqlen, cu_seqlens_cpu=cu_seqlens_cpu
        )
        cu_seqlens_cpu, max_seqlen, num_empty = info.cu_seqlens_cpu, info.max_seqlen, info.num_empty
    else:
        num_empty = 0
        if max_seqlen is None or backend in ("sdpa", "reference"):
            if cu_seqlens_cpu is None:
                cu_seqlens_cpu = cu_seqlens.cpu()
            if max_seqlen is None:
                max_seqlen = int(torch.diff(cu_seqlens_cpu.to(torch.int64)).max())
        max_seqlen = check_max_seqlen(max_seqlen)

    if backend == "reference":
        return varlen_attention_reference(q, k, v, cu_seqlens_cpu, causal=causal, softmax_scale=scale)
    if backend == "sdpa":
        return sdpa_varlen_attention(q, k, v, cu_seqlens_cpu, causal=causal, softmax_scale=scale)

    if num_empty:  # no fused kernel ever sees a zero-length segment
        host = cu_seqlens_cpu
        keep = torch.ones(host.numel(), dtype=torch.bool)
        keep[1:] = host[1:] != host[:-1]
        cu_seqlens = host[keep].to(q.device, non_blocking=True)
    if backend == "flash_attn":
        return _flash_attn_varlen_func()(
            q,
            k,
            v,
            cu_seqlens,
            cu_seqlens,
            max_seqlen,
            max_seqlen,
            dropout_p=0.0,
            softmax_scale=scale,
            causal=causal,
        )
    return _torch_varlen_call(q, k, v, cu_seqlens, max_seqlen, causal=causal, scale=scale)
