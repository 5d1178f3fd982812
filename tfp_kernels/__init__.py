"""tfp_kernels: Threshold Filtering Packing (arXiv:2408.09327) for LLM fine-tuning.

Layers (each usable alone): ``order`` (threshold, TFP path, validator), ``packing`` (bin packing of
lengths). Glossary of tensor shapes used in the docstrings: N samples, D embedding dimension,
M pieces of samples, P packs, T tokens.
"""

from ._ext import ExtensionNotAvailableError, has_cuda_ops, has_extension
from .order import (
    OrderStats,
    PathCheck,
    check_path,
    estimate_threshold,
    tfp_order,
    tfp_order_reference,
)
from .packing import Packing, pack_lengths
from .version import __version__

__all__ = [
    "ExtensionNotAvailableError",
    "OrderStats",
    "Packing",
    "PathCheck",
    "__version__",
    "check_path",
    "estimate_threshold",
    "has_cuda_ops",
    "has_extension",
    "pack_lengths",
    "tfp_order",
    "tfp_order_reference",
]
