"""Read SFT records from JSON, JSONL, Parquet or a ``datasets`` dataset saved to disk.

Every reader returns a list of N dicts (one per record, in file order). Problems with the input raise
:class:`InputError` with one line that names the file (and the line, for JSON Lines).
"""

from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Iterable

#: Suffixes read as JSON Lines / JSON / Parquet (``.gz`` variants of the JSON ones too).
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson")
JSON_SUFFIXES = (".json", ".json.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")


class InputError(ValueError):
    """A problem with the input data (missing file, bad JSON, unknown field, empty dataset...)."""


def input_kind(path: str) -> str:
    """What ``path`` holds, from its name: ``"jsonl"``, ``"json"``, ``"parquet"``, ``"datasets"`` (a
    directory written by ``Dataset.save_to_disk``) or ``"embeddings"`` (``.pt``/``.npz``).

    Raises:
        InputError: the path does not exist, or its suffix is none of the above.
    """
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        return "datasets"
    lower = path.lower()
    if lower.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if lower.endswith(JSON_SUFFIXES):
        return "json"
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if lower.endswith((".pt", ".npz")):
        return "embeddings"
    raise InputError(
        f"{path}: unknown input type; expected .json, .jsonl (optionally .gz), .parquet, a directory saved "
        f"with datasets' save_to_disk, or .pt/.npz embeddings"
    )


def _open_text(path: str):
    if path.lower().endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _limited(items: Iterable, limit: int | None):
    for i, item in enumerate(items):
        if limit is not None and i >= limit:
            return
        yield item


def read_jsonl(path: str, *, limit: int | None = None, progress: bool = False) -> list[dict]:
    """Records of a JSON Lines file (one JSON object per line; blank lines skipped; ``.gz`` allowed).

    Raises:
        InputError: a line that is not valid JSON (named by its 1-based number) or not an object.
    """
    from tqdm.auto import tqdm

    records = []
    size = os.path.getsize(path)
    with (
        _open_text(path) as f,
        tqdm(
            total=size,
            unit="B",
            unit_scale=True,
            desc="reading",
            disable=not progress or path.lower().endswith(".gz"),
        ) as bar,
    ):
        for number, line in enumerate(f, start=1):
            bar.update(len(line))
            if not line.strip():
                continue
            if limit is not None and len(records) >= limit:
                break
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(
                    f"{path}: line {number} is not valid JSON ({err.msg} at column {err.colno})"
                ) from None
            if not isinstance(record, dict):
                raise InputError(
                    f"{path}: line {number} is a JSON {type(record).__name__}, expected an object"
                )
            records.append(record)
    return records


def read_json(path: str, *, limit: int | None = None, progress: bool = False) -> list[dict]:
    """Records of a JSON file holding a list of objects (or ``{"data"|"train"|"records": [...]}``).

    Raises:
        InputError: invalid JSON (named by line and column), or not a list of objects.
    """
    try:
        with _open_text(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise InputError(
            f"{path}: line {err.lineno} is not valid JSON ({err.msg} at column {err.colno})"
        ) from None
    if isinstance(data, dict):
        lists = [k for k in ("data", "train", "records") if isinstance(data.get(k), list)]
        if not lists:
            raise InputError(
                f"{path}: expected a JSON list of records (or an object with a 'data' list), got an object "
                f"with keys {sorted(data)[:10]}"
            )
        data = data[lists[0]]
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON list of records, got a JSON {type(data).__name__}")
    records = list(_limited(data, limit))
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise InputError(f"{path}: record {i} is a JSON {type(record).__name__}, expected an object")
    return records


def read_parquet(path: str, *, limit: int | None = None, progress: bool = False) -> list[dict]:
    """Records of a Parquet file (pyarrow), one dict per row."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    try:
        f = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise InputError(f"{path}: cannot read as Parquet ({err})") from None
    records: list[dict] = []
    with tqdm(total=f.metadata.num_rows, unit="rec", desc="reading", disable=not progress) as bar:
        for batch in f.iter_batches(batch_size=65536):
            rows = batch.to_pylist()
            if limit is not None:
                rows = rows[: max(0, limit - len(records))]
            records.extend(rows)
            bar.update(len(rows))
            if limit is not None and len(records) >= limit:
                break
    return records


def read_saved_dataset(path: str, *, limit: int | None = None, progress: bool = False) -> list[dict]:
    """Records of a ``datasets`` dataset saved with ``save_to_disk`` (a ``DatasetDict`` must hold a
    ``train`` split or a single split). ``datasets`` is imported only here."""
    try:
        import datasets
    except ImportError:
        raise InputError(
            f"{path}: reading a saved dataset needs the 'datasets' package (pip install datasets)"
        ) from None
    try:
        ds = datasets.load_from_disk(path)
    except FileNotFoundError as err:
        raise InputError(f"{path}: not a dataset saved with save_to_disk ({err})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" in ds:
            ds = ds["train"]
        elif len(ds) == 1:
            ds = next(iter(ds.values()))
        else:
            raise InputError(
                f"{path}: a DatasetDict with splits {sorted(ds)} and no 'train' split; save one split"
            )
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return ds.to_list()


def read_records(path: str, *, limit: int | None = None, progress: bool = False) -> list[dict]:
    """The records of ``path``: JSON, JSON Lines (``.gz`` allowed), Parquet, or a saved ``datasets`` dataset.

    Args:
        path: the file or directory.
        limit: read at most this many records (the first ones).
        progress: show a progress bar.

    Returns:
        list of N dicts, in file order.

    Raises:
        InputError: the path is missing or of an unknown type, the content is invalid, or it holds no records.
    """
    kind = input_kind(path)
    readers = {
        "jsonl": read_jsonl,
        "json": read_json,
        "parquet": read_parquet,
        "datasets": read_saved_dataset,
    }
    if kind not in readers:
        raise InputError(f"{path}: {kind} input is not a text dataset")
    records = readers[kind](path, limit=limit, progress=progress)
    if not records:
        raise InputError(f"{path}: the dataset is empty (no records)")
    return records
