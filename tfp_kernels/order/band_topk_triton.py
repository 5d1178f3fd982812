"""Fused Triton kernel: blockwise squared distances + threshold band + top-k per row, with a filter epilogue.

Each program is persistent: it takes row blocks of ``BLOCK_M`` rows in turn (``pid``, ``pid + grid``, ...)
and streams every column block of ``x`` (``BLOCK_N`` columns at a time) past them (or, for the rows of one
array against those of another, the rows ``row_start ..`` of their concatenation past its first ``n_cols``
columns: a row is never a column there, so the self tests below never fire). Per tile it

1. computes the (BLOCK_M, BLOCK_N) squared distances ``|a|^2 + |b|^2 - 2 a.b`` with ``tl.dot``
   (tensor cores for bf16/fp16 rows, IEEE float32 products for float32 rows; float32 accumulation; split
   rows: three products per BLOCK_D chunk in a fresh accumulator, the chunks added in float32, float16
   rows scaled per row by powers of two, undone in the epilogue); the tiles come from masked pointer loads
   or, with ``DESCRIPTORS`` (16-bit rows), through tensor descriptors (Hopper's tensor memory accelerator:
   no per-element address or mask in the product loop, rows and entries past the end read as zeros);
2. counts the entries below ``upper`` (``num_close``; the row itself is taken out in the diagonal tiles
   only);
3. keeps the *candidates*: entries at or above ``lower`` (the band) and strictly below the row's
   ``cutoff``, the squared distance of its current K-th best entry (``+inf`` until K are known), and
   appends their s2 and column to the row's slots of a small scratch (exclusive prefix sum for the
   slots; 32-bit stores, so that no 64-bit tile is ever held in registers).

Only when a row's scratch slots could overflow (and once at the end) are the candidates *merged* into
the row's sorted K best: entries are packed into int64 keys ``(float32 bits << 32) | column`` so that one
integer sort orders them by (distance, index) (squared distances are >= 0, so their bit patterns order
like the values), and a sorted-ascending list and a sorted-descending chunk merge by elementwise minimum
(a bitonic half-cleaner) plus one more sort. The cutoff then tightens to the new K-th best.

Why this is exact: columns are streamed in increasing index order, so an entry whose distance *equals*
the cutoff comes after the cutoff's own column and loses the (distance, index) tie-break; entries above
the cutoff can never enter; entries not yet merged only make the true K-th best smaller than the cutoff.

Why this is fast: with rows in no particular order relative to their neighbours, a row's running top-K
improves about ``K ln(N / K)`` times over N columns, so after the first tiles almost every entry is
filtered out by two comparisons; the per-element work is a GEMM epilogue (a few comparisons, one
prefix sum, predicated stores), not the sort of the previous version of this kernel (which merged whole
tiles by sorting whenever any row of the program improved, 9-10% of the bf16 GEMM rate on an H200). But
the 128 rows of a tile together keep some candidate in nearly every tile (measured on the CPU with the
benchmark's clustered rows: every one of the 512 tiles of a row block at N = 65,536, K = 64, ~560
candidates per row), so the prefix sum and the stores run at every tile; the ``SINGLES`` launch option
takes the tiles where no row keeps more than one (11% of them there, 37% at N = 262,144, K = 128) by two
row reductions instead (see ``append_candidates``).
Never materialises N x N; memory O(N K) plus a scratch per program row of K int64 keys and CAP (s2, column)
pairs (2 x 132 SMs x 128 x (64 x 8 + 512 x 8) B = 156 MB on an H100, whatever N).
Semantics: :mod:`tfp_kernels.order.band_topk`.
"""

from __future__ import annotations

import os
import warnings

import torch

from .band_tiles_triton import ACC_CHUNK, HAVE_TRITON, candidate_slots, check_split_chunk
from .band_topk import SPLIT_DTYPES, BandLists, split_rows

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .band_tiles_triton import append_candidates, list_cutoff, merge_candidates, store_lists, tile_s2

_MAX_KEY = 0x7FFFFFFFFFFFFFFF


