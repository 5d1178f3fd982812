"""Build script for the ``tfp_kernels._C`` extension.

One extension, ``tfp_kernels._C``, holds every compiled op. Its sources:

- ``csrc/*.cpp`` and ``csrc/cpu/*.cpp``: always (registration + CPU implementations);
- ``csrc/cuda/*.cu``: when torch was built with CUDA and a CUDA toolkit (``nvcc``) is found,
  compiled with ``-DWITH_CUDA``.

Build switches (environment variables), decided without probing the build machine's GPU:

==============================  =============================================================
``TFP_KERNELS_FORCE_CPU=1``     build the CPU part only, even when CUDA is available
``TFP_KERNELS_FORCE_CUDA=1``    fail instead of silently building CPU-only when CUDA is missing
``TFP_KERNELS_NO_EXT=1``        build no extension at all (pure-torch fallbacks only)
``TORCH_CUDA_ARCH_LIST``        respected; if unset and no GPU is visible: ``8.0;9.0+PTX``
``CUDA_HOME``                   respected; if unset, ``/usr/local/cuda`` when it holds ``bin/nvcc``
``MAX_JOBS``                    parallel compile jobs (ninja)
``TFP_KERNELS_DEBUG=1``         ``-O0 -g`` instead of ``-O3``
``TFP_KERNELS_NO_OPENMP=1``     no ``-fopenmp`` (the CPU ops' parallel loops then run on one thread)
==============================  =============================================================

Install against the already installed torch (no second copy of torch in an isolated build env)::

    pip install --no-build-isolation -e .
"""

import glob
import os
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


# torch guesses CUDA_HOME from the location of `nvcc` on PATH; /usr/local/bin/nvcc may be a wrapper
# script, which makes torch pick /usr/local and fail to link -lcudart. Prefer the real toolkit.
if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"


def _build_with_openmp() -> bool:
    """Whether to build with ``-fopenmp``: torch's ATen parallel backend is OpenMP (not on macOS's clang) and
    the C++ compiler compiles and links a small OpenMP program with it (else the build goes on without)."""
    import tempfile

    import torch

    if sys.platform == "darwin" or _flag("TFP_KERNELS_NO_OPENMP"):
        return False
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        print("tfp_kernels: torch's parallel backend is not OpenMP; the CPU ops' parallel loops use its own",
              file=sys.stderr)
        return False
    cxx = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "omp.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            done = subprocess.run([cxx, "-fopenmp", src, "-o", os.path.join(tmp, "omp")], check=False,
                                  capture_output=True, text=True, timeout=120)
            ok = done.returncode == 0
        except (OSError, subprocess.SubprocessError):
            ok = False
    if not ok:
        print(f"tfp_kernels: warning: CXX={cxx} cannot build with -fopenmp; the CPU ops' parallel loops will run "
              "on one thread", file=sys.stderr)
    return ok


def _has_shared_libstdcxx(cxx: str) -> bool:
    """Whether ``cxx`` links against a shared libstdc++ (as torch does)."""
    try:
        out = subprocess.run([cxx, "-print-file-name=libstdc++.so"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return True  # cannot tell; let the build go on with it
    return os.path.isabs(out.stdout.strip())


def _choose_cxx() -> None:
    """Avoid a C++ compiler that would put a static copy of libstdc++ into the extension.

    Such a copy (seen with a GCC toolchain whose lib dir has only libstdc++.a, set as CC/CXX) makes
    _C.so use its own iostreams/locale next to torch's shared libstdc++: formatting an error message
    then segfaults. Switch to the system compiler when it links libstdc++ dynamically.
    """
    cxx = os.environ.get("CXX", "c++")
    if _has_shared_libstdcxx(cxx) or _flag("TFP_KERNELS_ALLOW_STATIC_LIBSTDCXX"):
        return
    for candidate_cxx, candidate_cc in (("/usr/bin/g++", "/usr/bin/gcc"), ("/usr/bin/c++", "/usr/bin/cc")):
        if shutil.which(candidate_cxx) and _has_shared_libstdcxx(candidate_cxx):
            print(
                f"tfp_kernels: CXX={cxx} has no shared libstdc++ (a static copy in _C.so crashes next to "
                f"torch's); building with CXX={candidate_cxx} CC={candidate_cc} instead "
                "(TFP_KERNELS_ALLOW_STATIC_LIBSTDCXX=1 keeps the original)",
                file=sys.stderr,
            )
            os.environ["CXX"], os.environ["CC"] = candidate_cxx, candidate_cc
            return
    print(f"tfp_kernels: warning: CXX={cxx} links libstdc++ statically; the extension may crash", file=sys.stderr)


def _extensions():
    if _flag("TFP_KERNELS_NO_EXT"):
        print("tfp_kernels: TFP_KERNELS_NO_EXT=1, building no C++ extension", file=sys.stderr)
        return [], {}

    _choose_cxx()
    import torch
    from torch.utils import cpp_extension

    cuda_home = cpp_extension.CUDA_HOME
    torch_has_cuda = torch.version.cuda is not None
    with_cuda = torch_has_cuda and cuda_home is not None and not _flag("TFP_KERNELS_FORCE_CPU")
    if _flag("TFP_KERNELS_FORCE_CUDA") and not with_cuda:
        raise RuntimeError(
            "TFP_KERNELS_FORCE_CUDA=1 but the CUDA sources cannot be built: "
            f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={cuda_home!r}, "
            f"TFP_KERNELS_FORCE_CPU={os.environ.get('TFP_KERNELS_FORCE_CPU')!r}"
        )

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    debug = _flag("TFP_KERNELS_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # no fused multiply-adds where the source has none: the CPU code's AVX-512/AVX2 clones (with FMA) and its
    # baseline one (without) round alike, so results do not depend on the CPU they ran on
    extra_compile_args = {"cxx": list(opt) + ["-ffp-contract=off"]}  # torch picks the C++ standard it needs
    define_macros = []
    include_dirs = [os.path.join(ROOT, "csrc")]
    extra_link_args = []
    # at::parallel_for runs its loop in parallel only in code compiled with OpenMP when torch's backend is
    # OpenMP (ATen/ParallelOpenMP.h is guarded by _OPENMP): without -fopenmp every parallel_for of the
    # extension ran on one thread (measured: the band selection took as long on 2 threads as on 1). The
    # OpenMP runtime is torch's own (libgomp.so.1, loaded by torch before the extension).
    if _build_with_openmp():
        extra_compile_args["cxx"].append("-fopenmp")
        extra_link_args.append("-fopenmp")

    if with_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        define_macros.append(("WITH_CUDA", None))
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # No GPU to detect the architecture from: build for A100 and H100/H200 (+PTX for newer).
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        extra_compile_args["nvcc"] = opt + ["-lineinfo", "--expt-relaxed-constexpr"]
        ext_cls = cpp_extension.CUDAExtension
        print(
            f"tfp_kernels: building CPU + CUDA ops (CUDA_HOME={cuda_home}, "
            f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')})",
            file=sys.stderr,
        )
    else:
        ext_cls = cpp_extension.CppExtension
        why = "TFP_KERNELS_FORCE_CPU=1" if _flag("TFP_KERNELS_FORCE_CPU") else (
            "torch has no CUDA" if not torch_has_cuda else "no CUDA toolkit (nvcc) found"
        )
        print(f"tfp_kernels: building CPU ops only ({why})", file=sys.stderr)

    ext = ext_cls(
        name="tfp_kernels._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args=extra_compile_args,
        extra_link_args=extra_link_args,
    )
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}
    return [ext], cmdclass


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
