"""Integrations with the Hugging Face stack (transformers ``Trainer`` / models, ``datasets``).

Public API:

- :class:`TFPDataCollator`: a ``DataCollatorWithFlattening``-style collator that TFP-orders and packs each
  batch (:func:`~tfp_kernels.pack_gpu`) and returns ``input_ids`` / ``labels`` / ``position_ids`` ``[1, T]``
  (+ ``cu_seq_lens_q/k``, ``max_length_q/k``), never an ``attention_mask``;
- :func:`order_dataset`: a ``datasets.Dataset`` in TFP order (whole dataset, ``dataset.select(path)``);
- :func:`pack_dataset`: a tokenized or text ``datasets.Dataset`` -> a ``datasets.Dataset`` of TFP packs (one
  pack per row, the columns of ``tfp-pack``'s ``packed.parquet``) that TRL's ``SFTTrainer`` and transformers'
  ``Trainer`` take as they are;
- :class:`PackedRowsCollator`: pre-packed rows (one pack per row, e.g. ``tfp-pack``'s ``packed.parquet``)
  -> one flat batch with the rows' attention segments;
- :func:`count_label_tokens`, :func:`global_num_items_in_batch`: the ``num_items_in_batch`` of a batch and
  of an optimizer step (micro-batches and ranks), for a loss that is the per-token mean of the step;
- :func:`register_hf_attention`: ``attn_implementation="tfp_varlen"`` for transformers models.

None needs transformers or datasets at import time.
"""

from .datasets import PackedDatasetStats, pack_dataset
from .training import (
    PackedRowsCollator,
    count_label_tokens,
    global_num_items_in_batch,
    hf_varlen_attention_forward,
    register_hf_attention,
)
from .transformers import TFPDataCollator, order_dataset

__all__ = [
    "PackedDatasetStats",
    "PackedRowsCollator",
    "TFPDataCollator",
    "count_label_tokens",
    "global_num_items_in_batch",
    "hf_varlen_attention_forward",
    "order_dataset",
    "pack_dataset",
    "register_hf_attention",
]
