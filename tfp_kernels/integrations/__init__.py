"""Integrations with the Hugging Face stack (transformers ``Trainer`` / models, ``datasets``).

Public API:

- :class:`TFPDataCollator`: a ``DataCollatorWithFlattening``-style collator that TFP-orders and packs each
  batch (:func:`~tfp_kernels.pack_gpu`) and returns ``input_ids`` / ``labels`` / ``position_ids`` ``[1, T]``
  (+ ``cu_seq_lens_q/k``, ``max_length_q/k``), never an ``attention_mask``;
- :func:`order_dataset`: a ``datasets.Dataset`` in TFP order (whole dataset, ``dataset.select(path)``).

Neither needs transformers or datasets at import time.
"""

from .transformers import TFPDataCollator, order_dataset

__all__ = ["TFPDataCollator", "order_dataset"]
