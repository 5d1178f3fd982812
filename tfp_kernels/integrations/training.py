"""Training on TFP packs: a collator for pre-packed rows, loss normalisation, and a transformers attention.

- :class:`PackedRowsCollator`: concatenates pre-packed rows (one pack per row, e.g. the rows of the
  ``packed.parquet`` that ``tfp-pack`` writes) into one flat ``[1, T]`` batch whose attention segments are
  the ones the rows were written with; use it as the ``collate_fn`` of a ``DataLoader`` (with
  :class:`~tfp_kernels.DistributedPackSampler` as its ``batch_sampler``) or as a ``Trainer``'s
  ``data_collator``.
- :func:`count_label_tokens` / :func:`global_num_items_in_batch`: the label tokens that count in the loss,
  of one batch, and of a whole optimizer step (all micro-batches, all ranks), for a loss that is the
  per-token mean of the step, as an unpacked run computes it.
- :func:`register_hf_attention`: makes :func:`~tfp_kernels.varlen_attention` available to transformers
  models as ``attn_implementation="tfp_varlen"`` (flash-attn when installed, torch's varlen attention on
  CUDA, else SDPA per chunk of segments).

How transformers' ``Trainer`` (5.x) normalises the loss: at each optimizer step it takes the
``gradient_accumulation_steps`` batches of the step, counts ``labels[..., 1:] != -100`` over all of them
(``shift_labels`` when a batch has them), sums that count over the ranks when
``TrainingArguments.average_tokens_across_devices`` is True (the default), passes it to the model as
``num_items_in_batch`` (models whose ``forward`` takes ``**kwargs``) and multiplies the loss by the number
of processes (data parallelism averages the gradients over the ranks). Every label token of the step on
every rank then weighs the same: the loss equals the per-token mean of the unpacked run, provided the
labels are -100 at the first token of every attention segment (the collators here and
:func:`~tfp_kernels.assemble` make them so). So with ``Trainer``: keep ``average_tokens_across_devices=True``
and pass nothing else; the ``num_items_in_batch`` entry of a collated batch is replaced by the Trainer's
global count. TRL's ``SFTTrainer`` computes its loss through ``Trainer.compute_loss`` with the same
``num_items_in_batch``. With ``average_tokens_across_devices=False`` each rank divides by its own count:
samples on a rank with few label tokens weigh more.

In your own loop do what the Trainer does::

    n = global_num_items_in_batch(micro_batches)        # all micro-batches of the step, all ranks
    for mb in micro_batches:
        loss = model(**mb.to_hf_kwargs(num_items_in_batch=n), use_cache=False).loss
        (loss * world_size).backward()                   # DDP averages the gradients over the ranks
    optimizer.step()
"""

from __future__ import annotations

import functools
import numbers
import weakref
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch

from ..assembly import IGNORE_INDEX, PackedBatch
from ..attention import varlen_attention
from ..attention.api import BACKENDS
from ..packing import Packing

__all__ = [
    "PackedRowsCollator",
    "count_label_tokens",
    "global_num_items_in_batch",
    "hf_varlen_attention_forward",
    "register_hf_attention",
]

#: the columns of a pre-packed row that :class:`PackedRowsCollator` reads
ROW_TOKENS, ROW_LABELS, ROW_POSITIONS, ROW_SEGMENTS = "input_ids", "labels", "position_ids", "cu_seqlens"
ROW_SEGMENT_LENGTHS = "seq_lengths"
ROW_SAMPLE_IDS, ROW_PIECE_LENGTHS, ROW_PIECE_STARTS = "sample_ids", "sample_lengths", "sample_starts"


# ---------------------------------------------------------------------------------------- label counts


