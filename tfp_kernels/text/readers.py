"""Read SFT records from JSON, JSONL, Parquet or a ``datasets`` dataset saved to disk, and embeddings +
lengths from ``.pt`` / ``.npz`` files.

Every record reader returns a list of N dicts (one per record, in file order). Problems with the input
raise :class:`InputError` with one line that names the file and where in it the problem is (the line for
JSON / JSON Lines, the key and record index for ``.pt`` / ``.npz``): invalid JSON, bytes that are not
UTF-8, a truncated or corrupt ``.gz``, a file that is not what its name says.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import zlib
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:  # tokenize imports this module
    from .tokenize import Tokenized

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


def _open_binary(path: str):
    if path.lower().endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _read_error(path: str, err: BaseException, where: str) -> InputError:
    """One-line InputError for an exception raised while reading (decompressing) ``path``."""
    if isinstance(err, gzip.BadGzipFile) and "Not a gzipped file" in str(err):
        return InputError(
            f"{path}: not a gzip file, although its name ends in .gz (rename it if it is plain text)"
        )
    if isinstance(err, EOFError):
        return InputError(f"{path}: the compressed data ends early, {where} (a truncated download or copy?)")
    if isinstance(err, (zlib.error, gzip.BadGzipFile)):
        return InputError(f"{path}: corrupt gzip data {where} ({_first_line(err)})")
    return InputError(f"{path}: cannot read the file ({_first_line(err)})")


def _utf8_error(path: str, data: bytes, pos: int, line: int | None = None) -> InputError:
    """One-line InputError for the byte ``data[pos]`` that is not UTF-8, naming its line and byte column
    (``data`` is the line ``line``, or the whole file when ``line`` is None)."""
    column = pos
    if line is None:  # a whole file: count the lines before the bad byte
        line = data.count(b"\n", 0, pos) + 1
        column = pos - (data.rfind(b"\n", 0, pos) + 1)
    return InputError(
        f"{path}: line {line} is not valid UTF-8 (byte 0x{data[pos]:02x} at byte column {column + 1}); "
        f"re-encode the file as UTF-8"
    )


def _first_bad_utf8(data: bytes) -> int:
    """Offset of the first byte of ``data`` that does not decode as UTF-8."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        return err.start
    return 0  # not reached: callers pass bytes that failed to decode (a byte-order mark is valid UTF-8)


