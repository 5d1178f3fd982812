"""Streaming TFP packing: :class:`TFPStreamingDataset`, an ``IterableDataset`` over any iterable of samples.

Shape letters: ``B`` samples per buffer, ``U`` units of a buffer (a unit is a sample or, after a resume or
an ``overlong="split"``, a token range of one), ``M`` pieces of a batch, ``P`` packs, ``T`` tokens.

How a shard walks the stream:

1. **Sharding.** Item ``i`` of the source (0-based, in the source's order) belongs to shard
   ``i % num_shards``, with ``num_shards = world_size * num_workers`` and shard id
   ``rank * num_workers + worker_id`` (``torch.utils.data.get_worker_info()``; 1 worker and id 0 outside a
   DataLoader worker). Shards are disjoint and cover the stream. Every shard reads the source from the
   start and keeps its own items (a source with ``__len__`` and ``__getitem__``, e.g. a list or a map-style
   ``datasets.Dataset``, is indexed directly instead). A ``datasets.IterableDataset`` is read through its
   ``.iter()``, which does not split it by DataLoader worker (its ``__iter__`` would, and the two splits
   would lose data); do not split it by node either (``split_dataset_by_node``): pass the whole stream to
   every rank. The same holds for any other source that splits itself by worker or rank.
2. **Buffer.** The shard collects ``buffer_size`` of its items, turns each into a 1-D token tensor (and
   labels), and packs the buffer with :func:`tfp_kernels.pack_gpu` (TFP order over the buffer, then bin
   packing); the last buffer of the stream may be smaller and is packed and emitted all the same: nothing
   is dropped at the end of the stream.
3. **Batches.** The buffer's packs are put in a seeded random order (``shuffle=True``; the paper shuffles
   packs, never the order inside a pack) and emitted ``packs_per_batch`` at a time, each group assembled
   with :func:`tfp_kernels.assemble` into a :class:`StreamBatch` (a :class:`~tfp_kernels.PackedBatch` plus
   ``source_index`` / ``source_offset`` / ``shard`` / ``stream_state``). The last batch of a buffer may hold
   fewer packs.

**Resuming.** A shard's state is: the epoch, how many of its items went into buffers that were fully
emitted (``items_consumed``), and for a partly emitted buffer, its number of items and the token ranges
``(position in buffer, start, end)`` of the pieces not emitted yet. The buffer's items are *re-read* from
the source on resume (so the source must give the same items in the same order when iterated again: a
list, a ``datasets`` dataset, a file reader, or a zero-argument callable returning a fresh iterator; a
one-shot generator cannot be resumed) and the pieces still due are packed again with ``pack_gpu`` and
emitted. Every sample (or every token range of a split sample) is emitted exactly once across the
interruption, whatever ``pack_gpu`` does; what changes is only how the remainder of that one buffer is
grouped into packs.

The state is updated *before* each batch is yielded and travels with it (``batch.stream_state``): with
``num_workers=0`` :meth:`TFPStreamingDataset.state_dict` is current; with DataLoader workers (each holds
its own copy of the dataset), call :meth:`TFPStreamingDataset.update_state` ``(batch)`` in the training
loop for every batch taken, then ``state_dict()`` reflects exactly the batches consumed (batches prefetched
but not taken are emitted again after a resume, not lost). Resume with the same ``world_size`` and
``num_workers``.

**End of an epoch.** When a shard has emitted its last batch, its state says so (``done``); the next
iteration starts the next epoch from the start of the stream (the pack shuffles take the epoch into their
seed; re-shuffling the source itself is the source's business, e.g. ``datasets``' ``set_epoch``).

**Equal batch counts over the ranks.** Shards emit different numbers of batches (their buffers pack
differently), and a data-parallel loop run to exhaustion would hang on the rank that stops first. With
``equal_batches=True`` (the default) and ``world_size > 1`` every rank yields the same number of batches:
before each batch the ranks agree, with one all-reduce of a flag over the default process group, whether
any of them still has one; a rank that has run out yields a *repeat* meanwhile: a copy of its last batch
with every label -100 (so its ``num_items_in_batch`` is 0: it adds nothing to the loss, and the label
count of :func:`~tfp_kernels.global_num_items_in_batch` leaves it out) and ``repeat=True``; a rank that has
emitted nothing yet repeats a one-token placeholder (token 0, ``source_index`` -1). The epoch ends when
every rank has run out, on all ranks at once; a state saved while some ranks were repeating resumes that
way (the ranks agree again when iteration starts). One process (``world_size == 1``) has nothing to agree
on and pays nothing. The collective needs the iteration in the main process (``num_workers=0``); with
DataLoader workers pass ``equal_batches=False`` and wrap the loader: ``for batch in
equalize_batches(loader)`` (:func:`equalize_batches`, the same agreement one level up).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..assembly import IGNORE_INDEX, PackedBatch, assemble
from ..packing import Packing, pack_lengths, select_packs
from .sampler import _as_int, _default_world

STATE_VERSION = 1
_HF_BATCH_SIZE = 256
_RESERVED_PACK_KWARGS = ("samples", "max_len", "labels", "embeddings")
_INTEGER_DTYPES = frozenset({torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64})


@dataclass(frozen=True, eq=False, repr=False)
class StreamBatch(PackedBatch):
    """A :class:`~tfp_kernels.PackedBatch` emitted by :class:`TFPStreamingDataset`, with where its pieces
    came from in the stream. The fields of ``PackedBatch`` keep their meaning for the batch, except that
    ``sample_index`` indexes the pieces' samples *within this batch* (use ``source_index`` to identify them)
    and ``order`` / ``order_stats`` are those of the whole buffer the batch comes from (``pack_gpu``'s order
    of the buffer's units, and its ordering statistics). Added fields:

    Attributes:
        source_index: (M,), torch.int64, CPU: the position in the source stream of each piece's sample.
        source_offset: (M,), torch.int64, CPU: first token of each piece within that sample (0 unless the
            sample was split by ``overlong="split"``); the piece's length is ``packing.length``.
        shard: the shard that emitted the batch (``rank * num_workers + worker_id``).
        stream_state: that shard's state after this batch (what :meth:`TFPStreamingDataset.update_state`
            records).
        repeat: True for a batch yielded by ``equal_batches`` while this rank had run out: a copy of an
            earlier batch (or a one-token placeholder) with every label -100; its samples are not emitted
            again (its ``num_items_in_batch`` is 0).

    ``micro_batches(n)`` slices ``source_index`` / ``source_offset`` with the pieces; ``stream_state`` stays
    the state after the whole batch.
    """

    source_index: torch.Tensor | None = None
    source_offset: torch.Tensor | None = None
    shard: int = 0
    stream_state: dict | None = None
    repeat: bool = False

    _extra_piece_fields = ("source_index", "source_offset")

    def __repr__(self) -> str:
        inner = super().__repr__()
        flag = ", repeat" if self.repeat else ""
        return f"StreamBatch{inner[inner.index('(') : -1]}, shard={self.shard}{flag})"


class TFPStreamingDataset(IterableDataset):
    """TFP-pack a stream of samples buffer by buffer, split across ranks and DataLoader workers, resumable.

    See the module docstring for how the stream is sharded, buffered, packed, emitted and resumed. Use it
    with ``DataLoader(dataset, batch_size=None, num_workers=...)`` (each item is already a packed batch).

    Args:
        source: the samples: any iterable (a list, a ``datasets`` dataset — map-style or streaming —, a
            ``torch`` ``IterableDataset``, ...) or a zero-argument callable returning a fresh iterator. Each
            item is a 1-D integer tensor / numpy array / list of ints (the token ids), or a mapping with the
            field ``input_field`` (and optionally ``labels_field`` and ``embedding_field``); or anything
            ``tokenize`` turns into one of those. For :meth:`load_state_dict` the source must give the same
            items in the same order every time it is iterated.
        buffer_size: ``B >= 1``, items of a shard packed together (TFP orders within a buffer: larger is
            better for locality, costlier to order).
        max_len: capacity of a pack in tokens.
        tokenize: optional callable ``item -> tokens | mapping`` applied to every item first (e.g. a
            tokenizer call on a text field).
        input_field: field of the token ids in mapping items.
        labels_field: field of the labels in mapping items (same length as the tokens); items without it
            use their token ids (the default labels of :func:`~tfp_kernels.assemble`). None: ignore labels.
        embedding_field: optional field of a precomputed 1-D embedding per item, passed to ``pack_gpu`` as
            ``embeddings`` (else ``pack_gpu`` embeds the tokens with its default embedder).
        pack_kwargs: keyword arguments of :func:`tfp_kernels.pack_gpu` (``order``, ``strategy``,
            ``attention``, ``metric``, ``quantile``, ``threshold``, ``window``, ``k``, ``embedder``,
            ``overlong``, ``pad_to``, ``seed``...), except ``samples``, ``max_len``, ``labels`` and
            ``embeddings``. ``attention`` and ``pad_to`` also apply to the emitted batches.
        packs_per_batch: packs per emitted batch (default 1); None: the whole buffer in one batch.
        shuffle: emit a buffer's packs in a seeded random order (else in TFP order).
        rank, world_size: this process's rank and the number of ranks (default: those of the initialised
            default process group, else 0 and 1).
        seed: non-negative int: seeds the pack shuffles (mixed with epoch, shard and buffer number) and is
            ``pack_gpu``'s ``seed`` unless ``pack_kwargs`` names one.
        device: where the tokens go before packing (default CPU; e.g. ``"cuda"`` with ``num_workers=0``).
        equal_batches: with ``world_size > 1``, every rank yields the same number of batches per epoch, the
            ranks that run out first yielding flagged repeats (``repeat=True``, labels all -100; see the module
            docstring). Needs an initialised default process group of ``world_size`` ranks and iteration in
            the main process. Default True (no cost with one process); False lets each rank stop on its own
            (then bound the steps, or use :func:`equalize_batches` around a DataLoader with workers).

    Yields:
        :class:`StreamBatch` (a ``PackedBatch``): ``input_ids``, ``labels``, ``position_ids`` (1, T) int64,
        ``cu_seqlens`` (S + 1,) int32, ``max_seqlen``, ``to_hf_kwargs()``; ``source_index`` / ``source_offset``
        (M,) int64 identifying every piece in the stream; ``stream_state``.

    Raises:
        ValueError / TypeError: bad arguments (at construction); an item without tokens, with an empty or
        non-integer token list, or labels of another length (while iterating, naming the stream position);
        a state saved with another ``world_size`` / rank / worker count (when iterating after
        :meth:`load_state_dict`); ``equal_batches=True`` with ``world_size > 1`` but no matching initialised
        process group, or inside a DataLoader worker (RuntimeError, when iterating).

    Examples::

        >>> import torch
        >>> from tfp_kernels.distributed import TFPStreamingDataset
        >>> stream = [{"input_ids": torch.arange(i % 7 + 1) + i} for i in range(30)]
        >>> ds = TFPStreamingDataset(stream, buffer_size=8, max_len=16, pack_kwargs={"order": "keep"})
        >>> batches = list(ds)  # one process: equal_batches has nothing to do
        >>> sorted(torch.cat([b.source_index for b in batches]).tolist()) == list(range(30))
        True
        >>> ds2 = TFPStreamingDataset(stream, buffer_size=8, max_len=16, pack_kwargs={"order": "keep"})
        >>> it = iter(ds2); first = [next(it) for _ in range(3)]
        >>> ds3 = TFPStreamingDataset(stream, buffer_size=8, max_len=16, pack_kwargs={"order": "keep"})
        >>> ds3.load_state_dict(ds2.state_dict())
        >>> seen = torch.cat([b.source_index for b in first + list(ds3)])
        >>> sorted(seen.tolist()) == list(range(30))
        True
    """

    def __init__(
        self,
        source,
        *,
        buffer_size: int,
        max_len: int,
        tokenize: Callable | None = None,
        input_field: str = "input_ids",
        labels_field: str | None = "labels",
        embedding_field: str | None = None,
        pack_kwargs: Mapping | None = None,
        packs_per_batch: int | None = 1,
        shuffle: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        seed: int = 0,
        device: str | torch.device | None = None,
        equal_batches: bool = True,
    ) -> None:
        super().__init__()
        if source is None or not (callable(source) or hasattr(source, "__iter__")):
            raise TypeError(
                "source must be an iterable of samples or a zero-argument callable returning an iterator, "
                f"got {type(source).__name__}"
            )
        self.source = source
        self.buffer_size = _as_int(buffer_size, "buffer_size", 1)
        self.max_len = _as_int(max_len, "max_len", 1)
        if tokenize is not None and not callable(tokenize):
            raise TypeError(f"tokenize must be callable or None, got {type(tokenize).__name__}")
        self.tokenize = tokenize
        self.input_field = input_field
        self.labels_field = labels_field
        self.embedding_field = embedding_field
        pack_kwargs = dict(pack_kwargs or {})
        reserved = sorted(set(pack_kwargs) & set(_RESERVED_PACK_KWARGS))
        if reserved:
            raise ValueError(f"pack_kwargs must not set {reserved}: the dataset passes them to pack_gpu")
        self.pack_kwargs = pack_kwargs
        self.packs_per_batch = (
            None if packs_per_batch is None else _as_int(packs_per_batch, "packs_per_batch", 1)
        )
        if not isinstance(shuffle, (bool, np.bool_)):
            raise TypeError(f"shuffle must be a bool, got {type(shuffle).__name__}")
        self.shuffle = bool(shuffle)
        default_world, default_rank = _default_world()
        self.world_size = _as_int(default_world if world_size is None else world_size, "world_size", 1)
        self.rank = _as_int(default_rank if rank is None else rank, "rank", 0)
        if self.rank >= self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")
        self.seed = _as_int(seed, "seed", 0)
        self.device = torch.device("cpu") if device is None else torch.device(device)
        if not isinstance(equal_batches, (bool, np.bool_)):
            raise TypeError(f"equal_batches must be a bool, got {type(equal_batches).__name__}")
        self.equal_batches = bool(equal_batches)
        self._states: dict[int, dict] = {}

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """The progress of this rank's shards, to restore with :meth:`load_state_dict`.

        Returns:
            ``{"version", "world_size", "rank", "shards": {shard_id: shard_state}}``, where a shard state is
            ``{"num_shards", "epoch", "items_consumed", "buffer_index", "done", "num_batches", "num_dropped",
            "pending"}`` and ``pending`` is None or ``{"num_items", "generation", "units"}`` with ``units`` a
            (U, 3) torch.int64 CPU tensor of ``(position in buffer, start, end)`` token ranges still to emit.
            Suitable for ``torch.save``. Shards this object has not seen (workers whose batches were not
            passed to :meth:`update_state`) are absent and start from the beginning.
        """
        return {
            "version": STATE_VERSION,
            "world_size": self.world_size,
            "rank": self.rank,
            "shards": {shard: _copy_state(state) for shard, state in sorted(self._states.items())},
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Resume from a :meth:`state_dict` (of this rank, same ``world_size``): the next iteration continues
        every recorded shard where it stopped.

        Raises:
            ValueError: another version, ``world_size`` or rank; a malformed shard state.
        """
        if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a TFPStreamingDataset state (version {STATE_VERSION}): {state!r:.200}")
        if state["world_size"] != self.world_size or state["rank"] != self.rank:
            raise ValueError(
                f"the state was saved by rank {state['rank']} of world_size {state['world_size']}, but this "
                f"dataset is rank {self.rank} of world_size {self.world_size}"
            )
        shards = {}
        for shard, shard_state in state["shards"].items():
            shard = int(shard)
            shard_state = _copy_state(shard_state)
            num_shards = int(shard_state["num_shards"])
            if num_shards % self.world_size != 0 or shard // (num_shards // self.world_size) != self.rank:
                raise ValueError(f"shard {shard} of {num_shards} does not belong to rank {self.rank}")
            shards[shard] = shard_state
        self._states = shards

    def update_state(self, batch: StreamBatch) -> None:
        """Record the shard state carried by ``batch`` (call it in the main process for every batch taken
        from a DataLoader with workers, so that :meth:`state_dict` covers the workers' shards)."""
        if not isinstance(batch, StreamBatch) or batch.stream_state is None:
            raise TypeError(f"update_state needs a StreamBatch from this dataset, got {type(batch).__name__}")
        self._states[batch.shard] = batch.stream_state

    # ------------------------------------------------------------------ iteration

    def _shard_layout(self) -> tuple[int, int]:
        info = get_worker_info()
        worker_id, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        return self.rank * num_workers + worker_id, self.world_size * num_workers

    def __iter__(self) -> Iterator[StreamBatch]:
        shard, num_shards = self._shard_layout()
        state = self._states.get(shard)
        if state is not None and state["num_shards"] != num_shards:
            raise ValueError(
                f"the state of shard {shard} was saved with {state['num_shards']} shards (world_size x "
                f"num_workers) but there are now {num_shards}: resume with the same world_size and num_workers"
            )
        group = self._equal_batches_group()
        done = state is not None and state["done"]
        if group is not None:  # the epoch ends when every rank is done: a done rank may still have to repeat
            done = _agree(done, all_ranks=True, group=group)
        if state is None or done:
            epoch = 0 if state is None else state["epoch"] + 1
            state = _fresh_state(num_shards, epoch)
        self._states[shard] = state
        batches = self._run(shard, num_shards, state)
        if group is None:
            return batches
        return self._equalized(batches, shard, state, group)

    def _equal_batches_group(self):
        """The process group of ``equal_batches`` (None when there is nothing to agree on)."""
        if not self.equal_batches or self.world_size == 1:
            return None
        import torch.distributed as dist

        if get_worker_info() is not None:
            raise RuntimeError(
                "TFPStreamingDataset(equal_batches=True) agrees with the other ranks on every batch, which a "
                "DataLoader worker cannot do (it is not in the process group): pass equal_batches=False and "
                "iterate `tfp_kernels.distributed.equalize_batches(loader)` instead, or use num_workers=0"
            )
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                f"TFPStreamingDataset(equal_batches=True, world_size={self.world_size}) needs an initialised "
                "torch.distributed process group to agree on the number of batches; pass equal_batches=False "
                "to iterate one rank's shard alone"
            )
        if dist.get_world_size() != self.world_size or dist.get_rank() != self.rank:
            raise RuntimeError(
                f"TFPStreamingDataset(equal_batches=True) is rank {self.rank} of {self.world_size} but the "
                f"process group has this process as rank {dist.get_rank()} of {dist.get_world_size()}"
            )
        return dist.group.WORLD

    def _equalized(self, batches, shard: int, state: dict, group) -> Iterator[StreamBatch]:
        last = None
        while True:
            batch = next(batches, None)
            if not _agree(batch is not None, all_ranks=False, group=group):
                return  # every rank has run out: the epoch ends everywhere
            if batch is not None:
                last = batch
                yield batch
                continue
            if last is None:  # nothing emitted here yet (a shard without items, or a resume while repeating)
                last = _placeholder_batch(
                    self.pack_kwargs.get("attention", "pack"), self.pack_kwargs.get("pad_to"), self.device
                )
                last = StreamBatch(
                    **{f.name: getattr(last, f.name) for f in dataclasses.fields(PackedBatch)},
                    source_index=torch.full((1,), -1, dtype=torch.int64),
                    source_offset=torch.zeros(1, dtype=torch.int64),
                    shard=shard,
                )
            last = dataclasses.replace(
                as_repeat(last), stream_state=_copy_state(state, share=True), repeat=True
            )
            yield last

    def _run(self, shard: int, num_shards: int, state: dict) -> Iterator[StreamBatch]:
        items = self._shard_items(shard, num_shards, state["items_consumed"])
        while True:
            pending = state["pending"]
            if pending is None:
                raw = list(itertools.islice(items, self.buffer_size))
                if not raw:
                    state["done"] = True
                    return
                buffer = self._read_buffer(raw)
                lengths = torch.tensor([t.numel() for t in buffer[0]], dtype=torch.int64)
                units = torch.stack([torch.arange(len(raw)), torch.zeros_like(lengths), lengths], dim=1)
                pending = {"num_items": len(raw), "generation": 0, "units": units}
                state["pending"] = pending
            else:  # resumed in the middle of a buffer: read the same items again, pack what is left anew
                pending["generation"] += 1
                raw = list(itertools.islice(items, pending["num_items"]))
                if len(raw) != pending["num_items"]:
                    raise ValueError(
                        f"shard {shard}: the source gave {len(raw)} items where the saved state expects "
                        f"{pending['num_items']} (it must give the same items when iterated again)"
                    )
                buffer = self._read_buffer(raw)
            yield from self._emit_buffer(shard, num_shards, state, buffer)

    def _emit_buffer(self, shard: int, num_shards: int, state: dict, buffer) -> Iterator[StreamBatch]:
        from ..pipeline import pack_gpu

        tokens, labels, embeddings = buffer
        pending = state["pending"]
        units = pending["units"]
        position, start, end = units.unbind(1)
        samples = [tokens[p][s:e] for p, s, e in units.tolist()]
        unit_labels = None if labels is None else [labels[p][s:e] for p, s, e in units.tolist()]
        unit_embeddings = (
            None if embeddings is None else embeddings.index_select(0, position.to(embeddings.device))
        )
        mix = (self.seed, state["epoch"], shard, state["buffer_index"], pending["generation"])
        kwargs = {"seed": _mixed_seed(*mix, 0)} | self.pack_kwargs
        packed = pack_gpu(
            samples, max_len=self.max_len, labels=unit_labels, embeddings=unit_embeddings, **kwargs
        )
        packing = packed.packing
        if pending["generation"] == 0:
            state["num_dropped"] += packing.num_dropped
        if packing.num_packs == 0:  # every sample of the buffer dropped by overlong="drop": nothing to emit
            state["items_consumed"] += pending["num_items"]
            state["buffer_index"] += 1
            state["pending"] = None
            return
        if self.shuffle:
            generator = torch.Generator().manual_seed(_mixed_seed(*mix, 1))
            packing = select_packs(packing, torch.randperm(packing.num_packs, generator=generator))
        # every piece as a token range of its buffer item, in emission order
        piece_unit = packing.sample_index
        piece_start = start.index_select(0, piece_unit) + packing.offset
        emitted = torch.stack(
            [position.index_select(0, piece_unit), piece_start, piece_start + packing.length], dim=1
        )
        piece_offsets = packing.pack_piece_offsets.tolist()
        unit_lengths = (end - start).to(torch.int64)
        attention = self.pack_kwargs.get("attention", "pack")
        pad_to = self.pack_kwargs.get("pad_to")
        per_batch = packing.num_packs if self.packs_per_batch is None else self.packs_per_batch
        for first in range(0, packing.num_packs, per_batch):
            last = min(first + per_batch, packing.num_packs)
            # packs first..last-1 are contiguous: a slice of the pieces (select_packs without the gathers)
            pieces = slice(piece_offsets[first], piece_offsets[last])
            used, local = torch.unique(packing.sample_index[pieces], return_inverse=True)
            chunk = Packing(
                pack_id=packing.pack_id[pieces] - first,
                sample_index=local,
                offset=packing.offset[pieces],
                length=packing.length[pieces],
                pack_offsets=packing.pack_offsets[first : last + 1] - packing.pack_offsets[first],
                max_len=packing.max_len,
                num_packs=last - first,
                sample_lengths=unit_lengths.index_select(0, used),
            )
            used_list = used.tolist()
            batch = assemble(
                [samples[u] for u in used_list],
                chunk,
                attention=attention,
                labels=None if unit_labels is None else [unit_labels[u] for u in used_list],
                pad_to=pad_to,
            )
            ranges = emitted[pieces]
            source_index = (ranges[:, 0] + state["items_consumed"]) * num_shards + shard
            # the state after this batch, updated before the batch leaves
            state["num_batches"] += 1
            if last == packing.num_packs:
                state["items_consumed"] += pending["num_items"]
                state["buffer_index"] += 1
                state["pending"] = None
            else:
                pending["units"] = emitted[piece_offsets[last] :]
            fields = {f.name: getattr(batch, f.name) for f in dataclasses.fields(PackedBatch)}
            fields.update(order=packed.order, order_stats=packed.order_stats)
            yield StreamBatch(
                **fields,
                source_index=source_index,
                source_offset=ranges[:, 1].clone(),
                shard=shard,
                stream_state=_copy_state(state, share=True),
            )
        if state["pending"] is not None:  # pragma: no cover - every buffer ends with its last pack
            raise AssertionError("buffer not fully emitted")

    # ------------------------------------------------------------------ reading the source

    def _open(self) -> Iterator:
        source = self.source
        if callable(source) and not hasattr(source, "__iter__"):
            return iter(source())
        if _is_hf_iterable(source):
            # iterating a datasets.IterableDataset inside a DataLoader worker gives only that worker's share
            # of its shards; .iter() does not split, and the sharding here stays the only one
            return _unbatch(source.iter(batch_size=_HF_BATCH_SIZE))
        return iter(source)

    def _random_access(self) -> bool:
        source = self.source
        return (
            not isinstance(source, (IterableDataset, Mapping, str, bytes))
            and hasattr(source, "__len__")
            and hasattr(source, "__getitem__")
        )

    def _shard_items(self, shard: int, num_shards: int, start: int) -> Iterator[tuple[int, object]]:
        """``(stream position, item)`` of the shard's items from its ``start``-th on."""
        first = start * num_shards + shard
        if self._random_access():
            source = self.source
            return ((i, source[i]) for i in range(first, len(source), num_shards))
        positions = itertools.count(first, num_shards)
        return zip(positions, itertools.islice(self._open(), first, None, num_shards))

    def _read_buffer(self, raw: list) -> tuple[list, list | None, torch.Tensor | None]:
        """Token tensors (and labels, embeddings) of the buffer's items; errors name the stream position."""
        tokens, labels, embeddings = [], [], []
        any_labels = False
        for position, item in raw:
            if self.tokenize is not None:
                item = self.tokenize(item)
            tok, lab, emb = self._parse(item, position)
            tokens.append(tok)
            labels.append(lab)
            any_labels = any_labels or lab is not None
            embeddings.append(emb)
        if any_labels:
            labels = [t if lab is None else lab for t, lab in zip(tokens, labels)]
        else:
            labels = None
        stacked = None
        if self.embedding_field is not None:
            stacked = torch.stack(embeddings).to(self.device)
        return tokens, labels, stacked

    def _parse(self, item, position: int):
        label = embedding = None
        if isinstance(item, Mapping):
            if self.input_field not in item:
                raise ValueError(
                    f"stream item {position} has no field {self.input_field!r} (fields: {sorted(item)[:10]})"
                )
            tokens = item[self.input_field]
            if self.labels_field is not None and item.get(self.labels_field) is not None:
                label = _as_ids(
                    item[self.labels_field], f"stream item {position} field {self.labels_field!r}"
                )
            if self.embedding_field is not None:
                if item.get(self.embedding_field) is None:
                    raise ValueError(f"stream item {position} has no field {self.embedding_field!r}")
                embedding = torch.as_tensor(np.asarray(item[self.embedding_field])).reshape(-1)
        else:
            if self.embedding_field is not None:
                raise ValueError(
                    f"stream item {position} is not a mapping, so it has no field {self.embedding_field!r}"
                )
            tokens = item
        tokens = _as_ids(tokens, f"stream item {position} tokens")
        if tokens.numel() == 0:
            raise ValueError(f"stream item {position} has no tokens: every sample needs at least one")
        if tokens.numel() > self.max_len and self.pack_kwargs.get("overlong", "error") == "error":
            raise ValueError(
                f"stream item {position} has {tokens.numel()} tokens, more than max_len={self.max_len}; pass "
                "pack_kwargs={'overlong': 'truncate' | 'drop' | 'split'} to handle over-long samples"
            )
        if label is not None and label.numel() != tokens.numel():
            raise ValueError(f"stream item {position} has {tokens.numel()} tokens but {label.numel()} labels")
        tokens = tokens.to(self.device)
        label = None if label is None else label.to(self.device)
        return tokens, label, embedding

    def __repr__(self) -> str:
        return (
            f"TFPStreamingDataset(buffer_size={self.buffer_size}, max_len={self.max_len}, "
            f"packs_per_batch={self.packs_per_batch}, rank {self.rank} of {self.world_size}, seed={self.seed})"
        )


