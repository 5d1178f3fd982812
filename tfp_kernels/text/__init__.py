"""Text datasets for ``tfp-pack``: readers (JSON, JSONL, Parquet, saved ``datasets``), SFT record formats
(alpaca, chat, prompt/completion, text), tokenizers (built-in byte-level, local transformers) and the
Parquet writers of the ordered and packed datasets."""

from .formats import FORMATS, check_fields, default_embed_field, detect_format, embed_text, segments
from .readers import InputError, input_kind, read_records
from .tokenize import IGNORE_INDEX, ByteTokenizer, HFTokenizer, Tokenized, load_tokenizer, tokenize_records
from .writers import index_column_name, packed_table, records_table, unpack_records, write_parquet

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "ByteTokenizer",
    "HFTokenizer",
    "InputError",
    "Tokenized",
    "check_fields",
    "default_embed_field",
    "detect_format",
    "embed_text",
    "index_column_name",
    "input_kind",
    "load_tokenizer",
    "packed_table",
    "read_records",
    "records_table",
    "segments",
    "tokenize_records",
    "unpack_records",
    "write_parquet",
]
