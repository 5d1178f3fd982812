"""Rank-balanced packs for data-parallel training: :class:`DistributedPackSampler`.

Shape letters: ``P`` packs, ``R`` ranks (``num_replicas``), ``K`` packs per rank per step
(``packs_per_step``), ``G = R * K`` packs per global step, ``S`` steps per epoch.

One epoch of the sampler, the same computation on every rank (no communication):

1. order the packs: :func:`~tfp_kernels.packing.pack_permutation` ``(P, seed, epoch)`` (``shuffle=True``) or
   ``0..P-1``;
2. the remainder policy makes the count a multiple of ``G``: ``"pad"`` appends repeats of the first packs
   of that order (marked as repeats), ``"drop"`` leaves the last ``P % G`` packs out of the epoch (counted
   and listed). Nothing is ever dropped or repeated silently;
3. cut the order into ``S`` global steps of ``G`` packs and, within each step, give every rank exactly
   ``K`` packs with near-equal token sums (``balance="tokens"``, see :func:`balance_steps`) or in order
   (``balance="none"``: rank ``r`` takes slots ``r*K .. r*K+K-1``).

The balance guarantee (proved in :func:`balance_steps`, tested in ``tests/distributed/test_sampler.py``):
in every step, the tokens of the most loaded rank are at most the mean over ranks plus the longest pack
of that step, so ``max / mean <= 1 + longest_pack / mean``; when every pack holds at least ``f * max_len``
tokens, ``max / mean <= 1 + 1 / (f * K)``. In practice far closer to 1 (``stats()`` reports it).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Sampler

from ..packing import Packing, pack_permutation

REMAINDER_POLICIES = ("pad", "drop")
BALANCE_MODES = ("tokens", "none")

_INTEGER_DTYPES = frozenset({torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64})


# ---------------------------------------------------------------------------------------- balancing


def _balance_rounds(tokens: torch.Tensor, num_replicas: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted rounds: the step's packs in decreasing size, ``R`` at a time; in each round the largest goes to
    the least loaded rank, the second largest to the second least loaded, ... Returns ``(slot, loads)``:
    ``slot`` (S, R, K) index into the step's ``G`` slots, ``loads`` (S, R) token sums."""
    num_steps, group = tokens.shape
    k = group // num_replicas
    order = torch.sort(tokens, dim=1, descending=True, stable=True).indices
    sorted_tokens = tokens.gather(1, order)
    loads = torch.zeros(num_steps, num_replicas, dtype=torch.int64)
    slot = torch.empty(num_steps, num_replicas, k, dtype=torch.int64)
    for j in range(k):
        cols = slice(j * num_replicas, (j + 1) * num_replicas)
        ranks = torch.sort(loads, dim=1, stable=True).indices  # ascending load, ties by rank id
        slot[:, :, j].scatter_(1, ranks, order[:, cols])
        loads.scatter_add_(1, ranks, sorted_tokens[:, cols])
    return slot, loads


