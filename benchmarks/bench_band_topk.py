"""Band top-k benchmark: the fused Triton kernel vs blockwise torch vs torch's bf16 GEMM on the same shapes.

    python -m benchmarks.bench_band_topk --sizes 16384 65536 --dim 768 --k 64

For each N: the Triton kernel with split products, float16 x 3 (what ``tfp_order`` uses on CUDA: rows scaled
per row, three tensor-core products per tile summed by chunks, better than float32 accuracy) and bf16 x 3,
with tf32 products of the float32 rows, with IEEE float32 products (CUDA cores) and with plain bf16
products (tensor cores; too coarse for the ordering), the pairs kernel (``schedule="pairs"``: each unordered
pair's product once, float16 x 3 and bf16), the torch implementation (float32 GEMM + topk), and a plain bf16
matrix product ``x @ x.T`` over the same (N, N, D) problem in row blocks (the ceiling).
``tflops`` counts the problem's 2 N^2 D; ``tensor_core_tflops`` the products the kernel actually issues
(3 x for the split, half of that for the pairs kernel). Agreement: fraction of rows whose index lists equal
the torch float32 version's (``--no-torch``: the first case's; ``lists_compared_with``). The Triton launch
setting picked by the one-off tuning is recorded. Writes ``benchmarks/results/band_topk_<device>.json``.
"""

from __future__ import annotations

import argparse

import torch
import triton

from benchmarks._harness import time_call, write_results
from benchmarks.bench_order import clustered_embeddings
from tfp_kernels import estimate_threshold
from tfp_kernels.order import band_topk_triton as btk
from tfp_kernels.order.band_topk import band_topk_torch
from tfp_kernels.order.band_topk_triton import band_topk_triton


def _gemm_blocks(xb: torch.Tensor, block: int = 8192) -> None:
    for r0 in range(0, xb.shape[0], block):
        torch.mm(xb[r0 : r0 + block], xb.T)


#: Launch setting of the comparison kernels (tuned as the fastest for bf16 x 3, bf16 and float32 on an H200).
FIXED_CONFIG = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_D": 64, "num_warps": 8, "num_stages": 3}


