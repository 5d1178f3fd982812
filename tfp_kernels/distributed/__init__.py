"""Beyond one GPU: rank-balanced packs for data-parallel training and streaming TFP packing.

Public API:

- :class:`DistributedPackSampler`: every rank the same number of steps and packs per step, near-equal
  tokens per step, deterministic per ``(seed, epoch)``, an explicit remainder policy (``"pad"`` | ``"drop"``);
  :func:`plan_epoch` / :class:`PackPlan` (the plan of all ranks), :func:`balance_steps`;
- :class:`TFPStreamingDataset`: an ``IterableDataset`` that buffers any iterable of samples, packs each
  buffer with :func:`tfp_kernels.pack_gpu`, splits the stream across ranks and DataLoader workers and
  resumes from ``state_dict()`` without losing or repeating samples; it yields :class:`StreamBatch`.
"""

from .sampler import (
    BALANCE_MODES,
    REMAINDER_POLICIES,
    DistributedPackSampler,
    PackPlan,
    balance_step_reference,
    balance_steps,
    plan_epoch,
)
from .streaming import StreamBatch, TFPStreamingDataset

__all__ = [
    "BALANCE_MODES",
    "REMAINDER_POLICIES",
    "DistributedPackSampler",
    "PackPlan",
    "StreamBatch",
    "TFPStreamingDataset",
    "balance_step_reference",
    "balance_steps",
    "plan_epoch",
]