def _balance_lpt(tokens: torch.Tensor, num_replicas: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Longest processing time first with a cardinality limit: packs in decreasing size, each to the least
    loaded rank that holds fewer than ``K`` packs (ties: lowest rank). Same outputs as :func:`_balance_rounds`."""
    num_steps, group = tokens.shape
    k = group // num_replicas
    order = torch.sort(tokens, dim=1, descending=True, stable=True).indices
    sorted_tokens = tokens.gather(1, order)
    loads = torch.zeros(num_steps, num_replicas, dtype=torch.int64)
    counts = torch.zeros(num_steps, num_replicas, dtype=torch.int64)
    slot = torch.empty(num_steps, num_replicas, k, dtype=torch.int64)
    steps = torch.arange(num_steps)
    full = torch.iinfo(torch.int64).max
    for i in range(group):
        rank = torch.where(counts < k, loads, full).argmin(dim=1)  # first minimum: lowest rank on ties
        slot[steps, rank, counts[steps, rank]] = order[:, i]
        loads[steps, rank] += sorted_tokens[:, i]
        counts[steps, rank] += 1
    return slot, loads


def _refine_swaps(
    tokens: torch.Tensor, slot: torch.Tensor, loads: torch.Tensor, max_swaps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise-swap local search: while it helps, swap one pack of the most loaded rank ``m`` (first on
    ties) with one pack of another rank ``r``, choosing the swap that minimises ``max(load_m - d, load_r +
    d)`` among those that make both sides smaller than ``load_m`` (ties: the first ``(r, i, j)``); at most
    ``max_swaps`` swaps per step. Each swap lowers the sum of squared loads, so the search ends; the most
    loaded rank never gets heavier. Vectorised over the steps, a chunk of steps at a time (about 2**22
    candidate swaps, tens of MB)."""
    num_steps, num_replicas, k = slot.shape
    chunk = max(1, (1 << 22) // (num_replicas * k * k))
    slot, loads = slot.clone(), loads.clone()
    big = torch.iinfo(torch.int64).max
    for begin in range(0, num_steps, chunk):
        active = torch.arange(begin, min(begin + chunk, num_steps))
        for _ in range(max_swaps):
            if active.numel() == 0:
                break
            sl, ld = slot[active], loads[active]
            x = tokens[active].gather(1, sl.reshape(active.numel(), -1)).view_as(sl)  # (A, R, K)
            rows = torch.arange(active.numel())
            m = ld.argmax(dim=1)
            peak = ld[rows, m]
            d = x[rows, m][:, None, :, None] - x[:, :, None, :]  # (A, R, K_m, K_r): a_i - b_j
            new = torch.maximum(peak[:, None, None, None] - d, ld[:, :, None, None] + d)
            other = torch.arange(num_replicas)[None, :] != m[:, None]
            valid = (d > 0) & (new < peak[:, None, None, None]) & other[:, :, None, None]
            flat = torch.where(valid, new, big).reshape(active.numel(), -1)
            best = flat.argmin(dim=1)
            found = flat[rows, best] < big
            if not bool(found.any()):
                break
            active, rows, best, m = active[found], rows[found], best[found], m[found]
            r, i, j = best // (k * k), (best // k) % k, best % k
            a, b = slot[active, m, i], slot[active, r, j]
            delta = x[rows, m, i] - x[rows, r, j]
            slot[active, m, i], slot[active, r, j] = b, a
            loads[active, m] -= delta
            loads[active, r] += delta
    return slot, loads


def balance_steps(
    tokens: torch.Tensor, num_replicas: int, *, max_swaps: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the packs of every step among ``num_replicas`` ranks, ``K`` each, with near-equal token sums.

    Vectorised over the steps, deterministic. Two greedy assignments are computed for every step and the one
    whose most loaded rank has fewer tokens is kept (ties: the first), then improved by pairwise swaps:

    - *sorted rounds*: the step's packs in decreasing size, ``R`` at a time; in each round the largest goes
      to the least loaded rank, the second largest to the second least loaded, and so on;
    - *LPT with a cardinality limit*: packs in decreasing size, each to the least loaded rank that holds
      fewer than ``K`` packs;
    - *swaps*: while it helps (at most ``max_swaps`` times per step), swap a pack of the most loaded rank
      with a pack of another rank, the swap that lowers the larger of the two new loads most. (The last two
      are skipped when ``K == 1`` or ``R == 1``: every assignment has the same loads.)

    Bound. For sorted rounds, ``max_r load_r - min_r load_r <= x_max`` (the step's longest pack). Proof by
    induction over the rounds: before a round let the loads be ``l_1 <= ... <= l_R`` with spread ``D``, and
    the round's packs ``x_1 >= ... >= x_R`` (``x_i`` goes to the rank of ``l_i``). For ``i < j``,
    ``(l_i + x_i) - (l_j + x_j) <= x_i - x_j <= x_1``; for ``i > j``, ``(l_i + x_i) - (l_j + x_j) <=
    l_i - l_j <= D``. So the spread stays ``<= max(D, x_1) <= x_max``. Neither the choice nor the swaps
    raise the largest load, and ``min <= mean``, so the result has ``max_r load_r <= mean_r load_r + x_max``.

    Args:
        tokens: (S, G) integer tensor (CPU), ``G = R * K``: tokens of the packs of each step, in slot order.
        num_replicas: ``R >= 1``, dividing ``G``.
        max_swaps: cap on the swaps per step (default ``2 * G``; 0 turns the swaps off).

    Returns:
        ``(slot, loads)``: ``slot`` (S, R, K) torch.int64, the slots (indices into ``G``) given to each rank
        (each slot exactly once per step); ``loads`` (S, R) torch.int64, the token sum of each rank.
        Deterministic.
    """
    tokens = tokens.to(device="cpu", dtype=torch.int64)
    num_steps, group = tokens.shape
    if num_replicas < 1 or group % num_replicas != 0:
        raise ValueError(f"num_replicas={num_replicas} must be >= 1 and divide the step size {group}")
    slot, loads = _balance_rounds(tokens, num_replicas)
    if group // num_replicas > 1 and num_replicas > 1 and num_steps > 0:
        slot_lpt, loads_lpt = _balance_lpt(tokens, num_replicas)
        better = loads_lpt.max(dim=1).values < loads.max(dim=1).values
        slot = torch.where(better[:, None, None], slot_lpt, slot)
        loads = torch.where(better[:, None], loads_lpt, loads)
        max_swaps = 2 * group if max_swaps is None else max_swaps
        slot, loads = _refine_swaps(tokens, slot, loads, max_swaps)
    return slot, loads


def balance_step_reference(
    tokens: list[int], num_replicas: int, *, max_swaps: int | None = None
) -> list[list[int]]:
    """Plain-Python definition of :func:`balance_steps` for one step: the slots of each rank."""
    group = len(tokens)
    k = group // num_replicas
    order = sorted(range(group), key=lambda i: (-tokens[i], i))

    def rounds():
        loads, slots = [0] * num_replicas, [[] for _ in range(num_replicas)]
        for j in range(k):
            ranks = sorted(range(num_replicas), key=lambda r: (loads[r], r))
            for i, r in enumerate(ranks):
                slots[r].append(order[j * num_replicas + i])
                loads[r] += tokens[order[j * num_replicas + i]]
        return slots, loads

    def lpt():
        loads, slots = [0] * num_replicas, [[] for _ in range(num_replicas)]
        for i in order:
            r = min((r for r in range(num_replicas) if len(slots[r]) < k), key=lambda r: (loads[r], r))
            slots[r].append(i)
            loads[r] += tokens[i]
        return slots, loads

    slots, loads = rounds()
    if k > 1 and num_replicas > 1:
        slots_lpt, loads_lpt = lpt()
        if max(loads_lpt) < max(loads):
            slots, loads = slots_lpt, loads_lpt
        for _ in range(2 * group if max_swaps is None else max_swaps):
            m = max(range(num_replicas), key=lambda r: (loads[r], -r))
            best = None
            for r in range(num_replicas):
                for i in range(k):
                    for j in range(k):
                        d = tokens[slots[m][i]] - tokens[slots[r][j]]
                        new = max(loads[m] - d, loads[r] + d)
                        if r != m and d > 0 and new < loads[m] and (best is None or new < best[0]):
                            best = (new, r, i, j, d)
            if best is None:
                break
            _, r, i, j, d = best
            slots[m][i], slots[r][j] = slots[r][j], slots[m][i]
            loads[m] -= d
            loads[r] += d
    return slots


# ---------------------------------------------------------------------------------------- the plan of an epoch


@dataclass(frozen=True, eq=False)
class PackPlan:
    """Which packs every rank takes at every step of one epoch (all tensors on the CPU).

    Attributes:
        packs: (S, R, K) torch.int64: pack indices; ``packs[s, r]`` are rank ``r``'s packs at step ``s``.
        repeat: (S, R, K) torch.bool: True where the pack is a repeat added by ``remainder="pad"`` (its
            samples were already seen this epoch; mask its loss to keep every sample's weight at one).
        tokens: (S, R) torch.int64: tokens of each rank at each step (repeats included).
        dropped: (D,) torch.int64: packs left out of this epoch by ``remainder="drop"`` (empty otherwise).
        epoch: the epoch of the plan.
    """

    packs: torch.Tensor
    repeat: torch.Tensor
    tokens: torch.Tensor
    dropped: torch.Tensor
    epoch: int

    @property
    def num_steps(self) -> int:
        return self.packs.shape[0]

    @property
    def num_repeated(self) -> int:
        return int(self.repeat.sum())

    @property
    def num_dropped(self) -> int:
        return self.dropped.numel()


def plan_epoch(
    pack_tokens: torch.Tensor,
    *,
    num_replicas: int,
    packs_per_step: int = 1,
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
    remainder: str = "pad",
    balance: str = "tokens",
) -> PackPlan:
    """The :class:`PackPlan` of one epoch (what :class:`DistributedPackSampler` iterates over).

    Args:
        pack_tokens: (P,) integer tensor: tokens of every pack (any device; read on the CPU).
        num_replicas, packs_per_step, shuffle, seed, epoch, remainder, balance: as in
            :class:`DistributedPackSampler`.

    Returns:
        :class:`PackPlan` with ``S = ceil(P / G)`` steps (``"pad"``) or ``floor(P / G)`` (``"drop"``).
    """
    pack_tokens = pack_tokens.to(device="cpu", dtype=torch.int64)
    num_packs = pack_tokens.numel()
    group = num_replicas * packs_per_step
    order = pack_permutation(num_packs, seed, epoch) if shuffle else torch.arange(num_packs)
    dropped = order.new_empty(0)
    repeat = torch.zeros(num_packs, dtype=torch.bool)
    if remainder == "drop":
        num_steps = num_packs // group
        order, dropped = order[: num_steps * group], order[num_steps * group :]
        repeat = repeat[: num_steps * group]
    elif remainder == "pad":
        num_steps = -(-num_packs // group)
        missing = num_steps * group - num_packs
        if missing > 0:  # repeat the first packs of the order (cyclically when P < missing)
            extra = order.repeat(-(-missing // num_packs))[:missing]
            order = torch.cat([order, extra])
            repeat = torch.cat([repeat, torch.ones(missing, dtype=torch.bool)])
    else:  # pragma: no cover - checked by the sampler
        raise ValueError(f"remainder must be one of {REMAINDER_POLICIES}, got {remainder!r}")
    order = order.view(num_steps, group)
    repeat = repeat.view(num_steps, group)
    tokens = pack_tokens[order]
    if balance == "tokens":
        slot, loads = balance_steps(tokens, num_replicas)
    else:
        slot = torch.arange(group).view(1, num_replicas, packs_per_step).expand(num_steps, -1, -1)
        loads = tokens.view(num_steps, num_replicas, packs_per_step).sum(dim=2)
    flat = slot.reshape(num_steps, group)
    packs = order.gather(1, flat).view(num_steps, num_replicas, packs_per_step)
    repeat = repeat.gather(1, flat).view(num_steps, num_replicas, packs_per_step)
    return PackPlan(packs=packs, repeat=repeat, tokens=loads, dropped=dropped, epoch=epoch)


def mask_repeats(batch, repeat) -> object:
    """``batch`` with the labels of its repeat packs set to -100, so that they add nothing to the loss.

    For ``remainder="pad"``: assemble a step's packs in the order the sampler gave them (``select_packs``
    + ``assemble``), then pass the step's repeat flags (:meth:`DistributedPackSampler.iter_with_repeats`).

    Args:
        batch: a :class:`~tfp_kernels.PackedBatch` with ``K`` packs.
        repeat: (K,) bools (tensor or sequence): True for the packs whose labels to mask.

    Returns:
        A copy of ``batch`` (``dataclasses.replace``) whose ``labels`` are -100 over the flagged packs
        (also in its ``padded`` view, when present: one row per pack); ``batch`` itself when nothing is
        flagged.

    Raises:
        ValueError: ``repeat`` does not have one flag per pack.
    """
    import dataclasses

    from ..assembly import IGNORE_INDEX

    flags = torch.as_tensor(repeat, dtype=torch.bool).reshape(-1).cpu()
    if flags.numel() != batch.num_packs:
        raise ValueError(f"repeat has {flags.numel()} flags but the batch has {batch.num_packs} packs")
    if not bool(flags.any()):
        return batch
    pack_lengths = torch.diff(batch.pack_offsets)
    token_flags = torch.repeat_interleave(flags.to(batch.device), pack_lengths, output_size=batch.num_tokens)
    labels = batch.labels.masked_fill(token_flags.unsqueeze(0), IGNORE_INDEX)
    padded = batch.padded
    if padded is not None:  # one row per pack
        rows = flags.to(padded.labels.device).unsqueeze(1)
        padded = padded._replace(labels=padded.labels.masked_fill(rows, IGNORE_INDEX))
    return dataclasses.replace(batch, labels=labels, padded=padded)


# ---------------------------------------------------------------------------------------- the sampler


class DistributedPackSampler(Sampler):
    """Packs for data-parallel training: every rank the same number of steps and of packs per step, with
    near-equal token counts per step; deterministic per ``(seed, epoch)``; every pack exactly once per epoch
    over all ranks, up to the explicit ``remainder`` policy.

    Like :class:`torch.utils.data.DistributedSampler`: ``num_replicas`` and ``rank`` default to those of the
    initialised default process group (1 and 0 without one), call :meth:`set_epoch` before every epoch,
    every rank computes the same plan locally (no communication).

    What it yields, once per step (``len(sampler)`` steps per epoch, the same on every rank):

    - ``packs_per_step == 1``: an ``int``, the pack index;
    - ``packs_per_step > 1``: a ``list`` of ``packs_per_step`` pack indices.

    On pre-packed rows (one pack per row, e.g. ``datasets.load_dataset("parquet", data_files="packed.parquet")``
    from ``tfp-pack``): ``DataLoader(packs, batch_sampler=sampler, collate_fn=PackedRowsCollator())`` when
    ``packs_per_step > 1`` (``sampler=sampler, collate_fn=PackedRowsCollator()`` when it is 1): the
    :class:`~tfp_kernels.PackedRowsCollator` concatenates a step's rows into one flat batch with the rows'
    attention segments (the default collate would try to stack rows of different lengths). To mask the
    repeats, iterate :meth:`iter_with_repeats` and collate yourself: ``mask_repeats(collator.pack([packs[i]
    for i in step]), flags)``. On a :class:`~tfp_kernels.packing.Packing` in memory:
    :func:`~tfp_kernels.packing.select_packs` ``(packing, step)`` + :func:`~tfp_kernels.assemble` give one
    packed batch per step.

    The remainder (``P % (R * K)`` packs that do not fill a last global step):

    - ``"pad"`` (default): the last step is filled with repeats of the first packs of the epoch's order (in
      turn, cyclically if needed). ``stats()["num_repeated"]`` counts them; :meth:`repeat_mask` / the
      ``repeat`` field of :meth:`plan` say which yielded packs are repeats, and :meth:`iter_with_repeats`
      yields the flags alongside: :func:`mask_repeats` sets the labels of the repeat packs of an assembled
      step to -100, which keeps every sample's weight at exactly one per epoch. Every pack is used at least once, non-repeats exactly
      once.
    - ``"drop"``: the last ``P % (R * K)`` packs of the epoch's order are left out of that epoch
      (``stats()["num_dropped"]``, the indices in ``plan().dropped``); with ``shuffle=True`` a different set
      each epoch.

    Args:
        packing_or_pack_lengths: a :class:`~tfp_kernels.packing.Packing` or
            :class:`~tfp_kernels.assembly.PackedBatch` (tokens per pack taken from its ``pack_offsets``), a
            (P,) integer tensor / sequence of tokens per pack (``>= 0``), or an ``int`` P (packs of unknown
            size: balanced by count only).
        num_replicas: ``R``, ranks taking part (default: world size of the default process group, else 1).
        rank: this rank, in ``[0, R)`` (default: rank in the default process group, else 0).
        packs_per_step: ``K >= 1``, packs per rank per step.
        shuffle: shuffle the packs every epoch with :func:`~tfp_kernels.packing.pack_permutation`
            ``(P, seed, epoch)``; False keeps the pack order (then only the balancing reorders within steps).
        seed: a non-negative int, the same on every rank.
        remainder: ``"pad"`` or ``"drop"`` (above).
        balance: ``"tokens"`` (balance token sums within each step, see :func:`balance_steps`) or ``"none"``
            (rank ``r`` takes the step's slots ``r*K .. r*K+K-1`` in order).

    Raises:
        TypeError / ValueError: at construction, naming the bad argument (negative lengths, rank outside
        ``[0, R)``, unknown policy, ...).

    Examples::

        >>> from tfp_kernels.distributed import DistributedPackSampler
        >>> pack_tokens = [10, 2, 7, 7, 3, 9, 1]
        >>> samplers = [DistributedPackSampler(pack_tokens, num_replicas=2, rank=r, packs_per_step=2, seed=0)
        ...             for r in range(2)]
        >>> [list(s) for s in samplers]  # 7 packs, 4 per global step: 2 steps each, pack 5 used twice
        [[[0, 4], [5, 6]], [[5, 3], [2, 1]]]
        >>> samplers[0].repeat_mask()  # rank 0's second pack 5 is the repeat: mask its loss
        tensor([[False, False],
                [ True, False]])
        >>> samplers[0].stats()["rank_tokens"]  # tokens of rank 0 and rank 1 at each step
        tensor([[13, 16],
                [10,  9]])
        >>> samplers[0].stats()["num_repeated"], samplers[0].stats()["num_dropped"]
        (1, 0)

    With pre-packed rows (here 7 rows of 10, 2, 7, ... tokens) and a ``DataLoader``::

        >>> from torch.utils.data import DataLoader
        >>> from tfp_kernels import PackedRowsCollator
        >>> packs = [{"input_ids": list(range(n)), "cu_seqlens": [0, n]} for n in pack_tokens]
        >>> loader = DataLoader(packs, batch_sampler=samplers[0], collate_fn=PackedRowsCollator())
        >>> [step["cu_seq_lens_q"].tolist() for step in loader]  # rank 0: packs 0 and 4, then 5 and 6
        [[0, 10, 13], [0, 9, 10]]
    """

    def __init__(
        self,
        packing_or_pack_lengths,
        *,
        num_replicas: int | None = None,
        rank: int | None = None,
        packs_per_step: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        remainder: str = "pad",
        balance: str = "tokens",
    ) -> None:
        self.pack_tokens = _as_pack_tokens(packing_or_pack_lengths)
        default_world, default_rank = _default_world()
        self.num_replicas = _as_int(
            default_world if num_replicas is None else num_replicas, "num_replicas", 1
        )
        self.rank = _as_int(default_rank if rank is None else rank, "rank", 0)
        if self.rank >= self.num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas={self.num_replicas}), got {self.rank}")
        self.packs_per_step = _as_int(packs_per_step, "packs_per_step", 1)
        self.seed = _as_int(seed, "seed", 0)
        if not isinstance(shuffle, (bool, np.bool_)):
            raise TypeError(f"shuffle must be a bool, got {type(shuffle).__name__}")
        self.shuffle = bool(shuffle)
        if remainder not in REMAINDER_POLICIES:
            raise ValueError(f"remainder must be one of {REMAINDER_POLICIES}, got {remainder!r}")
        if balance not in BALANCE_MODES:
            raise ValueError(f"balance must be one of {BALANCE_MODES}, got {balance!r}")
        self.remainder = remainder
        self.balance = balance
        self.epoch = 0
        self._plan: PackPlan | None = None

    # ------------------------------------------------------------------ epochs and the plan

    @property
    def num_packs(self) -> int:
        """``P``."""
        return self.pack_tokens.numel()

    @property
    def num_steps(self) -> int:
        """Steps per epoch ``S`` (the same on every rank and every epoch)."""
        group = self.num_replicas * self.packs_per_step
        if self.remainder == "drop":
            return self.num_packs // group
        return math.ceil(self.num_packs / group)

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` from the next iteration on (call it before each epoch, on every rank)."""
        epoch = _as_int(epoch, "epoch", 0)
        if epoch != self.epoch:
            self.epoch = epoch
            self._plan = None

    def plan(self) -> PackPlan:
        """The :class:`PackPlan` of the current epoch for all ranks (computed once per epoch, cached)."""
        if self._plan is None or self._plan.epoch != self.epoch:
            self._plan = plan_epoch(
                self.pack_tokens,
                num_replicas=self.num_replicas,
                packs_per_step=self.packs_per_step,
                shuffle=self.shuffle,
                seed=self.seed,
                epoch=self.epoch,
                remainder=self.remainder,
                balance=self.balance,
            )
        return self._plan

    def rank_packs(self) -> torch.Tensor:
        """(S, K) torch.int64: this rank's packs of the current epoch, one row per step."""
        return self.plan().packs[:, self.rank]

    def repeat_mask(self) -> torch.Tensor:
        """(S, K) torch.bool: which of this rank's packs (as in :meth:`rank_packs`) are ``"pad"`` repeats."""
        return self.plan().repeat[:, self.rank]

    # ------------------------------------------------------------------ iteration

    def __len__(self) -> int:
        return self.num_steps

    def __iter__(self) -> Iterator:
        rows = self.rank_packs().tolist()
        if self.packs_per_step == 1:
            return (row[0] for row in rows)
        return iter(rows)

    def iter_with_repeats(self) -> Iterator[tuple]:
        """Like ``iter(sampler)`` but each step comes with its repeat flags: ``(pack, is_repeat)`` for
        ``packs_per_step == 1``, else ``(list_of_packs, list_of_flags)``."""
        rows, flags = self.rank_packs().tolist(), self.repeat_mask().tolist()
        if self.packs_per_step == 1:
            return ((row[0], flag[0]) for row, flag in zip(rows, flags))
        return zip(rows, flags)

    # ------------------------------------------------------------------ reporting

    def stats(self) -> dict:
        """Balance and remainder figures of the current epoch, as Python numbers (plus two tensors).

        Keys: ``epoch``, ``num_packs``, ``num_replicas``, ``packs_per_step``, ``num_steps``, ``remainder``,
        ``num_repeated`` (pad repeats over all ranks), ``num_dropped``; ``imbalance`` ((S,) float64: max over
        ranks / mean over ranks of the step's tokens; 1.0 for a step without tokens), ``max_imbalance`` and
        ``mean_imbalance`` (over the steps; 1.0 without steps), ``max_excess_tokens`` (largest ``max - mean``
        of a step), ``longest_pack`` (the bound: ``max - mean <= longest pack of the step``), ``rank_tokens``
        ((S, R) int64).
        """
        plan = self.plan()
        loads = plan.tokens.to(torch.float64)
        if plan.num_steps > 0:
            mean = loads.mean(dim=1)
            peak = loads.max(dim=1).values
            imbalance = torch.where(mean > 0, peak / mean.clamp_min(1e-300), torch.ones_like(mean))
            max_imbalance, mean_imbalance = float(imbalance.max()), float(imbalance.mean())
            max_excess = float((peak - mean).max())
            longest = int(self.pack_tokens[plan.packs.reshape(-1)].max())
        else:
            imbalance = torch.empty(0, dtype=torch.float64)
            max_imbalance = mean_imbalance = 1.0
            max_excess, longest = 0.0, 0
        return {
            "epoch": self.epoch,
            "num_packs": self.num_packs,
            "num_replicas": self.num_replicas,
            "packs_per_step": self.packs_per_step,
            "num_steps": plan.num_steps,
            "remainder": self.remainder,
            "num_repeated": plan.num_repeated,
            "num_dropped": plan.num_dropped,
            "imbalance": imbalance,
            "max_imbalance": max_imbalance,
            "mean_imbalance": mean_imbalance,
            "max_excess_tokens": max_excess,
            "longest_pack": longest,
            "rank_tokens": plan.tokens,
        }

    def __repr__(self) -> str:
        return (
            f"DistributedPackSampler({self.num_packs} packs, rank {self.rank} of {self.num_replicas}, "
            f"packs_per_step={self.packs_per_step}, {self.num_steps} steps, remainder={self.remainder!r}, "
            f"balance={self.balance!r}, shuffle={self.shuffle}, seed={self.seed}, epoch={self.epoch})"
        )


# ---------------------------------------------------------------------------------------- input checks


def _default_world() -> tuple[int, int]:
    """``(world_size, rank)`` of the initialised default process group, else ``(1, 0)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _as_int(value, name: str, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r}")
    try:
        result = operator.index(value)
    except TypeError as err:
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}") from err
    if result < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {result}")
    return result


def _as_pack_tokens(source) -> torch.Tensor:
    """(P,) torch.int64 CPU tensor of tokens per pack, from any accepted input."""
    from ..assembly import PackedBatch

    if isinstance(source, Packing):
        return source.pack_lengths.to(device="cpu", dtype=torch.int64)
    if isinstance(source, PackedBatch):
        return torch.diff(source.pack_offsets).to(device="cpu", dtype=torch.int64)
    if isinstance(source, (int, np.integer)) and not isinstance(source, (bool, np.bool_)):
        return torch.ones(_as_int(source, "the number of packs", 0), dtype=torch.int64)
    if isinstance(source, range):
        source = list(source)
    if not isinstance(source, torch.Tensor):
        try:
            array = np.asarray(source)
        except (TypeError, ValueError) as err:
            raise TypeError(
                "packing_or_pack_lengths must be a Packing, PackedBatch, 1-D integer tensor/sequence of "
                f"tokens per pack, or an int; got {type(source).__name__}"
            ) from err
        if array.size > 0 and (array.dtype == np.bool_ or array.dtype.kind not in "iu"):
            raise TypeError(f"pack lengths must be integers, got dtype {array.dtype}")
        source = torch.as_tensor(array.astype(np.int64, copy=False))
    if source.dim() != 1:
        raise ValueError(f"pack lengths must be 1-D (P,), got shape {tuple(source.shape)}")
    if source.numel() > 0 and source.dtype not in _INTEGER_DTYPES:
        raise TypeError(f"pack lengths must have an integer dtype, got {source.dtype}")
    tokens = source.to(device="cpu", dtype=torch.int64)
    if tokens.numel() > 0 and int(tokens.min()) < 0:
        raise ValueError(f"pack lengths must be >= 0, got {int(tokens.min())}")
    return tokens
