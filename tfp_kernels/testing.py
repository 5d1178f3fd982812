"""Helpers shared by the tests and benchmarks of tfp_kernels (shipped with the package).

- ``devices``: ``["cpu"]``, plus ``"cuda"`` when a CUDA device is available, so CPU CI and the GPU box run
  the same parametrised tests (``torch.cuda.is_available()`` does not create a CUDA context).
- ``int_dtypes`` / ``non_int_dtypes``: dtypes that length inputs accept / reject.
- ``lognormal_lengths``: long-tailed sample lengths like those of an SFT data set.
- ``assert_equal``: exact tensor equality whose failure message says where the tensors differ.
"""

from __future__ import annotations

import torch

devices: list[str] = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

int_dtypes: list[torch.dtype] = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]
"""Integer dtypes with full torch operator support (uint16/32/64 are accepted too, but barely usable)."""

non_int_dtypes: list[torch.dtype] = [torch.bool, torch.float16, torch.bfloat16, torch.float32, torch.float64]

float_dtypes: list[torch.dtype] = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def lognormal_lengths(
    n: int,
    *,
    mean: float = 512.0,
    sigma: float = 1.0,
    max_len: int = 2048,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Long-tailed sample lengths: log-normal with the given mean, rounded and clipped to ``[1, max_len]``.

    Args:
        n: number of samples N.
        mean: mean of the log-normal before clipping (the clipped mean is a little lower).
        sigma: standard deviation of the underlying normal (1.0: heavy tail, ~5% above 4x the mean).
        max_len: upper clip.
        seed: seed of a private CPU generator (the same lengths on every device).
        device: where the result goes.

    Returns:
        (N,), torch.int64, on ``device``.
    """
    generator = torch.Generator().manual_seed(seed)
    mu = (
        torch.log(torch.tensor(mean, dtype=torch.float64)) - sigma**2 / 2
    )  # E[exp(X)] = exp(mu + sigma^2 / 2)
    normal = torch.randn(n, generator=generator, dtype=torch.float64)
    lengths = torch.exp(mu + sigma * normal).round().clamp_(1, max_len).to(torch.int64)
    return lengths.to(device)


def assert_equal(actual: torch.Tensor, expected: torch.Tensor, name: str = "tensor") -> None:
    """Assert ``torch.equal(actual, expected)`` (same shape, dtype, values); on failure, say where they differ."""
    assert isinstance(actual, torch.Tensor), f"{name}: expected a tensor, got {type(actual).__name__}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != expected {expected.dtype}"
    assert actual.shape == expected.shape, (
        f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    )
    if torch.equal(actual, expected.to(actual.device)):
        return
    actual_cpu, expected_cpu = actual.cpu(), expected.cpu()
    mismatch = (actual_cpu != expected_cpu).reshape(-1).nonzero().reshape(-1)
    first = int(mismatch[0])
    window = slice(max(0, first - 3), first + 4)
    raise AssertionError(
        f"{name}: {mismatch.numel()} of {actual_cpu.numel()} elements differ; first at flat index {first}: "
        f"actual {actual_cpu.reshape(-1)[first].item()} != expected {expected_cpu.reshape(-1)[first].item()}; "
        f"actual[{window.start}:{window.stop}] = {actual_cpu.reshape(-1)[window].tolist()}, "
        f"expected = {expected_cpu.reshape(-1)[window].tolist()}"
    )
