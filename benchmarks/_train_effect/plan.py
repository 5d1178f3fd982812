"""Conditions of ``train_effect`` and the batches each one feeds the model.

A :class:`Condition` is an order (``tfp`` / ``random``), an attention mode (``pack`` / ``sample``), a
packing strategy and, for TFP order, the walk's policy where the threshold runs out (``paper`` / ``spread``).
:class:`PreparedTask` holds a task's training samples as torch tensors, their embeddings and
the cached packings; :func:`step_packs` cuts ``epochs`` seeded pack shuffles into ``steps`` batches of about
equal tokens; :func:`step_batch` assembles one of them; :func:`packing_diagnostics` says what a packing puts
in view.
"""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import torch

import tfp_kernels
from tfp_kernels import Jagged, PackedBatch, Packing, assemble, pack_gpu, pack_permutation, select_packs
from tfp_kernels.packing import STRATEGIES

ORDERS = ("tfp", "random")
ATTENTIONS = ("pack", "sample")
#: The strategy of the four core conditions: keeps the order, never splits a sample.
CORE_STRATEGY = "next_fit"
#: The policy of the core TFP conditions: the paper's rule.
CORE_POLICY = "paper"
POLICIES = ("paper", "spread")


@dataclasses.dataclass(frozen=True)
class Condition:
    """How the training samples are ordered, packed and attended: ``order`` (``"tfp"``, ``"random"``),
    ``attention`` (``"pack"``: one segment per pack; ``"sample"``: one per sample), ``strategy`` (a
    :func:`tfp_kernels.pack_lengths` strategy), ``policy`` (TFP order only: ``"paper"``, the paper's rule, or
    ``"spread"``; see :mod:`tfp_kernels.order.policy`)."""

    order: str
    attention: str
    strategy: str = CORE_STRATEGY
    policy: str = CORE_POLICY

    @property
    def name(self) -> str:
        base = f"{self.order}+{self.attention}"
        if self.strategy != CORE_STRATEGY:
            base += f"/{self.strategy}"
        if self.order == "tfp" and self.policy != CORE_POLICY:
            base += f"/{self.policy}"
        return base


def parse_condition(spec: str) -> Condition:
    """``"ORDER:ATTENTION[:STRATEGY[:POLICY]]"`` -> :class:`Condition`, e.g. ``"tfp:pack"``,
    ``"random:sample:bfd"``, ``"tfp:pack:next_fit:spread"``."""
    parts = spec.split(":")
    if len(parts) not in (2, 3, 4):
        raise ValueError(f"condition {spec!r}: expected ORDER:ATTENTION[:STRATEGY[:POLICY]], e.g. tfp:pack")
    order, attention = parts[0], parts[1]
    strategy = parts[2] if len(parts) >= 3 else CORE_STRATEGY
    policy = parts[3] if len(parts) == 4 else CORE_POLICY
    if order not in ORDERS:
        raise ValueError(f"condition {spec!r}: order must be one of {ORDERS}, got {order!r}")
    if attention not in ATTENTIONS:
        raise ValueError(f"condition {spec!r}: attention must be one of {ATTENTIONS}, got {attention!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"condition {spec!r}: strategy must be one of {STRATEGIES}, got {strategy!r}")
    if policy not in POLICIES:
        raise ValueError(f"condition {spec!r}: policy must be one of {POLICIES}, got {policy!r}")
    return Condition(order, attention, strategy, policy)


def package_default_strategy() -> str:
    """The packing strategy :func:`tfp_kernels.pack_gpu` uses when none is given."""
    return inspect.signature(pack_gpu).parameters["strategy"].default


def package_default_policy() -> str:
    """The walk policy :func:`tfp_kernels.pack_gpu` uses when none is given (and no ``max_rejections``)."""
    default = inspect.signature(pack_gpu).parameters["policy"].default
    return "spread" if default is None else default


def default_conditions() -> list[Condition]:
    """The four core conditions (the paper's rule, :data:`CORE_STRATEGY`), plus ``tfp+pack`` with the
    package's default packing (``pack_gpu``'s default strategy and policy) when that differs."""
    core = [Condition(o, a) for a in ATTENTIONS for o in ("random", "tfp")]
    default = Condition("tfp", "pack", package_default_strategy(), package_default_policy())
    if default not in core:
        core.append(default)
    return core


# ---------------------------------------------------------------------------------------- training data


class PreparedTask:
    """A task's training samples on the CPU as ``Jagged`` tokens and labels, the embeddings of their texts,
    and the packing of every (order, strategy[, seed]) asked for so far.

    Args:
        task: a :class:`~benchmarks._train_effect.tasks.TaskData`.
        embedder: an embedder of ``tfp_kernels.embed`` (``embed_texts``), or None for no TFP conditions.
        max_len: pack capacity in tokens.
        metric, quantile, window: TFP settings (``tfp_order``'s).
    """

    def __init__(self, task, embedder, max_len: int, *, metric="l2", quantile=0.02, window=4):
        offsets = torch.from_numpy(task.train_offsets)
        self.task = task
        self.max_len = int(max_len)
        self.tokens = Jagged(torch.from_numpy(task.train_ids), offsets)
        self.labels = Jagged(torch.from_numpy(task.train_labels), offsets)
        self.lengths = torch.diff(offsets)
        self.metric, self.quantile, self.window = metric, quantile, window
        self.embeddings = None if embedder is None else embedder.embed_texts(task.train_texts)
        self._packings: dict = {}
        self.order_stats: dict = {}

    def packing(self, condition: Condition, seed: int) -> Packing:
        """The packing of the whole training set for ``condition`` (TFP: the same for every seed)."""
        key = (condition.order, condition.strategy, condition.policy if condition.order == "tfp" else None,
               seed if condition.order == "random" else None)
        if key not in self._packings:
            if condition.order == "tfp" and self.embeddings is None:
                raise ValueError("a tfp condition needs an embedder")
            batch = pack_gpu(
                self.tokens,
                labels=self.labels,
                max_len=self.max_len,
                embeddings=self.embeddings if condition.order == "tfp" else None,
                order=condition.order,
                strategy=condition.strategy,
                attention=condition.attention,
                metric=self.metric,
                quantile=self.quantile,
                window=self.window,
                seed=seed,
                overlong="split",
                policy=condition.policy if condition.order == "tfp" else None,
            )
            self._packings[key] = batch.packing
            if batch.order_stats is not None:
                stats = batch.order_stats
                self.order_stats[f"{condition.strategy}/{condition.policy}"] = {
                    k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v))
                    for k, v in (dataclasses.asdict(stats).items() if dataclasses.is_dataclass(stats) else {})
                }
        return self._packings[key]


