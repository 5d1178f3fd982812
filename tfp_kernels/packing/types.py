"""The result type of bin packing: :class:`Packing`.

Glossary of the shape letters used in ``tfp_kernels.packing``:

- ``N``: number of input samples (``lengths.shape == (N,)``);
- ``M``: number of *pieces*: a sample that is packed whole is one piece, a sample cut by the ``"split"``
  over-long policy is several, a dropped sample is none;
- ``P``: number of packs (bins), each holding at most ``max_len`` tokens;
- ``T``: total number of tokens over all pieces.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class Packing:
    """Assignment of samples (or pieces of them) to packs of at most ``max_len`` tokens.

    The pieces are listed in pack order: all pieces of pack 0 first, in their order inside the pack,
    then those of pack 1, and so on. Concatenating the pieces in this order gives the packed token
    stream; pack ``p`` is the token range ``pack_offsets[p]:pack_offsets[p + 1]`` of that stream.

    Every tensor field is 1-D, ``torch.int64``, contiguous, and on the device of the ``lengths`` that
    :func:`~tfp_kernels.packing.pack_lengths` was given.

    Attributes:
        pack_id: (M,) pack of each piece; ``0 <= pack_id < P``, non-decreasing, every pack non-empty.
        sample_index: (M,) index into ``lengths`` of the sample each piece comes from.
        offset: (M,) first token of the piece within its sample (0 unless the sample was split).
        length: (M,) tokens in the piece; ``1 <= length <= max_len``.
        pack_offsets: (P + 1,) token offsets of the packs in the packed stream: ``pack_offsets[0] == 0``,
            non-decreasing, ``pack_offsets[-1] == T``; ``pack_offsets[p + 1] - pack_offsets[p] <= max_len``.
        max_len: capacity of a pack in tokens (Python int).
        num_packs: ``P`` (Python int).
        num_truncated: samples cut to ``max_len`` tokens by ``overlong="truncate"``.
        num_dropped: samples left out by ``overlong="drop"`` (their indices: ``dropped_index``).
        num_split: samples cut into several pieces by ``overlong="split"``.
        dropped_index: (num_dropped,) increasing indices into ``lengths`` of the dropped samples.
        sample_lengths: (N,) the lengths that were packed (``None`` for a packing built by hand); lets
            :func:`~tfp_kernels.assembly.assemble` check that its tokens match the packing.
    """

    pack_id: torch.Tensor
    sample_index: torch.Tensor
    offset: torch.Tensor
    length: torch.Tensor
    pack_offsets: torch.Tensor
    max_len: int
    num_packs: int
    num_truncated: int = 0
    num_dropped: int = 0
    num_split: int = 0
    dropped_index: torch.Tensor | None = None
    sample_lengths: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.dropped_index is None:
            empty = torch.empty(0, dtype=torch.int64, device=self.pack_id.device)
            object.__setattr__(self, "dropped_index", empty)

    # ------------------------------------------------------------------ derived quantities

    @property
    def device(self) -> torch.device:
        """Device of every tensor field."""
        return self.pack_id.device

    @property
    def num_samples(self) -> int | None:
        """``N``, the number of samples packed (``None`` when ``sample_lengths`` is unknown)."""
        return None if self.sample_lengths is None else self.sample_lengths.numel()

    @property
    def num_pieces(self) -> int:
        """``M``, the number of pieces."""
        return self.pack_id.numel()

    @property
    def pack_lengths(self) -> torch.Tensor:
        """(P,) int64: tokens in each pack, ``diff(pack_offsets)``; each ``<= max_len``."""
        return torch.diff(self.pack_offsets)

    @property
    def piece_offsets(self) -> torch.Tensor:
        """(M + 1,) int64: token offset of each piece in the packed stream, then ``T``."""
        zero = self.length.new_zeros(1)
        return torch.cat([zero, torch.cumsum(self.length, 0)])

    @property
    def pack_piece_offsets(self) -> torch.Tensor:
        """(P + 1,) int64: index of the first piece of each pack, then ``M`` (CSR row pointers)."""
        boundaries = torch.arange(self.num_packs + 1, dtype=torch.int64, device=self.device)
        return torch.searchsorted(self.pack_id, boundaries)

    @property
    def num_tokens(self) -> int:
        """``T``, the number of tokens in all packs (Python int; a host sync on CUDA)."""
        return int(self.pack_offsets[-1])

    @property
    def fill_ratio(self) -> float:
        """``T / (P * max_len)``: how full the packs are on average; 0.0 when there are no packs."""
        if self.num_packs == 0:
            return 0.0
        return self.num_tokens / (self.num_packs * self.max_len)

    # ------------------------------------------------------------------ display

    def summary(self) -> str:
        """One line of counts: packs, pieces, tokens, fill ratio and what the over-long policy did."""
        return (
            f"{self.num_packs} packs of max_len={self.max_len}, {self.num_pieces} pieces, "
            f"{self.num_tokens} tokens, fill {self.fill_ratio:.4f}; truncated={self.num_truncated} "
            f"dropped={self.num_dropped} split={self.num_split}"
        )

    def __repr__(self) -> str:
        return f"Packing({self.summary()}, device={self.device})"
