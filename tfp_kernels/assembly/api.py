"""Packed-batch assembly: samples' tokens + a :class:`~tfp_kernels.packing.Packing` -> :class:`PackedBatch`.

:func:`assemble` works in three steps:

1. read the tokens (a list of 1-D tensors, a :class:`Jagged` ``(values, offsets)`` pair or a :class:`Padded`
   ``(tokens, lengths)`` pair) into one flat ``values`` tensor on the tokens' device plus the start and
   length of every sample, known on the host; check them, the labels and the packing against each other;
2. build, on the host, a (4, M) table with one column per piece (where its tokens start in ``values``,
   where they go in the output, how many, the position id of the first), the segment boundaries
   ``cu_seqlens`` and ``max_seqlen``; copy the table to the device (pinned memory, non-blocking);
3. gather: the compiled op ``torch.ops.tfp_kernels.assemble`` (CPU: one C++ pass over the pieces; CUDA:
   one kernel launch) or :func:`assemble_pieces_torch` (vectorised torch, any device; the fallback).

Host syncs on CUDA: none when the packing and the sample lengths are on the CPU (a list of tensors, or
offsets / lengths given as CPU tensors) — the usual case, since packing runs on lengths. A packing or
offsets on the GPU are copied to the host first (one sync each).
"""

from __future__ import annotations

import operator
import warnings
from typing import NamedTuple

import numpy as np
import torch

from .._ext import has_cuda_ops, has_extension, require_extension, warn_fallback
from ..packing import Packing
from .types import IGNORE_INDEX, Jagged, PackedBatch, Padded, as_token_container

ATTENTION_MODES = ("pack", "sample")
BACKENDS = ("auto", "op", "torch")

_INTEGER_DTYPES = frozenset({torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64})
_INT32_MAX = 2**31 - 1


# ---------------------------------------------------------------------------------------- gather


