"""Loading of the compiled extension ``tfp_kernels._C``.

The extension registers its ops as ``torch.ops.tfp_kernels.*``. ``import tfp_kernels`` works without
it: functions with a pure-torch fallback use the fallback, and functions without one raise
:class:`ExtensionNotAvailableError` (an ``ImportError``) that names the build step.
"""

from __future__ import annotations

import warnings

import torch

BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` from the tfp_kernels source tree "
    "(needs a C++17 compiler; CUDA ops also need nvcc and a CUDA build of torch)"
)


class ExtensionNotAvailableError(ImportError):
    """Raised when an op needs the compiled extension ``tfp_kernels._C`` and it is not built."""


_load_error: BaseException | None = None
try:
    from . import _C  # noqa: F401  (loading the library runs the TORCH_LIBRARY registrations)

    _loaded = True
except ImportError as err:  # not built, or built against another torch
    _loaded = False
    _load_error = err


def _check_cuda_version() -> None:
    built = int(torch.ops.tfp_kernels.cuda_version())
    if built < 0 or torch.version.cuda is None:
        return
    major, minor = (int(x) for x in torch.version.cuda.split(".")[:2])
    if built // 1000 != major:
        raise ImportError(
            f"tfp_kernels._C was compiled with CUDA {built // 1000}.{built % 1000 // 10}, but torch uses CUDA "
            f"{major}.{minor}; reinstall tfp_kernels: {BUILD_HINT}"
        )


if _loaded:
    _check_cuda_version()


def has_extension() -> bool:
    """True when the compiled extension ``tfp_kernels._C`` is loaded."""
    return _loaded


def has_cuda_ops() -> bool:
    """True when the extension was compiled with its CUDA implementations."""
    return _loaded and int(torch.ops.tfp_kernels.cuda_version()) >= 0


def require_extension(what: str) -> None:
    """Raise :class:`ExtensionNotAvailableError` naming ``what`` when the extension is missing."""
    if not _loaded:
        raise ExtensionNotAvailableError(
            f"{what} needs the compiled extension tfp_kernels._C, which could not be loaded "
            f"({_load_error}); {BUILD_HINT}"
        )


def warn_fallback(what: str) -> None:
    """Warn once per call site that ``what`` runs a slower pure-torch fallback."""
    warnings.warn(
        f"tfp_kernels._C is not built ({_load_error}); {what} uses its pure-torch fallback. {BUILD_HINT}",
        RuntimeWarning,
        stacklevel=3,
    )
