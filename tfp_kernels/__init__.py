"""tfp_kernels: Threshold Filtering Packing (arXiv:2408.09327) for LLM fine-tuning.

Layers, each usable alone: ``embed`` (hashed token-bag or transformers embeddings), ``order`` (threshold,
exact TFP path, validator), ``packing`` (bin packing of lengths, pack shuffling), ``assembly`` (packed
input_ids / labels / position_ids / cu_seqlens), ``attention`` (varlen attention over a packed batch),
``integrations`` (transformers collators, ``order_dataset``, ``pack_dataset`` for TRL / ``Trainer``, loss
normalisation, the ``tfp_varlen`` attention), ``distributed`` (sharded ordering, rank-balanced
pack sampler, streaming), ``cli`` (``tfp-pack``). :func:`pack_gpu` composes embed -> order -> pack -> assemble
for training loops. Shape letters in the docstrings: N samples, D embedding dimension, M pieces of samples,
P packs, T tokens.
"""

from ._ext import ExtensionNotAvailableError, has_cuda_ops, has_extension
from .assembly import IGNORE_INDEX, Jagged, PackedBatch, Padded, PaddedBatch, assemble
from .attention import available_backends, check_cu_seqlens, varlen_attention
from .distributed import (
    DistributedPackSampler,
    PackPlan,
    ShardedOrderStats,
    StreamBatch,
    TFPStreamingDataset,
    mask_repeats,
    tfp_order_sharded,
)
from .embed import HashedEmbedder, TransformersEmbedder, hashed_embed, load_embedder, minilm_path
from .integrations import (
    PackedRowsCollator,
    TFPDataCollator,
    count_label_tokens,
    global_num_items_in_batch,
    order_dataset,
    pack_dataset,
    register_hf_attention,
)
from .order import (
    OrderStats,
    PathCheck,
    check_path,
    estimate_threshold,
    tfp_order,
    tfp_order_reference,
)
from .packing import Packing, pack_lengths, pack_permutation, select_packs, shuffle_packs
from .pipeline import pack_gpu
from .version import __version__

__all__ = [
    "IGNORE_INDEX",
    "DistributedPackSampler",
    "ExtensionNotAvailableError",
    "HashedEmbedder",
    "Jagged",
    "OrderStats",
    "PackPlan",
    "PackedBatch",
    "PackedRowsCollator",
    "Packing",
    "Padded",
    "PaddedBatch",
    "PathCheck",
    "ShardedOrderStats",
    "StreamBatch",
    "TFPDataCollator",
    "TFPStreamingDataset",
    "TransformersEmbedder",
    "__version__",
    "assemble",
    "available_backends",
    "check_cu_seqlens",
    "check_path",
    "count_label_tokens",
    "estimate_threshold",
    "global_num_items_in_batch",
    "has_cuda_ops",
    "has_extension",
    "hashed_embed",
    "load_embedder",
    "mask_repeats",
    "minilm_path",
    "order_dataset",
    "pack_dataset",
    "pack_gpu",
    "pack_lengths",
    "pack_permutation",
    "register_hf_attention",
    "select_packs",
    "shuffle_packs",
    "tfp_order",
    "tfp_order_reference",
    "tfp_order_sharded",
    "varlen_attention",
]