def assemble_pieces_torch(
    values: torch.Tensor,
    labels: torch.Tensor | None,
    pieces: torch.Tensor,
    num_tokens: int,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gather of :func:`assemble_pieces` in vectorised torch ops (any device, no host sync).

    Args:
        values: (V,) integer tensor of token ids.
        labels: (V,) integer tensor of labels aligned with ``values``, or None (the labels are the ids).
        pieces: (4, M) torch.int64 on the device of ``values``; columns ``(src, dst, length, pos)``: piece
            ``i`` copies ``values[src : src + length]`` to the output ``[dst : dst + length]`` with position
            ids ``pos, pos + 1, ...``. The pieces tile the output (``dst`` = exclusive cumsum of ``length``).
        num_tokens: ``T == pieces[2].sum()``.
        ignore_index: label of every token whose position id is 0.

    Returns:
        ``(input_ids, labels, position_ids)``: (T,) torch.int64 each, on the device of ``values``.
    """
    device = values.device
    src, dst, length, pos = pieces
    piece = torch.repeat_interleave(
        torch.arange(length.numel(), dtype=torch.int64, device=device), length, output_size=num_tokens
    )
    within = torch.arange(num_tokens, dtype=torch.int64, device=device) - dst.index_select(0, piece)
    index = src.index_select(0, piece) + within
    input_ids = values.index_select(0, index).to(torch.int64)
    position_ids = pos.index_select(0, piece) + within
    source = input_ids if labels is None else labels.index_select(0, index).to(torch.int64)
    out_labels = torch.where(position_ids == 0, torch.full_like(source, ignore_index), source)
    return input_ids, out_labels, position_ids


def assemble_pieces(
    values: torch.Tensor,
    labels: torch.Tensor | None,
    pieces: torch.Tensor,
    num_tokens: int,
    *,
    ignore_index: int = IGNORE_INDEX,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather the pieces into flat ``input_ids``, ``labels`` and ``position_ids`` (low-level step of :func:`assemble`).

    Args:
        values, labels, pieces, num_tokens, ignore_index: as in :func:`assemble_pieces_torch`; for the
            compiled op ``values`` and ``labels`` must be torch.int32 or torch.int64.
        backend: ``"auto"`` (the compiled op when it has a kernel for the device, else
            :func:`assemble_pieces_torch`, with a warning on CPU/CUDA), ``"op"`` (compiled op or an error) or
            ``"torch"``.

    Returns:
        ``(input_ids, labels, position_ids)``: (T,) torch.int64 each, on the device of ``values``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device_type = values.device.type
    if backend == "torch":
        return assemble_pieces_torch(values, labels, pieces, num_tokens, ignore_index)
    if backend == "op":
        require_extension("assemble_pieces(backend='op')")
        if device_type == "cuda" and not has_cuda_ops():
            raise RuntimeError(
                "assemble_pieces(backend='op') got CUDA tensors, but tfp_kernels._C was built without its "
                "CUDA ops; rebuild it with a CUDA toolkit (see setup.py)"
            )
        return torch.ops.tfp_kernels.assemble(values, labels, pieces, num_tokens, ignore_index)
    if (device_type == "cpu" and has_extension()) or (device_type == "cuda" and has_cuda_ops()):
        return torch.ops.tfp_kernels.assemble(values, labels, pieces, num_tokens, ignore_index)
    if device_type == "cpu" or (device_type == "cuda" and not has_extension()):
        warn_fallback("packed-batch assembly")
    elif device_type == "cuda":
        warnings.warn(
            "tfp_kernels._C was built without CUDA ops; packed-batch assembly of CUDA tensors uses its pure-torch "
            "fallback. Rebuild with a CUDA toolkit for the compiled kernel (see setup.py).",
            RuntimeWarning,
            stacklevel=3,
        )
    return assemble_pieces_torch(values, labels, pieces, num_tokens, ignore_index)


# ---------------------------------------------------------------------------------------- reading the tokens


class _Source(NamedTuple):
    """The tokens (and labels) as one flat buffer on their device, with host-side sample starts and lengths."""

    values: torch.Tensor  # (V,) int32 or int64
    labels: torch.Tensor | None  # (V,) int32 or int64, aligned with values
    starts: torch.Tensor  # (N,) int64 CPU: where sample i starts in values (for the samples used)
    lengths: torch.Tensor  # (N,) int64 CPU


def _as_int_ids(tensor: torch.Tensor) -> torch.Tensor:
    """A flat integer buffer in a dtype the compiled op reads (int32 or int64)."""
    return tensor if tensor.dtype in (torch.int32, torch.int64) else tensor.to(torch.int64)


def _check_integer(tensor, name: str, dim: int | None = None) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if dim is not None and tensor.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(tensor.shape)}")
    if tensor.dtype not in _INTEGER_DTYPES:
        raise TypeError(f"{name} must have an integer dtype, got {tensor.dtype}")
    return tensor


def _check_device(
    tensor: torch.Tensor, name: str, device: torch.device, what: str, *, cpu_ok: bool = False
) -> None:
    if tensor.device != device and not (cpu_ok and tensor.device.type == "cpu"):
        allowed = f"{device}" + (" or the CPU" if cpu_ok and device.type != "cpu" else "")
        raise ValueError(f"{name} is on {tensor.device} but {what} is on {device}: it must be on {allowed}")


def _host_lengths(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """``tensor`` as a contiguous CPU int64 tensor (a host sync when it lives on a GPU)."""
    return tensor.to(device="cpu", dtype=torch.int64).contiguous()


def _uniform_1d_integer(tensors, device: torch.device | None = None) -> bool:
    """Whether all ``tensors`` are 1-D integer tensors on one device (``device`` when given): one set per
    property instead of a function call per tensor (4096 samples: ~1 ms instead of ~10 ms)."""
    try:
        dims = {t.dim() for t in tensors}
        devices = {t.device for t in tensors}
        dtypes = {t.dtype for t in tensors}
    except AttributeError:  # not all tensors
        return False
    return (
        dims == {1}
        and len(devices) == 1
        and (device is None or devices == {device})
        and dtypes <= _INTEGER_DTYPES
    )


def _read_list(tokens, labels, used: torch.Tensor | None) -> _Source:
    n = len(tokens)
    if n == 0:
        raise ValueError("tokens is empty: assemble needs at least one sample")
    if not _uniform_1d_integer(tokens):  # find the first bad sample and say what is wrong with it
        first = _check_integer(tokens[0], "tokens[0]", 1)
        for i, sample in enumerate(tokens):
            _check_integer(sample, f"tokens[{i}]", 1)
            _check_device(sample, f"tokens[{i}]", first.device, "tokens[0]")
    device = tokens[0].device
    sizes = [sample.numel() for sample in tokens]
    lengths = torch.tensor(sizes, dtype=torch.int64)
    if labels is not None:
        if not isinstance(labels, (list, tuple)):
            raise TypeError(
                f"labels must be a list of 1-D tensors like tokens (a list), got {type(labels).__name__}"
            )
        if len(labels) != n:
            raise ValueError(f"labels has {len(labels)} samples but tokens has {n}")
        if not _uniform_1d_integer(labels, device) or [label.numel() for label in labels] != sizes:
            for i, (label, size) in enumerate(zip(labels, sizes)):
                _check_integer(label, f"labels[{i}]", 1)
                _check_device(label, f"labels[{i}]", device, "tokens")
                if label.numel() != size:
                    raise ValueError(f"labels[{i}] has {label.numel()} entries but tokens[{i}] has {size}")
    # concatenate only the samples the packing uses (a batch of packs out of a whole data set)
    starts = torch.zeros(n, dtype=torch.int64)
    if used is None:
        starts[1:] = torch.cumsum(lengths[:-1], 0)
        values = torch.cat(tokens) if n > 1 else tokens[0]
        label_values = None if labels is None else (torch.cat(labels) if n > 1 else labels[0])
    elif used.numel() == 0:
        values = torch.empty(0, dtype=tokens[0].dtype, device=device)
        label_values = None if labels is None else torch.empty(0, dtype=labels[0].dtype, device=device)
    else:
        starts[used] = torch.cumsum(lengths[used], 0) - lengths[used]
        selected = used.tolist()
        values = torch.cat([tokens[i] for i in selected])
        label_values = None if labels is None else torch.cat([labels[i] for i in selected])
    return _Source(
        _as_int_ids(values), None if label_values is None else _as_int_ids(label_values), starts, lengths
    )


def _read_labels(labels, layout: type, tokens: torch.Tensor, tokens_name: str, meta: torch.Tensor,
                 host: torch.Tensor, *, part: str) -> torch.Tensor | None:
    """The labels of a ``Jagged``/``Padded`` token container, flat like its values (or None).

    ``labels``: a tensor shaped like ``tokens``, or a pair of ``layout`` (``Jagged``: values + offsets,
    ``Padded``: tokens + lengths) whose ``part`` (offsets / lengths) equals the tokens' ``meta`` (host copy
    ``host``).
    """
    if labels is None:
        return None
    if isinstance(labels, layout) or (isinstance(labels, tuple) and len(labels) == 2):
        label_tensor, label_meta = labels
        _check_integer(label_meta, f"labels.{part}", 1)
        if label_meta is not meta and not torch.equal(_host_lengths(label_meta, f"labels.{part}"), host):
            raise ValueError(
                f"labels.{part} differ from tokens.{part}: labels must have the layout of tokens"
            )
    else:
        label_tensor = labels
    _check_integer(label_tensor, "labels", tokens.dim())
    _check_device(label_tensor, "labels", tokens.device, "tokens")
    if label_tensor.shape != tokens.shape:
        raise ValueError(
            f"labels has shape {tuple(label_tensor.shape)} but {tokens_name} has {tuple(tokens.shape)}"
        )
    return _as_int_ids(label_tensor.contiguous().view(-1))


def _read_jagged(values, offsets, labels) -> _Source:
    values = _check_integer(values, "tokens.values", 1)
    offsets = _check_integer(offsets, "tokens.offsets", 1)
    _check_device(offsets, "tokens.offsets", values.device, "tokens.values", cpu_ok=True)
    if offsets.numel() < 2:
        raise ValueError(f"tokens is empty: tokens.offsets needs N + 1 >= 2 entries, got {offsets.numel()}")
    host = _host_lengths(offsets, "tokens.offsets")
    lengths = host[1:] - host[:-1]
    if int(host[0]) < 0:
        raise ValueError(f"tokens.offsets[0] = {int(host[0])} is negative")
    if (lengths < 0).any():
        i = int(torch.argmax((lengths < 0).to(torch.uint8)))
        raise ValueError(
            f"tokens.offsets must be non-decreasing: offsets[{i + 1}] = {int(host[i + 1])} < offsets[{i}] = {int(host[i])}"
        )
    if int(host[-1]) > values.numel():
        raise ValueError(
            f"tokens.offsets[-1] = {int(host[-1])} is past the end of tokens.values ({values.numel()})"
        )
    label_values = _read_labels(labels, Jagged, values, "tokens.values", offsets, host, part="offsets")
    return _Source(_as_int_ids(values), label_values, host[:-1].clone(), lengths)


def _read_padded(tokens, lengths, labels) -> _Source:
    tokens = _check_integer(tokens, "tokens.tokens", 2)
    lengths = _check_integer(lengths, "tokens.lengths", 1)
    _check_device(lengths, "tokens.lengths", tokens.device, "tokens.tokens", cpu_ok=True)
    batch, width = tokens.shape
    if batch == 0:
        raise ValueError("tokens is empty: the padded tokens have 0 rows")
    if lengths.numel() != batch:
        raise ValueError(f"tokens.lengths has {lengths.numel()} entries but tokens.tokens has {batch} rows")
    host = _host_lengths(lengths, "tokens.lengths")
    bad = (host < 0) | (host > width)
    if bad.any():
        i = int(torch.argmax(bad.to(torch.uint8)))
        raise ValueError(f"tokens.lengths[{i}] = {int(host[i])} is outside [0, {width}] (the padded width)")
    label_values = _read_labels(labels, Padded, tokens, "tokens", lengths, host, part="lengths")
    starts = torch.arange(batch, dtype=torch.int64) * width
    return _Source(_as_int_ids(tokens.contiguous().view(-1)), label_values, starts, host)


def _read_tokens(tokens, labels, used_fn) -> _Source:
    tokens = as_token_container(tokens)
    if isinstance(tokens, Jagged):
        return _read_jagged(tokens.values, tokens.offsets, labels)
    if isinstance(tokens, Padded):
        return _read_padded(tokens.tokens, tokens.lengths, labels)
    return _read_list(tokens, labels, used_fn(len(tokens)))


# ---------------------------------------------------------------------------------------- checks


class _HostPacking(NamedTuple):
    pack_id: torch.Tensor
    sample_index: torch.Tensor
    offset: torch.Tensor
    length: torch.Tensor
    pack_offsets: torch.Tensor


def _host_packing(packing: Packing) -> _HostPacking:
    fields = (packing.pack_id, packing.sample_index, packing.offset, packing.length, packing.pack_offsets)
    if packing.device.type != "cpu":
        fields = torch.cat(fields).cpu().split([f.numel() for f in fields])  # one host sync
    return _HostPacking(*(f.contiguous() for f in fields))


def _check_packing(source: _Source, packing: Packing, host: _HostPacking) -> None:
    n = source.lengths.numel()
    if packing.sample_lengths is not None:
        expected = packing.sample_lengths.to(device="cpu", dtype=torch.int64)
        if expected.numel() != n:
            raise ValueError(f"tokens has {n} samples but the packing was made for {expected.numel()}")
        differs = expected != source.lengths
        if differs.any():
            i = int(torch.argmax(differs.to(torch.uint8)))
            raise ValueError(
                f"tokens[{i}] has {int(source.lengths[i])} tokens but the packing was made for a length of "
                f"{int(expected[i])} ({int(differs.sum())} of {n} samples differ)"
            )
    m = host.length.numel()
    if m == 0:
        return
    if int(host.sample_index.max()) >= n or int(host.sample_index.min()) < 0:
        raise ValueError(
            f"the packing refers to sample {int(host.sample_index.max())} but tokens has {n} samples"
        )
    ends = host.offset + host.length
    bad = (host.length < 1) | (host.offset < 0) | (ends > source.lengths.index_select(0, host.sample_index))
    if bad.any():
        i = int(torch.argmax(bad.to(torch.uint8)))
        s = int(host.sample_index[i])
        raise ValueError(
            f"piece {i} of the packing takes tokens[{s}][{int(host.offset[i])}:{int(ends[i])}], but tokens[{s}] "
            f"has {int(source.lengths[s])} tokens"
        )
    if int(host.length.sum()) != int(host.pack_offsets[-1]):
        raise ValueError(
            f"packing is inconsistent: its pieces hold {int(host.length.sum())} tokens, its pack_offsets "
            f"{int(host.pack_offsets[-1])}"
        )


def _as_int(value, name: str) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError as err:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from err


def _as_pad_to(pad_to, max_pack_length: int) -> int:
    value = _as_int(pad_to, "pad_to")
    if value < 1:
        raise ValueError(f"pad_to must be a positive int, got {value}")
    if value < max_pack_length:
        raise ValueError(f"pad_to={value} is shorter than the fullest pack ({max_pack_length} tokens)")
    return value


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``: through pinned memory and a non-blocking copy for CUDA (no sync)."""
    if device.type == "cpu":
        return tensor
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


