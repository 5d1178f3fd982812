"""The compiled extension tfp_kernels._C: loading, op registration, opcheck, CUDA version.

Skipped as a whole when the extension is not built (``TFP_KERNELS_NO_EXT=1``); the pure-torch fallbacks
are tested in the op test modules then.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from tfp_kernels import _ext

pytestmark = pytest.mark.skipif(not _ext.has_extension(), reason="tfp_kernels._C is not built")

OPS = ["next_fit_pack_ids", "assemble"]  # ops with CPU and CUDA kernels
CPU_ONLY_OPS = ["best_fit_decreasing", "stream_pack"]  # sequential: CUDA callers use host copies
I64 = torch.int64


def has_kernel(op: str, dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"tfp_kernels::{op}", dispatch_key)


def test_extension_loads():
    from tfp_kernels import _C

    assert _C.__name__ == "tfp_kernels._C"
    assert _ext.has_extension()
    _ext.require_extension("test")  # does not raise


@pytest.mark.parametrize("op", OPS)
def test_ops_registered_for_cpu(op):
    assert hasattr(torch.ops.tfp_kernels, op)
    assert has_kernel(op, "CPU")


@pytest.mark.parametrize("op", OPS)
def test_ops_registered_for_cuda_when_built(op):
    assert has_kernel(op, "CUDA") == _ext.has_cuda_ops()


@pytest.mark.parametrize("op", CPU_ONLY_OPS)
def test_cpu_only_ops_registered(op):
    assert has_kernel(op, "CPU") and not has_kernel(op, "CUDA")


@pytest.mark.skipif(sys.platform == "darwin" or (os.cpu_count() or 1) < 2
                    or os.environ.get("TFP_KERNELS_NO_OPENMP", "0") not in ("", "0"),
                    reason="needs 2 cores and a Linux build with OpenMP")
def test_parallel_loops_run_on_torch_threads():
    # the CPU ops' at::parallel_for loops run on torch's intra-op threads only when the extension was built
    # with -fopenmp under torch's OpenMP backend; without it they ran on one thread, silently
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch's parallel backend is not OpenMP")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert int(torch.ops.tfp_kernels.parallel_threads()) == 2
        torch.set_num_threads(1)
        assert int(torch.ops.tfp_kernels.parallel_threads()) == 1
    finally:
        torch.set_num_threads(before)


def test_schema():
    schema = str(torch.ops.tfp_kernels.next_fit_pack_ids.default._schema)
    assert schema == "tfp_kernels::next_fit_pack_ids(Tensor lengths, int max_len) -> Tensor"


def test_cuda_version_matches_torch():
    built = int(torch.ops.tfp_kernels.cuda_version())
    if not _ext.has_cuda_ops():
        assert built == -1
        pytest.skip("extension built without CUDA ops")
    assert torch.version.cuda is not None
    major, minor = (int(part) for part in torch.version.cuda.split(".")[:2])
    assert (built // 1000, built % 1000 // 10) == (major, minor), (
        f"built with {built}, torch has {torch.version.cuda}"
    )


@pytest.mark.parametrize(
    "lengths, max_len",
    [
        pytest.param([3, 4, 5, 1, 9, 2], 10, id="small"),
        pytest.param([1], 1, id="one"),
        pytest.param(list(range(1, 200)), 300, id="ramp"),
    ],
)
def test_opcheck_next_fit_pack_ids(lengths, max_len):
    import tfp_kernels.packing  # noqa: F401  (registers the fake kernel)

    torch.library.opcheck(
        torch.ops.tfp_kernels.next_fit_pack_ids.default, (torch.tensor(lengths, dtype=I64), max_len)
    )


def test_fake_kernel_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    import tfp_kernels.packing  # noqa: F401

    with FakeTensorMode():
        lengths = torch.empty(17, dtype=I64)
        out = torch.ops.tfp_kernels.next_fit_pack_ids(lengths, 10)
    assert out.shape == (17,) and out.dtype == I64


def test_op_empty_input():
    assert torch.ops.tfp_kernels.next_fit_pack_ids(torch.empty(0, dtype=I64), 10).shape == (0,)


@pytest.mark.parametrize(
    "lengths, max_len, match",
    [
        pytest.param(
            torch.tensor([1, 0, 2]), 10, r"lengths\[1\] = 0 is outside \[1, max_len=10\]", id="zero"
        ),
        pytest.param(torch.tensor([1, 11]), 10, r"lengths\[1\] = 11 is outside", id="too-long"),
        pytest.param(torch.tensor([1, 2], dtype=torch.int32), 10, "lengths must have dtype Long", id="int32"),
        pytest.param(torch.ones(2, 2, dtype=I64), 10, "lengths must be 1-D", id="2-D"),
        pytest.param(torch.tensor([1, 2]), 0, "max_len must be positive", id="max-len-0"),
    ],
)
def test_op_checks_its_inputs(lengths, max_len, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.tfp_kernels.next_fit_pack_ids(lengths, max_len)


def test_op_non_contiguous_input():
    lengths = torch.tensor([3, 99, 4, 99, 5, 99, 1, 99])[::2]
    assert torch.ops.tfp_kernels.next_fit_pack_ids(lengths, 8).tolist() == [0, 0, 1, 1]


@pytest.mark.gpu
def test_cuda_op_runs():
    if not _ext.has_cuda_ops():
        pytest.skip("extension built without CUDA ops")
    lengths = torch.tensor([3, 4, 5, 1, 9, 2], dtype=I64, device="cuda")
    out = torch.ops.tfp_kernels.next_fit_pack_ids(lengths, 10)
    assert out.device == lengths.device and out.tolist() == [0, 0, 1, 1, 2, 3]


@pytest.mark.gpu
def test_opcheck_next_fit_pack_ids_cuda():
    if not _ext.has_cuda_ops():
        pytest.skip("extension built without CUDA ops")
    import tfp_kernels.packing  # noqa: F401

    lengths = torch.tensor([3, 4, 5, 1, 9, 2], dtype=I64, device="cuda")
    torch.library.opcheck(torch.ops.tfp_kernels.next_fit_pack_ids.default, (lengths, 10))