# ---------------------------------------------------------------------------------------- helpers


def _is_hf_iterable(source) -> bool:
    """Whether ``source`` is a ``datasets.IterableDataset`` (without importing ``datasets``)."""
    import sys

    datasets = sys.modules.get("datasets")
    return datasets is not None and isinstance(source, getattr(datasets, "IterableDataset", ()))


def _unbatch(batches) -> Iterator[dict]:
    """Rows of the column batches (``{name: values}``) that ``datasets.IterableDataset.iter`` yields."""
    for batch in batches:
        columns = list(batch)
        size = len(batch[columns[0]]) if columns else 0
        for i in range(size):
            yield {name: batch[name][i] for name in columns}


def _collective_device(group) -> torch.device:
    """Where a collective of ``group`` runs: the current CUDA device for nccl, else the CPU."""
    import torch.distributed as dist

    backend = str(dist.get_backend(group)).lower()
    return torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")


def _agree(flag: bool, *, all_ranks: bool, group) -> bool:
    """``flag`` on every rank of ``group`` (``all_ranks``) or on any of them, by one all-reduce."""
    import torch.distributed as dist

    value = torch.tensor([int(bool(flag))], dtype=torch.int32, device=_collective_device(group))
    dist.all_reduce(value, op=dist.ReduceOp.MIN if all_ranks else dist.ReduceOp.MAX, group=group)
    return bool(value.item())