# ---------------------------------------------------------------------------------------- public API


def assemble(
    tokens,
    packing: Packing,
    *,
    attention: str = "pack",
    labels=None,
    pad_to: int | None = None,
    pad_id: int = 0,
) -> PackedBatch:
    """Lay the samples' tokens out as a packed batch, in the order and cuts of ``packing``.

    The batch is flat, ``[1, T]``, as flash-attention's varlen functions and transformers' packed
    ("padding-free") batches take it: the pieces of pack 0, then those of pack 1, and so on, each piece
    being the token slice ``[offset, offset + length)`` of its sample.

    Attention modes (``attention=``; docs/design.md, 'Assembly and attention modes'):

    - ``"pack"`` (the TFP paper): one attention segment per pack; position ids 0, 1, ... over the whole
      pack, so later samples see the earlier ones of the same pack.
    - ``"sample"`` (mainstream packing): one segment per piece (a sample, or the part of a split sample
      inside one pack); position ids restart at 0 at every piece; no attention across samples.

    In both modes the label of every segment's first token is -100 (in the flat layout its predecessor
    belongs to another segment; transformers' ``DataCollatorWithFlattening`` does the same per sample);
    every other label is carried through.

    Args:
        tokens: the N samples' token ids (any integer dtype, any device, all on one device), as one of:
            a list of N 1-D tensors; ``Jagged(values, offsets)`` (sample i is
            ``values[offsets[i]:offsets[i + 1]]``); ``Padded(tokens, lengths)`` (sample i is
            ``tokens[i, :lengths[i]]``, tokens ``[B, L]``). A plain 2-tuple of tensors is read as
            ``Jagged`` when its first element is 1-D and as ``Padded`` when it is 2-D. ``offsets`` and
            ``lengths`` may be CPU tensors while the tokens live on a GPU (that avoids a host sync).
        packing: a :class:`~tfp_kernels.packing.Packing` of these samples (e.g. ``pack_lengths(lengths,
            ...)``, ``shuffle_packs``/``select_packs`` of one), on the CPU or on the tokens' device. Its
            ``sample_lengths`` must match the tokens; a list of tensors is concatenated only for the samples
            the packing uses.
        attention: ``"pack"`` or ``"sample"``, see above.
        labels: None (the labels are the token ids) or labels in the layout of ``tokens``: a list of N
            tensors of the samples' lengths; a tensor shaped like ``values`` (or ``Jagged`` with the same
            offsets); a ``[B, L]`` tensor (or ``Padded`` with the same lengths). Use -100 for tokens outside
            the loss (e.g. the prompt).
        pad_to: when given, also compute the ``[P, pad_to]`` padded view (``batch.padded``, see
            :meth:`PackedBatch.to_padded`); ``pad_to >= `` the fullest pack.
        pad_id: token id of the padding in the padded view.

    Returns:
        :class:`PackedBatch`: ``input_ids``, ``labels``, ``position_ids`` (1, T) torch.int64 and ``cu_seqlens``
        (S + 1,) torch.int32 on the tokens' device (S = P packs in ``"pack"`` mode, M pieces in ``"sample"``
        mode); ``cu_seqlens_cpu``; ``max_seqlen`` (Python int); ``sample_index``, ``pack_index`` (M,),
        ``pack_offsets`` (P + 1,); stats (``fill_ratio``, ``num_pad_tokens``, ``stats()``);
        ``to_hf_kwargs()`` for transformers models.

    Raises:
        TypeError: ``packing`` not a Packing; tokens or labels not integer tensors, or of an unknown kind.
        ValueError: no samples; tokens, labels or offsets/lengths on different devices (offsets/lengths may
            also be on the CPU); labels whose layout differs from the tokens'; tokens that do not match the
            packing (number of samples, a sample's length); a bad ``attention`` or ``pad_to``; more than
            2^31 - 1 tokens (``cu_seqlens`` is int32).

    Host syncs: none on CUDA when the packing and the sample lengths are on the CPU (the table and
    ``cu_seqlens`` go to the GPU through pinned memory with non-blocking copies); one per GPU-resident
    packing / offsets / lengths otherwise.

    Examples::

        >>> import torch
        >>> from tfp_kernels.assembly import assemble
        >>> from tfp_kernels.packing import pack_lengths
        >>> samples = [torch.tensor([11, 12, 13]), torch.tensor([21, 22]), torch.tensor([31, 32, 33, 34])]
        >>> packing = pack_lengths([3, 2, 4], max_len=5)  # packs: 3+2 | 4
        >>> batch = assemble(samples, packing, attention="sample")
        >>> batch.input_ids
        tensor([[11, 12, 13, 21, 22, 31, 32, 33, 34]])
        >>> batch.labels
        tensor([[-100,   12,   13, -100,   22, -100,   32,   33,   34]])
        >>> batch.position_ids
        tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
        >>> batch.cu_seqlens, batch.max_seqlen
        (tensor([0, 3, 5, 9], dtype=torch.int32), 4)
        >>> packed = assemble(samples, packing, attention="pack")
        >>> packed.position_ids, packed.cu_seqlens
        (tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]]), tensor([0, 5, 9], dtype=torch.int32))
        >>> sorted(batch.to_hf_kwargs())
        ['cu_seq_lens_k', 'cu_seq_lens_q', 'input_ids', 'labels', 'max_length_k', 'max_length_q', 'position_ids']
    """
    if not isinstance(packing, Packing):
        raise TypeError(f"packing must be a tfp_kernels.packing.Packing, got {type(packing).__name__}")
    if not isinstance(attention, str) or attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {list(ATTENTION_MODES)}, got {attention!r}")
    pad_id = _as_int(pad_id, "pad_id")
    if pad_to is not None:
        _as_pad_to(pad_to, 1)  # type and sign now; the fullest pack below
    host = _host_packing(packing)

    def used_samples(n: int) -> torch.Tensor | None:
        """Increasing indices of the samples the packing uses, or None when it uses all (or is invalid)."""
        index = host.sample_index
        if index.numel() == 0:
            return torch.empty(0, dtype=torch.int64)
        low, high = torch.aminmax(index)
        if int(low) < 0 or int(high) >= n:
            return None  # reported by _check_packing
        used = torch.zeros(n, dtype=torch.uint8).index_fill_(0, index, 1)
        return None if int(used.sum()) == n else torch.nonzero(used).reshape(-1)

    source = _read_tokens(tokens, labels, used_samples)
    _check_packing(source, packing, host)

    # the plan, on the host
    m = host.length.numel()
    num_tokens = int(host.pack_offsets[-1])
    if num_tokens > _INT32_MAX:
        raise ValueError(
            f"the packing holds {num_tokens} tokens; cu_seqlens is int32, so at most {_INT32_MAX}"
        )
    piece_offsets = torch.zeros(m + 1, dtype=torch.int64)
    torch.cumsum(host.length, 0, out=piece_offsets[1:])
    dst = piece_offsets[:-1]
    src = source.starts.index_select(0, host.sample_index) + host.offset
    pack_lengths = torch.diff(host.pack_offsets)
    max_pack_length = int(pack_lengths.max()) if pack_lengths.numel() else 0
    if attention == "pack":
        first_position = dst - host.pack_offsets.index_select(0, host.pack_id)
        cu_seqlens_cpu = host.pack_offsets.to(torch.int32)
        max_seqlen = max_pack_length
    else:
        first_position = torch.zeros(m, dtype=torch.int64)
        cu_seqlens_cpu = piece_offsets.to(torch.int32)
        max_seqlen = int(host.length.max()) if m else 0
    if pad_to is not None:
        _as_pad_to(pad_to, max_pack_length)

    # one transfer of the int64 metadata, one of cu_seqlens
    device = source.values.device
    meta = torch.cat(
        [src, dst, host.length, first_position, host.sample_index, host.pack_id, host.pack_offsets]
    )
    meta = _to_device(meta, device)
    table = meta[: 4 * m].view(4, m)
    sample_index, pack_index, pack_offsets = meta[4 * m :].split([m, m, host.pack_offsets.numel()])
    cu_seqlens = _to_device(cu_seqlens_cpu, device)

    input_ids, out_labels, position_ids = assemble_pieces(source.values, source.labels, table, num_tokens)
    batch = PackedBatch(
        input_ids=input_ids.view(1, num_tokens),
        labels=out_labels.view(1, num_tokens),
        position_ids=position_ids.view(1, num_tokens),
        cu_seqlens=cu_seqlens,
        cu_seqlens_cpu=cu_seqlens_cpu,
        max_seqlen=max_seqlen,
        attention=attention,
        sample_index=sample_index,
        pack_index=pack_index,
        pack_offsets=pack_offsets,
        max_len=packing.max_len,
        max_pack_length=max_pack_length,
        packing=packing,
    )
    return batch if pad_to is None else batch.with_padded(pad_to, pad_id=pad_id)


if has_extension():
    # Outputs of num_tokens entries each: traceable by torch.compile, checkable by opcheck.
    @torch.library.register_fake("tfp_kernels::assemble")
    def _assemble_fake(values, labels, pieces, num_tokens: int, ignore_index: int):
        torch._check(values.dim() == 1, lambda: f"values must be 1-D, got shape {tuple(values.shape)}")
        torch._check(pieces.dim() == 2 and pieces.shape[0] == 4, lambda: "pieces must have shape (4, M)")
        torch._check(num_tokens >= 0, lambda: f"num_tokens must be >= 0, got {num_tokens}")
        return tuple(values.new_empty(num_tokens, dtype=torch.int64) for _ in range(3))
