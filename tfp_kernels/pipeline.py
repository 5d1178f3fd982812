"""``pack_gpu``: one call for training loops — a buffer of tokenized samples in, a TFP-ordered packed batch out.

It composes the layers (docs/design.md, 'Data flow'), each of which is usable alone::

    embed (tfp_kernels.embed) -> threshold + order (tfp_kernels.order) -> pack_lengths (tfp_kernels.packing)
      -> assemble (tfp_kernels.assembly) -> PackedBatch

Shape letters: ``N`` samples in the buffer, ``D`` embedding dimension, ``M`` pieces, ``P`` packs, ``T`` tokens.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .assembly import Jagged, PackedBatch, Padded, assemble
from .assembly.api import ATTENTION_MODES
from .assembly.types import as_token_container
from .order import _checks
from .order.api import tfp_order
from .order.policy import check_policy
from .packing import Packing, pack_lengths
from .packing.binpack import OVERLONG_POLICIES, STRATEGIES, _as_keep_apart

ORDERS = ("tfp", "keep", "random")

__all__ = ["ORDERS", "pack_gpu"]


# ---------------------------------------------------------------------------------------- input conversion


def _as_tensor(x, name: str) -> torch.Tensor:
    """A torch view of a tensor, numpy array, DLPack-capable array (cupy, jax, ...) or a list of ints."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x if x.flags.writeable else x.copy())
    if hasattr(x, "__dlpack__"):
        return torch.from_dlpack(x)
    if isinstance(x, (list, tuple)) and all(isinstance(v, (int, np.integer)) for v in x):
        return torch.tensor(x, dtype=torch.int64)
    raise TypeError(
        f"{name} must be a torch tensor, a numpy/cupy array (DLPack) or a list of ints, got {type(x).__name__}"
    )


def _is_array(x) -> bool:
    return isinstance(x, (torch.Tensor, np.ndarray)) or hasattr(x, "__dlpack__")


def _as_samples(samples, name: str):
    """``samples`` in one of the kinds :func:`~tfp_kernels.assemble` reads, with torch tensors throughout."""
    if isinstance(samples, (Jagged, Padded)):
        fields = (_as_tensor(x, f"{name}.{f}") for f, x in zip(samples._fields, samples))
        return type(samples)(*fields)
    if _is_array(samples):
        shape = tuple(getattr(samples, "shape", ()))
        raise TypeError(
            f"{name} is a single array of shape {shape}; pass a list of 1-D token tensors, "
            "Jagged(values, offsets) or Padded(tokens, lengths)"
        )
    if isinstance(samples, tuple) and len(samples) == 2 and all(_is_array(s) for s in samples):
        return as_token_container(tuple(_as_tensor(s, name) for s in samples))  # (values, offsets) or padded
    if isinstance(samples, (list, tuple)):
        return [_as_tensor(s, f"{name}[{i}]") for i, s in enumerate(samples)]
    raise TypeError(
        f"{name} must be a list of 1-D token tensors/arrays, Jagged(values, offsets) or Padded(tokens, "
        f"lengths), got {type(samples).__name__}"
    )


def _tokens_device(samples) -> torch.device:
    if isinstance(samples, Jagged):
        return samples.values.device
    if isinstance(samples, Padded):
        return samples.tokens.device
    return samples[0].device


def _host_lengths(samples) -> torch.Tensor:
    """(N,) int64 CPU lengths of the samples (a device sync only for device-resident offsets/lengths)."""
    if isinstance(samples, Jagged):
        offsets = samples.offsets
        if offsets.dim() != 1 or offsets.numel() < 1:
            raise ValueError(f"offsets must be 1-D with N + 1 entries, got shape {tuple(offsets.shape)}")
        return torch.diff(offsets.to("cpu", torch.int64))
    if isinstance(samples, Padded):
        if samples.lengths.dim() != 1:
            raise ValueError(f"lengths must be 1-D, got shape {tuple(samples.lengths.shape)}")
        return samples.lengths.to("cpu", torch.int64)
    for i, s in enumerate(samples):
        if s.dim() != 1:
            raise ValueError(f"samples[{i}] must be 1-D, got shape {tuple(s.shape)}")
    return torch.tensor([s.numel() for s in samples], dtype=torch.int64)