def count_label_tokens(labels, *, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The label tokens that count in a causal-LM loss: ``(labels[..., 1:] != ignore_index).sum()``.

    transformers' causal-LM loss shifts the labels (the logits at token ``i`` predict ``labels[i + 1]``), so
    the first label of every row never counts; its ``Trainer`` counts the same way.

    Args:
        labels: (B, T) or (T,) integer tensor (any device); or a :class:`~tfp_kernels.PackedBatch`; or a
            batch dict: its ``num_items_in_batch`` entry when there is one, else its ``shift_labels``
            (already shifted: every entry counts), else its ``labels``.
        ignore_index: the label of tokens outside the loss.

    Returns:
        0-d torch.int64 tensor on the device of the labels (no host sync).

    Examples::

        >>> import torch
        >>> from tfp_kernels import count_label_tokens
        >>> count_label_tokens(torch.tensor([[-100, 5, 6, -100, 7]]))
        tensor(3)
    """
    if isinstance(labels, PackedBatch):
        return labels.num_items_in_batch
    if isinstance(labels, Mapping):
        if labels.get("num_items_in_batch") is not None:
            return torch.as_tensor(labels["num_items_in_batch"], dtype=torch.int64)
        if labels.get("shift_labels") is not None:
            return (_label_tensor(labels["shift_labels"], "shift_labels") != ignore_index).sum()
        if labels.get("labels") is None:
            raise ValueError(f"the batch has no 'labels' (keys: {sorted(labels)[:10]})")
        labels = labels["labels"]
    labels = _label_tensor(labels, "labels")
    return (labels[..., 1:] != ignore_index).sum()


def _label_tensor(labels, name: str) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() == 0 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(
            f"{name} must be an integer tensor of shape (B, T) or (T,), got {labels.dtype} {tuple(labels.shape)}"
        )
    return labels


def _count_of(item) -> torch.Tensor:
    """The label-token count of one batch, or of an already counted int / 0-d tensor."""
    if isinstance(item, bool):
        raise TypeError("a count must be an int, not a bool")
    if isinstance(item, numbers.Integral):
        return torch.tensor(int(item), dtype=torch.int64)
    if isinstance(item, torch.Tensor) and item.dim() == 0:
        if item.dtype.is_floating_point or item.dtype == torch.bool:
            raise TypeError(f"a count must be an integer tensor, got {item.dtype}")
        return item.to(torch.int64)
    return count_label_tokens(item)


def global_num_items_in_batch(batches, *, group=None, device=None) -> torch.Tensor:
    """The label tokens of one optimizer step over all its micro-batches and all ranks: the
    ``num_items_in_batch`` to pass to the model so that its loss is the per-token mean of the whole step.

    Sums :func:`count_label_tokens` over ``batches`` (the gradient-accumulation micro-batches of the step
    on this rank), then, when ``torch.distributed`` is initialised, all-reduces the sum over ``group`` (one
    collective: call it on every rank of the group, once per step). Masked repeats (labels all -100) count
    0. With data parallelism the gradients are averaged over the ``R`` ranks: multiply each rank's loss by
    ``R`` (as ``Trainer`` does) so that the update is the gradient of the global per-token mean.

    Args:
        batches: the step's micro-batches: a sequence of :class:`~tfp_kernels.PackedBatch`, batch dicts
            (their ``num_items_in_batch`` entry, or ``labels``), label tensors or counts (ints / 0-d
            integer tensors); or a single one of those.
        group: the process group to sum over (default: the default group, when initialised).
        device: where the result goes (default: the device of the first batch's count). The collective
            itself runs on the CPU for gloo and on the current CUDA device for nccl.

    Returns:
        0-d torch.int64 tensor, the same on every rank of ``group``.

    Raises:
        ValueError: no batches. TypeError: an item that is neither a batch nor a count.

    Examples::

        >>> import torch
        >>> from tfp_kernels import global_num_items_in_batch
        >>> micro = [{"labels": torch.tensor([[-100, 1, 2]])}, {"labels": torch.tensor([[-100, -100, 3, 4]])}]
        >>> global_num_items_in_batch(micro)  # one process: 2 + 2
        tensor(4)
    """
    single = isinstance(batches, (PackedBatch, Mapping, torch.Tensor, numbers.Integral))
    items = [batches] if single else list(batches)
    if not items:
        raise ValueError("batches is empty: pass the micro-batches of the step (or their counts)")
    counts = [_count_of(item) for item in items]
    if device is None:
        device = counts[0].device
    total = torch.stack([c.to(counts[0].device) for c in counts]).sum()
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        backend = str(dist.get_backend(group))
        where = (
            torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
        )
        buffer = total.to(where).reshape(1).clone()
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
        total = buffer[0]
    return total.to(device)


# ---------------------------------------------------------------------------------------- pre-packed rows


def _row_ints(row, name: str, index: int, *, required: bool = True) -> np.ndarray | None:
    """Field ``name`` of row ``index`` as a 1-D int64 numpy array (None when absent and not required)."""
    if not isinstance(row, Mapping):
        raise TypeError(f"row {index} must be a mapping of columns (a dict), got {type(row).__name__}")
    value = row.get(name)
    if value is None:
        if required:
            raise ValueError(f"row {index} has no {name!r} (columns: {sorted(row)[:10]})")
        return None
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.ndim != 1 or (array.size and (array.dtype == np.bool_ or array.dtype.kind not in "iu")):
        raise TypeError(
            f"row {index}: {name!r} must be a 1-D sequence of ints, got {array.dtype} of shape {array.shape}"
        )
    return array.astype(np.int64, copy=False)


def _shown_ints(values: np.ndarray) -> str:
    return f"{values[:8].tolist()}{'...' if values.size > 8 else ''}"


def _segments_of_row(row, index: int, length: int, positions: np.ndarray | None) -> np.ndarray:
    """The attention segment boundaries inside one row: its ``cu_seqlens``, else the running sum of its
    ``seq_lengths`` (the two must agree when both are given), else the restarts of its ``position_ids`` (a
    token whose position is not its predecessor's + 1 starts a segment), else ``[0, L]``."""
    cu = _row_ints(row, ROW_SEGMENTS, index, required=False)
    if cu is not None and (cu.size < 2 or cu[0] != 0 or cu[-1] != length or np.any(np.diff(cu) <= 0)):
        raise ValueError(
            f"row {index}: {ROW_SEGMENTS!r} must rise strictly from 0 to the row's {length} tokens, got "
            f"{_shown_ints(cu)}"
        )
    segment_lengths = _row_ints(row, ROW_SEGMENT_LENGTHS, index, required=False)
    if segment_lengths is not None:
        if segment_lengths.size == 0 or np.any(segment_lengths <= 0) or segment_lengths.sum() != length:
            raise ValueError(
                f"row {index}: {ROW_SEGMENT_LENGTHS!r} (the attention segments' lengths) must be positive "
                f"and add up to the row's {length} tokens, got {_shown_ints(segment_lengths)}"
            )
        if cu is not None and not np.array_equal(np.diff(cu), segment_lengths):
            raise ValueError(
                f"row {index}: {ROW_SEGMENT_LENGTHS!r} {_shown_ints(segment_lengths)} are not the lengths of "
                f"the segments of {ROW_SEGMENTS!r} {_shown_ints(cu)}"
            )
        if cu is None:
            cu = np.concatenate([[0], np.cumsum(segment_lengths)]).astype(np.int64)
    if cu is not None:
        return cu
    if positions is not None:
        starts = np.flatnonzero(np.diff(positions) != 1) + 1
        return np.concatenate([[0], starts, [length]]).astype(np.int64)
    return np.array([0, length], dtype=np.int64)


class PackedRowsCollator:
    """Collate pre-packed rows (one pack per row) into one flat packed batch, attention segments kept.

    A row is a mapping with (the columns of the ``packed.parquet`` that ``tfp-pack`` writes):

    - ``input_ids`` (required): the pack's tokens, a 1-D sequence of ints (list, numpy array, tensor);
    - ``labels``: same length, -100 outside the loss (default: the tokens, with -100 at the first token of
      every segment);
    - ``cu_seqlens``: the attention segment boundaries inside the pack, ``0 < ... < L`` (``[0, L]``: pack
      attention, the paper's; one segment per sample: per-sample attention); without it the segments are
      read from ``seq_lengths`` (the segments' lengths, the column TRL reads), else from ``position_ids`` (a
      segment starts where a position is not its predecessor's + 1), and without any the whole row is one
      segment;
    - ``position_ids``: checked against the segments when both are given (0, 1, ... in each segment),
      else built from them;
    - ``sample_ids``, ``sample_lengths``, ``sample_starts``: the pieces of the pack (original sample index,
      tokens, first token within the sample); they fill the batch's ``sample_index`` / ``packing``. Without
      them every segment is one piece of unknown sample (``sample_index`` -1).

    The batch keeps the rows' segments: pack attention stays pack attention and per-sample stays
    per-sample (each row's ``cu_seqlens`` shifted by the tokens of the rows before it). The labels are taken
    as they are: their -100 at every segment start keeps a segment from predicting the next one's first
    token.

    Args:
        max_len: capacity of a pack (the batch's ``max_len``); rows longer than it raise. Default: the
            longest row of each batch.
        return_flash_attn_kwargs: also return ``cu_seq_lens_q/k`` and ``max_length_q/k`` (default True:
            flash-attention and ``attn_implementation="tfp_varlen"`` read them; sdpa/eager read the segments
            from ``position_ids``).
        return_num_items_in_batch: also return ``num_items_in_batch`` (default True; see
            :func:`count_label_tokens`). Turn it off for a model whose ``forward`` takes no ``**kwargs``.

    Call: ``collator(rows)`` with ``rows`` a list of rows -> a dict: ``input_ids``, ``labels``,
    ``position_ids`` (1, T) torch.int64; ``cu_seq_lens_q``, ``cu_seq_lens_k`` (S + 1,) torch.int32 and
    ``max_length_q``, ``max_length_k`` Python ints; ``num_items_in_batch`` a 0-d torch.int64 tensor. All on
    the CPU. Never an ``attention_mask`` (transformers would let the segments attend to each other).

    :meth:`pack` returns the :class:`~tfp_kernels.PackedBatch` itself (``micro_batches``, ``to_padded``,
    :func:`~tfp_kernels.mask_repeats`, ``varlen_attention(q, k, v, batch)``); its ``attention`` is
    ``"sample"`` when some row holds more than one segment, else ``"pack"``.

    Raises:
        TypeError / ValueError: naming the row and the column: a missing ``input_ids``, an empty row,
        non-integer values, lengths that disagree, segments that do not cover the row, position ids that do
        not restart at the segments, a row longer than ``max_len``.

    Examples::

        >>> from tfp_kernels import PackedRowsCollator
        >>> rows = [{"input_ids": [5, 6, 7, 8], "cu_seqlens": [0, 3, 4]},   # two samples, per-sample attention
        ...         {"input_ids": [9, 10, 11], "cu_seqlens": [0, 3]}]      # one pack-attention segment
        >>> out = PackedRowsCollator()(rows)
        >>> out["position_ids"], out["cu_seq_lens_q"]
        (tensor([[0, 1, 2, 0, 0, 1, 2]]), tensor([0, 3, 4, 7], dtype=torch.int32))
        >>> out["labels"], out["num_items_in_batch"]
        (tensor([[-100,    6,    7, -100, -100,   10,   11]]), tensor(4))
    """

    def __init__(
        self,
        *,
        max_len: int | None = None,
        return_flash_attn_kwargs: bool = True,
        return_num_items_in_batch: bool = True,
    ) -> None:
        if max_len is not None and (
            isinstance(max_len, bool) or not isinstance(max_len, numbers.Integral) or max_len < 1
        ):
            raise ValueError(f"max_len must be a positive int or None, got {max_len!r}")
        self.max_len = None if max_len is None else int(max_len)
        self.return_flash_attn_kwargs = bool(return_flash_attn_kwargs)
        self.return_num_items_in_batch = bool(return_num_items_in_batch)

    def __repr__(self) -> str:
        return (
            f"PackedRowsCollator(max_len={self.max_len}, return_flash_attn_kwargs={self.return_flash_attn_kwargs}, "
            f"return_num_items_in_batch={self.return_num_items_in_batch})"
        )

    def pack(self, rows) -> PackedBatch:
        """The :class:`~tfp_kernels.PackedBatch` of ``rows`` (on the CPU), one pack per row, in row order."""
        if isinstance(rows, Mapping) or not isinstance(rows, Sequence):
            raise TypeError(f"rows must be a list of rows (dicts), got {type(rows).__name__}")
        if not rows:
            raise ValueError("PackedRowsCollator received no rows")
        ids, labels, positions, segments = [], [], [], []
        piece_samples, piece_lengths, piece_starts, piece_rows = [], [], [], []
        for i, row in enumerate(rows):
            tokens = _row_ints(row, ROW_TOKENS, i)
            length = tokens.size
            if length == 0:
                raise ValueError(f"row {i} has no tokens")
            if self.max_len is not None and length > self.max_len:
                raise ValueError(f"row {i} has {length} tokens, more than max_len={self.max_len}")
            row_positions = _row_ints(row, ROW_POSITIONS, i, required=False)
            if row_positions is not None and row_positions.size != length:
                raise ValueError(
                    f"row {i}: {ROW_POSITIONS!r} has {row_positions.size} entries but input_ids has {length}"
                )
            cu = _segments_of_row(row, i, length, row_positions)
            seg_lengths = np.diff(cu)
            expected = np.arange(length, dtype=np.int64) - np.repeat(cu[:-1], seg_lengths)
            if row_positions is not None and not np.array_equal(row_positions, expected):
                bad = int(np.flatnonzero(row_positions != expected)[0])
                raise ValueError(
                    f"row {i}: {ROW_POSITIONS!r} do not restart at the segments of {ROW_SEGMENTS!r} (token {bad}: "
                    f"position {int(row_positions[bad])}, expected {int(expected[bad])})"
                )
            row_labels = _row_ints(row, ROW_LABELS, i, required=False)
            if row_labels is None:
                row_labels = tokens.copy()
                row_labels[cu[:-1]] = IGNORE_INDEX
            elif row_labels.size != length:
                raise ValueError(
                    f"row {i}: {ROW_LABELS!r} has {row_labels.size} entries but input_ids has {length}"
                )
            sample_ids = _row_ints(row, ROW_SAMPLE_IDS, i, required=False)
            lengths = _row_ints(row, ROW_PIECE_LENGTHS, i, required=False)
            if sample_ids is not None and lengths is not None:
                starts = _row_ints(row, ROW_PIECE_STARTS, i, required=False)
                starts = np.zeros_like(lengths) if starts is None else starts
                if not (sample_ids.size == lengths.size == starts.size) or int(lengths.sum()) != length:
                    raise ValueError(
                        f"row {i}: {ROW_SAMPLE_IDS!r}, {ROW_PIECE_LENGTHS!r} and {ROW_PIECE_STARTS!r} must list the "
                        f"same pieces and {ROW_PIECE_LENGTHS!r} must add up to the row's {length} tokens; got "
                        f"{sample_ids.size}, {lengths.size}, {starts.size} pieces of {int(lengths.sum())} tokens"
                    )
                piece_bounds = np.concatenate([[0], np.cumsum(lengths)])
                if np.any(lengths <= 0) or not np.all(np.isin(cu, piece_bounds)):
                    raise ValueError(
                        f"row {i}: a segment of {ROW_SEGMENTS!r} starts or ends inside a piece of "
                        f"{ROW_PIECE_LENGTHS!r} (segments {cu[:8].tolist()}, pieces {lengths[:8].tolist()})"
                    )
            else:
                sample_ids = np.full(seg_lengths.size, -1, dtype=np.int64)
                lengths, starts = seg_lengths, np.zeros_like(seg_lengths)
            ids.append(tokens)
            labels.append(row_labels)
            positions.append(expected)
            segments.append(cu)
            piece_samples.append(sample_ids)
            piece_lengths.append(lengths)
            piece_starts.append(starts)
            piece_rows.append(np.full(lengths.size, i, dtype=np.int64))
        row_lengths = np.array([t.size for t in ids], dtype=np.int64)
        pack_offsets = np.concatenate([[0], np.cumsum(row_lengths)])
        cu = np.concatenate([segments[0]] + [s[1:] + o for s, o in zip(segments[1:], pack_offsets[1:-1])])
        num_tokens = int(pack_offsets[-1])
        if num_tokens > 2**31 - 1:
            raise ValueError(f"{num_tokens} tokens do not fit int32 cu_seqlens")
        max_len = int(row_lengths.max()) if self.max_len is None else self.max_len

        def flat(parts):
            return torch.from_numpy(np.concatenate(parts)).view(1, num_tokens)

        cu_cpu = torch.from_numpy(cu.astype(np.int32))
        pack_index = torch.from_numpy(np.concatenate(piece_rows))
        sample_index = torch.from_numpy(np.concatenate(piece_samples))
        pack_offsets_t = torch.from_numpy(pack_offsets)
        packing = Packing(
            pack_id=pack_index,
            sample_index=sample_index,
            offset=torch.from_numpy(np.concatenate(piece_starts)),
            length=torch.from_numpy(np.concatenate(piece_lengths)),
            pack_offsets=pack_offsets_t,
            max_len=max_len,
            num_packs=len(rows),
        )
        return PackedBatch(
            input_ids=flat(ids),
            labels=flat(labels),
            position_ids=flat(positions),
            cu_seqlens=cu_cpu,
            cu_seqlens_cpu=cu_cpu,
            max_seqlen=int(np.diff(cu).max()),
            attention="sample" if any(s.size > 2 for s in segments) else "pack",
            sample_index=sample_index,
            pack_index=pack_index,
            pack_offsets=pack_offsets_t,
            max_len=max_len,
            max_pack_length=int(row_lengths.max()),
            packing=packing,
        )

    def __call__(self, rows, return_tensors: str | None = None) -> dict:
        """Collate ``rows`` (see the class docstring) -> dict of ``input_ids``, ``labels``, ``position_ids`` ..."""
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors must be 'pt', got {return_tensors!r}")
        return batch_to_dict(
            self.pack(rows),
            flash_attn_kwargs=self.return_flash_attn_kwargs,
            num_items_in_batch=self.return_num_items_in_batch,
        )


def batch_to_dict(
    batch: PackedBatch, *, flash_attn_kwargs: bool = True, num_items_in_batch: bool = True
) -> dict:
    """The model inputs of a packed batch as a collator returns them: ``input_ids``, ``labels``,
    ``position_ids`` (1, T); with ``flash_attn_kwargs`` ``cu_seq_lens_q/k`` and ``max_length_q/k``; with
    ``num_items_in_batch`` the batch's label-token count (0-d int64 tensor)."""
    out = {"input_ids": batch.input_ids, "labels": batch.labels, "position_ids": batch.position_ids}
    if flash_attn_kwargs:
        out.update(
            cu_seq_lens_q=batch.cu_seqlens,
            cu_seq_lens_k=batch.cu_seqlens,
            max_length_q=batch.max_seqlen,
            max_length_k=batch.max_seqlen,
        )
    if num_items_in_batch:
        out["num_items_in_batch"] = batch.num_items_in_batch
    return out


# ---------------------------------------------------------------------------------------- transformers attention


class _Segments(NamedTuple):
    """What :func:`~tfp_kernels.varlen_attention` reads from a ``batch``: device and host boundaries."""

    cu_seqlens: torch.Tensor
    cu_seqlens_cpu: torch.Tensor
    max_seqlen: int


class _LastSegments:
    """The segments derived from the last tensor seen (the model passes the same ``position_ids`` /
    ``cu_seq_lens_q`` object to every layer: one host copy per forward instead of one per layer)."""

    def __init__(self) -> None:
        self._ref = None
        self._key = None
        self._value = None

    def get(self, tensor: torch.Tensor, key, make) -> _Segments:
        if self._ref is not None and self._ref() is tensor and self._key == (tensor._version, key):
            return self._value
        value = make()
        self._ref, self._key, self._value = weakref.ref(tensor), (tensor._version, key), value
        return value


_LAST_SEGMENTS = _LastSegments()


def _segments_from_cu(cu_q, cu_k, max_q, max_k, num_tokens: int, device) -> _Segments:
    if (
        cu_k is not None
        and cu_k is not cu_q
        and (cu_k.shape != cu_q.shape or not torch.equal(cu_k.cpu(), cu_q.cpu()))
    ):
        raise ValueError(
            "cu_seq_lens_k differs from cu_seq_lens_q: the tfp_varlen attention is self-attention over one "
            "packed batch (the same segments for queries and keys)"
        )
    if max_k is not None and max_q is not None and int(max_k) != int(max_q):
        raise ValueError(f"max_length_k ({max_k}) differs from max_length_q ({max_q})")
    if not isinstance(cu_q, torch.Tensor):
        raise TypeError(f"cu_seq_lens_q must be a tensor, got {type(cu_q).__name__}")
    host = cu_q.detach().cpu()
    if host.dtype != torch.int32:
        if host.dtype.is_floating_point or host.dtype == torch.bool:
            raise TypeError(f"cu_seq_lens_q must hold integers, got {host.dtype}")
        host = host.to(torch.int32)
    host = host.contiguous()
    device_cu = cu_q if (cu_q.dtype == torch.int32 and cu_q.device == device) else host.to(device)
    max_seqlen = None if max_q is None else int(max_q)
    if max_seqlen is None and host.numel() > 1:
        max_seqlen = int(torch.diff(host.to(torch.int64)).max())
    return _Segments(device_cu.contiguous(), host, 0 if max_seqlen is None else max_seqlen)


def _segments_from_positions(position_ids: torch.Tensor, batch_size: int, length: int, device) -> _Segments:
    """Segment boundaries of the flattened (B * L) tokens: every row starts one, and so does every token
    whose position id is not its predecessor's + 1 (transformers' rule for packed sequences)."""
    positions = position_ids.expand(batch_size, length).to(device)
    starts = torch.ones(batch_size, length, dtype=torch.bool, device=device)
    starts[:, 1:] = positions[:, 1:] - positions[:, :-1] != 1
    flat = torch.nonzero(starts.reshape(-1)).reshape(-1)
    host = torch.cat([flat.cpu(), torch.tensor([batch_size * length])]).to(torch.int32)
    max_seqlen = int(torch.diff(host.to(torch.int64)).max())
    return _Segments(host.to(device), host, max_seqlen)


def _segments_per_row(batch_size: int, length: int, device) -> _Segments:
    host = (torch.arange(batch_size + 1, dtype=torch.int64) * length).to(torch.int32)
    return _Segments(host.to(device), host, length)


def hf_varlen_attention_forward(
    module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    *,
    backend: str = "auto",
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """A transformers attention function (``AttentionInterface``) that runs :func:`~tfp_kernels.varlen_attention`.

    The segments come from, first that applies: a 2-D padding ``attention_mask`` (each row's kept tokens
    are one segment, as transformers' flash-attention path unpads them); ``cu_seq_lens_q`` /
    ``cu_seq_lens_k`` and ``max_length_q`` / ``max_length_k`` in ``kwargs`` (what the collators return; the
    whole ``B * L`` token range, as flash-attention's varlen call); ``position_ids`` (a segment starts at
    every row start and wherever a position is not its predecessor's + 1, the rule of transformers' sdpa /
    eager masks); else one segment per row. The host copy of the boundaries is made once per forward (the
    model passes the same tensor to every layer).

    Args:
        module: the attention module (its ``is_causal`` is used when ``is_causal`` is None).
        query: (B, H, L, Dh); key, value: (B, H_kv, L, Dh), floating, one device (grouped-query attention
            when ``H_kv < H``). Queries and keys have the same length: a forward over whole sequences (training,
            or a forward without a cache).
        attention_mask: None, or a (B, L) padding mask (True / 1 = a real token).
        dropout: must be 0 (no attention dropout here).
        scaling: the softmax scale (default ``1 / sqrt(Dh)``).
        sliding_window, softcap: must be None (not supported).
        is_causal: causal attention inside each segment (default: ``module.is_causal``, else True).
        backend: the :func:`~tfp_kernels.varlen_attention` backend (``"auto"``: flash-attn > torch varlen >
            sdpa).
        kwargs: ``cu_seq_lens_q``, ``cu_seq_lens_k``, ``max_length_q``, ``max_length_k``, ``position_ids``;
            others are ignored.

    Returns:
        ``(attn_output, None)``: (B, L, H, Dh), dtype and device of ``query`` (zeros at padded tokens).

    Raises:
        ValueError / NotImplementedError: keys of another length than the queries (a cache), dropout, a
        sliding window, soft-capping, a 4-D mask, inconsistent ``cu_seq_lens_q`` / ``_k``.
    """
    if query.dim() != 4 or key.dim() != 4:
        raise ValueError(f"query/key must be (B, H, L, Dh), got {tuple(query.shape)} and {tuple(key.shape)}")
    batch_size, num_heads, length, head_dim = query.shape
    if key.shape[2] != length:
        raise NotImplementedError(
            f"the tfp_varlen attention runs over whole sequences (queries and keys of one length, no cache); got "
            f"{length} queries and {key.shape[2]} keys. For generation switch the model to another attention, "
            "e.g. model.set_attn_implementation('sdpa')"
        )
    if dropout:
        raise NotImplementedError(
            f"the tfp_varlen attention has no attention dropout (got dropout={dropout})"
        )
    if sliding_window is not None or softcap is not None or kwargs.get("s_aux") is not None:
        raise NotImplementedError(
            "the tfp_varlen attention supports no sliding window, soft-capping or sinks"
        )
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    device = query.device
    q = query.transpose(1, 2).reshape(batch_size * length, num_heads, head_dim)
    k = key.transpose(1, 2).reshape(batch_size * length, key.shape[1], head_dim)
    v = value.transpose(1, 2).reshape(batch_size * length, value.shape[1], value.shape[3])

    if attention_mask is not None:
        if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch_size, length):
            raise ValueError(
                f"the tfp_varlen attention takes a 2-D (B, L) = ({batch_size}, {length}) padding mask, got shape "
                f"{tuple(attention_mask.shape)}"
            )
        keep = attention_mask.reshape(-1).to(device=device, dtype=torch.bool)
        index = torch.nonzero(keep).reshape(-1)
        row_lengths = attention_mask.to(torch.bool).sum(dim=1).cpu().to(torch.int64)
        host = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(row_lengths, 0)]).to(torch.int32)
        longest = int(row_lengths.max()) if row_lengths.numel() else 0
        segments = _Segments(host.to(device), host, longest)
        out = varlen_attention(
            q.index_select(0, index),
            k.index_select(0, index),
            v.index_select(0, index),
            segments,
            causal=causal,
            softmax_scale=scaling,
            backend=backend,
        )
        full = out.new_zeros(batch_size * length, num_heads, out.shape[2])
        full = full.index_copy(0, index, out)
        return full.view(batch_size, length, num_heads, -1), None

    cu_q = kwargs.get("cu_seq_lens_q")
    position_ids = kwargs.get("position_ids")
    if cu_q is not None:
        cu_k, max_q, max_k = (
            kwargs.get("cu_seq_lens_k"),
            kwargs.get("max_length_q"),
            kwargs.get("max_length_k"),
        )
        key_ = (None if max_q is None else int(max_q), id(cu_k), str(device))
        segments = _LAST_SEGMENTS.get(
            cu_q, key_, lambda: _segments_from_cu(cu_q, cu_k, max_q, max_k, batch_size * length, device)
        )
    elif position_ids is not None:
        segments = _LAST_SEGMENTS.get(
            position_ids,
            (batch_size, length, str(device)),
            lambda: _segments_from_positions(position_ids, batch_size, length, device),
        )
    else:
        segments = _segments_per_row(batch_size, length, device)
    out = varlen_attention(q, k, v, segments, causal=causal, softmax_scale=scaling, backend=backend)
    return out.view(batch_size, length, num_heads, -1), None


def _padding_mask_only(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
):
    """The mask function registered with the attention (transformers' ``AttentionMaskInterface``): no 4-D
    mask is ever built; the 2-D padding mask is passed on only when it hides a token (as for flash-attention)."""
    if attention_mask is not None:
        attention_mask = attention_mask[:, -kv_length:]
        if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
            attention_mask = None
    return attention_mask


def register_hf_attention(name: str = "tfp_varlen", *, backend: str = "auto") -> str:
    """Register :func:`~tfp_kernels.varlen_attention` as a transformers attention implementation.

    After the call, ``AutoModelForCausalLM.from_pretrained(..., attn_implementation=name)`` (or
    ``model.set_attn_implementation(name)``, or ``config._attn_implementation = name``) runs every attention
    layer through :func:`hf_varlen_attention_forward`: packed batches (``[1, T]`` with ``cu_seq_lens_q/k``
    or restarting ``position_ids``, e.g. from :class:`PackedRowsCollator`, :class:`~tfp_kernels.TFPDataCollator`
    or ``PackedBatch.to_hf_kwargs()``) attend within their segments with flash-attn when it is installed,
    torch's varlen attention on CUDA, else SDPA per chunk of segments (CPU, float32). A mask function is
    registered under the same name (``AttentionMaskInterface``): the model builds no 4-D mask, and a 2-D
    padding mask reaches the attention only when it hides a token.

    Args:
        name: the ``attn_implementation`` name (default ``"tfp_varlen"``).
        backend: the :func:`~tfp_kernels.varlen_attention` backend: ``"auto"`` (default), ``"flash_attn"``,
            ``"torch_varlen"``, ``"sdpa"`` or ``"reference"``.

    Returns:
        ``name``.

    Raises:
        ImportError: transformers is not installed. ValueError: an unknown backend or an empty name.

    Examples::

        >>> import tfp_kernels, transformers
        >>> tfp_kernels.register_hf_attention()
        'tfp_varlen'
        >>> "tfp_varlen" in transformers.AttentionInterface._global_mapping
        True
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    try:
        from transformers import AttentionInterface
    except ImportError as err:  # pragma: no cover - transformers is a test dependency
        raise ImportError("register_hf_attention needs transformers (pip install transformers)") from err
    forward = functools.partial(hf_varlen_attention_forward, backend=backend)
    functools.update_wrapper(forward, hf_varlen_attention_forward)
    AttentionInterface.register(name, forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:  # pragma: no cover - transformers < 4.53 builds masks per attention type itself
        return name
    AttentionMaskInterface.register(name, _padding_mask_only)
    return name
