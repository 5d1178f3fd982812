"""Parquet outputs of ``tfp-pack``: the records in TFP order and the packed dataset (one row per pack).

Both files are written deterministically (same input -> same bytes: pyarrow writes no time stamps;
columns and row groups follow the data) and load with ``datasets.load_dataset("parquet", data_files=...)``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import torch

#: Rows per Parquet row group of the packed file (a pack is up to max_len tokens per list column).
PACKED_ROW_GROUP = 2048


#: Largest integer a float64 holds exactly: ints and floats share a double column only up to it.
_EXACT_IN_DOUBLE = 2**53


def _kind(value) -> str:
    """The kind of a (non-null) record value, as the columns of ``records_table`` group them."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "str"
    if isinstance(value, (bytes, bytearray)):
        return "bytes"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, dict):
        return "dict"
    return type(value).__name__


def _typed_array(values: list):
    """``(array, as_json)``: a pyarrow array of ``values`` (one kind), or, when pyarrow cannot hold them in
    one type (a list of mixed items, an int beyond int64...), their JSON texts (``as_json`` True)."""
    import pyarrow as pa

    try:
        return pa.array(values), False
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
        texts = [
            None if v is None else json.dumps(v, ensure_ascii=False, sort_keys=True, default=str)
            for v in values
        ]
        return pa.array(texts, type=pa.string()), True


def field_columns(name: str, values: list, taken: set) -> tuple[dict, dict | None]:
    """The Parquet column(s) of one record field, so that every value comes back as it went in.

    A field whose non-null values are of one kind (strings, numbers, bools, lists, dicts...) is one column
    ``name``. A field that mixes kinds (strings in most records, a number in one) is one column per kind:
    ``name`` holds the values of the most common kind (ties: the first seen), ``name__<kind>``
    (``__number``, ``__str``, ``__bool``, ``__list``, ``__dict``...) the others; in each column a row is null
    where the record's value is of another kind (or null). Strings are never re-encoded. Ints and floats
    are one kind (``number``, a float64 column: 2 comes back as 2.0) unless an int is beyond +-2**53 (not
    exact in a double): then such ints are a kind of their own (``__int``). Values of one kind that pyarrow
    cannot type (a list mixing strings and numbers, an int beyond int64) are stored as their JSON text (in
    the main column, or in a ``__<kind>_json`` one).

    Args:
        name: the field.
        values: its value in every record (None where missing or null), in row order.
        taken: column names already used; the new names are added to it.

    Returns:
        ``(columns, note)``: column name -> pyarrow array, in order; ``note`` is None for a plain column,
        else ``{column: kind}`` describing the split / JSON columns.
    """
    has_float = any(isinstance(v, float) for v in values)
    counts: dict[str, int] = {}
    kinds = []
    for v in values:
        k = None if v is None else _kind(v)
        if k == "number" and has_float and isinstance(v, int) and abs(v) > _EXACT_IN_DOUBLE:
            k = "int"  # a float64 column would round it
        kinds.append(k)
        if k is not None:
            counts[k] = counts.get(k, 0) + 1
    if len(counts) <= 1:
        array, as_json = _typed_array(values)
        taken.add(name)
        return {name: array}, ({name: f"{next(iter(counts))} as JSON text"} if as_json else None)
    main = max(counts, key=lambda k: (counts[k], -list(counts).index(k)))
    columns, note = {}, {}
    for k in [main] + [k for k in counts if k != main]:
        column = name if k == main else _free_name(f"{name}__{k}", taken)
        array, as_json = _typed_array([v if kk == k else None for v, kk in zip(values, kinds)])
        if as_json and k != main:
            column = _free_name(f"{name}__{k}_json", taken)
        taken.add(column)
        columns[column] = array
        note[column] = f"{k} as JSON text" if as_json else k
    return columns, note


def _free_name(name: str, taken: set) -> str:
    out, k = name, 1
    while out in taken:
        k += 1
        out = f"{name}_{k}"
    return out


def records_table(
    records: Sequence[dict],
    order: np.ndarray,
    index_column: str,
    extra: dict | None = None,
    notes: dict | None = None,
):
    """A pyarrow Table of ``records[order]`` with the original index in ``index_column``.

    Columns: every field of any record (first-seen order; missing values are null; a field mixing value
    kinds is split into one column per kind, see :func:`field_columns`), then ``index_column`` (int64) and
    the ``extra`` columns (name -> (N,) array in the original order). ``notes``, when given, receives
    ``{field: {column: kind}}`` for every field written as several columns or as JSON text.
    """
    import pyarrow as pa

    keys: dict[str, None] = {}
    for r in records:
        for k in r:
            keys.setdefault(k, None)
    taken = set(keys) | {index_column} | set(extra or {})
    ordered = [records[i] for i in order.tolist()]
    columns = {}
    for k in keys:
        taken.discard(k)
        field, note = field_columns(k, [r.get(k) for r in ordered], taken)
        columns.update(field)
        if note is not None and notes is not None:
            notes[k] = note
    columns[index_column] = pa.array(order.astype(np.int64))
    for name, values in (extra or {}).items():
        columns[name] = pa.array(np.asarray(values)[order])
    return pa.table(columns)


def index_column_name(records: Sequence[dict], base: str = "original_index") -> str:
    """``base``, or ``base_2``, ``base_3``... when the records already have a field of that name."""
    taken = set()
    for r in records:
        taken.update(r)
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    return name


