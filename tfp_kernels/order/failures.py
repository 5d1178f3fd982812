"""How the engine reports a kernel that failed and the slower way it takes instead (same path)."""

from __future__ import annotations

import warnings


def kernel_failure(err: Exception) -> str:
    """``"Type: first line of the message"`` (at most 200 characters of it) for a warning."""
    lines = str(err).splitlines()
    return f"{type(err).__name__}: {lines[0][:200] if lines else ''}"


def warn_failure(what: str, err: Exception, instead: str, *, stacklevel: int = 3) -> None:
    """Warn (RuntimeWarning) that ``what`` failed with ``err`` and the engine goes on with ``instead``."""
    warnings.warn(f"tfp_order: {what} failed ({kernel_failure(err)}); {instead}", RuntimeWarning,
                  stacklevel=stacklevel + 1)
