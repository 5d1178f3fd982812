"""tfp_kernels: Threshold Filtering Packing (arXiv:2408.09327) for LLM fine-tuning."""

from ._ext import ExtensionNotAvailableError, has_cuda_ops, has_extension
from .version import __version__

__all__ = [
    "ExtensionNotAvailableError",
    "__version__",
    "has_cuda_ops",
    "has_extension",
]
