"""Compile the ordering's Triton kernels for a GPU target on any host (no GPU needed) and time each compile.

The first call of a kernel setting on a GPU compiles it (seconds to minutes, before any of its work runs), so
compile time is part of what a user waits for: the band kernel's 256-column lists took 263 s with the launch
setting it had (64 rows, 4 warps) and stopped an H200 run. This script compiles the launch setting that
``band_topk_triton._configs`` gives each list length (the first, for tuned lengths), the fused scan and the
settle kernels, through ``triton.compile`` for ``--arch`` (default sm_90), and records the seconds, the
registers and spills Triton reports (where it does) and the local Triton version (the GPU machine's may
differ).

    python -m benchmarks.compile_times [--ks 64 128 256] [--arch 90]

Writes ``benchmarks/results/compile_times_<host>.json``.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import time

# a fresh cache: a kernel compiled before (by this script or any run) would come back from Triton's disk cache in
# milliseconds (set before Triton is imported)
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="tfp_compile_times_")

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from benchmarks._harness import write_results
from tfp_kernels.order import band_topk_triton as btk
from tfp_kernels.order import scan_triton as st

_BAND_TYPES = {
    "out_index_ptr": "*i32", "out_s2_ptr": "*fp32", "out_close_ptr": "*i32", "x_ptr": "*fp16", "x_lo_ptr": "*fp16",
    "scale_ptr": "*fp32", "stride_xn": "i64", "stride_xd": "i64", "a_desc": "*fp16", "b_desc": "*fp16",
    "a_lo_desc": "*fp16", "b_lo_desc": "*fp16", "sq_norms_ptr": "*fp32", "lower_ptr": "*fp32", "upper_ptr": "*fp32",
    "best_ptr": "*i64", "cand_s2_ptr": "*fp32", "cand_col_ptr": "*i32", "row_start": "i32", "row_end": "i32",
    "n_cols": "i32", "dim": "i32",
}
_PAIRS_TYPES = {
    "pairs_ptr": "*i32", "x_ptr": "*fp16", "x_lo_ptr": "*fp16", "scale_ptr": "*fp32", "stride_xn": "i64",
    "stride_xd": "i64", "sq_norms_ptr": "*fp32", "lower_ptr": "*fp32", "upper_ptr": "*fp32", "best_ptr": "*i64",
    "cand_s2_ptr": "*fp32", "cand_col_ptr": "*i32", "count_ptr": "*i32", "cutoff_ptr": "*fp32",
    "cutoff_col_ptr": "*i32", "close_ptr": "*i32", "n_rows": "i32", "dim": "i32",
}
_SCAN_TYPES = {
    "out_s2_ptr": "*fp32", "out_status_ptr": "*i8", "x_ptr": "*fp32", "stride_xn": "i64", "stride_xd": "i64",
    "sq_norms_ptr": "*fp32", "rows_ptr": "*i64", "n_rows": "i32", "visited_ptr": "*u8", "query_ptr": "*i64",
    "lower_ptr": "*fp32", "upper_ptr": "*fp32", "n_query": "i32", "dim": "i32", "xh_ptr": "*fp16", "stride_hn": "i64",
    "stride_hd": "i64", "scale_ptr": "*fp32", "best_ptr": "*i32",
}
_SETTLE_TYPES = {
    "prog_d_ptr": "*fp64", "prog_node_ptr": "*i64", "count_ptr": "*i64", "s2_ptr": "*fp32", "status_ptr": "*i8",
    "rows_ptr": "*i64", "n_rows": "i32", "best_ptr": "*i32", "threshold_ptr": "*fp64", "slack_ptr": "*fp64",
    "x_ptr": "*fp64", "stride_xn": "i64", "stride_xd": "i64", "query_ptr": "*i64", "n_query": "i32", "dim": "i32",
}
_REDUCE_TYPES = {"out_ptr": "*i64", "prog_d_ptr": "*fp64", "prog_node_ptr": "*i64", "n_prog": "i32", "count_ptr": "*i64"}


def compile_seconds(fn, types: dict, constants: dict, arch: int, **options) -> dict:
    """Compile ``fn`` (a ``@triton.jit`` function) with these argument types and constexprs for ``sm_<arch>``,
    specialised as a launch specialises it (pointers and ``stride_*n``/``dim``/``n_rows`` (the band kernel's
    ``row_end``/``n_cols``; its ``row_start`` is never specialised) divisible by 16, the
    inner strides ``stride_*d`` equal to 1: without them the loads are neither vectorised nor pipelined).
    Returns the seconds and what the kernel's Triton GPU IR shows: asynchronous copies (the loads pipelined
    into shared memory) and the waits on tensor-core products (``pendings = 0``: the product is waited for)."""
    names = fn.arg_names
    constants = {**{name: 1 for name in names if name.startswith("stride_") and name.endswith("d")}, **constants}
    signature = {name: types.get(name, "constexpr") for name in names}
    aligned = [name for name in names if name in types and name not in constants and (
        types[name].startswith("*") or name in ("dim", "n_rows", "row_end", "n_cols") or (name.startswith("stride_") and name.endswith("n")))]
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(names.index(key),): value for key, value in constants.items()},
                       attrs={(names.index(name),): [["tt.divisibility", 16]] for name in aligned})
    t0 = time.perf_counter()
    try:
        kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as err:  # noqa: BLE001 - recorded, the other kernels still compile
        return {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}",
                "seconds": time.perf_counter() - t0}
    out = {"seconds": time.perf_counter() - t0}
    ttgir = kernel.asm.get("ttgir", "")
    out["async_copies"] = ttgir.count("async_copy_global_to_local")
    out["dot_waits"] = re.findall(r"pendings = (\d+)", ttgir)
    for attr in ("n_regs", "n_spills"):
        value = getattr(kernel, attr, None)
        if isinstance(value, int) and value >= 0:
            out[attr] = value
    return out


def band_topk_row(k: int, arch: int, *, singles: bool = False) -> dict:
    """Compile the float16 x 3 row-block band kernel with the first launch setting of ``_configs(k)`` (and the
    launch's default candidate slots); the row of the results."""
    config = dict(btk._configs(k, "cuda")[0])
    warps, stages = config.pop("num_warps"), config.pop("num_stages")
    cap = btk.candidate_slots({}, config["BLOCK_N"], "BLOCK_N", k)  # (the launch's default)
    constants = {"K": k, "CAP": cap, "INPUT_PRECISION": "ieee", "SPLIT": True, "SCALED": True,
                 "DESCRIPTORS": False, "STACKED": False, "SINGLES": singles, **config}
    return {"kernel": "band_topk float16x3" + (" singles" if singles else ""), "k": k, **config, "num_warps": warps,
            "num_stages": stages, **compile_seconds(btk._band_topk_kernel, _BAND_TYPES, constants, arch,
                                                    num_warps=warps, num_stages=stages)}


def band_pairs_row(k: int, arch: int, *, block: int | None = None, singles: bool = False) -> dict:
    """Compile the float16 x 3 pairs kernel (``band_topk_triton(schedule="pairs")``) with ``pairs_config(k)``, its
    tiles ``block`` rows a side if given; the row of the results."""
    from tfp_kernels.order import band_pairs_triton as bpt

    config = dict(btk.pairs_config(k, "cuda"))
    warps, stages = config.pop("num_warps"), config.pop("num_stages")
    block = block or config["BLOCK_M"]
    config.pop("BLOCK_M")
    constants = {"K": k, "CAP": btk.candidate_slots({}, block, "BLOCK_M", k), "SUPER": 8 * block, "BLOCK": block,
                 "INPUT_PRECISION": "ieee", "SPLIT": True, "SCALED": True, "SINGLES": singles, **config}
    return {"kernel": "band_pairs float16x3" + (" singles" if singles else ""), "k": k, "BLOCK": block, **config,
            "num_warps": warps, "num_stages": stages,
            **compile_seconds(bpt._band_pairs_kernel, _PAIRS_TYPES, constants, arch, num_warps=warps,
                              num_stages=stages)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ks", type=int, nargs="+", default=[64, 128, 256], help="band list lengths (powers of two)")
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for H100/H200")
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    rows = []

    def add(row: dict) -> None:
        rows.append(row)
        print(row, flush=True)

    for k in args.ks:
        add(band_topk_row(k, args.arch))
    stacked = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_D": 32}
    constants = {"K": 64, "CAP": 512, "INPUT_PRECISION": "ieee", "SPLIT": True, "SCALED": True, "DESCRIPTORS": False,
                 "STACKED": True, "SINGLES": False, **stacked}
    add({"kernel": "band_topk float16x3 stacked", "k": 64, **stacked, "num_warps": 8, "num_stages": 3,
         **compile_seconds(btk._band_topk_kernel, _BAND_TYPES, constants, args.arch, num_warps=8, num_stages=3)})
    for k in args.ks:  # the pairs kernel, its setting for each list length
        add(band_pairs_row(k, args.arch))
    # the launch options run_gpu_order.sh's band and pairs stages time (bench_band_topk's cases), at K = 64
    add(band_topk_row(64, args.arch, singles=True))
    add(band_pairs_row(64, args.arch, singles=True))
    add(band_pairs_row(64, args.arch, block=64))
    scan = {"BLOCK_U": 128, "BLOCK_W": 16, "BLOCK_D": st.SCAN_CHUNK, "HAS_VISITED": True, "HALF_ROWS": True,
            "TENSOR_CORES": True, "HAS_BEST": True}
    add({"kernel": "masked_scan tensor cores", **scan,
         **compile_seconds(st._masked_scan_kernel, _SCAN_TYPES, scan, args.arch)})
    for cosine in (False, True):
        settle = {"COSINE": cosine, "BLOCK_U": st._SETTLE_ROWS, "BLOCK_W": 4, "BLOCK_D": 16}
        add({"kernel": "settle", **settle, **compile_seconds(st._settle_kernel, _SETTLE_TYPES, settle, args.arch)})
    add({"kernel": "settle_reduce", "BLOCK": 1024,
         **compile_seconds(st._settle_reduce_kernel, _REDUCE_TYPES, {"BLOCK": 1024}, args.arch)})
    path = write_results("compile_times", "cpu", {"arch": args.arch, "triton": triton.__version__, "rows": rows},
                         out_dir=args.out_dir)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
