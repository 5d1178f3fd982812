"""Beyond one GPU: rank-balanced packs for data-parallel training and streaming TFP packing.

Public API:

- :class:`DistributedPackSampler`: every rank the same number of steps and packs per step, near-equal
  tokens per step, deterministic per ``(seed, epoch)``, an explicit remainder policy (``"pad"`` | ``"drop"``);
  :func:`plan_epoch` / :class:`PackPlan` (the plan of all ranks), :func:`balance_steps`, :func:`mask_repeats`;
- :class:`TFPStreamingDataset`: an ``IterableDataset`` that buffers any iterable of samples, packs each
  buffer with :func:`tfp_kernels.pack_gpu`, splits the stream across ranks and DataLoader workers and
  resumes from ``state_dict()`` without losing or repeating samples; it yields :class:`StreamBatch`; with
  ``equal_batches=True`` (default) every rank yields the same number of batches (flagged repeats);
  :func:`equalize_batches` does the same around any per-rank iterable (a DataLoader with workers),
  :func:`as_repeat` makes a batch a repeat (labels all -100);
- :func:`tfp_order_sharded` (also ``tfp_order(shard, ..., group=g)``): TFP ordering of rows sharded over the
  ranks of a process group, the same path as single-process ``tfp_order``; :class:`ShardedOrderStats`,
  :func:`shard_bounds` / :func:`shard_rows` (the ``torch.arange(N).tensor_split(world_size)`` split).
"""

from .order import ShardedOrderStats, shard_bounds, shard_rows, tfp_order_sharded
from .sampler import (
    BALANCE_MODES,
    REMAINDER_POLICIES,
    DistributedPackSampler,
    PackPlan,
    balance_step_reference,
    balance_steps,
    mask_repeats,
    plan_epoch,
)
from .streaming import StreamBatch, TFPStreamingDataset, as_repeat, equalize_batches

__all__ = [
    "BALANCE_MODES",
    "REMAINDER_POLICIES",
    "DistributedPackSampler",
    "PackPlan",
    "ShardedOrderStats",
    "StreamBatch",
    "TFPStreamingDataset",
    "as_repeat",
    "balance_step_reference",
    "balance_steps",
    "equalize_batches",
    "mask_repeats",
    "plan_epoch",
    "shard_bounds",
    "shard_rows",
    "tfp_order_sharded",
]
