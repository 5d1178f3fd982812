"""Ordered next-fit bin packing of item lengths: three implementations of one function.

Next fit keeps the items in order and opens a new pack when the next item does not fit into the
current one. Given item lengths ``len[0..N-1]``, each in ``[1, max_len]``, it returns the pack id of
every item.

- ``torch.ops.tfp_kernels.next_fit_pack_ids`` (C++ extension): a sequential loop on CPU tensors
  (``csrc/cpu/binpack_cpu.cpp``), pointer jumping on CUDA tensors (``csrc/cuda/binpack_cuda*.{cpp,cu}``).
- :func:`next_fit_pack_ids_torch`: the same pointer jumping in plain torch ops (cumsum, searchsorted,
  repeated gathers). It runs on any device, is the fallback when the extension is not built, and is a
  second implementation to test the compiled op against.
- :func:`tfp_kernels.packing.reference.next_fit_pack_ids_reference`: a Python loop (the oracle).

**Pointer jumping.** If a pack starts at item ``i``, the next pack starts at ``next[i]``, the first
item whose inclusive prefix sum exceeds ``begin[i] + max_len``; ``next[N] = N``. The pack starts are
the chain ``s_0 = 0, s_1 = next[0], s_2 = next[next[0]], ...`` up to ``N``. With the jump tables
``jump_k = next`` applied ``2**k`` times (``jump_{k+1} = jump_k[jump_k]``), the chain is rebuilt from
the top level down: knowing ``s_{j * 2**(k+1)}``, the element ``s_{j * 2**(k+1) + 2**k}`` is
``jump_k[s_{j * 2**(k+1)}]``. Each level doubles the chain; ``ceil(log2 N)`` levels reach every start.
Work O(N log N), depth O(log N), memory O(N log N) indices.
"""

from __future__ import annotations

import warnings

import torch

from .._ext import has_cuda_ops, has_extension, require_extension, warn_fallback

BACKENDS = ("auto", "op", "torch")

_INT32_MAX = 2**31 - 1


def next_fit_pack_ids_torch(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """Next-fit pack ids by pointer jumping in plain torch ops (any device, no host sync).

    Args:
        lengths: (N,), torch.int64, any device; every value in ``[1, max_len]`` (not checked here).
        max_len: capacity of a pack (Python int, ``>= 1``).

    Returns:
        pack_ids: (N,), torch.int64, same device as ``lengths``; ``pack_ids[0] == 0`` (when N > 0),
        non-decreasing with steps of 0 or 1.
    """
    n = lengths.numel()
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=lengths.device)
    lengths = lengths.contiguous()
    use_int32 = n < _INT32_MAX
    ends = torch.cumsum(lengths, 0)  # inclusive prefix sums
    begins = ends - lengths  # exclusive prefix sums
    # min(max_len, total tokens) gives the same packs and keeps begins + capacity from overflowing.
    capacity = torch.clamp(ends[-1:], max=max_len)
    next_start = torch.searchsorted(ends, begins + capacity, right=True, out_int32=use_int32)
    next_start = torch.cat([next_start, next_start.new_full((1,), n)])  # next[N] = N: the chain stays at N

    levels = (n - 1).bit_length()  # 2**levels >= N >= number of packs
    jumps = [next_start]
    for _ in range(1, levels):
        jumps.append(jumps[-1].index_select(0, jumps[-1]))
    chain = next_start.new_zeros(1)  # [s_0]
    for jump in reversed(jumps):
        chain = torch.stack([chain, jump.index_select(0, chain)], dim=1).reshape(-1)
    is_start = torch.zeros(n + 1, dtype=torch.int64, device=lengths.device)
    is_start.index_fill_(0, chain.long(), 1)
    return torch.cumsum(is_start[:n], 0).sub_(1)


def next_fit_pack_ids(lengths: torch.Tensor, max_len: int, *, backend: str = "auto") -> torch.Tensor:
    """Next-fit pack id of every item, dispatched to the compiled op or the pure-torch version.

    Args:
        lengths: (N,), torch.int64, CPU or CUDA; every value in ``[1, max_len]``. Validated by the
            public :func:`~tfp_kernels.packing.pack_lengths`; here only the compiled op re-checks.
        max_len: capacity of a pack (Python int, ``>= 1``).
        backend: ``"auto"`` (the compiled op when it has a kernel for the device, else
            :func:`next_fit_pack_ids_torch` with a warning), ``"op"`` (compiled op or an error) or
            ``"torch"`` (always :func:`next_fit_pack_ids_torch`).

    Returns:
        pack_ids: (N,), torch.int64, same device as ``lengths``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return next_fit_pack_ids_torch(lengths, max_len)
    device_type = lengths.device.type
    if backend == "op":
        require_extension("next_fit_pack_ids(backend='op')")
        if device_type == "cuda" and not has_cuda_ops():
            raise RuntimeError(
                "next_fit_pack_ids(backend='op') got a CUDA tensor, but tfp_kernels._C was built "
                "without its CUDA ops; rebuild it with a CUDA toolkit (see setup.py)"
            )
        return torch.ops.tfp_kernels.next_fit_pack_ids(lengths, max_len)
    # backend == "auto"
    if device_type == "cpu":
        if has_extension():
            return torch.ops.tfp_kernels.next_fit_pack_ids(lengths, max_len)
        warn_fallback("next_fit bin packing")
    elif device_type == "cuda":
        if has_cuda_ops():
            return torch.ops.tfp_kernels.next_fit_pack_ids(lengths, max_len)
        if has_extension():  # built, but CPU-only
            warnings.warn(
                "tfp_kernels._C was built without CUDA ops; next_fit bin packing of a CUDA tensor uses its "
                "pure-torch fallback. Rebuild with a CUDA toolkit for the compiled kernel (see setup.py).",
                RuntimeWarning,
                stacklevel=3,
            )
        else:
            warn_fallback("next_fit bin packing")
    # other device types (mps, xpu, ...) have no compiled kernel by design: plain torch ops, silently
    return next_fit_pack_ids_torch(lengths, max_len)


if has_extension():
    # Output size == input size, so the op can be traced by torch.compile / checked by opcheck.
    @torch.library.register_fake("tfp_kernels::next_fit_pack_ids")
    def _next_fit_pack_ids_fake(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
        torch._check(lengths.dim() == 1, lambda: f"lengths must be 1-D, got shape {tuple(lengths.shape)}")
        torch._check(lengths.dtype == torch.int64, lambda: f"lengths must be int64, got {lengths.dtype}")
        torch._check(max_len > 0, lambda: f"max_len must be positive, got {max_len}")
        return lengths.new_empty(lengths.shape)