#: A JSON escape of a UTF-16 surrogate: valid JSON, but a lone one is not Unicode text.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _lone_surrogate(value) -> bool:
    """Whether ``value`` (a decoded JSON value) holds a string that cannot be encoded as UTF-8."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _limited(items: Iterable, limit: int | None):
    for i, item in enumerate(items):
        if limit is not None and i >= limit:
            return
        yield item


def read_jsonl(path: str, *, limit: int | None = None, progress: bool = False) -> list[dict]:
    """Records of a JSON Lines file (one JSON object per line; blank lines skipped; ``.gz`` allowed; a
    UTF-8 byte-order mark on the first line is ignored).

    Raises:
        InputError: a line (named by its 1-based number) that is not UTF-8, not valid JSON, not an object,
            or holds a lone UTF-16 surrogate escape; a ``.gz`` that is not gzip, truncated or corrupt.
    """
    from tqdm.auto import tqdm

    records = []
    size = os.path.getsize(path)
    number = 0
    try:
        with (
            _open_binary(path) as f,
            tqdm(
                total=size,
                unit="B",
                unit_scale=True,
                desc="reading",
                disable=not progress or path.lower().endswith(".gz"),
            ) as bar,
        ):
            for number, raw in enumerate(f, start=1):
                bar.update(len(raw))
                if not raw.strip():
                    continue
                if limit is not None and len(records) >= limit:
                    break
                try:
                    line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError:
                    raise _utf8_error(path, raw, _first_bad_utf8(raw), number) from None
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
                if _SURROGATE_ESCAPE.search(raw) and _lone_surrogate(record):
                    raise InputError(
                        f"{path}: line {number} holds a lone UTF-16 surrogate escape (\\ud800-\\udfff "
                        f"without its pair): not Unicode text"
                    )
                records.append(record)
    except (EOFError, zlib.error, OSError) as err:
        raise _read_error(path, err, f"after line {number}") from None
    return records


def read_json(path: str, *, limit: int | None = None, progress: bool = False) -> list[dict]:
    """Records of a JSON file holding a list of objects (or ``{"data"|"train"|"records": [...]}``);
    ``.gz`` allowed; a UTF-8 byte-order mark is ignored.

    Raises:
        InputError: bytes that are not UTF-8 or invalid JSON (named by line and column), not a list of
            objects (the record named by its index), a lone UTF-16 surrogate escape, a bad ``.gz``.
    """
    try:
        with _open_binary(path) as f:
            data = f.read()
    except (EOFError, zlib.error, OSError) as err:
        raise _read_error(path, err, "before its end") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise _utf8_error(path, data, _first_bad_utf8(data)) from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(
            f"{path}: line {err.lineno} is not valid JSON ({err.msg} at column {err.colno})"
        ) from None
    if isinstance(value, dict):
        lists = [k for k in ("data", "train", "records") if isinstance(value.get(k), list)]
        if not lists:
            raise InputError(
                f"{path}: expected a JSON list of records (or an object with a 'data' list), got an object "
                f"with keys {sorted(value)[:10]}"
            )
        value = value[lists[0]]
    if not isinstance(value, list):
        raise InputError(f"{path}: expected a JSON list of records, got a JSON {type(value).__name__}")
    records = list(_limited(value, limit))
    check_surrogates = bool(_SURROGATE_ESCAPE.search(data))
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise InputError(f"{path}: record {i} is a JSON {type(record).__name__}, expected an object")
        if check_surrogates and _lone_surrogate(record):
            raise InputError(
                f"{path}: record {i} holds a lone UTF-16 surrogate escape (\\ud800-\\udfff without its "
                f"pair): not Unicode text"
            )
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
    try:
        with tqdm(total=f.metadata.num_rows, unit="rec", desc="reading", disable=not progress) as bar:
            for batch in f.iter_batches(batch_size=65536):
                rows = batch.to_pylist()
                if limit is not None:
                    rows = rows[: max(0, limit - len(records))]
                records.extend(rows)
                bar.update(len(rows))
                if limit is not None and len(records) >= limit:
                    break
    except (pa.ArrowException, OSError) as err:
        raise InputError(
            f"{path}: cannot read the Parquet data after record {len(records)} ({_first_line(err)})"
        ) from None
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
    except (OSError, ValueError, KeyError, TypeError) as err:  # a damaged dataset folder
        raise InputError(f"{path}: cannot read the saved dataset ({_first_line(err)})") from None
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


#: Fields of tokenized records: the token ids, their labels, and the masks that say which tokens are in the
#: loss when there are no labels (the columns TRL's ``SFTTrainer`` reads from a tokenized dataset).
TOKEN_FIELD, LABELS_FIELD, MASK_FIELDS = "input_ids", "labels", ("completion_mask", "assistant_masks")


def holds_token_ids(records, *, sample: int = 16) -> bool:
    """Whether ``records`` are tokenized: each of the first ``sample`` records (the ones
    :func:`~tfp_kernels.text.formats.detect_format` looks at) has an ``input_ids`` field."""
    head = records[:sample]
    return bool(head) and all(isinstance(r, dict) and TOKEN_FIELD in r for r in head)


def _int_list(value, where: str, *, what: str = "a list of ints") -> np.ndarray:
    """``value`` (a list / tuple / 1-D array of ints) as a 1-D int64 array; InputError naming ``where``."""
    if value is None:
        raise InputError(f"{where} is null, expected {what}")
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__len__"):
        raise InputError(f"{where} must be {what}, got {type(value).__name__}")
    array = np.asarray(value)
    if array.ndim != 1 or (array.size and array.dtype.kind not in "iub"):
        shown = f"{array.dtype} values" if array.ndim == 1 else f"shape {array.shape}"
        raise InputError(f"{where} must be {what}, got {shown}")
    return array.astype(np.int64, copy=False)


def read_token_records(records) -> Tokenized:
    """The token ids and labels of tokenized records, packed as they are (no tokenizer).

    Each record has ``input_ids`` (a non-empty list of token ids >= 0) and optionally ``labels`` (same
    length; -100 on tokens outside the loss). Without ``labels``, a record's ``completion_mask`` and
    ``assistant_masks`` (same length, 1 = in the loss), when present, decide the labels as TRL's
    ``SFTTrainer`` builds them: the token id where every mask is 1, else -100; with neither, every token is
    in the loss. A field present in one record must be present (not null) in all of them.

    Args:
        records: N >= 1 dicts (JSON / Parquet rows, ``Dataset.to_list()``).

    Returns:
        :class:`~tfp_kernels.text.tokenize.Tokenized` (``input_ids``, ``labels``, ``offsets`` int64 numpy).

    Raises:
        InputError: naming the record: a missing or null field, a value that is not a list of ints, an
            empty ``input_ids``, a negative token id, labels or masks of another length than the tokens, a
            mask value other than 0/1.

    Examples::

        >>> from tfp_kernels.text.readers import read_token_records
        >>> read_token_records([{"input_ids": [5, 6], "completion_mask": [0, 1]}, {"input_ids": [8]}])
        Traceback (most recent call last):
        ...
        tfp_kernels.text.readers.InputError: record 1 has no field 'completion_mask' (record 0 has it)
        >>> tok = read_token_records([{"input_ids": [5, 6, 7], "completion_mask": [0, 1, 1]}])
        >>> tok.input_ids.tolist(), tok.labels.tolist(), tok.offsets.tolist()
        ([5, 6, 7], [-100, 6, 7], [0, 3])
    """
    from .tokenize import IGNORE_INDEX, Tokenized

    if not records:
        raise InputError("the dataset is empty (no records)")
    optional = (LABELS_FIELD, *MASK_FIELDS)
    fields = [f for f in optional if isinstance(records[0], dict) and f in records[0]]
    masks = [] if LABELS_FIELD in fields else fields
    ids_parts, label_parts = [], []
    lengths = np.zeros(len(records), dtype=np.int64)
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise InputError(f"record {i} is a {type(record).__name__}, expected an object")
        if TOKEN_FIELD not in record:
            raise InputError(f"record {i} has no field '{TOKEN_FIELD}'; its fields: {sorted(record)}")
        present = [f for f in optional if f in record]
        if present != fields:
            missing = [f for f in fields if f not in present]
            if missing:
                raise InputError(f"record {i} has no field '{missing[0]}' (record 0 has it)")
            extra = next(f for f in present if f not in fields)
            raise InputError(f"record {i} has a field '{extra}' that record 0 has not")
        ids = _int_list(record[TOKEN_FIELD], f"record {i}: '{TOKEN_FIELD}'", what="a list of token ids")
        if ids.size == 0:
            raise InputError(f"record {i}: '{TOKEN_FIELD}' is empty; every record needs at least one token")
        if ids.min() < 0:
            raise InputError(f"record {i}: '{TOKEN_FIELD}' holds a negative token id ({int(ids.min())})")
        if LABELS_FIELD in fields:
            labels = _int_list(record[LABELS_FIELD], f"record {i}: '{LABELS_FIELD}'")
            if labels.size != ids.size:
                raise InputError(
                    f"record {i}: '{LABELS_FIELD}' has {labels.size} entries, '{TOKEN_FIELD}' {ids.size}"
                )
        else:
            keep = np.ones(ids.size, dtype=bool)
            for field in masks:
                mask = _int_list(record[field], f"record {i}: '{field}'", what="a list of 0/1")
                if mask.size != ids.size:
                    raise InputError(
                        f"record {i}: '{field}' has {mask.size} entries, '{TOKEN_FIELD}' {ids.size}"
                    )
                if mask.min() < 0 or mask.max() > 1:
                    raise InputError(f"record {i}: '{field}' must hold 0 or 1 only")
                keep &= mask == 1
            labels = np.where(keep, ids, IGNORE_INDEX)
        ids_parts.append(ids)
        label_parts.append(labels)
        lengths[i] = ids.size
    offsets = np.zeros(len(records) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return Tokenized(np.concatenate(ids_parts), np.concatenate(label_parts), offsets)


#: Keys of a ``.pt`` / ``.npz`` input: required, then optional.
EMBEDDINGS_KEYS = ("embeddings", "lengths")
OPTIONAL_EMBEDDINGS_KEYS = ("topic",)


def _load_npz(path: str) -> dict:
    import zipfile

    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise InputError(f"{path}: cannot read as an .npz archive ({_first_line(err)})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise InputError(
            f"{path}: holds a single array, expected an .npz archive with 'embeddings' and 'lengths' "
            f"(numpy.savez(path, embeddings=..., lengths=...))"
        )
    data = {}
    with archive:
        for key in archive.files:
            if key not in EMBEDDINGS_KEYS + OPTIONAL_EMBEDDINGS_KEYS:
                data[key] = None  # present (listed in errors) but not loaded
                continue
            try:
                data[key] = archive[key]
            except ValueError as err:
                if "allow_pickle" in str(err):
                    raise InputError(
                        f"{path}: key '{key}' holds Python objects (numpy dtype object), which are not "
                        f"loaded (no pickle); save a numeric array"
                    ) from None
                raise InputError(f"{path}: key '{key}' cannot be read ({_first_line(err)})") from None
            except (OSError, EOFError, zipfile.BadZipFile) as err:
                raise InputError(f"{path}: key '{key}' cannot be read ({_first_line(err)})") from None
    return data


def _load_pt(path: str):
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "numpy" in str(err):
            raise InputError(
                f"{path}: holds numpy arrays, which torch.load(weights_only=True) does not load; save torch "
                f"tensors (torch.from_numpy(array)) or an .npz file (numpy.savez)"
            ) from None
        raise InputError(f"{path}: cannot read as a torch.save file ({_first_line(err)})") from None
    except Exception as err:  # noqa: BLE001 - any failure to parse the file is a problem of the input
        raise InputError(f"{path}: cannot read as a torch.save file ({_first_line(err)})") from None


def _as_tensor(path: str, key: str, value) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise InputError(
                f"{path}: key '{key}' must hold numbers, got a numpy array of dtype {value.dtype}"
            )
        return torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, torch.Tensor):
        raise InputError(f"{path}: key '{key}' must be a tensor, got {type(value).__name__}")
    return value


def read_embeddings(path: str, *, limit: int | None = None) -> dict[str, torch.Tensor]:
    """Embeddings and token lengths of N records from a ``.pt`` (``torch.save`` of a dict of tensors,
    loaded with ``weights_only=True`` on the CPU) or ``.npz`` file (``numpy.savez``, no pickle).

    Keys: ``embeddings`` (N, D) floating point, finite; ``lengths`` (N,) integers >= 1 (token counts:
    floats and bools are refused, not rounded); optional ``topic`` (N,) integers (a label per record, used
    only in the report). Other keys are ignored.

    Args:
        path: the ``.pt`` / ``.npz`` file.
        limit: keep only the first ``limit`` records.

    Returns:
        dict with ``embeddings`` (N, D) (its dtype as stored), ``lengths`` (N,) int64 and, when present,
        ``topic`` (N,) int64; CPU tensors.

    Raises:
        InputError: the file cannot be read, a key is missing or has the wrong shape or dtype, a length is
            < 1, an embedding is NaN or infinite (the record is named by its index in the file).
    """
    data = _load_npz(path) if path.lower().endswith(".npz") else _load_pt(path)
    if not isinstance(data, dict):
        raise InputError(
            f"{path}: expected a dict with 'embeddings' and 'lengths', got {type(data).__name__}"
        )
    for key in EMBEDDINGS_KEYS:
        if key not in data:
            raise InputError(f"{path}: missing key '{key}' (found: {sorted(map(str, data))})")
    out = {k: _as_tensor(path, k, data[k]) for k in EMBEDDINGS_KEYS + OPTIONAL_EMBEDDINGS_KEYS if k in data}
    emb, lengths = out["embeddings"], out["lengths"]
    if emb.dim() != 2:
        raise InputError(f"{path}: 'embeddings' must have shape (N, D), got {tuple(emb.shape)}")
    if not emb.dtype.is_floating_point:
        raise InputError(f"{path}: 'embeddings' must hold floating-point numbers, got {emb.dtype}")
    n = emb.shape[0]
    if n == 0:
        raise InputError(f"{path}: the dataset is empty (no records)")
    if emb.shape[1] == 0:
        raise InputError(f"{path}: 'embeddings' has no columns (shape {tuple(emb.shape)})")
    for key in ("lengths", "topic"):
        if key not in out:
            continue
        value = out[key]
        if value.shape != (n,):
            raise InputError(
                f"{path}: '{key}' must have shape ({n},) (one per row of 'embeddings'), "
                f"got {tuple(value.shape)}"
            )
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            what = "token counts" if key == "lengths" else "labels"
            raise InputError(f"{path}: '{key}' must hold integers ({what}), got {value.dtype}")
    if limit is not None:
        out = {k: v[:limit] for k, v in out.items()}
        emb, lengths = out["embeddings"], out["lengths"]
    lengths = lengths.long()
    bad = (lengths < 1).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        raise InputError(
            f"{path}: record {i} has 'lengths'[{i}] = {int(lengths[i])}: every record needs at least one "
            f"token ({bad.shape[0]} of {lengths.numel()} records have a length < 1)"
        )
    bad = (~torch.isfinite(emb)).any(dim=1).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        raise InputError(
            f"{path}: record {i} has NaN or infinite values in 'embeddings'[{i}] ({bad.shape[0]} records do)"
        )
    out["lengths"] = lengths
    if "topic" in out:
        out["topic"] = out["topic"].long()
    return out