def triton_available() -> bool:
    """Whether the Triton kernel can run here (Triton importable and a CUDA device, or the interpreter)."""
    if not HAVE_TRITON:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1"


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_runs_on(device: torch.device | str) -> bool:
    """Whether the Triton kernels can take tensors of ``device``: CUDA tensors when compiled, CPU tensors only
    under the interpreter (``TRITON_INTERPRET=1``)."""
    if not HAVE_TRITON:
        return False
    if _interpreted():
        return True
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def require_triton(name: str, device: torch.device | str) -> None:
    """ValueError naming the argument ``name`` (its value ``"triton"``) where Triton cannot take tensors of
    ``device`` (:func:`triton_runs_on`)."""
    if not triton_runs_on(device):
        raise ValueError(f"{name}='triton' needs Triton and CUDA embeddings (CPU ones only under TRITON_INTERPRET=1), "
                         f"got embeddings on {device}")


if HAVE_TRITON:

    # (row_start: the column count of a rows-against-columns launch, any value; specialised on its divisibility,
    # each ring step could compile another variant of a kernel that takes seconds to compile)
    @triton.jit(do_not_specialize=["row_start"])
    def _band_topk_kernel(
        out_index_ptr, out_s2_ptr, out_close_ptr,
        x_ptr, x_lo_ptr, scale_ptr, stride_xn, stride_xd,
        a_desc, b_desc, a_lo_desc, b_lo_desc,
        sq_norms_ptr, lower_ptr, upper_ptr, best_ptr, cand_s2_ptr, cand_col_ptr,
        row_start, row_end, n_cols, dim,
        K: tl.constexpr, CAP: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        INPUT_PRECISION: tl.constexpr, SPLIT: tl.constexpr, SCALED: tl.constexpr, DESCRIPTORS: tl.constexpr,
        STACKED: tl.constexpr, SINGLES: tl.constexpr,
    ):
        pid = tl.program_id(0)
        num_programs = tl.num_programs(0)
        offs_k = tl.arange(0, K)
        opaque_zero = n_cols.to(tl.float32) * 0.0  # (see tile_s2)
        local = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # this program's scratch rows
        best_buf = best_ptr + local[:, None] * K
        cand_s2_buf = cand_s2_ptr + local[:, None] * CAP
        cand_col_buf = cand_col_ptr + local[:, None] * CAP
        for row0 in range(row_start + pid * BLOCK_M, row_end, num_programs * BLOCK_M):
            rows = row0 + tl.arange(0, BLOCK_M)
            row_ok = rows < row_end
            rows64 = rows.to(tl.int64)
            out_rows = rows - row_start  # (the outputs and the bounds hold the listed rows only)
            row_norm = tl.load(sq_norms_ptr + rows, mask=row_ok, other=0.0)
            row_scale = row_norm  # (unused unless SCALED)
            if SCALED:  # rows stored as x / scale (powers of two)
                row_scale = tl.load(scale_ptr + rows, mask=row_ok, other=1.0)
            lower = tl.load(lower_ptr + out_rows, mask=row_ok, other=float("inf"))  # padding rows keep nothing
            upper = tl.load(upper_ptr + out_rows, mask=row_ok, other=0.0)
            tl.debug_barrier()
            tl.store(best_buf + offs_k[None, :], tl.full((BLOCK_M, K), 0x7FFFFFFFFFFFFFFF, tl.int64))
            cutoff = tl.full((BLOCK_M,), float("inf"), tl.float32)
            count = tl.zeros((BLOCK_M,), tl.int32)
            close = tl.zeros((BLOCK_M,), tl.int32)
            for col0 in range(0, n_cols, BLOCK_N):
                cols = col0 + tl.arange(0, BLOCK_N)
                col_ok = cols < n_cols
                s2 = tile_s2(
                    x_ptr, x_lo_ptr, scale_ptr, stride_xn, stride_xd, a_desc, b_desc, a_lo_desc, b_lo_desc,
                    sq_norms_ptr, rows64, row_ok, row_norm, row_scale, row0, cols, col_ok, col0, dim, opaque_zero,
                    BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION, SPLIT, SCALED, DESCRIPTORS, STACKED,
                )
                below = s2 < upper[:, None]
                close += tl.sum(below.to(tl.int32), axis=1)
                if (col0 < row0 + BLOCK_M) & (row0 < col0 + BLOCK_N):  # a diagonal tile: the row itself
                    close -= tl.sum((below & (cols[None, :] == rows[:, None])).to(tl.int32), axis=1)
                # (columns arrive in index order: an entry tied with the cutoff comes after it and loses)
                count, most = append_candidates(s2, cols, lower, cutoff, count, count, cand_s2_buf, cand_col_buf,
                                                BLOCK_M, BLOCK_N, False, SINGLES)
                if most > 0:  # noqa: SIM102 - (the count reduction only where something was kept)
                    if tl.max(count, axis=0) > CAP - BLOCK_N:  # no room for another tile's candidates: merge
                        best = merge_candidates(best_buf, cand_s2_buf, cand_col_buf, rows, count, K, BLOCK_M)
                        cutoff, _ = list_cutoff(best)
                        count = tl.zeros((BLOCK_M,), tl.int32)
            best = merge_candidates(best_buf, cand_s2_buf, cand_col_buf, rows, count, K, BLOCK_M)
            store_lists(best, out_rows.to(tl.int64), row_ok, out_index_ptr, out_s2_ptr, K)
            tl.store(out_close_ptr + out_rows, close, mask=row_ok)