# ---------------------------------------------------------------------------------------- steps


def step_packs(packing: Packing, *, seed: int, epochs: int, steps: int) -> list[torch.Tensor]:
    """The packs of each optimizer step: ``epochs`` shuffles of the packs
    (:func:`tfp_kernels.pack_permutation` with ``seed`` and the epoch, as :func:`tfp_kernels.shuffle_packs`),
    one after the other, cut into ``steps`` runs of consecutive packs; pack ``j`` goes to step
    ``floor(steps * m_j / total)`` where ``m_j`` is the token offset of its middle in the stream, so every
    step holds about ``total / steps`` tokens (within one pack) and every pack of every epoch is used exactly
    once.

    Returns:
        ``steps`` (K_s,) int64 CPU tensors of pack indices of ``packing`` (a pack may come twice in a step
        that spans two epochs).

    Raises:
        ValueError: a step would get no pack (more steps than the epochs hold packs, or very unequal packs).
    """
    num_packs = packing.num_packs
    if epochs < 1 or steps < 1:
        raise ValueError(f"epochs and steps must be >= 1, got epochs={epochs}, steps={steps}")
    order = torch.cat([pack_permutation(num_packs, seed, epoch) for epoch in range(epochs)])
    lengths = packing.pack_lengths.to("cpu", torch.int64).index_select(0, order).double()
    ends = torch.cumsum(lengths, 0)
    total = float(ends[-1])
    middles = ends - lengths / 2
    step_of = torch.clamp((middles * steps / total).floor().to(torch.int64), max=steps - 1)
    counts = torch.bincount(step_of, minlength=steps)
    if bool((counts == 0).any()):
        raise ValueError(
            f"{steps} steps over {epochs} epoch(s) of {num_packs} packs ({int(total)} tokens) leave step "
            f"{int(torch.nonzero(counts == 0)[0])} without a pack: use fewer --steps or more --epochs"
        )
    return list(torch.split(order, counts.tolist()))


def step_batch(prepared: PreparedTask, packing: Packing, packs: torch.Tensor, attention: str) -> PackedBatch:
    """The packed batch (flat ``[1, T]``, CPU) of the packs ``packs`` of ``packing`` with ``attention``."""
    selected = select_packs(packing, packs)
    return assemble(prepared.tokens, selected, attention=attention, labels=prepared.labels)


def packing_diagnostics(packing: Packing, groups: list | None) -> dict:
    """What a packing puts next to each sample: packs, fill, pieces per pack, mean tokens before a piece in
    its pack, and (with ``groups``, one label per sample) the share of pieces whose pack holds an earlier
    piece of the same group."""
    pack_id = packing.pack_id.tolist()
    sample = packing.sample_index.tolist()
    length = packing.length.tolist()
    before, same, seen, tokens = [], 0, set(), 0
    current = -1
    for p, s, n in zip(pack_id, sample, length):
        if p != current:
            current, seen, tokens = p, set(), 0
        before.append(tokens)
        if groups is not None:
            same += groups[s] in seen
            seen.add(groups[s])
        tokens += n
    out = {
        "num_packs": packing.num_packs,
        "num_pieces": packing.num_pieces,
        "num_split": int(packing.num_split),
        "fill_ratio": packing.fill_ratio,
        "pieces_per_pack": packing.num_pieces / packing.num_packs,
        "tokens_before_piece_in_pack": float(np.mean(before)),
    }
    if groups is not None:
        out["same_group_earlier_in_pack"] = same / len(sample)
    return out


def versions() -> dict:
    import transformers

    return {"tfp_kernels": tfp_kernels.__version__, "transformers": transformers.__version__}