def _placeholder_batch(attention: str, pad_to, device) -> PackedBatch:
    """A one-token batch (token 0, label -100): what a rank without any batch repeats."""
    packing = pack_lengths(torch.ones(1, dtype=torch.int64), max_len=1)
    token = torch.zeros(1, dtype=torch.int64, device=device)
    return assemble([token], packing, attention=attention, labels=[token.new_full((1,), IGNORE_INDEX)], pad_to=pad_to)


def as_repeat(batch):
    """``batch`` as a flagged repeat: every label -100 (so it adds nothing to the loss and its
    ``num_items_in_batch`` is 0).

    Args:
        batch: a :class:`~tfp_kernels.PackedBatch` (its ``padded`` view too; a :class:`StreamBatch` also
            gets ``repeat=True``) or a batch dict with ``labels`` (a copy with ``labels`` all -100, ``shift_labels``
            likewise when present, and ``num_items_in_batch`` 0 when present).

    Returns:
        A copy; ``batch`` is not modified.
    """
    if isinstance(batch, PackedBatch):
        padded = batch.padded
        if padded is not None:
            padded = padded._replace(labels=torch.full_like(padded.labels, IGNORE_INDEX))
        fields = {"labels": torch.full_like(batch.labels, IGNORE_INDEX), "padded": padded}
        if isinstance(batch, StreamBatch):
            fields["repeat"] = True
        return dataclasses.replace(batch, **fields)
    if isinstance(batch, Mapping) and "labels" in batch:
        out = dict(batch)
        out["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
        if "shift_labels" in out:
            out["shift_labels"] = torch.full_like(batch["shift_labels"], IGNORE_INDEX)
        if "num_items_in_batch" in out:
            out["num_items_in_batch"] = torch.zeros((), dtype=torch.int64, device=batch["labels"].device)
        return out
    raise TypeError(
        f"cannot make a repeat of a {type(batch).__name__}: expected a PackedBatch or a dict with 'labels'"
    )


def equalize_batches(batches, *, group=None) -> Iterator:
    """Iterate ``batches`` so that every rank of ``group`` yields the same number of batches.

    Before each batch the ranks agree, with one all-reduce of a flag, whether any of them still has one;
    a rank that has run out yields a repeat of its last batch meanwhile (:func:`as_repeat`: every label
    -100, ``num_items_in_batch`` 0, ``repeat=True`` on a :class:`StreamBatch`), and the iteration ends on
    every rank when all have run out. Use it around a ``DataLoader`` whose workers read a
    :class:`TFPStreamingDataset` (``equal_batches=False``), or any per-rank iterable of uneven length.
    Without an initialised process group (or with one rank) it yields ``batches`` unchanged.

    Args:
        batches: an iterable of :class:`~tfp_kernels.PackedBatch` or batch dicts with ``labels``.
        group: the process group (default: the default group).

    Yields:
        The batches of ``batches``, then repeats until every rank has run out. A rank that has yielded
        nothing repeats a one-token placeholder :class:`~tfp_kernels.PackedBatch`.

    Raises:
        TypeError: a batch that is neither a ``PackedBatch`` nor a dict with ``labels`` (when it must be
        repeated).
    """
    import torch.distributed as dist

    iterator = iter(batches)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        yield from iterator
        return
    group = dist.group.WORLD if group is None else group
    last = None
    while True:
        batch = next(iterator, None)
        if not _agree(batch is not None, all_ranks=False, group=group):
            return
        if batch is not None:
            last = batch
            yield batch
            continue
        if last is None:
            last = _placeholder_batch("pack", None, torch.device("cpu"))
        last = as_repeat(last)
        yield last


def _fresh_state(num_shards: int, epoch: int) -> dict:
    return {
        "num_shards": num_shards,
        "epoch": epoch,
        "items_consumed": 0,
        "buffer_index": 0,
        "done": False,
        "num_batches": 0,
        "num_dropped": 0,
        "pending": None,
    }


def _copy_state(state: Mapping, *, share: bool = False) -> dict:
    """A copy of a shard state; ``share=True`` keeps the (never modified in place) ``units`` tensor."""
    copy = dict(state)
    pending = state.get("pending")
    if pending is not None:
        units = pending["units"]
        units = torch.as_tensor(units, dtype=torch.int64).reshape(-1, 3)
        copy["pending"] = {
            "num_items": int(pending["num_items"]),
            "generation": int(pending["generation"]),
            "units": units if share else units.clone(),
        }
    return copy


def _mixed_seed(*values: int) -> int:
    """A 63-bit seed mixing ``values`` (numpy SeedSequence): unrelated for neighbouring inputs."""
    state = np.random.SeedSequence(list(values)).generate_state(1, dtype=np.uint64)[0]
    return int(state) & (2**63 - 1)


def _as_ids(value, what: str) -> torch.Tensor:
    """A 1-D integer CPU tensor from a tensor, numpy array or list of ints."""
    if isinstance(value, torch.Tensor):
        tensor = value
    else:
        try:
            array = np.asarray(value)
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"{what} must be a 1-D integer tensor, array or list, got {type(value).__name__}"
            ) from err
        if array.size == 0:
            array = array.astype(np.int64)
        if array.dtype == np.bool_ or array.dtype.kind not in "iu":
            raise TypeError(f"{what} must hold integers, got dtype {array.dtype}")
        tensor = torch.from_numpy(array.astype(np.int64, copy=False))
    if tensor.dim() != 1:
        raise ValueError(f"{what} must be 1-D, got shape {tuple(tensor.shape)}")
    if tensor.dtype not in _INTEGER_DTYPES:
        raise TypeError(f"{what} must have an integer dtype, got {tensor.dtype}")
    return tensor