def _configs(k_pad: int, device_type: str, hopper: bool = False, split: bool = False) -> list[dict]:
    """Candidate (BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages[, DESCRIPTORS | STACKED]) for K = k_pad list
    columns; ``hopper``: 16-bit or split rows on a Hopper or newer GPU: also tiles read through tensor
    descriptors (one-product rows) or stacked products (``split`` rows, see ``_launch``)."""
    if device_type != "cuda":  # interpreter: one small tile shape
        return [{"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_D": 16, "num_warps": 4, "num_stages": 1}]
    configs = [  # each candidate costs a compile (seconds) on the first tuned call of a (K, dtype)
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_D": 64, "num_warps": 8, "num_stages": 3},
        {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_D": 64, "num_warps": 4, "num_stages": 4},
        {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_D": 64, "num_warps": 4, "num_stages": 4},
    ]
    if hopper and split:
        # split rows: the three products of a chunk waited for one by one (Triton waits for each tensor-core
        # product whose result feeds the next); stacked, one product of 4 x 32 entries and one wait per chunk
        # (the descriptor tiles were slower than the pointer ones for the split on an H200: 79.4 vs 76.6 ms)
        configs += [
            {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_D": 32, "num_warps": 8, "num_stages": 3, "STACKED": True},
            {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_D": 32, "num_warps": 4, "num_stages": 4, "STACKED": True},
        ]
    elif hopper:
        # the tensor memory accelerator's tiles (no per-element addresses or masks in the product loop); not
        # the untuned default (on an H200 they were slower for bf16 rows: 49.8 vs 44.4 ms at N = 65,536)
        configs += [
            {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_D": 64, "num_warps": 8, "num_stages": 3, "DESCRIPTORS": True},
            {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_D": 64, "num_warps": 4, "num_stages": 4, "DESCRIPTORS": True},
        ]
    if k_pad > 64:
        # the merge sorts (BLOCK_M, K) int64 keys twice; their code grows with the keys per thread, and so
        # does the compile: for sm_90 on a 2-core host (Triton 3.8), K = 128 took 61 s with BLOCK_M = 128 and 8
        # warps, 58 s with 64 rows and 4 warps, 23 s with 64 rows and 8 warps; K = 256 263 s with 64 rows and
        # 4 warps (an H200 run did not finish its first band call in 60 s), 84 s with 8 warps, 34 s with 32
        # rows and 8 warps (K = 64, BLOCK_M = 128, 8 warps: 17 s). One setting each, 32 keys per thread (and
        # for split rows at K = 128 its stacked-products twin); their speed is not measured on a GPU yet.
        block_m = 64 if k_pad <= 128 else 32
        configs = [{"BLOCK_M": block_m, "BLOCK_N": 128, "BLOCK_D": 64, "num_warps": 8, "num_stages": 3}]
        if hopper and split and k_pad <= 128:  # (K = 128 is what k="auto" takes at N ~ 10^6)
            configs.append({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_D": 32, "num_warps": 8, "num_stages": 3,
                            "STACKED": True})
    return configs


def pairs_config(k_pad: int, device_type: str) -> dict:
    """Launch setting of the pairs kernel (:mod:`~tfp_kernels.order.band_pairs_triton`) for K = k_pad list
    columns: the row-block kernel's first setting with square tiles (BLOCK_M rows a side; 64 at K = 128 and 32 at
    K = 256, for the merge's compile, as there). Not tuned: its speed is not measured on a GPU yet."""
    if device_type != "cuda":
        return {"BLOCK_M": 16, "BLOCK_D": 16, "num_warps": 4, "num_stages": 1}
    block = 128 if k_pad <= 64 else 64 if k_pad <= 128 else 32
    return {"BLOCK_M": block, "BLOCK_D": 64, "num_warps": 8, "num_stages": 3}


#: Tuned launch settings, keyed by (device name, dim, K, input dtype).
_TUNED: dict[tuple, dict] = {}
#: Rows used to time the candidate settings (the first call of a key tunes on a prefix of its rows): 256 row
#: blocks of 128, enough to fill two waves of an H100's 132 SMs so that no tile shape wins by occupancy alone.
_TUNE_ROWS = 32768
#: Below this many rows no tuning: the first candidate (the fastest for every precision at 32,768 rows on an
#: H200), so that a training loop's first small call compiles one kernel, not three (seconds each), for a
#: kernel that runs in milliseconds there.
_MIN_TUNE_ROWS = 16384


def _descriptor_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` (N, D) with a row stride of a multiple of 16 bytes (a tensor descriptor's requirement): ``t`` itself,
    or a copy into rows padded to it (the view's columns are those of ``t``)."""
    per_16_bytes = 16 // t.element_size()
    if t.stride(1) == 1 and t.stride(0) % per_16_bytes == 0 and t.data_ptr() % 16 == 0:
        return t
    n, dim = t.shape
    padded = t.new_zeros(n, triton.cdiv(max(dim, 1), per_16_bytes) * per_16_bytes)
    padded[:, :dim] = t
    return padded[:, :dim]


def _descriptors(t: torch.Tensor, block_m: int, block_n: int, block_d: int):
    """Tensor descriptors of ``t`` (N, D) for the kernel's (BLOCK_M, BLOCK_D) row tiles and (BLOCK_N, BLOCK_D)
    column tiles (out-of-range rows and entries read as zeros)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    t = _descriptor_rows(t)
    return (TensorDescriptor.from_tensor(t, [block_m, block_d]), TensorDescriptor.from_tensor(t, [block_n, block_d]))


def _stacked_rows(hi: torch.Tensor, lo: torch.Tensor, chunk: int) -> torch.Tensor:
    """(N, 2 Dp) rows of ``STACKED`` launches: for each chunk of ``chunk`` entries, the ``lo`` part then the
    ``hi`` part; D padded with zeros to ``Dp``, a multiple of ``chunk``."""
    n, dim = hi.shape
    padded = triton.cdiv(max(dim, 1), chunk) * chunk
    parts = [torch.nn.functional.pad(t, (0, padded - dim)).view(n, padded // chunk, 1, chunk) for t in (lo, hi)]
    return torch.cat(parts, dim=2).reshape(n, 2 * padded)


def _launch(config, x, x_lo, scale, sq_norms, lower, upper, k_pad, precision, num_sms, listed=None):
    """One kernel launch: the rows of ``x`` against all of them, or with ``listed = (row_start, row_end, n_cols)``
    the rows ``row_start .. row_end - 1`` against the columns ``0 .. n_cols - 1`` (``lower``, ``upper`` and the
    results then hold the listed rows only; a row is left out of its own list only if it is also a column).
    ``config`` holds the tile shape and, optionally, ``CAP`` (candidate slots per row between merges: a multiple
    of K, at least BLOCK_N; default 4 BLOCK_N rounded up to a multiple of K),
    ``programs`` (persistent programs; default min(row blocks, 2 x SMs), one per row block off the GPU) and
    ``DESCRIPTORS`` (tiles read through tensor descriptors, the tensor memory accelerator on Hopper, instead of
    masked pointer loads; 16-bit rows only) or ``STACKED`` (split rows: the chunk's four products lo.lo',
    lo.hi', hi.lo', hi.hi' as one tensor-core product over 4 x BLOCK_D entries of an (N, 2 D) copy of the
    rows holding [lo | hi] per chunk; the same order of additions as the three products, plus the smallest
    term, in a fresh accumulator per chunk) or ``SINGLES`` (tiles where no row keeps more than one candidate
    append by row reductions: ``append_candidates``)."""
    config = dict(config)
    dim = x.shape[1]
    row_start, row_end, n_cols = listed or (0, x.shape[0], x.shape[0])
    n = row_end - row_start
    block_m = config["BLOCK_M"]
    descriptors = bool(config.pop("DESCRIPTORS", False))
    stacked = bool(config.pop("STACKED", False))
    singles = bool(config.pop("SINGLES", False))
    if descriptors and x.element_size() != 2:
        raise ValueError(f"DESCRIPTORS needs 16-bit rows (float16, bfloat16 or a split), got {x.dtype}")
    if stacked and (x_lo is None or descriptors):
        raise ValueError("STACKED needs split rows (float16x3 or bfloat16x3) and no DESCRIPTORS")
    check_split_chunk(x_lo, config["BLOCK_D"])
    cap = candidate_slots(config, config["BLOCK_N"], "BLOCK_N", k_pad)
    row_blocks = triton.cdiv(n, block_m)
    grid = config.pop("programs", None) or (min(row_blocks, 2 * num_sms) if num_sms else row_blocks)
    grid = max(1, grid)
    index = torch.empty(n, k_pad, dtype=torch.int32, device=x.device)
    s2 = torch.empty(n, k_pad, dtype=torch.float32, device=x.device)
    close = torch.empty(n, dtype=torch.int32, device=x.device)
    best = torch.empty(grid * block_m, k_pad, dtype=torch.int64, device=x.device)
    cand_s2 = torch.empty(grid * block_m, cap, dtype=torch.float32, device=x.device)
    cand_col = torch.empty(grid * block_m, cap, dtype=torch.int32, device=x.device)
    if descriptors:
        a_desc, b_desc = _descriptors(x, block_m, config["BLOCK_N"], config["BLOCK_D"])
        a_lo_desc, b_lo_desc = (a_desc, b_desc) if x_lo is None else _descriptors(
            x_lo, block_m, config["BLOCK_N"], config["BLOCK_D"])
    else:  # (unused)
        a_desc = b_desc = a_lo_desc = b_lo_desc = x
    if stacked:  # the kernel reads [lo | hi] per chunk from one array
        x = _stacked_rows(x, x_lo, config["BLOCK_D"])
    _band_topk_kernel[(grid,)](
        index, s2, close, x, x if x_lo is None else x_lo, sq_norms if scale is None else scale, x.stride(0),
        x.stride(1), a_desc, b_desc, a_lo_desc, b_lo_desc, sq_norms, lower, upper, best, cand_s2, cand_col,
        row_start, row_end, n_cols, dim, K=k_pad, CAP=cap, INPUT_PRECISION=precision, SPLIT=x_lo is not None,
        SCALED=scale is not None, DESCRIPTORS=descriptors, STACKED=stacked, SINGLES=singles, **config,
    )
    return index, s2, close


def _tuned_config(x, x_lo, scale, sq_norms, lower, upper, k_pad, precision, num_sms) -> dict:
    """The fastest of :func:`_configs` for this (device, dim, K, dtype, size class), timed on the first
    ``min(N, _TUNE_ROWS)`` rows of the first call of the class (size classes: powers of two of that count;
    timing whole million-row calls per candidate would cost minutes)."""
    hopper = (x.device.type == "cuda" and x.element_size() == 2
              and torch.cuda.get_device_capability(x.device)[0] >= 9)
    configs = _configs(k_pad, x.device.type, hopper, split=x_lo is not None)
    if len(configs) == 1 or x.shape[0] < _MIN_TUNE_ROWS:
        return configs[0]
    m = min(x.shape[0], _TUNE_ROWS)
    # by size class too: a setting timed on a 700-row warm-up call must not be the one of a 10^6-row call
    key = (
        torch.cuda.get_device_name(x.device), x.shape[1], k_pad, x.dtype, x_lo is not None,
        triton.next_power_of_2(m),
    )
    if key not in _TUNED:
        args = (x[:m], None if x_lo is None else x_lo[:m], None if scale is None else scale[:m], sq_norms[:m],
                lower[:m], upper[:m], k_pad, precision, num_sms)
        timings = []
        for config in configs:
            try:
                ms = triton.testing.do_bench(lambda c=config: _launch(c, *args), warmup=5, rep=20)
            except triton.runtime.errors.OutOfResources:  # e.g. the split's 4 tiles x stages exceed shared memory
                continue
            except Exception as err:  # noqa: BLE001 - any other failure of one setting: try the others
                warnings.warn(f"band_topk_triton: launch setting {config} skipped ({type(err).__name__}: {err})",
                              RuntimeWarning, stacklevel=3)
                continue
            timings.append((ms, config))
        if not timings:
            raise RuntimeError(f"band_topk_triton: no launch configuration compiled for {key}")
        _TUNED[key] = min(timings, key=lambda item: item[0])[1]
    return _TUNED[key]


def band_topk_triton(
    x: torch.Tensor, sq_norms: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, k: int,
    *, input_dtype: torch.dtype | None = None, config: dict | None = None, schedule: str = "rows",
    columns: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> BandLists:
    """Band top-k lists with the fused Triton kernel: every row of ``x`` against the other rows of ``x``, or
    against the rows of ``columns``.

    Args:
        x: (N, D) prepared rows, float32 (or bf16/fp16), CUDA (or CPU under ``TRITON_INTERPRET=1``).
        sq_norms: (N,) float32 squared norms of the float32 rows.
        lower, upper: (N,) float32 bounds in the squared domain.
        k: K in [1, 1024]; the kernel works with the next power of two >= 16 and returns K columns.
        input_dtype: what ``tl.dot`` multiplies: float32 (IEEE float32 products on the CUDA cores, the
            default), ``"tf32"`` (float32 rows, tensor-core products of their tf32 parts), ``torch.bfloat16``
            or ``torch.float16`` (the rows rounded; tensor cores), or
            ``"bfloat16x3"`` / ``"float16x3"`` (rows split as hi + lo, float16 ones scaled per row, three
            tensor-core products per tile summed by chunks of BLOCK_D <= :data:`ACC_CHUNK`: better than float32
            accuracy for float16, at the 16-bit rate; :func:`~tfp_kernels.order.band_topk.split_rows`).
            The caller's error bound must match:
            :func:`~tfp_kernels.order.band_topk.squared_distance_error_coef` ``(D, input_dtype)``, with
            ``acc_chunk=ACC_CHUNK`` for the split dtypes.
        config: launch settings (BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages; optional CAP, programs,
            DESCRIPTORS: see ``_launch``); default: the fastest of a few candidates (with 16-bit or split rows
            on Hopper, also tensor-descriptor tiles), timed once per (GPU, D, K, dtype, size class) on the first
            call's leading rows (below 16,384 rows: the first candidate, untimed).
        schedule: ``"rows"``: every row block against all columns (N^2 D products); ``"pairs"``: each unordered
            pair's product once (N^2 D / 2), in rounds of disjoint pairs of super blocks
            (:mod:`~tfp_kernels.order.band_pairs_triton`; pointer tiles, untuned: ``config`` from
            :func:`pairs_config` unless given). Same lists up to each product's rounding (same error bound).
        columns: None, or ``(x_cols, sq_cols)``: (C, D) other prepared rows (same dtype and device as ``x``) and
            their (C,) float32 squared norms: each row of ``x`` is listed against them (none is left out: they
            are not rows of ``x``), the lists' indices into ``x_cols``. One launch over the rows of the
            concatenation ``[x_cols; x]`` from C on, against its first C columns (a sharded build's block of
            another rank's rows; :func:`~tfp_kernels.order.band_topk.band_topk_reference` with ``columns`` is
            its reference). ``schedule="rows"`` only.

    Returns:
        :class:`~tfp_kernels.order.band_topk.BandLists` on the device of ``x``.
    """
    if not HAVE_TRITON:
        raise ImportError("band_topk_triton needs triton (pip install triton)")
    n = x.shape[0]
    if n >= 2**31:
        raise ValueError(f"band_topk_triton supports N < 2^31 rows, got {n}")
    if schedule not in ("rows", "pairs"):
        raise ValueError(f"schedule must be 'rows' or 'pairs', got {schedule!r}")
    if not 1 <= k <= 1024:
        raise ValueError(f"k must lie in [1, 1024], got {k}")
    listed = None  # (rows against columns: the launch's (row_start, row_end, n_cols))
    if columns is not None:
        if schedule != "rows":
            raise ValueError("band_topk_triton: columns= lists rows against other rows: schedule='rows' only")
        x_cols, sq_cols = columns
        if x_cols.dim() != 2 or x_cols.shape[1] != x.shape[1] or sq_cols.shape != (x_cols.shape[0],):
            raise ValueError(f"band_topk_triton: columns must be (C, {x.shape[1]}) rows and (C,) squared norms, got "
                             f"{tuple(x_cols.shape)} and {tuple(sq_cols.shape)}")
        if x_cols.shape[0] + n >= 2**31:
            raise ValueError(f"band_topk_triton supports C + N < 2^31 rows, got {x_cols.shape[0] + n}")
        listed = (x_cols.shape[0], x_cols.shape[0] + n, x_cols.shape[0])
        x = torch.cat([x_cols.to(x.dtype), x])
        sq_norms = torch.cat([sq_cols.float(), sq_norms.float()])
    input_dtype = input_dtype or torch.float32
    scale = None
    if input_dtype in SPLIT_DTYPES:
        xin, x_lo, scale = split_rows(x.float(), input_dtype)
    elif input_dtype in (torch.float32, torch.bfloat16, torch.float16):
        xin, x_lo = x.to(input_dtype).contiguous(), None
    elif input_dtype == "tf32":  # float32 rows, tensor-core products of their tf32 parts
        xin, x_lo = x.float().contiguous(), None
    else:
        raise ValueError(
            f"input_dtype must be float32, 'tf32', bfloat16, float16, 'bfloat16x3' or 'float16x3', "
            f"got {input_dtype!r}"
        )
    sq_norms, lower, upper = (t.float().contiguous() for t in (sq_norms, lower, upper))
    k_pad = max(16, triton.next_power_of_2(k))
    precision = "ieee" if input_dtype == torch.float32 else "tf32"  # (tf32 is moot for 16-bit inputs)
    num_sms = 0
    if x.device.type == "cuda" and not _interpreted():
        num_sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    if schedule == "pairs":
        from .band_pairs_triton import launch_pairs

        index, s2, close = launch_pairs(config or pairs_config(k_pad, x.device.type), xin, x_lo, scale, sq_norms,
                                        lower, upper, k_pad, precision, num_sms)
    else:
        if config is None and columns is not None:  # (the tuning times square launches of the rows)
            config = _configs(k_pad, x.device.type)[0]
        elif config is None:
            config = _tuned_config(xin, x_lo, scale, sq_norms, lower, upper, k_pad, precision, num_sms)
        index, s2, close = _launch(config, xin, x_lo, scale, sq_norms, lower, upper, k_pad, precision, num_sms,
                                   listed=listed)
    return BandLists(index[:, :k].contiguous(), s2[:, :k].contiguous(), close)
