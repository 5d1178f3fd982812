"""Reordering the packs of a :class:`~tfp_kernels.packing.Packing`: selection and seeded epoch shuffles.

The TFP paper shuffles the *packs* between epochs and never the order inside a pack (that order is what
TFP built). :func:`shuffle_packs` does exactly that, from a seed and an epoch number, the same on every
machine; :func:`select_packs` takes any list of packs (a shuffle, the packs of one training step, the
share of one rank). Plain-Python definition: :func:`tfp_kernels.packing.reference.select_packs_reference`.
"""

from __future__ import annotations

import dataclasses
import operator

import numpy as np
import torch

from .types import Packing

_INTEGER_DTYPES = frozenset({torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64})


def pack_permutation(num_packs: int, seed: int, epoch: int = 0) -> torch.Tensor:
    """A permutation of ``range(num_packs)`` determined by ``(seed, epoch)``.

    ``numpy.random.SeedSequence([seed, epoch])`` mixes the two numbers into the seed of a CPU
    ``torch.Generator``, then ``torch.randperm`` draws the permutation: the same on every machine and
    device for a given torch version, and unrelated between neighbouring epochs or seeds.

    Args:
        num_packs: ``P >= 0``.
        seed: a non-negative int.
        epoch: a non-negative int.

    Returns:
        (P,) torch.int64 on the CPU.
    """
    num_packs = _as_non_negative_int(num_packs, "num_packs")
    seed = _as_non_negative_int(seed, "seed")
    epoch = _as_non_negative_int(epoch, "epoch")
    state = np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0]
    generator = torch.Generator().manual_seed(int(state))
    return torch.randperm(num_packs, generator=generator, dtype=torch.int64)


def select_packs(packing: Packing, packs) -> Packing:
    """The packs ``packs`` of ``packing``, in that order, as a new :class:`Packing`.

    Pack ``packs[j]`` becomes pack ``j``; its pieces keep their order. A pack may be listed more than once
    (its samples then appear more than once) or not at all. The per-sample fields (``sample_lengths``,
    ``dropped_index`` and the over-long counts) are those of ``packing``.

    Args:
        packing: a :class:`Packing`.
        packs: (K,) indices of packs, each in ``[0, P)``: an integer tensor (any device), numpy array,
            range or sequence of ints.

    Returns:
        :class:`Packing` with K packs, on the device of ``packing``.

    Raises:
        TypeError: ``packing`` is not a :class:`Packing`; ``packs`` is not integer.
        ValueError: ``packs`` not 1-D, or holding an index outside ``[0, P)``.

    Examples::

        >>> from tfp_kernels.packing import pack_lengths, select_packs
        >>> packing = pack_lengths([3, 4, 5, 1, 9, 2], max_len=10)  # packs 3+4 | 5+1 | 9 | 2
        >>> picked = select_packs(packing, [2, 0])
        >>> picked.sample_index, picked.pack_id, picked.pack_offsets
        (tensor([4, 0, 1]), tensor([0, 1, 1]), tensor([ 0,  9, 16]))
    """
    if not isinstance(packing, Packing):
        raise TypeError(f"packing must be a tfp_kernels.packing.Packing, got {type(packing).__name__}")
    device = packing.device
    packs = _as_pack_indices(packs, packing.num_packs).to(device)
    pack_piece_offsets = packing.pack_piece_offsets
    first = pack_piece_offsets.index_select(0, packs)
    count = pack_piece_offsets.index_select(0, packs + 1) - first
    num_pieces = int(count.sum()) if packs.numel() > 0 else 0
    new_pack = torch.arange(packs.numel(), dtype=torch.int64, device=device)
    pack_id = torch.repeat_interleave(new_pack, count, output_size=num_pieces)
    start_of_new = torch.cumsum(count, 0) - count
    rank = torch.arange(num_pieces, dtype=torch.int64, device=device) - start_of_new.index_select(0, pack_id)
    piece = first.index_select(0, pack_id) + rank
    pack_offsets = torch.zeros(packs.numel() + 1, dtype=torch.int64, device=device)
    torch.cumsum(packing.pack_lengths.index_select(0, packs), 0, out=pack_offsets[1:])
    return dataclasses.replace(
        packing,
        pack_id=pack_id,
        sample_index=packing.sample_index.index_select(0, piece),
        offset=packing.offset.index_select(0, piece),
        length=packing.length.index_select(0, piece),
        pack_offsets=pack_offsets,
        num_packs=packs.numel(),
    )


def shuffle_packs(packing: Packing, seed: int, epoch: int = 0) -> Packing:
    """``packing`` with its packs in a seeded random order; the order inside every pack is unchanged.

    The order is :func:`pack_permutation` ``(P, seed, epoch)``: the same for the same arguments on every
    machine and device, different for every epoch.

    Args:
        packing: a :class:`Packing`.
        seed: a non-negative int.
        epoch: a non-negative int.

    Returns:
        :class:`Packing` with the same packs (renumbered in the new order), on the device of ``packing``.

    Examples::

        >>> from tfp_kernels.packing import pack_lengths, shuffle_packs
        >>> packing = pack_lengths(list(range(1, 9)), max_len=8)
        >>> shuffled = shuffle_packs(packing, seed=0, epoch=1)
        >>> sorted(shuffled.pack_lengths.tolist()) == sorted(packing.pack_lengths.tolist())
        True
    """
    if not isinstance(packing, Packing):
        raise TypeError(f"packing must be a tfp_kernels.packing.Packing, got {type(packing).__name__}")
    return select_packs(packing, pack_permutation(packing.num_packs, seed, epoch))


def _as_non_negative_int(value, name: str) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a non-negative int, got {value!r}")
    try:
        result = operator.index(value)
    except TypeError as err:
        raise TypeError(f"{name} must be a non-negative int, got {type(value).__name__} {value!r}") from err
    if result < 0:
        raise ValueError(f"{name} must be a non-negative int, got {result}")
    return result


def _as_pack_indices(packs, num_packs: int) -> torch.Tensor:
    if isinstance(packs, range):
        packs = list(packs)
    if not isinstance(packs, torch.Tensor):
        array = np.asarray(packs)
        if array.size > 0 and (array.dtype == np.bool_ or array.dtype.kind not in "iu"):
            raise TypeError(f"packs must hold integers, got dtype {array.dtype}")
        packs = torch.as_tensor(array.astype(np.int64, copy=False))
    if packs.dim() != 1:
        raise ValueError(f"packs must be 1-D, got shape {tuple(packs.shape)}")
    if packs.numel() > 0 and packs.dtype not in _INTEGER_DTYPES:
        raise TypeError(f"packs must have an integer dtype, got {packs.dtype}")
    packs = packs.to(torch.int64)
    if packs.numel() > 0:
        low, high = (int(v) for v in torch.stack([packs.min(), packs.max()]).tolist())
        if low < 0 or high >= num_packs:
            bad = low if low < 0 else high
            raise ValueError(f"packs holds {bad}, outside [0, num_packs={num_packs})")
    return packs