def _list_array(values: np.ndarray, offsets: np.ndarray, value_type):
    import pyarrow as pa

    values = pa.array(values, type=value_type)
    if offsets[-1] < 2**31:
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)
    return pa.LargeListArray.from_arrays(pa.array(offsets.astype(np.int64)), values)


def packed_table(batch=None, *, packing=None):
    """One row per pack of a :class:`~tfp_kernels.PackedBatch` (or, without tokens, of a
    :class:`~tfp_kernels.Packing` whose ``sample_index`` holds original record indices).

    Columns (lists are per pack):

    - ``input_ids``, ``labels``, ``position_ids``: list<int32>, the pack's tokens (labels -100 outside the
      loss and at the first token of every attention segment, as ``assemble`` makes them);
    - ``cu_seqlens``: list<int32>, attention segment boundaries inside the pack, from 0 to its length
      (``[0, length]`` with ``attention="pack"``; one segment per piece with ``"sample"``);
    - ``seq_lengths``: list<int32>, tokens of each attention segment (``np.diff(cu_seqlens)``: one entry, the
      pack's length, with ``attention="pack"``). TRL's padding-free collator rebuilds ``position_ids`` from
      this column, so TRL sees the attention segments the packs were written with;
    - ``sample_ids``: list<int64>, original record index of each piece, in order;
    - ``sample_lengths``: list<int32>, tokens of each piece (the whole record unless it was split);
      ``sample_starts``: list<int32>, the piece's first token within its record (0 unless it was split);
    - ``length``: int32, tokens in the pack.

    Without a batch (``packing=`` given) only ``sample_ids``, ``sample_lengths``, ``sample_starts`` and
    ``length`` are written (no tokens, no attention segments).
    """
    import pyarrow as pa

    if batch is not None:
        packing = batch.packing
    pack_offsets = packing.pack_offsets.cpu().numpy()
    piece_rows = packing.pack_piece_offsets.cpu().numpy()
    columns = {}
    if batch is not None:
        for name in ("input_ids", "labels", "position_ids"):
            columns[name] = _list_array(
                getattr(batch, name)[0].cpu().numpy().astype(np.int32), pack_offsets, pa.int32()
            )
        cu = batch.cu_seqlens_cpu.numpy().astype(np.int64)
        # a pack's boundaries: its segment starts, then its end; segments never cross packs
        seg_pack = np.searchsorted(pack_offsets, cu[:-1], side="right") - 1
        num_packs = pack_offsets.size - 1
        seg_counts = np.bincount(seg_pack, minlength=num_packs)
        row_offsets = np.zeros(num_packs + 1, dtype=np.int64)
        np.cumsum(seg_counts + 1, out=row_offsets[1:])
        values = np.empty(row_offsets[-1], dtype=np.int64)
        seg_pos = np.arange(cu.size - 1) + seg_pack  # each earlier pack adds one end entry
        values[seg_pos] = cu[:-1] - pack_offsets[seg_pack]
        values[row_offsets[1:] - 1] = np.diff(pack_offsets)
        columns["cu_seqlens"] = _list_array(values.astype(np.int32), row_offsets, pa.int32())
        seg_offsets = np.zeros(num_packs + 1, dtype=np.int64)
        np.cumsum(seg_counts, out=seg_offsets[1:])
        columns["seq_lengths"] = _list_array(np.diff(cu).astype(np.int32), seg_offsets, pa.int32())
    columns["sample_ids"] = _list_array(packing.sample_index.cpu().numpy(), piece_rows, pa.int64())
    columns["sample_lengths"] = _list_array(
        packing.length.cpu().numpy().astype(np.int32), piece_rows, pa.int32()
    )
    columns["sample_starts"] = _list_array(
        packing.offset.cpu().numpy().astype(np.int32), piece_rows, pa.int32()
    )
    columns["length"] = pa.array(np.diff(pack_offsets).astype(np.int32))
    return pa.table(columns)


def write_parquet(
    table, path: str, *, row_group_size: int | None = None, progress: bool = False, desc: str = "writing"
) -> None:
    """Write ``table`` to ``path`` (zstd, deterministic), in row groups, with a progress bar."""
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    rows = table.num_rows
    step = row_group_size or max(1, rows)
    with (
        pq.ParquetWriter(path, table.schema, compression="zstd") as writer,
        tqdm(total=rows, unit="row", desc=desc, disable=not progress) as bar,
    ):
        for start in range(0, max(rows, 1), step):
            writer.write_table(table.slice(start, step), row_group_size=step)
            bar.update(min(step, rows - start))


def unpack_records(table, num_records: int, column: str = "input_ids") -> list[torch.Tensor]:
    """The tokens (or ``column``: ``labels``, ``position_ids``) of every record, rebuilt from a packed table
    (``sample_ids``, ``sample_lengths``, ``sample_starts``): a list of N 1-D int64 tensors (empty for records
    not packed). The inverse of the packing, used by the tests."""
    ids = table.column(column).to_pylist()
    sids = table.column("sample_ids").to_pylist()
    lens = table.column("sample_lengths").to_pylist()
    starts = table.column("sample_starts").to_pylist()
    pieces: list[list[tuple[int, list[int]]]] = [[] for _ in range(num_records)]
    for row_ids, row_sids, row_lens, row_starts in zip(ids, sids, lens, starts):
        pos = 0
        for s, n, st in zip(row_sids, row_lens, row_starts):
            pieces[s].append((st, row_ids[pos : pos + n]))
            pos += n
    out = []
    for p in pieces:
        p.sort(key=lambda x: x[0])
        out.append(torch.tensor([t for _, chunk in p for t in chunk], dtype=torch.int64))
    return out
