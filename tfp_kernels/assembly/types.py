"""Types of packed-batch assembly: the token containers :class:`Jagged` / :class:`Padded`, and the result
:class:`PackedBatch` (with its optional :class:`PaddedBatch` view).

Shape letters (as in :mod:`tfp_kernels.packing.types`): ``N`` samples, ``M`` pieces, ``P`` packs, ``T``
tokens in the packed batch, ``S`` attention segments (``P`` with ``attention="pack"``, ``M`` with
``attention="sample"``), ``B``/``L`` the shape of a padded token tensor.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:  # pragma: no cover
    from ..packing import Packing

IGNORE_INDEX = -100
"""Label of tokens that take no part in the loss (PyTorch's ``cross_entropy`` default ``ignore_index``)."""


class Jagged(NamedTuple):
    """Samples stored back to back: sample ``i`` is ``values[offsets[i]:offsets[i + 1]]``.

    ``values``: (total,) integer tensor, any device. ``offsets``: (N + 1,) integer tensor, non-decreasing,
    on the CPU (no host sync) or on the device of ``values``.
    """

    values: torch.Tensor
    offsets: torch.Tensor


class Padded(NamedTuple):
    """Samples as the rows of a padded tensor: sample ``i`` is ``tokens[i, :lengths[i]]``.

    ``tokens``: (B, L) integer tensor, any device. ``lengths``: (B,) integer tensor, each in ``[0, L]``, on
    the CPU (no host sync) or on the device of ``tokens``.
    """

    tokens: torch.Tensor
    lengths: torch.Tensor


def as_token_container(tokens):
    """``tokens`` as ``Jagged``, ``Padded`` or a list/tuple of per-sample tensors (the containers that
    :func:`~tfp_kernels.assembly.assemble` and the embedders read).

    A plain 2-tuple of tensors becomes ``Jagged`` when its first element is 1-D and ``Padded`` when it is 2-D;
    ``Jagged``/``Padded`` and other lists/tuples are returned as they are.

    Raises:
        TypeError: a single tensor (its sample boundaries are unknown), or anything else.
    """
    if isinstance(tokens, (Jagged, Padded)):
        return tokens
    if isinstance(tokens, torch.Tensor):
        raise TypeError(
            f"tokens is a single tensor of shape {tuple(tokens.shape)}; pass a list of 1-D tensors, "
            "Jagged(values, offsets) or Padded(tokens, lengths) (a [B, L] tensor needs its lengths)"
        )
    if isinstance(tokens, tuple) and len(tokens) == 2 and all(isinstance(t, torch.Tensor) for t in tokens):
        return Padded(*tokens) if tokens[0].dim() == 2 else Jagged(*tokens)
    if isinstance(tokens, (list, tuple)):
        return tokens
    raise TypeError(
        "tokens must be a list of 1-D integer tensors, Jagged(values, offsets) or Padded(tokens, lengths), "
        f"got {type(tokens).__name__}"
    )


class PaddedBatch(NamedTuple):
    """A packed batch laid out as ``[P, pad_to]`` rows, one pack per row, padding at the end of each row.

    All (P, pad_to), torch.int64, on the device of the tokens. Padding has ``input_ids == pad_id``,
    ``labels == -100``, ``attention_mask == 0`` and position ids that continue the last segment of the row,
    so that with causal attention no real token sees a pad and transformers' detection of packed sequences
    from restarting position ids sees no extra boundary. Pass ``attention_mask`` only where the model
    expects it (with ``attention="pack"`` it is the classic padded causal batch; with ``"sample"`` an
    ``attention_mask`` would disable transformers' per-sample masking).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor


@dataclass(frozen=True, eq=False)
class PackedBatch:
    """A packed batch in the flat ``[1, T]`` layout of flash-attention's varlen functions and of
    transformers' ``DataCollatorWithFlattening``, built by :func:`~tfp_kernels.assembly.assemble`.

    Attributes:
        input_ids: (1, T), torch.int64, on the device of the tokens: the pieces' tokens in pack order.
        labels: (1, T), torch.int64, same device: the given labels (or the token ids), with -100 at the first
            token of every attention segment (its predecessor in the flat layout belongs to another segment).
        position_ids: (1, T), torch.int64, same device: 0, 1, ... from the start of every segment.
        cu_seqlens: (S + 1,), torch.int32, contiguous, same device: segment boundaries; ``cu_seqlens[0] == 0``,
            increasing, ``cu_seqlens[-1] == T`` (flash-attention's ``cu_seqlens_q/k``).
        cu_seqlens_cpu: (S + 1,), torch.int32, CPU copy of ``cu_seqlens`` (no device sync needed to read it).
        max_seqlen: the longest segment (Python int; flash-attention's ``max_seqlen_q/k``).
        attention: ``"pack"`` (one segment per pack, later samples see earlier ones: the TFP paper) or
            ``"sample"`` (one segment per piece: no attention across samples).
        sample_index: (M,), torch.int64, same device: the input sample of each piece, in pack order.
        pack_index: (M,), torch.int64, same device: the pack of each piece (non-decreasing).
        pack_offsets: (P + 1,), torch.int64, same device: token offsets of the packs in the flat layout.
        max_len: capacity of a pack (Python int).
        max_pack_length: tokens in the fullest pack (Python int).
        packing: the :class:`~tfp_kernels.packing.Packing` the batch was assembled from.
        padded: the :class:`PaddedBatch` view when ``assemble(..., pad_to=...)`` asked for it, else None.
        order: (N,), torch.int64, same device: the order of the input samples that was packed, when the
            batch comes from :func:`~tfp_kernels.pack_gpu` (else None).
        order_stats: the :class:`~tfp_kernels.OrderStats` of that order (``pack_gpu(order="tfp")``), else None.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    cu_seqlens_cpu: torch.Tensor
    max_seqlen: int
    attention: str
    sample_index: torch.Tensor
    pack_index: torch.Tensor
    pack_offsets: torch.Tensor
    max_len: int
    max_pack_length: int
    packing: Packing
    padded: PaddedBatch | None = None
    order: torch.Tensor | None = None
    order_stats: object | None = None

    # ------------------------------------------------------------------ sizes and stats

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    @property
    def num_tokens(self) -> int:
        """``T``."""
        return self.input_ids.shape[1]

    @property
    def num_packs(self) -> int:
        """``P``."""
        return self.pack_offsets.numel() - 1

    @property
    def num_pieces(self) -> int:
        """``M``."""
        return self.sample_index.numel()

    @property
    def num_segments(self) -> int:
        """``S``, the number of attention segments (``len(cu_seqlens) - 1``)."""
        return self.cu_seqlens_cpu.numel() - 1

    @property
    def fill_ratio(self) -> float:
        """``T / (P * max_len)``; 0.0 without packs."""
        return self.num_tokens / (self.num_packs * self.max_len) if self.num_packs else 0.0

    @property
    def num_pad_tokens(self) -> int:
        """Padding needed to lay the packs out as ``[P, max_len]`` rows: ``P * max_len - T``."""
        return self.num_packs * self.max_len - self.num_tokens

    def stats(self) -> dict:
        """Counts of the batch as a dict of Python numbers (no device sync)."""
        return {
            "attention": self.attention,
            "num_packs": self.num_packs,
            "num_pieces": self.num_pieces,
            "num_segments": self.num_segments,
            "num_tokens": self.num_tokens,
            "max_len": self.max_len,
            "max_seqlen": self.max_seqlen,
            "max_pack_length": self.max_pack_length,
            "fill_ratio": self.fill_ratio,
            "num_pad_tokens": self.num_pad_tokens,
        }

    # ------------------------------------------------------------------ conversions

    @property
    def num_items_in_batch(self) -> torch.Tensor:
        """The label tokens that count in the loss: a 0-d torch.int64 tensor on the batch's device (no sync).

        ``(labels[:, 1:] != -100).sum()``: transformers' causal-LM loss shifts the labels (the logits at token
        ``i`` predict ``labels[i + 1]``), so the first label never counts; here it is -100 anyway (the first
        token of a segment). Transformers' ``Trainer`` counts the same way. Sum it over the micro-batches of
        an optimizer step and over the ranks (:func:`~tfp_kernels.global_num_items_in_batch`) and pass the
        total to the model to get the per-token mean of the whole step.
        """
        return (self.labels[:, 1:] != IGNORE_INDEX).sum()

    def to_hf_kwargs(self, *, num_items_in_batch=None) -> dict:
        """The keyword arguments transformers models take for a packed batch (as ``DataCollatorWithFlattening``
        with ``return_flash_attn_kwargs=True`` produces them): ``input_ids``, ``labels``, ``position_ids``
        (1, T) int64; ``cu_seq_lens_q``, ``cu_seq_lens_k`` (S + 1,) int32; ``max_length_q``, ``max_length_k``
        Python ints. There is deliberately no ``attention_mask``: with one, transformers' sdpa/eager paths
        stop detecting the segments from the position ids and let them attend to each other. Call the model
        with ``use_cache=False`` (a cache also disables that detection).

        Args:
            num_items_in_batch: when given (an int or a 0-d tensor, e.g. the global count of
                :func:`~tfp_kernels.global_num_items_in_batch`), it is added under that key: transformers'
                causal-LM loss is then the sum of the token losses divided by it, instead of their mean.
        """
        kwargs = {
            "input_ids": self.input_ids,
            "labels": self.labels,
            "position_ids": self.position_ids,
            "cu_seq_lens_q": self.cu_seqlens,
            "cu_seq_lens_k": self.cu_seqlens,
            "max_length_q": self.max_seqlen,
            "max_length_k": self.max_seqlen,
        }
        if num_items_in_batch is not None:
            kwargs["num_items_in_batch"] = num_items_in_batch
        return kwargs

    # ------------------------------------------------------------------ micro-batches

    #: fields of a subclass that hold one entry per piece, (M,): sliced with the pieces by :meth:`micro_batches`
    _extra_piece_fields = ()

    def micro_batches(self, n: int) -> list[PackedBatch]:
        """Split the batch into ``n`` micro-batches of whole packs (for gradient accumulation).

        The packs are cut into ``n`` consecutive groups of near-equal size (the first ``P % n`` groups hold
        one pack more), as ``torch.arange(P).tensor_split(n)``. Micro-batch ``j`` is the batch of its packs
        alone: every token field is the slice of its packs' tokens, ``cu_seqlens`` / ``cu_seqlens_cpu`` /
        ``pack_offsets`` are rebased to start at 0 (segments never cross a pack, so no segment is cut),
        ``sample_index`` / ``pack_index`` (rebased) and the ``packing``'s per-piece fields are the slice of
        its pieces, ``max_seqlen`` / ``max_pack_length`` are its own, the ``padded`` view (when present)
        holds its rows. ``order`` / ``order_stats`` and the ``packing``'s per-sample fields stay those of the
        whole batch. Concatenating the micro-batches' tokens gives back the batch's.

        Args:
            n: the number of micro-batches, ``1 <= n <= P``.

        Returns:
            A list of ``n`` batches of the same type as this one, on its device.

        Raises:
            ValueError: ``n`` is not an int in ``[1, P]``.

        Host syncs on CUDA: one (a copy of the pack and piece offsets to the host).

        Examples::

            >>> import torch
            >>> from tfp_kernels import assemble, pack_lengths
            >>> tokens = [torch.arange(n) + 10 * n for n in (3, 2, 4, 1, 2)]
            >>> batch = assemble(tokens, pack_lengths([3, 2, 4, 1, 2], max_len=5), attention="sample")
            >>> batch.pack_offsets.tolist(), batch.cu_seqlens.tolist()  # packs 3+2 | 4+1 | 2
            ([0, 5, 10, 12], [0, 3, 5, 9, 10, 12])
            >>> [mb.pack_offsets.tolist() for mb in batch.micro_batches(2)]
            [[0, 5, 10], [0, 2]]
            >>> [mb.cu_seqlens.tolist() for mb in batch.micro_batches(2)]
            [[0, 3, 5, 9, 10], [0, 2]]
        """
        num_packs = self.num_packs
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= max(num_packs, 1):
            raise ValueError(
                f"n must be an int in [1, {num_packs}] (the number of packs: micro-batches hold whole packs), "
                f"got {n!r}"
            )
        if num_packs == 0:
            return [self]
        bounds = [0]
        for size in (num_packs // n + (j < num_packs % n) for j in range(n)):
            bounds.append(bounds[-1] + size)
        piece_offsets = torch.searchsorted(
            self.pack_index, torch.arange(num_packs + 1, dtype=self.pack_index.dtype, device=self.device)
        )
        host = torch.stack([self.pack_offsets.to(torch.int64), piece_offsets.to(torch.int64)]).cpu()
        return [self._pack_range(first, last, host) for first, last in itertools.pairwise(bounds)]

    def _pack_range(self, first: int, last: int, host: torch.Tensor) -> PackedBatch:
        """Packs ``first .. last - 1`` as a batch of their own; ``host``: (2, P + 1) CPU int64, the pack
        offsets and the index of the first piece of every pack."""
        token_start, token_end = int(host[0, first]), int(host[0, last])
        piece_start, piece_end = int(host[1, first]), int(host[1, last])
        cu = self.cu_seqlens_cpu.to(torch.int64)
        lo = int(torch.searchsorted(cu, token_start, side="left"))
        hi = int(torch.searchsorted(cu, token_end, side="right")) - 1
        if int(cu[lo]) != token_start or int(cu[hi]) != token_end:  # pragma: no cover - assemble never does it
            raise ValueError(f"a segment of cu_seqlens crosses pack {first} or {last}: cannot split the batch")
        cu_cpu = (cu[lo : hi + 1] - token_start).to(torch.int32)
        cu_device = (self.cu_seqlens[lo : hi + 1] - token_start).contiguous()
        pack_offsets_host = host[0, first : last + 1] - token_start
        tokens = slice(token_start, token_end)
        pieces = slice(piece_start, piece_end)
        packing = self.packing
        if packing is not None:
            packing = dataclasses.replace(
                packing,
                pack_id=packing.pack_id[pieces] - first,
                sample_index=packing.sample_index[pieces],
                offset=packing.offset[pieces],
                length=packing.length[pieces],
                pack_offsets=packing.pack_offsets[first : last + 1] - token_start,
                num_packs=last - first,
            )
        padded = self.padded
        if padded is not None:
            padded = PaddedBatch(*(field[first:last] for field in padded))
        fields = {
            "input_ids": self.input_ids[:, tokens],
            "labels": self.labels[:, tokens],
            "position_ids": self.position_ids[:, tokens],
            "cu_seqlens": cu_device,
            "cu_seqlens_cpu": cu_cpu,
            "max_seqlen": int(torch.diff(cu_cpu).max()) if cu_cpu.numel() > 1 else 0,
            "sample_index": self.sample_index[pieces],
            "pack_index": self.pack_index[pieces] - first,
            "pack_offsets": self.pack_offsets[first : last + 1] - token_start,
            "max_pack_length": int(torch.diff(pack_offsets_host).max()),
            "packing": packing,
            "padded": padded,
        }
        for name in self._extra_piece_fields:
            value = getattr(self, name)
            fields[name] = None if value is None else value[pieces]
        return dataclasses.replace(self, **fields)

    def to_padded(self, pad_to: int | None = None, *, pad_id: int = 0) -> PaddedBatch:
        """The ``[P, pad_to]`` padded view of the batch (see :class:`PaddedBatch`), on its device.

        Args:
            pad_to: row length, ``>= max_pack_length``; default ``max_len``.
            pad_id: token id of the padding.

        Raises:
            ValueError: ``pad_to`` shorter than the fullest pack, or not a positive int.
        """
        from .api import _as_int, _as_pad_to

        pad_to = self.max_len if pad_to is None else _as_pad_to(pad_to, self.max_pack_length)
        pad_id = _as_int(pad_id, "pad_id")
        device = self.device
        num_packs, num_tokens = self.num_packs, self.num_tokens
        pack_lengths = torch.diff(self.pack_offsets)
        row = torch.repeat_interleave(
            torch.arange(num_packs, dtype=torch.int64, device=device), pack_lengths, output_size=num_tokens
        )
        col = torch.arange(num_tokens, dtype=torch.int64, device=device) - self.pack_offsets.index_select(
            0, row
        )
        flat = row * pad_to + col
        size = num_packs * pad_to

        def scatter(fill: int, values: torch.Tensor) -> torch.Tensor:
            out = torch.full((size,), fill, dtype=torch.int64, device=device)
            out.index_copy_(0, flat, values)
            return out.view(num_packs, pad_to)

        if self.attention == "sample" and num_packs > 0:
            # padding continues the last segment of its row: position = column - start of that segment
            cu = self.cu_seqlens.to(torch.int64)
            last = torch.searchsorted(cu, self.pack_offsets[1:]) - 1
            last_start = cu.index_select(0, last) - self.pack_offsets[:-1]
        else:
            last_start = torch.zeros(num_packs, dtype=torch.int64, device=device)
        grid = torch.arange(pad_to, dtype=torch.int64, device=device).unsqueeze(0) - last_start.unsqueeze(1)
        positions = grid.reshape(-1).index_copy(0, flat, self.position_ids[0]).view(num_packs, pad_to)
        return PaddedBatch(
            input_ids=scatter(pad_id, self.input_ids[0]),
            labels=scatter(IGNORE_INDEX, self.labels[0]),
            position_ids=positions,
            attention_mask=scatter(0, torch.ones(num_tokens, dtype=torch.int64, device=device)),
        )

    def with_padded(self, pad_to: int | None = None, *, pad_id: int = 0) -> PackedBatch:
        """A copy of the batch whose ``padded`` field holds :meth:`to_padded` ``(pad_to, pad_id=pad_id)``."""
        return dataclasses.replace(self, padded=self.to_padded(pad_to, pad_id=pad_id))

    # ------------------------------------------------------------------ display

    def __repr__(self) -> str:
        return (
            f"PackedBatch(attention={self.attention!r}, {self.num_packs} packs, {self.num_pieces} pieces, "
            f"{self.num_tokens} tokens, max_seqlen={self.max_seqlen}, fill {self.fill_ratio:.4f}, "
            f"device={self.device})"
        )