def _check_choice(value, name: str, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def _check_lengths(lengths: torch.Tensor, max_len: int, overlong: str) -> None:
    """Fail before the (costly) ordering on what ``pack_lengths`` would refuse anyway."""
    if lengths.numel() == 0:
        raise ValueError("samples is empty: pack_gpu needs at least one sample")
    not_positive = lengths < 1
    if bool(not_positive.any()):
        first = int(torch.nonzero(not_positive)[0])
        raise ValueError(
            f"sample {first} has length {int(lengths[first])}; every sample needs at least one token "
            f"({int(not_positive.sum())} of {lengths.numel()} samples are empty)"
        )
    if overlong == "error":
        over = lengths > max_len
        if bool(over.any()):
            first = int(torch.nonzero(over)[0])
            raise ValueError(
                f"sample {first} has {int(lengths[first])} tokens, more than max_len={max_len} "
                f"({int(over.sum())} of {lengths.numel()} samples are over-long); pass overlong='truncate', "
                "'drop' or 'split' to handle them"
            )


# ---------------------------------------------------------------------------------------- embedding + order


def _embed(samples, embedder) -> torch.Tensor:
    if embedder is None:
        from .embed import HashedEmbedder

        embedder = HashedEmbedder()
    embed_tokens = getattr(embedder, "embed_tokens", None)
    if embed_tokens is None and not callable(embedder):
        raise TypeError(
            f"embedder must have an embed_tokens(tokens) method or be callable, got {type(embedder).__name__}"
        )
    return embed_tokens(samples) if embed_tokens is not None else embedder(samples)


def _check_buffer_embeddings(embeddings, n: int, device: torch.device, metric: str) -> torch.Tensor:
    embeddings = _as_tensor(embeddings, "embeddings")
    if embeddings.device != device:
        raise ValueError(
            f"embeddings are on {embeddings.device} but the samples are on {device}; put both on one device"
        )
    embeddings = _checks.check_embeddings(embeddings, metric=metric)
    if embeddings.shape[0] != n:
        raise ValueError(
            f"embeddings has {embeddings.shape[0]} rows but there are {n} samples: one row per sample"
        )
    return embeddings


def _reindex(packing: Packing, order: torch.Tensor, lengths: torch.Tensor) -> Packing:
    """The packing of the samples ``order[0], order[1], ...`` expressed with indices of the input samples."""
    dropped = order.index_select(0, packing.dropped_index).sort().values
    return dataclasses.replace(
        packing,
        sample_index=order.index_select(0, packing.sample_index),
        dropped_index=dropped,
        sample_lengths=lengths,
    )


# ---------------------------------------------------------------------------------------- the API


def pack_gpu(
    samples,
    *,
    max_len: int,
    embeddings=None,
    labels=None,
    order: str = "tfp",
    strategy: str = "next_fit",
    attention: str = "pack",
    metric: str = "l2",
    quantile: float = 0.02,
    threshold: float | None = None,
    window: int = 4,
    max_rejections: int | None = None,
    k: int | str = "auto",
    seed: int = 0,
    embedder=None,
    overlong: str = "error",
    pad_to: int | None = None,
    policy: str | None = None,
    keep_apart: int = 0,
) -> PackedBatch:
    """Order a buffer of tokenized samples by TFP and pack them into one flash-attention-ready batch.

    Steps, all on the device of the samples (no Python loop per sample for tensor inputs):

    1. embeddings: the given ``embeddings``, else ``embedder.embed_tokens(samples)`` (default: the hashed
       token-bag embedder of :mod:`tfp_kernels.embed`, no model needed); only for ``order="tfp"``;
    2. order: ``"tfp"`` — :func:`~tfp_kernels.tfp_order` over the buffer (threshold: ``threshold`` if
       given, e.g. estimated once over the whole dataset with :func:`~tfp_kernels.estimate_threshold`,
       else the ``quantile`` of the buffer's pair distances); ``"keep"`` — input order; ``"random"`` — a
       seeded permutation;
    3. :func:`~tfp_kernels.pack_lengths` of the lengths in that order (``strategy``, ``overlong``), on the
       host copy of the lengths (they are known there, so nothing waits on the device);
    4. :func:`~tfp_kernels.assemble` of the packs (``attention="pack"``: the TFP paper's one segment per
       pack; ``"sample"``: one segment per sample).

    Host syncs: one to bring the order to the host (``order="tfp"``, CUDA), those of ``tfp_order`` (its
    walk runs in C++ on the host) and one to read device-resident offsets/lengths (none for a list of
    tensors, CPU offsets or CPU lengths).

    Args:
        samples: the N samples' token ids, any integer dtype, all on one device: a list of N 1-D tensors
            (or numpy/cupy arrays — taken through DLPack without a copy —, or lists of ints);
            ``Jagged(values, offsets)``; ``Padded(tokens, lengths)``; or a plain ``(values, offsets)`` /
            ``(tokens [B, L], lengths)`` pair. Every sample has at least one token.
        max_len: capacity of a pack in tokens (Python int).
        embeddings: (N, D) float16/bfloat16/float32/float64 on the samples' device, finite; or None.
        labels: None (labels = token ids) or labels in the layout of ``samples`` (see ``assemble``).
        order: ``"tfp"``, ``"keep"`` or ``"random"``.
        strategy: ``"next_fit"`` (default: keeps the order), ``"fill_in_order"`` (next fit, each pack topped
            up from the next pieces), ``"stream"`` (the paper: splits samples), ``"window_best_fit"`` or
            ``"bfd"`` (ignores the order), see :func:`~tfp_kernels.pack_lengths`.
        attention: ``"pack"`` or ``"sample"``.
        metric, quantile, threshold, window, max_rejections, k: as :func:`~tfp_kernels.tfp_order`.
        seed: seed of ``order="random"``.
        embedder: object with ``embed_tokens(samples) -> (N, D)`` or a callable ``f(samples) -> (N, D)``.
        overlong: ``"error"``, ``"truncate"``, ``"drop"`` or ``"split"``: samples longer than ``max_len``;
            counted in ``batch.packing`` (``num_truncated``, ``num_dropped`` + ``dropped_index``,
            ``num_split``).
        pad_to: also build the ``[P, pad_to]`` padded view (``batch.padded``).
        policy: what the TFP walk does where the threshold runs out (``order="tfp"``; see
            :mod:`tfp_kernels.order.policy`): ``"spread"`` (exact duplicates that the window can barely keep apart
            are taken as soon as they are valid, and a step with no valid node takes the node farthest from the
            window; no ``max_rejections``) or ``"paper"`` (the paper's rule, the default of
            :func:`~tfp_kernels.tfp_order`). None (default): ``"spread"``, or ``"paper"`` when ``max_rejections``
            is given (the cap exists only in the paper's rule).
        keep_apart: with ``strategy="fill_in_order"`` or ``"next_fit"``, keep samples closer than the
            threshold ``t`` to each other out of one pack where it can: the next fit passes over up to
            ``keep_apart`` such samples per pack (held back for the next packs), the top-up never takes one
            (see :func:`~tfp_kernels.pack_lengths`); the embeddings go to the packer then
            (``fill_in_order``: its similarity-aware top-up). Needs the threshold: ``order="tfp"``, or
            ``embeddings`` and ``threshold`` with the other orders. 0 (default): off.

    Returns:
        :class:`~tfp_kernels.PackedBatch` on the samples' device: ``input_ids``, ``labels``, ``position_ids``
        (1, T) int64, ``cu_seqlens`` (S + 1,) int32, ``max_seqlen`` (int), ``sample_index`` (M,) int64
        indices into the *input* samples, ``to_hf_kwargs()``; ``batch.order`` (N,) int64 — the order of the
        input samples that was packed — and ``batch.order_stats`` (an :class:`~tfp_kernels.OrderStats`
        for ``order="tfp"``, else None).

    Raises:
        ValueError: empty buffer; an empty sample; an over-long sample with ``overlong="error"``;
            embeddings with the wrong N, on another device, or with NaN/inf; mixed devices; unknown
            ``order``/``strategy``/``attention``/``overlong``/``metric``/``policy``; ``policy="spread"`` with
            ``max_rejections``; ``keep_apart`` negative, with another strategy, or without a threshold
            (``order="keep"``/``"random"`` without ``embeddings`` and ``threshold``).
        TypeError: samples of an unknown kind or a non-integer dtype; embeddings not floating.

    Examples::

        >>> import torch, tfp_kernels
        >>> g = torch.Generator().manual_seed(0)
        >>> samples = [torch.randint(0, 1000, (int(n),), generator=g) for n in torch.randint(5, 60, (40,), generator=g)]
        >>> batch = tfp_kernels.pack_gpu(samples, max_len=128)
        >>> batch.cu_seqlens.dtype, int(batch.cu_seqlens[-1]) == sum(len(s) for s in samples)
        (torch.int32, True)
        >>> sorted(batch.sample_index.tolist()) == list(range(40))
        True
    """
    order = _check_choice(order, "order", ORDERS)
    _check_choice(strategy, "strategy", STRATEGIES)
    _check_choice(attention, "attention", ATTENTION_MODES)
    overlong = _check_choice(overlong, "overlong", OVERLONG_POLICIES)
    metric = _checks.check_metric(metric)
    if policy is None:
        policy = "spread" if max_rejections is None else "paper"
    policy = check_policy(policy, _checks.check_max_rejections(max_rejections))
    keep_apart = _as_keep_apart(keep_apart)
    if keep_apart:
        if strategy not in ("fill_in_order", "next_fit"):
            raise ValueError(
                f"keep_apart needs strategy='fill_in_order' or 'next_fit', got strategy={strategy!r}"
            )
        if order != "tfp" and (embeddings is None or threshold is None):
            raise ValueError(
                f"keep_apart with order={order!r} needs embeddings= and threshold= (samples closer than the "
                "threshold are kept apart); order='tfp' estimates the threshold"
            )
    if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) or max_len < 1:
        raise ValueError(f"max_len must be a positive int, got {max_len!r}")
    max_len = int(max_len)
    samples = _as_samples(samples, "samples")
    if isinstance(samples, list) and not samples:
        raise ValueError("samples is empty: pack_gpu needs at least one sample")
    if labels is not None:
        labels = _as_samples(labels, "labels") if not _is_array(labels) else _as_tensor(labels, "labels")
    device = _tokens_device(samples)
    lengths = _host_lengths(samples)
    _check_lengths(lengths, max_len, overlong)
    n = lengths.numel()

    order_stats = None
    apart = {}
    if order == "tfp":
        if embeddings is None:
            embeddings = _embed(samples, embedder)
        embeddings = _check_buffer_embeddings(embeddings, n, device, metric)
        path, order_stats = tfp_order(
            embeddings,
            metric=metric,
            quantile=quantile,
            threshold=threshold,
            window=window,
            max_rejections=max_rejections,
            k=k,
            return_stats=True,
            policy=policy,
        )
        path_cpu = path.cpu()
        threshold = order_stats.threshold
    elif order == "random":
        if embeddings is not None:
            embeddings = _check_buffer_embeddings(embeddings, n, device, metric)
        path_cpu = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
        path = path_cpu.to(device)
    else:
        if embeddings is not None:
            embeddings = _check_buffer_embeddings(embeddings, n, device, metric)
        path_cpu = torch.arange(n, dtype=torch.int64)
        path = path_cpu.to(device)
    if keep_apart:
        apart = dict(
            embeddings=embeddings.index_select(0, path), min_distance=threshold, metric=metric,
            keep_apart=keep_apart,
        )

    packing = pack_lengths(
        lengths.index_select(0, path_cpu), max_len, strategy=strategy, overlong=overlong, **apart
    )
    if order != "keep":
        packing = _reindex(packing, path_cpu, lengths)
    batch = assemble(samples, packing, attention=attention, labels=labels, pad_to=pad_to)
    return dataclasses.replace(batch, order=path, order_stats=order_stats)
