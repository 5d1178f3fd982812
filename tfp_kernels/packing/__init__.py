"""Bin packing of sample lengths into packs of at most ``max_len`` tokens.

Public API:

- :func:`pack_lengths` ``(lengths, max_len, *, strategy="next_fit", overlong="error") -> Packing``
- :class:`Packing`: pieces in pack order (``pack_id``, ``sample_index``, ``offset``, ``length``),
  ``pack_offsets`` and the counts of the over-long policy.

Lower level: :func:`next_fit_pack_ids` (compiled op or pure torch), :func:`next_fit_pack_ids_torch`,
:func:`expand_overlong`; plain-Python oracles in :mod:`tfp_kernels.packing.reference`.
"""

from .binpack import OVERLONG_POLICIES, PLANNED_STRATEGIES, STRATEGIES, Pieces, expand_overlong, pack_lengths
from .next_fit import next_fit_pack_ids, next_fit_pack_ids_torch
from .types import Packing

__all__ = [
    "OVERLONG_POLICIES",
    "PLANNED_STRATEGIES",
    "STRATEGIES",
    "Packing",
    "Pieces",
    "expand_overlong",
    "next_fit_pack_ids",
    "next_fit_pack_ids_torch",
    "pack_lengths",
]
