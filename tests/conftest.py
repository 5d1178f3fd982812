"""Shared pytest configuration for the tfp_kernels tests.

- Tests marked ``@pytest.mark.gpu`` are skipped when no CUDA device is available (checked at collection
  time, after import: no test module touches CUDA at import).
- Hypothesis profiles: ``default`` (fast, for every run) and ``thorough`` (``HYPOTHESIS_PROFILE=thorough``).
- ``poison_empty`` fixture: ``torch.empty`` / ``torch.empty_like`` / ``Tensor.new_empty`` return buffers
  filled with a sentinel (-1 for integers, NaN for floats) so that an output element our Python code
  forgot to write shows up.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. The flag is read when a
# @triton.jit function is defined, so it is set here, before any test module imports a kernel module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile(
    "default", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile(
    "thorough", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


INT_SENTINEL = -1


def _poison(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex:
        return tensor.fill_(float("nan"))
    if tensor.dtype == torch.bool:
        return tensor.fill_(True)
    return tensor.fill_(INT_SENTINEL)


@pytest.fixture
def poison_empty(monkeypatch):
    """Make fresh uninitialised buffers hold a sentinel (-1 / NaN) instead of leftover memory."""
    empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty

    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: _poison(empty(*args, **kwargs)))
    monkeypatch.setattr(torch, "empty_like", lambda *args, **kwargs: _poison(empty_like(*args, **kwargs)))
    monkeypatch.setattr(
        torch.Tensor, "new_empty", lambda self, *args, **kwargs: _poison(new_empty(self, *args, **kwargs))
    )
    return INT_SENTINEL