def bench(n: int, dim: int, k: int, device: str, only: list[str] | None = None,
          torch_reference: bool = True) -> dict:
    x = clustered_embeddings(n, dim, device=device)
    sq = x.square().sum(dim=1)
    t = estimate_threshold(x)
    lower = torch.full((n,), t * t * 0.999, device=device)
    upper = torch.full((n,), t * t * 1.001, device=device)
    flops = 2.0 * n * n * dim
    row = {"n": n, "dim": dim, "k": k}
    # the lists the others are compared with: blockwise torch float32, or (``torch_reference`` False: at sizes
    # where its ~15 TFLOP/s cost minutes) the first case's
    ref = band_topk_torch(x, sq, lower, upper, k) if torch_reference else None
    # the production precision (float16 x 3) with its tuned launch setting; the others, for comparison, with the
    # setting the tuning picked for every precision on an H200 (one compile each instead of three)
    fixed = None if device != "cuda" else FIXED_CONFIG
    tiles = None if fixed is None else {**fixed, "DESCRIPTORS": True}  # the same tiles through tensor descriptors

    k_pad = triton.next_power_of_2(max(k, 16))
    # the SINGLES cases' settings (those they are compared at: the fixed one, or K > 64's own)
    rows_setting = fixed if fixed is not None and k_pad <= 64 else btk._configs(k_pad, device)[0]
    pairs_setting = btk.pairs_config(k_pad, device)

    def kernel(dtype, config, schedule="rows"):
        return lambda: band_topk_triton(x, sq, lower, upper, k, input_dtype=dtype, config=config, schedule=schedule)

    cases = {
        "triton_fp16x3": (kernel("float16x3", None), 3),
        # each unordered pair's product once (half the products of the same problem), its untuned setting
        "triton_fp16x3_pairs": (kernel("float16x3", None, "pairs"), 1.5),
        # tiles where no row keeps more than one candidate appended by row reductions (SINGLES)
        "triton_fp16x3_singles": (kernel("float16x3", {**rows_setting, "SINGLES": True}), 3),
        "triton_fp16x3_pairs_singles": (kernel("float16x3", {**pairs_setting, "SINGLES": True}, "pairs"), 1.5),
        # 64-row tiles (K = 128's setting; fewer registers: 640 vs 3,016 bytes of spills per thread for sm_90)
        "triton_fp16x3_pairs_b64": (kernel("float16x3", {**pairs_setting, "BLOCK_M": min(pairs_setting["BLOCK_M"], 64)},
                                           "pairs"), 1.5),
        "triton_bf16_pairs": (kernel(torch.bfloat16, None, "pairs"), 0.5),
        "triton_fp16x3_pointer": (kernel("float16x3", fixed), 3),
        "triton_fp16x3_descriptors": (kernel("float16x3", tiles), 3),
        # the chunk's four products as one tensor-core product (one wait per chunk instead of three)
        "triton_fp16x3_stacked": (kernel("float16x3", None if fixed is None else {**fixed, "BLOCK_D": 32,
                                                                                  "STACKED": True}), 3),
        "triton_bf16x3": (kernel("bfloat16x3", fixed), 3),
        "triton_tf32": (kernel("tf32", fixed), 1),
        "triton_fp32_ieee": (kernel(torch.float32, fixed), 1),
        "triton_bf16": (kernel(torch.bfloat16, fixed), 1),
        "triton_bf16_descriptors": (kernel(torch.bfloat16, tiles), 1),
        "torch_fp32": (lambda: band_topk_torch(x, sq, lower, upper, k), 1),
    }
    if not torch_reference:
        del cases["torch_fp32"]
    if device != "cuda":  # (tensor descriptors: the same kernel path as the pointer tiles off the GPU)
        cases = {name: case for name, case in cases.items() if "descriptors" not in name}
    if only:
        # (in the order given: without the torch lists, the first is the one the others are compared with)
        cases = {name: cases[name] for name in [*only, "torch_fp32"] if name in cases}
    compared_with = "torch_fp32" if torch_reference else next(iter(cases), None)
    row["lists_compared_with"] = compared_with
    for name, (fn, products) in cases.items():
        try:
            out = fn()  # (the first Triton call of a precision also tunes its launch setting)
        except Exception as err:  # noqa: BLE001 - e.g. a launch setting that does not compile on this Triton
            row[name] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"}
            print(f"{name}: {row[name]['error']}", flush=True)
            continue
        if ref is None:
            ref = out
        timing = time_call(fn, device=device, warmup=1, repeat=3, max_seconds=60)
        tflops = flops / (timing["median_ms"] * 1e-3) / 1e12
        row[name] = {**timing, "tflops": tflops, "tensor_core_tflops": tflops * products,
                     "rows_equal_to_reference": float((out.index == ref.index).all(dim=1).float().mean())}
    row["triton_launch_settings"] = {str(key): config for key, config in btk._TUNED.items()}
    xb = x.bfloat16()
    timing = time_call(lambda: _gemm_blocks(xb), device=device, warmup=1, repeat=3)
    row["torch_bf16_gemm"] = {**timing, "tflops": flops / (timing["median_ms"] * 1e-3) / 1e12}
    xf = x.float()
    timing = time_call(lambda: _gemm_blocks(xf), device=device, warmup=1, repeat=3)
    row["torch_fp32_gemm"] = {**timing, "tflops": flops / (timing["median_ms"] * 1e-3) / 1e12}
    for name in cases:
        if name.startswith("torch") or "tflops" not in row[name]:
            continue
        row[name]["fraction_of_bf16_gemm"] = row[name]["tflops"] / row["torch_bf16_gemm"]["tflops"]
        row[name]["tensor_core_fraction_of_bf16_gemm"] = (
            row[name]["tensor_core_tflops"] / row["torch_bf16_gemm"]["tflops"])
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--sizes", type=int, nargs="+", default=[16384, 65536])
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--cases", nargs="+", default=None,
                   help="only these kernels (names as in the JSON, e.g. triton_fp16x3 triton_bf16); torch_fp32 always")
    p.add_argument("--no-torch", action="store_true",
                   help="no blockwise torch float32 lists (minutes at N >= 262,144): the cases are compared with the "
                        "first one's lists")
    p.add_argument("--stage", default=None, help="the JSON's name (default band_topk, band_topk_k<K>)")
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    rows = []
    for n in args.sizes:
        row = bench(n, args.dim, args.k, args.device, args.cases, torch_reference=not args.no_torch)
        rows.append(row)
        print(f"N={n}: " + "  ".join(
            f"{name} {value['median_ms']:.1f} ms ({value['tflops']:.1f} TFLOP/s)"
            for name, value in row.items() if isinstance(value, dict) and "tflops" in value),
            flush=True)
    stage = args.stage or ("band_topk" if args.k == 64 else f"band_topk_k{args.k}")
    path = write_results(stage, args.device, {"rows": rows}, out_dir=args.out_dir)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
