"""Bin packing of sample lengths into packs of at most ``max_len`` tokens.

Public API:

- :func:`pack_lengths` ``(lengths, max_len, *, strategy="next_fit", overlong="error", window=1024,
  embeddings=None, min_distance=None, metric="l2", keep_apart=0) -> Packing`` with strategies ``"stream"``,
  ``"next_fit"``, ``"fill_in_order"``, ``"window_best_fit"``, ``"bfd"`` (``keep_apart``: samples closer than
  ``min_distance`` kept out of one pack where it can, with ``"fill_in_order"`` and ``"next_fit"``);
- :class:`Packing`: pieces in pack order (``pack_id``, ``sample_index``, ``offset``, ``length``),
  ``pack_offsets`` and the counts of the over-long policy;
- :func:`shuffle_packs` (seeded epoch shuffle of the packs), :func:`select_packs`, :func:`pack_permutation`.

Lower level: :func:`next_fit_pack_ids` (compiled op or pure torch), :func:`next_fit_pack_ids_torch`,
:func:`best_fit_decreasing` (compiled op or pure Python), :func:`best_fit_decreasing_python`,
:func:`stream_pack` (compiled op or pure torch), :func:`stream_pack_torch`, :func:`fill_in_order_pack`
(compiled op or pure Python), :func:`fill_in_order_pack_python`, :func:`expand_overlong`; plain-Python oracles in
:mod:`tfp_kernels.packing.reference`.
"""

from .best_fit import best_fit_decreasing, best_fit_decreasing_python
from .binpack import (
    DEFAULT_WINDOW,
    OVERLONG_POLICIES,
    STRATEGIES,
    Pieces,
    expand_overlong,
    pack_lengths,
)
from .fill_in_order import fill_in_order_pack, fill_in_order_pack_python
from .next_fit import next_fit_pack_ids, next_fit_pack_ids_torch
from .shuffle import pack_permutation, select_packs, shuffle_packs
from .stream import stream_pack, stream_pack_torch
from .types import Packing

__all__ = [
    "DEFAULT_WINDOW",
    "OVERLONG_POLICIES",
    "STRATEGIES",
    "Packing",
    "Pieces",
    "best_fit_decreasing",
    "best_fit_decreasing_python",
    "expand_overlong",
    "fill_in_order_pack",
    "fill_in_order_pack_python",
    "next_fit_pack_ids",
    "next_fit_pack_ids_torch",
    "pack_lengths",
    "pack_permutation",
    "select_packs",
    "shuffle_packs",
    "stream_pack",
    "stream_pack_torch",
]
