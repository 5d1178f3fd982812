"""``pack_dataset``: a ``datasets.Dataset`` of SFT samples in, a ``datasets.Dataset`` of TFP packs out.

The packs have the columns of the ``packed.parquet`` that ``tfp-pack`` writes (one row per pack:
``input_ids``, ``labels``, ``position_ids``, ``cu_seqlens``, ``seq_lengths``, ``sample_ids``,
``sample_lengths``, ``sample_starts``, ``length``), so that they train as they are with

- TRL's ``SFTTrainer`` (``padding_free=True``, ``max_length=None``,
  ``dataset_kwargs={"skip_prepare_dataset": True}``): its padding-free collator keeps ``input_ids``,
  ``labels`` and ``seq_lengths`` and restarts the position ids at every ``seq_lengths`` entry, which are the
  attention segments: one per pack with ``attention="pack"``, one per sample with ``"sample"``;
- transformers' ``Trainer`` with :class:`~tfp_kernels.PackedRowsCollator` (either attention; it reads
  ``cu_seqlens``, else ``seq_lengths``, else the restarts of ``position_ids``), or with
  ``DataCollatorWithFlattening``, which makes every row one attention segment: pack attention only.

The work is the package's pipeline: tokenize (text datasets, as ``tfp-pack``) -> embed -> TFP order ->
:func:`~tfp_kernels.pack_lengths` -> :func:`~tfp_kernels.assemble` (:func:`~tfp_kernels.pack_gpu`), then the
packed table of ``tfp-pack``.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
import warnings

import numpy as np
import torch

from ..assembly import IGNORE_INDEX, Jagged
from ..assembly.api import ATTENTION_MODES
from ..packing.binpack import OVERLONG_POLICIES, STRATEGIES
from ..pipeline import ORDERS, pack_gpu
from ..text.tokenize import ByteTokenizer, HFTokenizer, load_tokenizer
from . import transformers as _hf

__all__ = ["PackedDatasetStats", "pack_dataset"]

#: What ``pack_dataset(record_format=...)`` takes: ``"auto"``, ``"tokenized"`` or a text format.
RECORD_FORMATS = ("auto", "tokenized", "alpaca", "chat", "prompt_completion", "text")
#: Columns of a tokenized dataset besides ``input_ids`` that decide the labels (see :func:`pack_dataset`).
LABELS_COLUMN, MASK_COLUMNS = "labels", ("completion_mask", "assistant_masks")
EMBED_HINT = "embed more of each row (embed_field=[...] or embed_template=...)"


@dataclasses.dataclass(frozen=True)
class PackedDatasetStats:
    """What :func:`pack_dataset` did (``return_stats=True``).

    Attributes:
        num_samples: rows of the input dataset.
        num_packs: rows of the packed dataset.
        num_tokens: tokens in the packs.
        num_label_tokens: tokens in the loss, as the model counts them (``labels[1:] != -100`` of every pack:
            the first token of every attention segment never counts).
        fill_ratio: ``num_tokens / (num_packs * max_len)``.
        attention: ``"pack"`` or ``"sample"``.
        num_segments: attention segments in all packs (``num_packs`` with pack attention).
        num_split: samples cut into several pieces (``overlong="split"``, or ``strategy="stream"``).
        num_truncated: samples cut to ``max_len`` tokens (``overlong="truncate"``).
        num_dropped: samples left out (``overlong="drop"``); ``dropped_index``: their rows in the input.
        source: ``"tokenized"`` or the text format that was tokenized (``"alpaca"``, ``"chat"``, ...).
        embedded: what was embedded for the ordering, in words (None unless ``order="tfp"``).
        order_stats: the :class:`~tfp_kernels.OrderStats` of the TFP walk (None unless ``order="tfp"``).
    """

    num_samples: int
    num_packs: int
    num_tokens: int
    num_label_tokens: int
    fill_ratio: float
    attention: str
    num_segments: int
    num_split: int
    num_truncated: int
    num_dropped: int
    dropped_index: list[int]
    source: str
    embedded: str | None
    order_stats: object | None = None

    def summary(self) -> dict:
        """The counts as a JSON-ready dict (the packed dataset's ``info.description`` holds it)."""
        out = dataclasses.asdict(self)
        out.pop("order_stats")
        out["fill_ratio"] = round(self.fill_ratio, 6)
        return out


# ---------------------------------------------------------------------------------------- input checks


def _check_dataset(dataset) -> list[str]:
    """The column names of a map-style ``datasets.Dataset`` (or an object with the same methods)."""
    kind = type(dataset).__name__
    if kind in ("DatasetDict", "IterableDatasetDict") or isinstance(dataset, dict):
        splits = list(dataset.keys())
        raise TypeError(
            f"pack_dataset takes one split, e.g. dataset['train'], got a {kind} with splits {splits}"
        )
    if kind == "IterableDataset":
        raise TypeError(
            "pack_dataset needs a map-style datasets.Dataset (TFP orders the whole dataset at once), got an "
            "IterableDataset; load it without streaming=True, or use tfp_kernels.TFPStreamingDataset"
        )
    columns = getattr(dataset, "column_names", None)
    if columns is None or not hasattr(dataset, "with_format") or not hasattr(dataset, "__len__"):
        raise TypeError(f"dataset must be a datasets.Dataset, got {kind}")
    if len(dataset) == 0:
        raise ValueError("the dataset is empty: pack_dataset needs at least one row")
    return list(columns)


def _check_choice(value, name: str, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def _same_layout(offsets: np.ndarray, other: np.ndarray, name: str) -> None:
    if not np.array_equal(offsets, other):
        row = int(np.flatnonzero(np.diff(offsets) != np.diff(other))[0])
        raise ValueError(
            f"row {row}: column {name!r} has {int(other[row + 1] - other[row])} entries but 'input_ids' has "
            f"{int(offsets[row + 1] - offsets[row])}"
        )


def _token_column(dataset, name: str) -> Jagged:
    """A list-of-ints column as a Jagged of int64 CPU tensors (a writable copy of the Arrow buffers)."""
    values, offsets = _hf._list_values(_hf._arrow_column(dataset, name), name)
    if not np.issubdtype(values.dtype, np.integer):
        raise TypeError(f"column {name!r} must hold token ids (ints), got {values.dtype}")
    return Jagged(torch.from_numpy(np.array(values, dtype=np.int64)), torch.from_numpy(np.array(offsets)))


def _tokenized_columns(dataset, columns: list[str]) -> tuple[Jagged, Jagged | None]:
    """(tokens, labels or None) of a tokenized dataset, read from Arrow."""
    tokens = _token_column(dataset, "input_ids")
    offsets = tokens.offsets.numpy()
    lengths = np.diff(offsets)
    if lengths.size and lengths.min() == 0:
        row = int(np.flatnonzero(lengths == 0)[0])
        raise ValueError(
            f"row {row}: 'input_ids' is empty; every sample needs at least one token "
            f"({int((lengths == 0).sum())} of {lengths.size} rows are empty)"
        )
    if tokens.values.numel() and int(tokens.values.min()) < 0:
        row = int(np.searchsorted(offsets, int(torch.nonzero(tokens.values < 0)[0]), side="right") - 1)
        raise ValueError(f"row {row}: 'input_ids' holds a negative token id")
    if LABELS_COLUMN in columns:
        labels = _token_column(dataset, LABELS_COLUMN)
        _same_layout(offsets, labels.offsets.numpy(), LABELS_COLUMN)
        return tokens, Jagged(labels.values, tokens.offsets)
    masks = [name for name in MASK_COLUMNS if name in columns]
    if not masks:
        return tokens, None
    keep = torch.ones(tokens.values.numel(), dtype=torch.bool)
    for name in masks:
        values, mask_offsets = _hf._list_values(_hf._arrow_column(dataset, name), name)
        _same_layout(offsets, mask_offsets, name)
        values = np.asarray(values)
        if values.dtype.kind not in "iub" or (values.size and (values.min() < 0 or values.max() > 1)):
            raise ValueError(
                f"column {name!r} must hold 0/1 per token (1 = in the loss), got {values.dtype} values"
            )
        keep &= torch.from_numpy(values.astype(np.int64) == 1)
    labels = torch.where(keep, tokens.values, torch.full_like(tokens.values, IGNORE_INDEX))
    return tokens, Jagged(labels, tokens.offsets)


# ---------------------------------------------------------------------------------------- text datasets


class _GivenTokenizer(HFTokenizer):
    """A transformers tokenizer object, used as ``tfp-pack --tokenizer PATH`` uses the folder's tokenizer."""

    def __init__(self, tok):  # no loading: the tokenizer is given
        self.tok = tok
        self.name = getattr(tok, "name_or_path", None) or type(tok).__name__
        self.vocab_size = len(tok)
        self.bos_token_id = tok.bos_token_id
        self.eos_token_id = tok.eos_token_id
        self.has_chat_template = bool(getattr(tok, "chat_template", None))


def _as_tokenizer(tokenizer):
    """None / ``"byte"`` -> the byte tokenizer; a folder -> its transformers tokenizer; a transformers
    tokenizer object -> wrapped; the package's own tokenizers as they are."""
    if tokenizer is None or (isinstance(tokenizer, str) and tokenizer == "byte"):
        return ByteTokenizer()
    if isinstance(tokenizer, (str, os.PathLike)):
        path = os.path.expanduser(str(tokenizer))
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"tokenizer {str(tokenizer)!r}: no such directory (give None, 'byte', a tokenizer folder or a "
                "transformers tokenizer)"
            )
        return load_tokenizer(path)
    if isinstance(tokenizer, (ByteTokenizer, HFTokenizer)):
        return tokenizer
    if callable(tokenizer) and hasattr(tokenizer, "bos_token_id") and hasattr(tokenizer, "decode"):
        return _GivenTokenizer(tokenizer)
    raise TypeError(
        "tokenizer must be None, 'byte', a tokenizer folder or a transformers tokenizer, got "
        f"{type(tokenizer).__name__}"
    )


def _text_records(dataset, columns: list[str], fmt: str, embed_field, embed_template) -> list[dict]:
    """The rows as dicts of the columns the format and the embedded text read."""
    from ..text import formats

    wanted = set(formats.REQUIRED_FIELDS[fmt]) | {"input"}
    if embed_field is not None or embed_template is not None:
        wanted |= set(formats.embed_reads(fmt, embed_field, embed_template))
    missing = [name for name in formats.REQUIRED_FIELDS[fmt] if name not in columns]
    if missing:
        raise ValueError(f"record_format {fmt!r} needs the column {missing[0]!r}; columns: {columns}")
    return _hf._records(dataset, [name for name in columns if name in wanted])


def _tokenize_text(records: list[dict], fmt: str, tokenizer) -> tuple[Jagged, Jagged]:
    from ..text import formats, tokenize

    tokenizer = _as_tokenizer(tokenizer)  # before the row checks: a bad tokenizer argument fails first
    formats.check_fields(records, fmt)
    tok = tokenize.tokenize_records(records, fmt, tokenizer)
    offsets = torch.from_numpy(tok.offsets)
    return Jagged(torch.from_numpy(tok.input_ids), offsets), Jagged(torch.from_numpy(tok.labels), offsets)


# ---------------------------------------------------------------------------------------- embeddings


def _texts_embedding(records, fmt, embed_field, embed_template, embedder) -> tuple[torch.Tensor, str]:
    """(N, D) embeddings of the texts built from ``records`` (tfp-pack's rules), each distinct text once."""
    from ..embed import embed_unique
    from ..text import formats

    prepared = formats.prepare_embed_texts(
        records, fmt, fields=embed_field, template=embed_template, hint=EMBED_HINT
    )
    if prepared.warning:
        warnings.warn(prepared.warning.removeprefix("warning: "), stacklevel=4)
    return embed_unique(prepared.texts, embedder), f"text: {prepared.source}"


def _tokens_embedding(tokens: Jagged, embedder) -> tuple[torch.Tensor, str]:
    embed = getattr(embedder, "embed_tokens", None) or (embedder if callable(embedder) else None)
    if embed is None:
        raise TypeError(
            f"embedder must have embed_tokens(tokens) or be callable, got {type(embedder).__name__}"
        )
    return embed(tokens), "token ids"


def _embeddings(
    dataset,
    columns,
    n,
    *,
    source,
    records,
    tokens,
    embeddings,
    embed_field,
    embed_template,
    embedder,
    device,
) -> tuple[torch.Tensor, str]:
    """The (N, D) embeddings the TFP walk orders, and what they embed, in words."""
    if embeddings is not None:
        if isinstance(embeddings, str):
            what = f"the {embeddings!r} column"
            embeddings = _hf._embedding_column(dataset, embeddings)
        else:
            what = "the given embeddings"
            if isinstance(embeddings, np.ndarray):
                embeddings = torch.from_numpy(embeddings)
        if not isinstance(embeddings, torch.Tensor):
            raise TypeError(
                "embeddings must be an (N, D) tensor, a numpy array or a column name, got "
                f"{type(embeddings).__name__}"
            )
        if embeddings.dim() != 2 or embeddings.shape[0] != n:
            raise ValueError(
                f"embeddings must have shape (N, D) with N = {n} (one row per dataset row), got "
                f"{tuple(embeddings.shape)}"
            )
        return embeddings, what
    embedder = _hf._as_embedder(embedder, device)
    texts_wanted = embed_field is not None or embed_template is not None
    if source != "tokenized":
        return _texts_embedding(records, source, embed_field, embed_template, embedder)
    text_format = _hf._dataset_format(columns)
    if not texts_wanted and _hf._text_only(embedder) and text_format is not None:
        texts_wanted = True  # a text model cannot read the LLM's token ids; the rows have text
    if texts_wanted:
        rows = _text_records_for_embedding(dataset, columns, text_format, embed_field, embed_template)
        return _texts_embedding(rows, text_format, embed_field, embed_template, embedder)
    return _tokens_embedding(tokens, embedder)


def _text_records_for_embedding(dataset, columns, fmt, embed_field, embed_template) -> list[dict]:
    from ..text import formats

    reads = formats.embed_reads(fmt, embed_field, embed_template)
    present = [name for name in reads if name in columns]
    missing = [name for name in reads if name not in present]
    if missing and fmt not in ("chat", "prompt_completion"):  # on conversations a name may be a role
        raise ValueError(f"the dataset has no column {missing[0]!r}; columns: {columns}")
    return _hf._records(dataset, present)


# ---------------------------------------------------------------------------------------- the API


def _packed_dataset(table, stats: PackedDatasetStats, settings: dict):
    import datasets

    description = json.dumps({"packed_by": "tfp_kernels.pack_dataset", **settings, **stats.summary()})
    return datasets.Dataset(table, info=datasets.DatasetInfo(description=description))


def pack_dataset(
    dataset,
    *,
    max_len: int,
    attention: str = "pack",
    strategy: str = "next_fit",
    order: str = "tfp",
    overlong: str = "error",
    record_format: str = "auto",
    tokenizer=None,
    embeddings=None,
    embed_field=None,
    embed_template: str | None = None,
    embedder=None,
    metric: str = "l2",
    quantile: float = 0.02,
    threshold: float | None = None,
    window: int = 4,
    max_rejections: int | None = None,
    policy: str | None = None,
    k: int | str = "auto",
    seed: int = 0,
    device: str | torch.device | None = None,
    return_stats: bool = False,
    keep_apart: int = 0,
):
    """Pack a dataset of SFT samples into TFP packs, one pack per row, ready for TRL and ``Trainer``.

    The samples come from either

    - a **tokenized** dataset: an ``input_ids`` column (lists of token ids), packed as they are (no
      tokenizer); the labels are its ``labels`` column (-100 outside the loss), else the tokens where its
      ``completion_mask`` and ``assistant_masks`` columns (those present; 1 = in the loss) are all 1, as TRL's
      ``SFTTrainer`` builds them, else every token;
    - a **text** dataset, in the formats of ``tfp-pack`` (detected from the column names: ``messages``
      -> chat, ``instruction`` + ``output`` -> alpaca, ``prompt`` + ``completion``, ``text``), tokenized as
      ``tfp-pack`` tokenizes them (labels: the responses; chat: a tokenizer's chat template when it has one).

    Then, as ``tfp-pack``: embed -> TFP order over the whole dataset (``order="tfp"``) -> bin packing in that
    order (``strategy``) -> packed rows (:func:`~tfp_kernels.pack_gpu`, then ``tfp-pack``'s packed table).
    Every sample is in the packs exactly once (as pieces with ``overlong="split"`` or ``strategy="stream"``),
    except those ``overlong="drop"`` leaves out, which are counted.

    Columns of the result (lists per pack; the ``packed.parquet`` of ``tfp-pack``): ``input_ids``,
    ``labels`` (-100 outside the loss and at the first token of every attention segment), ``position_ids``
    (0, 1, ... from every segment start), ``cu_seqlens`` (segment boundaries, from 0 to the pack's length),
    ``seq_lengths`` (the segments' lengths: ``[length]`` with ``attention="pack"``, one per sample with
    ``"sample"``), ``sample_ids`` (the input row of each piece), ``sample_lengths`` (tokens of each piece),
    ``sample_starts`` (the piece's first token within its sample), ``length`` (tokens in the pack).
    ``dataset.info.description`` holds the settings and the counts (JSON).

    Train on it with TRL ``SFTTrainer(..., args=SFTConfig(padding_free=True, max_length=None,
    dataset_kwargs={"skip_prepare_dataset": True}))`` (TRL rebuilds the position ids from ``seq_lengths``),
    or transformers ``Trainer(..., data_collator=PackedRowsCollator())``; transformers'
    ``DataCollatorWithFlattening`` makes each row one segment, i.e. pack attention whatever ``attention`` says.

    Args:
        dataset: a ``datasets.Dataset`` (one split) of N >= 1 rows.
        max_len: capacity of a pack in tokens.
        attention: ``"pack"`` (the TFP paper: one causal segment per pack, later samples see earlier ones) or
            ``"sample"`` (one segment per sample).
        strategy: bin packing (:func:`~tfp_kernels.pack_lengths`): ``"next_fit"`` (default: keeps the TFP
            order), ``"stream"`` (the paper: concatenate and cut every ``max_len`` tokens, samples split),
            ``"window_best_fit"``, ``"fill_in_order"``, ``"bfd"`` (ignores the order).
        order: ``"tfp"``, ``"keep"`` (the dataset's order) or ``"random"`` (seeded by ``seed``).
        overlong: samples longer than ``max_len``: ``"error"`` (default: raise, naming the first),
            ``"split"``, ``"truncate"`` or ``"drop"``; counted in the stats and the description.
        record_format: ``"auto"`` (``input_ids`` -> tokenized, else detected from the columns),
            ``"tokenized"``, or a text format (``"alpaca"``, ``"chat"``, ``"prompt_completion"``, ``"text"``).
        tokenizer: text datasets only: None or ``"byte"`` (the package's byte tokenizer, as ``tfp-pack``), a
            local tokenizer folder, or a transformers tokenizer object. Given with a tokenized dataset it is
            not used (a warning says so).
        embeddings: (N, D) float tensor / numpy array, or the name of a column of equal-length vectors, to
            order by instead of embedding.
        embed_field, embed_template: embed texts built from the columns, by ``tfp-pack``'s
            ``--embed-field`` / ``--embed-template`` rules (one or several columns, or a format string; chat
            rows: ``{user}``, ``{user_all}``, ...). Default: text datasets embed what ``tfp-pack`` embeds
            (alpaca ``instruction``, chat the first user message, the prompt, the text); tokenized datasets
            embed their token ids.
        embedder: an object with ``embed_texts`` / ``embed_tokens``, a callable, or a name for
            :func:`~tfp_kernels.embed.load_embedder` (``"hashed"``, the default; ``"minilm"``; a model
            folder). A text-only embedder (``"minilm"``) on a tokenized dataset embeds the rows' text when
            their columns are of a known format, else needs ``embed_field``.
        metric, quantile, threshold, window, max_rejections, policy, k: as :func:`~tfp_kernels.pack_gpu`
            (``policy=None``: ``"spread"``, or ``"paper"`` with ``max_rejections``, as ``tfp-pack``'s
            ``--policy``).
        seed: seed of ``order="random"``.
        keep_apart: as :func:`~tfp_kernels.pack_gpu` (``order="tfp"``): keep samples closer than the threshold
            out of one pack where it can (``strategy="fill_in_order"`` or ``"next_fit"``); 0 (default): off.
        device: where the embedding and the ordering run (e.g. ``"cuda"``); None: the CPU.
        return_stats: also return a :class:`PackedDatasetStats`.

    Returns:
        a ``datasets.Dataset`` with one row per pack (columns above), or ``(packed, stats)``.

    Raises:
        TypeError: not a ``datasets.Dataset`` (a ``DatasetDict``, an ``IterableDataset``...); a column of the
            wrong type (token ids that are not ints, masks that are not 0/1); a bad tokenizer or embedder.
        ValueError: an empty dataset; an empty or negative-id sample (naming the row); labels or masks of
            another length than the tokens (naming the row); no ``input_ids`` and columns of no known format;
            an over-long sample with ``overlong="error"``; unknown ``attention`` / ``strategy`` / ``order`` /
            ``overlong`` / ``record_format``; embeddings of the wrong shape.
        InputError (a ValueError): a text row without a field its format needs (naming the row).
        FileNotFoundError: a tokenizer or embedder folder that does not exist.

    Examples::

        >>> import datasets
        >>> from tfp_kernels import pack_dataset
        >>> ds = datasets.Dataset.from_dict({"input_ids": [[5, 6, 7], [8, 9], [5, 6, 7, 1], [4]]})
        >>> packed = pack_dataset(ds, max_len=6, order="keep", attention="sample")
        >>> packed["input_ids"][:], packed["seq_lengths"][:], packed["sample_ids"][:]
        ([[5, 6, 7, 8, 9], [5, 6, 7, 1, 4]], [[3, 2], [4, 1]], [[0, 1], [2, 3]])
        >>> pack_dataset(ds, max_len=6, order="keep")["seq_lengths"][:]  # pack attention: one segment per pack
        [[5], [5]]
    """
    columns = _check_dataset(dataset)
    n = len(dataset)
    if isinstance(max_len, bool) or not isinstance(max_len, numbers.Integral) or max_len < 1:
        raise ValueError(f"max_len must be a positive int, got {max_len!r}")
    _check_choice(attention, "attention", ATTENTION_MODES)
    _check_choice(strategy, "strategy", STRATEGIES)
    _check_choice(order, "order", ORDERS)
    _check_choice(overlong, "overlong", OVERLONG_POLICIES)
    _check_choice(record_format, "record_format", RECORD_FORMATS)
    if embed_field is not None and embed_template is not None:
        raise ValueError("give embed_field or embed_template, not both")

    source = record_format
    if source == "auto":
        source = "tokenized" if "input_ids" in columns else _hf._dataset_format(columns)
        if source is None:
            raise ValueError(
                f"cannot tell what to pack: the dataset has no 'input_ids' column and its columns {columns} "
                "match no record format (instruction+output, messages, prompt+completion, text); pass "
                "record_format="
            )
    records = None
    if source == "tokenized":
        if "input_ids" not in columns:
            raise ValueError(f"record_format='tokenized' needs an 'input_ids' column; columns: {columns}")
        if tokenizer is not None:
            warnings.warn(
                "pack_dataset: the dataset is tokenized (input_ids); the tokenizer is not used", stacklevel=2
            )
        tokens, labels = _tokenized_columns(dataset, columns)
    else:
        records = _text_records(dataset, columns, source, embed_field, embed_template)
        tokens, labels = _tokenize_text(records, source, tokenizer)

    embedded = None
    if order == "tfp":
        embeddings, embedded = _embeddings(
            dataset,
            columns,
            n,
            source=source,
            records=records,
            tokens=tokens,
            embeddings=embeddings,
            embed_field=embed_field,
            embed_template=embed_template,
            embedder=embedder,
            device=device,
        )
        if device is not None:
            embeddings = embeddings.to(device)
        tokens = Jagged(tokens.values.to(embeddings.device), tokens.offsets.to(embeddings.device))
        if labels is not None:
            labels = Jagged(labels.values.to(embeddings.device), tokens.offsets)
    else:
        embeddings = None
    batch = pack_gpu(
        tokens,
        max_len=int(max_len),
        embeddings=embeddings,
        labels=labels,
        order=order,
        strategy=strategy,
        attention=attention,
        metric=metric,
        quantile=quantile,
        threshold=threshold,
        window=window,
        max_rejections=max_rejections,
        k=k,
        seed=seed,
        overlong=overlong,
        policy=policy,
        keep_apart=keep_apart,
    )
    from ..text.writers import packed_table

    packing = batch.packing
    stats = PackedDatasetStats(
        num_samples=n,
        num_packs=packing.num_packs,
        num_tokens=packing.num_tokens,
        num_label_tokens=int((batch.labels[:, 1:] != IGNORE_INDEX).sum()),
        fill_ratio=float(packing.fill_ratio),
        attention=attention,
        num_segments=int(batch.cu_seqlens_cpu.numel() - 1),
        num_split=packing.num_split,
        num_truncated=packing.num_truncated,
        num_dropped=packing.num_dropped,
        dropped_index=[] if packing.dropped_index is None else packing.dropped_index.cpu().tolist(),
        source=source,
        embedded=embedded,
        order_stats=batch.order_stats,
    )
    settings = {"max_len": int(max_len), "strategy": strategy, "order": order, "overlong": overlong}
    if keep_apart:
        settings["keep_apart"] = keep_apart
    packed = _packed_dataset(packed_table(batch), stats, settings)
    return (packed, stats) if return_stats else packed


# ---------------------------------------------------------------------------------------- tfp-pack input


def token_records_input(
    records,
    tokenized,
    *,
    embed_field=None,
    embed_template: str | None = None,
    embedder: str = "hashed",
    tokenizer: str = "byte",
    device: str | torch.device = "cpu",
    warn=None,
) -> dict:
    """What ``tfp-pack`` knows of tokenized records (``input_ids``, read by
    :func:`~tfp_kernels.text.readers.read_token_records`): their embeddings and the report's input entries.

    The records are embedded by their token ids with the ``embedder`` (``"hashed"``: the hashed token-bag),
    or, with ``embed_field`` / ``embed_template``, by the text of those fields (``tfp-pack``'s rules; chat
    ``messages`` rows by role). A text-only embedder (``"minilm"``, a model folder) embeds the records' text
    when their fields are of a known format (the format's default text), else needs ``embed_field``.

    Args:
        records: the N records (dicts).
        tokenized: their :class:`~tfp_kernels.text.tokenize.Tokenized` tokens and labels.
        embed_field, embed_template, embedder, device: ``tfp-pack``'s ``--embed-field``, ``--embed-template``,
            ``--embedder`` and device.
        tokenizer: ``--tokenizer``: must be ``"byte"`` (the default; not used): token ids are not tokenized
            again.
        warn: called with the one-line warning about empty or shared embedded texts, when there is one.

    Returns:
        dict: ``format`` ("tokenized"), ``tokenizer``, ``embedder``, ``embed_field``, ``tokens``,
        ``label_tokens``, ``chat_template_fallbacks`` (0), ``sample_length`` (min / mean / max), and
        ``_tokenized`` (``tokenized``) and ``_embeddings`` ((N, D) on ``device``).

    Raises:
        InputError: ``--tokenizer`` given; a text-only embedder and nothing to embed as text; a record
            without a field the embedded text names.
    """
    from ..embed import load_embedder
    from ..text import formats
    from ..text.readers import InputError

    if tokenizer != "byte":
        raise InputError(
            f"--tokenizer {tokenizer}: the records hold token ids (input_ids) and are packed as they are; the "
            "tokenizer would not be used: drop --tokenizer"
        )
    try:
        spec = load_embedder(embedder) if embedder == "hashed" else load_embedder(embedder, device=device)
    except FileNotFoundError as err:
        raise InputError(f"--embedder {embedder}: {err}") from None
    try:
        fmt = formats.detect_format(records)
    except InputError:
        fmt = None
    texts_wanted = embed_field is not None or embed_template is not None
    if not texts_wanted and _hf._text_only(spec):
        if fmt is None:
            raise InputError(
                f"--embedder {embedder} embeds text, and the records hold token ids without text fields of a "
                "known format: pass --embed-field FIELD (a text field of the records) or --embedder hashed"
            )
        texts_wanted = True
    offsets = torch.from_numpy(tokenized.offsets)
    if texts_wanted:
        prepared = formats.prepare_embed_texts(records, fmt, fields=embed_field, template=embed_template)
        if prepared.warning and warn is not None:
            warn(prepared.warning)
        kwargs = {"device": device} if embedder == "hashed" else {}
        rows = spec.embed_texts(prepared.distinct.texts, **kwargs)
        embeddings, what = prepared.distinct.gather(rows), prepared.source
    else:
        tokens = Jagged(torch.from_numpy(tokenized.input_ids).to(device), offsets.to(device))
        embeddings, what = spec.embed_tokens(tokens), "token ids (input_ids)"
    lengths = tokenized.lengths
    return {
        "format": "tokenized",
        "tokenizer": "none (input_ids as given)",
        "embedder": repr(spec),
        "embed_field": what,
        "tokens": int(lengths.sum()),
        "label_tokens": tokenized.num_label_tokens,
        "chat_template_fallbacks": 0,
        "sample_length": {
            "min": int(lengths.min()),
            "mean": round(float(lengths.mean()), 3),
            "max": int(lengths.max()),
        },
        "_tokenized": tokenized,
        "_embeddings": embeddings.to(device),
    }
