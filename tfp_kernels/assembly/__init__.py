"""Packed-batch assembly: the samples' tokens laid out as a packed batch for varlen attention.

Public API:

- :func:`assemble` ``(tokens, packing, *, attention="pack"|"sample", labels=None, pad_to=None, pad_id=0)
  -> PackedBatch``: flat ``input_ids`` / ``labels`` / ``position_ids`` ``[1, T]``, ``cu_seqlens`` (int32),
  ``max_seqlen``; ``PackedBatch.to_hf_kwargs()`` for transformers models, ``PackedBatch.to_padded()`` for a
  ``[P, pad_to]`` view;
- token containers :class:`Jagged` ``(values, offsets)`` and :class:`Padded` ``(tokens, lengths)`` (or a list
  of 1-D tensors); :data:`IGNORE_INDEX` (-100).

Lower level: :func:`assemble_pieces` (compiled op ``torch.ops.tfp_kernels.assemble`` or pure torch),
:func:`assemble_pieces_torch`; the plain-Python oracle :func:`tfp_kernels.assembly.reference.assemble_reference`.
"""

from .api import ATTENTION_MODES, assemble, assemble_pieces, assemble_pieces_torch
from .types import IGNORE_INDEX, Jagged, PackedBatch, Padded, PaddedBatch

__all__ = [
    "ATTENTION_MODES",
    "IGNORE_INDEX",
    "Jagged",
    "PackedBatch",
    "Padded",
    "PaddedBatch",
    "assemble",
    "assemble_pieces",
    "assemble_pieces_torch",
]
