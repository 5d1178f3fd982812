"""Types of packed-batch assembly: the token containers :class:`Jagged` / :class:`Padded`, and the result
:class:`PackedBatch` (with its optional :class:`PaddedBatch` view).

Shape letters (as in :mod:`tfp_kernels.packing.types`): ``N`` samples, ``M`` pieces, ``P`` packs, ``T``
tokens in the packed batch, ``S`` attention segments (``P`` with ``attention="pack"``, ``M`` with
``attention="sample"``), ``B``/``L`` the shape of a padded token tensor.
"""

from __future__ import annotations

import dataclasses
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

    def to_hf_kwargs(self) -> dict:
        """The keyword arguments transformers models take for a packed batch (as ``DataCollatorWithFlattening``
        with ``return_flash_attn_kwargs=True`` produces them): ``input_ids``, ``labels``, ``position_ids``
        (1, T) int64; ``cu_seq_lens_q``, ``cu_seq_lens_k`` (S + 1,) int32; ``max_length_q``, ``max_length_k``
        Python ints. There is deliberately no ``attention_mask``: with one, transformers' sdpa/eager paths
        stop detecting the segments from the position ids and let them attend to each other. Call the model
        with ``use_cache=False`` (a cache also disables that detection).
        """
        return {
            "input_ids": self.input_ids,
            "labels": self.labels,
            "position_ids": self.position_ids,
            "cu_seq_lens_q": self.cu_seqlens,
            "cu_seq_lens_k": self.cu_seqlens,
            "max_length_q": self.max_seqlen,
            "max_length_k": self.max_seqlen,
        }

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
