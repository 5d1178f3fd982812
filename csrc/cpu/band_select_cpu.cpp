// Band selection on the CPU: the epilogue of the blockwise band top-k (tfp_kernels/order/band_topk.py).
//
// For each row of a (B, N) block of squared distances (block rows are the global rows
// row_offset .. row_offset + B - 1, so the row's own column is skipped): count the entries below
// upper[i], and keep the K smallest entries >= lower[i] ordered by (value, column). Values are packed
// with their column into int64 keys (non-negative float bits order like the values) and kept in a
// bounded max-heap, one pass over the row (vectorised by chunks of columns, select_row). Rows are
// processed in parallel.
//
// With row_sq (B,) and col_sq (N,) the block holds dot products instead, and each squared distance is
// formed on the fly as max((-2 dot + col_sq[j]) + row_sq[i], 0) in float32, the very operations (and
// roundings) of the torch epilogue `dot.mul_(-2).add_(col_sq).add_(row_sq[:, None]).clamp_(min=0)`:
// one read of the block instead of three read-write passes over it (the passes cost about as much
// as the matrix product itself on a 2-core CPU).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

#include "checks.h"
#include "ops.h"

namespace tfp {

namespace {

// The per-element loops are compiled for AVX2 and for baseline x86-64 (below: the portable versions, picked by
// CPU feature and TFP_KERNELS_SELECT_ISA at each op call, see select_isa), beside hand-written AVX-512 versions;
// the helpers they call must be inlined into each of them (a helper compiled once, at the baseline, runs at its
// 4 lanes: measured, 1 ms per 1,024 x 1,024 block of the row side instead of 0.44 ms).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define TFP_X86_SELECT_KERNELS 1
#endif
#if defined(__GNUC__) || defined(__clang__)
#define TFP_INLINE __attribute__((always_inline)) inline
#else
#define TFP_INLINE inline
#endif

// The squared distance of column j as the torch epilogue forms it (from a dot product when FromDots).
template <bool FromDots>
TFP_INLINE float entry_s2(const float* row, const float* col_sq, float row_sq, int64_t j) {
  float x = row[j];
  if (FromDots) {
    x = (-2.0f * x + col_sq[j]) + row_sq;  // -2 x is exact: a fused multiply-add rounds the same
    x = x < 0.0f ? 0.0f : x;               // clamp_(min=0); never -0.0 here (sums of >= +0 terms)
  }
  return x;
}

// A row's running selection: its keys (value bits << 32 | column) in a max-heap of `size` entries (at most
// k), and its cutoff, the value of its K-th best key once K are held (+inf before): larger values cannot
// enter, equal ones may (by column). band_select keeps one per thread; band_select_pairs one per row in
// its (N, K) tables.
struct HeapRow {
  int64_t* keys = nullptr;
  int32_t* size = nullptr;
  float cutoff = std::numeric_limits<float>::infinity();
  int64_t k = 0;

  HeapRow() = default;
  HeapRow(int64_t* keys_, int32_t* size_, int64_t k_) : keys(keys_), size(size_), k(k_) {
    if (*size == k) {
      const int32_t worst = static_cast<int32_t>(keys[0] >> 32);
      std::memcpy(&cutoff, &worst, sizeof(cutoff));
    }
  }

  void offer(float x, int64_t col) {
    int32_t bits;
    std::memcpy(&bits, &x, sizeof(bits));
    const int64_t key = (static_cast<int64_t>(bits) << 32) | col;
    int64_t* end = keys + *size;
    if (*size < k) {
      *end = key;
      std::push_heap(keys, end + 1);
      ++*size;
    } else if (key < keys[0]) {
      std::pop_heap(keys, end);
      end[-1] = key;
      std::push_heap(keys, end);
    } else {
      return;
    }
    if (*size == k) {
      const int32_t worst = static_cast<int32_t>(keys[0] >> 32);
      std::memcpy(&cutoff, &worst, sizeof(cutoff));
    }
  }
};

// Column j of a row offered to `heap` (as col_base + j) unless it is the row itself, below `lower` or past the
// heap's cutoff.
template <typename Heap>
TFP_INLINE void offer_entry(Heap& heap, float x, int64_t j, int64_t self, float lower, int64_t col_base) {
  if (j == self || !(x >= lower) || x > heap.cutoff) return;
  heap.offer(x, col_base + j);
}

// The end of a row after its chunks of 16 (select_row and its AVX-512 version): columns j0 .. n - 1 one by
// one, then the row's own column taken out of the count below `upper`; returns what it adds to the count.
template <bool FromDots, typename Heap>
TFP_INLINE int32_t finish_row(const float* row, const float* col_sq, float row_sq, int64_t j0, int64_t n,
                              int64_t self, float lower, float upper, Heap& heap, int64_t col_base) {
  int32_t below = 0;
  for (int64_t j = j0; j < n; ++j) {
    const float x = entry_s2<FromDots>(row, col_sq, row_sq, j);
    below += x < upper;
    offer_entry(heap, x, j, self, lower, col_base);
  }
  if (self >= 0 && self < n) below -= entry_s2<FromDots>(row, col_sq, row_sq, self) < upper;  // not itself
  return below;
}

// One row: the count of columns (self excluded) below `upper`; the columns >= `lower` are offered to `heap`
// (which keeps the K smallest keys (value bits, column) and its cutoff: the value of its K-th best key once
// K are held, larger values cannot enter, equal ones may by column). Columns go by chunks of 16: the chunk's
// values, its count below `upper` and whether any value may enter the heap are computed branch-free
// (vectorised); only chunks with a candidate (rare once the heap is full) are walked one by one. Column j
// is reported to the heap as col_base + j.
template <bool FromDots, typename Heap>
TFP_INLINE int32_t select_row(const float* row, const float* col_sq, float row_sq, int64_t n, int64_t self,
                              float lower, float upper, Heap& heap, int64_t col_base = 0) {
  constexpr int kChunk = 16;
  int32_t below = 0;
  float xs[kChunk];
  int64_t j0 = 0;
  for (; j0 + kChunk <= n; j0 += kChunk) {
    int32_t count = 0, any = 0;
    const float cutoff = heap.cutoff;
    for (int l = 0; l < kChunk; ++l) {
      const float x = entry_s2<FromDots>(row, col_sq, row_sq, j0 + l);
      xs[l] = x;
      count += x < upper;
      any |= (x >= lower) & (x <= cutoff);
    }
    below += count;
    if (!any) continue;
    for (int l = 0; l < kChunk; ++l) offer_entry(heap, xs[l], j0 + l, self, lower, col_base);
  }
  return below + finish_row<FromDots>(row, col_sq, row_sq, j0, n, self, lower, upper, heap, col_base);
}

// The s2 of pair (col0 + j, row0 + i) as the list row col0 + j's own epilogue forms it, from the product `dot`
// of the pair: (-2 dot + sq[row0 + i]) + sq[col0 + j], clamped at 0.
TFP_INLINE float column_entry_s2(float dot, float r_sq, float c_sq) {
  const float x = (-2.0f * dot + r_sq) + c_sq;
  return x < 0.0f ? 0.0f : x;
}

// The column side's state for the block's columns j_begin .. j_end - 1 (global rows col0 + j): each column's
// heap and, in arrays beside the block's rows so that a chunk of 16 columns reads them as vectors, its bounds,
// cutoff (cut[j] mirrors heaps[j].cutoff) and count below its upper bound.
struct ColumnStates {
  int64_t row0, first, width;
  std::vector<HeapRow> heaps;
  std::vector<float> lo, hi, c_sq, cut;
  std::vector<int32_t> below;

  ColumnStates(int64_t row0_, int64_t first_, int64_t width_, const float* sq, const float* lower,
               const float* upper, int64_t* keys, int32_t* sizes, int64_t k)
      : row0(row0_), first(first_), width(width_), heaps(width_), lo(width_), hi(width_), c_sq(width_),
        cut(width_), below(width_, 0) {
    for (int64_t j = 0; j < width; ++j) {
      const int64_t g = first + j;
      heaps[j] = HeapRow(keys + g * k, sizes + g, k);
      lo[j] = lower[g];
      hi[j] = upper[g];
      c_sq[j] = sq[g];
      cut[j] = heaps[j].cutoff;
    }
  }

  void offer(int64_t j, float x, int64_t i) {
    if (x >= lo[j] && x <= cut[j]) {
      heaps[j].offer(x, row0 + i);
      cut[j] = heaps[j].cutoff;
    }
  }

  // Columns from .. width - 1 of the block's row i (`row`: its first column, j_begin), one by one.
  void columns_one_by_one(const float* row, float r_sq, int64_t i, int64_t from) {
    for (int64_t j = from; j < width; ++j) {
      const float x = column_entry_s2(row[j], r_sq, c_sq[j]);
      below[j] += x < hi[j];
      offer(j, x, i);
    }
  }

  void finish(int32_t* close) {
    for (int64_t j = 0; j < width; ++j) close[first + j] += below[j];
  }
};

// select_row's two instances and the column side in portable C++, compiled once per ISA by
// TFP_SELECT_PORTABLE_VERSIONS(attributes, suffix) (GCC vectorises only part of their chunk loops, see the
// AVX-512 versions below). The column side reads the block row by row, in memory order (a walk down each
// column, 4 KB apart at 1,024 columns, missed the caches and the prefetchers on every row: 5x the row side's
// time). Every version does the same float32 operations in the same order, so all give the same lists, bit
// for bit (tested under each ISA the CPU has).
#define TFP_SELECT_PORTABLE_VERSIONS(ATTRS, SUFFIX)                                                                \
  ATTRS int32_t select_row_dots_##SUFFIX(const float* row, const float* col_sq, float row_sq, int64_t n,            \
                                         int64_t self, float lower, float upper, HeapRow& heap, int64_t col_base) { \
    return select_row<true>(row, col_sq, row_sq, n, self, lower, upper, heap, col_base);                            \
  }                                                                                                                 \
  ATTRS int32_t select_row_s2_##SUFFIX(const float* row, int64_t n, int64_t self, float lower, float upper,         \
                                       HeapRow& heap) {                                                             \
    return select_row<false>(row, nullptr, 0.0f, n, self, lower, upper, heap);                                      \
  }                                                                                                                 \
  ATTRS void select_columns_##SUFFIX(const float* dot, int64_t b, int64_t c, int64_t j_begin, ColumnStates& cols,   \
                                     const float* sq) {                                                             \
    constexpr int64_t kChunk = 16;                                                                                  \
    for (int64_t i = 0; i < b; ++i) {                                                                               \
      const float* row = dot + i * c + j_begin;                                                                     \
      const float r_sq = sq[cols.row0 + i];                                                                         \
      int64_t j0 = 0;                                                                                               \
      for (; j0 + kChunk <= cols.width; j0 += kChunk) {                                                             \
        float xs[kChunk];                                                                                           \
        int32_t any = 0;                                                                                            \
        for (int64_t l = 0; l < kChunk; ++l) {                                                                      \
          const float x = column_entry_s2(row[j0 + l], r_sq, cols.c_sq[j0 + l]);                                    \
          xs[l] = x;                                                                                                \
          cols.below[j0 + l] += x < cols.hi[j0 + l];                                                                \
          any |= (x >= cols.lo[j0 + l]) & (x <= cols.cut[j0 + l]);                                                  \
        }                                                                                                           \
        if (!any) continue;                                                                                         \
        for (int64_t l = 0; l < kChunk; ++l) cols.offer(j0 + l, xs[l], i);                                          \
      }                                                                                                             \
      cols.columns_one_by_one(row, r_sq, i, j0);                                                                    \
    }                                                                                                               \
  }

TFP_SELECT_PORTABLE_VERSIONS(, portable)
#ifdef TFP_X86_SELECT_KERNELS
// (AVX2 without FMA: and -2 x is exact, so a fused multiply-add would round the same anyway)
TFP_SELECT_PORTABLE_VERSIONS(__attribute__((target("avx2"))), avx2)
#endif

#ifdef TFP_X86_SELECT_KERNELS
// AVX-512 versions: a chunk of 16 columns is one vector, the same operations in the same order as the
// portable code (a product by -2, exact; two float32 additions; the clamp as a maximum with +0, which gives
// the same value: the sums are never -0), so the lists are bit for bit the same. Measured on a 2-core
// Xeon with full heaps (K = 64): a 1,024 x 1,024 off-diagonal block 1.56 -> 0.64 ms (both sides), the row
// side alone 0.44 -> 0.13 ms.

template <bool FromDots>
__attribute__((target("avx512f,popcnt"))) int32_t select_row_avx512(const float* row, const float* col_sq,
                                                                     float row_sq, int64_t n, int64_t self,
                                                                     float lower, float upper, HeapRow& heap,
                                                                     int64_t col_base) {
  int32_t below = 0;
  const __m512 minus2 = _mm512_set1_ps(-2.0f), zero = _mm512_setzero_ps(), v_row = _mm512_set1_ps(row_sq);
  const __m512 v_lo = _mm512_set1_ps(lower), v_hi = _mm512_set1_ps(upper);
  alignas(64) float xs[16];
  int64_t j0 = 0;
  for (; j0 + 16 <= n; j0 += 16) {
    __m512 x = _mm512_loadu_ps(row + j0);
    if (FromDots) {
      x = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(minus2, x), _mm512_loadu_ps(col_sq + j0)), v_row);
      x = _mm512_max_ps(x, zero);
    }
    below += __builtin_popcount(static_cast<unsigned>(_mm512_cmp_ps_mask(x, v_hi, _CMP_LT_OQ)));
    unsigned cand = _mm512_cmp_ps_mask(x, v_lo, _CMP_GE_OQ) &
                    _mm512_cmp_ps_mask(x, _mm512_set1_ps(heap.cutoff), _CMP_LE_OQ);
    if (!cand) continue;
    _mm512_store_ps(xs, x);
    for (; cand; cand &= cand - 1) {  // (lanes outside the mask are rejected by any later cutoff too)
      const int l = __builtin_ctz(cand);
      offer_entry(heap, xs[l], j0 + l, self, lower, col_base);
    }
  }
  return below + finish_row<FromDots>(row, col_sq, row_sq, j0, n, self, lower, upper, heap, col_base);
}

__attribute__((target("avx512f"))) void select_columns_avx512(const float* dot, int64_t b, int64_t c,
                                                               int64_t j_begin, ColumnStates& cols,
                                                               const float* sq) {
  const __m512 minus2 = _mm512_set1_ps(-2.0f), zero = _mm512_setzero_ps();
  const __m512i one = _mm512_set1_epi32(1);
  alignas(64) float xs[16];
  for (int64_t i = 0; i < b; ++i) {
    const float* row = dot + i * c + j_begin;
    const float r_sq = sq[cols.row0 + i];
    const __m512 v_r = _mm512_set1_ps(r_sq);
    int64_t j0 = 0;
    for (; j0 + 16 <= cols.width; j0 += 16) {
      __m512 x = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(minus2, _mm512_loadu_ps(row + j0)), v_r),
                               _mm512_loadu_ps(cols.c_sq.data() + j0));
      x = _mm512_max_ps(x, zero);
      const __mmask16 lt = _mm512_cmp_ps_mask(x, _mm512_loadu_ps(cols.hi.data() + j0), _CMP_LT_OQ);
      int32_t* below = cols.below.data() + j0;
      const __m512i counts = _mm512_loadu_si512(below);
      _mm512_storeu_si512(below, _mm512_mask_add_epi32(counts, lt, counts, one));
      unsigned cand = _mm512_cmp_ps_mask(x, _mm512_loadu_ps(cols.lo.data() + j0), _CMP_GE_OQ) &
                      _mm512_cmp_ps_mask(x, _mm512_loadu_ps(cols.cut.data() + j0), _CMP_LE_OQ);
      if (!cand) continue;
      _mm512_store_ps(xs, x);
      for (; cand; cand &= cand - 1) {
        const int l = __builtin_ctz(cand);
        cols.offer(j0 + l, xs[l], i);
      }
    }
    cols.columns_one_by_one(row, r_sq, i, j0);
  }
}
#endif

// Which versions the op calls use: the best the CPU has (AVX-512, AVX2, else portable), capped by
// TFP_KERNELS_SELECT_ISA (read at each op call, for the tests): "avx512" (the default: no cap), "avx2" or
// "portable" (baseline x86-64).
enum class SelectIsa { kPortable, kAvx2, kAvx512 };

SelectIsa select_isa() {
  const char* cap = std::getenv("TFP_KERNELS_SELECT_ISA");
  const std::string isa = cap ? cap : "avx512";
  TORCH_CHECK(isa == "avx512" || isa == "avx2" || isa == "portable",
              "TFP_KERNELS_SELECT_ISA must be avx512, avx2 or portable, got ", isa);
#ifdef TFP_X86_SELECT_KERNELS
  static const bool has_avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("popcnt");
  static const bool has_avx2 = __builtin_cpu_supports("avx2");
  if (isa == "avx512" && has_avx512) return SelectIsa::kAvx512;
  if (isa != "portable" && has_avx2) return SelectIsa::kAvx2;
#endif
  return SelectIsa::kPortable;
}

int32_t select_row_dots(SelectIsa isa, const float* row, const float* col_sq, float row_sq, int64_t n, int64_t self,
                        float lower, float upper, HeapRow& heap, int64_t col_base) {
#ifdef TFP_X86_SELECT_KERNELS
  if (isa == SelectIsa::kAvx512) {
    return select_row_avx512<true>(row, col_sq, row_sq, n, self, lower, upper, heap, col_base);
  }
  if (isa == SelectIsa::kAvx2) return select_row_dots_avx2(row, col_sq, row_sq, n, self, lower, upper, heap, col_base);
#endif
  return select_row_dots_portable(row, col_sq, row_sq, n, self, lower, upper, heap, col_base);
}

int32_t select_row_s2(SelectIsa isa, const float* row, int64_t n, int64_t self, float lower, float upper,
                      HeapRow& heap) {
#ifdef TFP_X86_SELECT_KERNELS
  if (isa == SelectIsa::kAvx512) return select_row_avx512<false>(row, nullptr, 0.0f, n, self, lower, upper, heap, 0);
  if (isa == SelectIsa::kAvx2) return select_row_s2_avx2(row, n, self, lower, upper, heap);
#endif
  return select_row_s2_portable(row, n, self, lower, upper, heap);
}

void select_columns(SelectIsa isa, const float* dot, int64_t b, int64_t c, int64_t row0, int64_t col0,
                    int64_t j_begin, int64_t j_end, const float* sq, const float* lower, const float* upper,
                    int64_t* keys, int32_t* sizes, int32_t* close, int64_t k) {
  ColumnStates cols(row0, col0 + j_begin, j_end - j_begin, sq, lower, upper, keys, sizes, k);
#ifdef TFP_X86_SELECT_KERNELS
  if (isa == SelectIsa::kAvx512) {
    select_columns_avx512(dot, b, c, j_begin, cols, sq);
  } else if (isa == SelectIsa::kAvx2) {
    select_columns_avx2(dot, b, c, j_begin, cols, sq);
  } else {
    select_columns_portable(dot, b, c, j_begin, cols, sq);
  }
#else
  select_columns_portable(dot, b, c, j_begin, cols, sq);
#endif
  cols.finish(close);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> band_select_cpu(const at::Tensor& s2, int64_t row_offset,
                                                               const at::Tensor& lower, const at::Tensor& upper,
                                                               int64_t k, const std::optional<at::Tensor>& row_sq,
                                                               const std::optional<at::Tensor>& col_sq) {
  TFP_CHECK_CPU(s2);
  TFP_CHECK_DIM(s2, 2);
  TFP_CHECK_DTYPE(s2, at::kFloat);
  TFP_CHECK_DTYPE(lower, at::kFloat);
  TFP_CHECK_DTYPE(upper, at::kFloat);
  TORCH_CHECK(k >= 1, "band_select: k must be >= 1, got ", k);
  const int64_t b = s2.size(0), n = s2.size(1);
  TORCH_CHECK(lower.numel() == b && upper.numel() == b, "band_select: lower and upper must have ", b, " entries");
  TORCH_CHECK(n < std::numeric_limits<int32_t>::max(), "band_select: N must be < 2^31");
  TORCH_CHECK(row_sq.has_value() == col_sq.has_value(), "band_select: pass both row_sq and col_sq, or neither");
  const bool from_dots = row_sq.has_value();
  at::Tensor rsq, csq;
  if (from_dots) {
    TFP_CHECK_DTYPE((*row_sq), at::kFloat);
    TFP_CHECK_DTYPE((*col_sq), at::kFloat);
    TORCH_CHECK(row_sq->numel() == b && col_sq->numel() == n, "band_select: row_sq must have ", b,
                " entries and col_sq ", n);
    rsq = row_sq->contiguous();
    csq = col_sq->contiguous();
  }
  const float* rsq_p = from_dots ? rsq.data_ptr<float>() : nullptr;
  const float* csq_p = from_dots ? csq.data_ptr<float>() : nullptr;
  const auto values = s2.contiguous();
  const auto lo = lower.contiguous(), hi = upper.contiguous();
  auto index = at::empty({b, k}, s2.options().dtype(at::kInt));
  auto out = at::empty({b, k}, s2.options());
  auto close = at::empty({b}, s2.options().dtype(at::kInt));
  const float* v = values.data_ptr<float>();
  const float* lo_p = lo.data_ptr<float>();
  const float* hi_p = hi.data_ptr<float>();
  int32_t* index_p = index.data_ptr<int32_t>();
  float* out_p = out.data_ptr<float>();
  int32_t* close_p = close.data_ptr<int32_t>();
  const SelectIsa isa = select_isa();
  at::parallel_for(0, b, 16, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> heap(k);
    int32_t held = 0;
    for (int64_t i = begin; i < end; ++i) {
      held = 0;
      const float* row = v + i * n;
      const int64_t self = row_offset + i;
      HeapRow selection(heap.data(), &held, k);
      const int32_t below = from_dots ? select_row_dots(isa, row, csq_p, rsq_p[i], n, self, lo_p[i], hi_p[i],
                                                        selection, 0)
                                      : select_row_s2(isa, row, n, self, lo_p[i], hi_p[i], selection);
      std::sort_heap(heap.begin(), heap.begin() + held);
      close_p[i] = below;
      for (int64_t j = 0; j < k; ++j) {
        if (j < held) {
          const int64_t key = heap[j];
          const int32_t bits = static_cast<int32_t>(key >> 32);
          float x;
          std::memcpy(&x, &bits, sizeof(x));
          index_p[i * k + j] = static_cast<int32_t>(key & 0xFFFFFFFF);
          out_p[i * k + j] = x;
        } else {
          index_p[i * k + j] = -1;
          out_p[i * k + j] = std::numeric_limits<float>::infinity();
        }
      }
    }
  });
  return {index, out, close};
}


void band_select_pairs_cpu(const at::Tensor& dot, int64_t row0, int64_t col0, const at::Tensor& sq_norms,
                           const at::Tensor& lower, const at::Tensor& upper, at::Tensor& heap_keys,
                           at::Tensor& heap_sizes, at::Tensor& num_close) {
  TFP_CHECK_CPU(dot);
  TFP_CHECK_DIM(dot, 2);
  TFP_CHECK_DTYPE(dot, at::kFloat);
  for (const at::Tensor* t : {&sq_norms, &lower, &upper}) TFP_CHECK_DTYPE((*t), at::kFloat);
  TFP_CHECK_DTYPE(heap_keys, at::kLong);
  TFP_CHECK_DTYPE(heap_sizes, at::kInt);
  TFP_CHECK_DTYPE(num_close, at::kInt);
  TORCH_CHECK(dot.is_contiguous() && heap_keys.is_contiguous() && heap_sizes.is_contiguous() &&
                  num_close.is_contiguous() && sq_norms.is_contiguous() && lower.is_contiguous() &&
                  upper.is_contiguous(),
              "band_select_pairs: every tensor must be contiguous");
  const int64_t n = sq_norms.numel(), b = dot.size(0), c = dot.size(1);
  TORCH_CHECK(heap_keys.dim() == 2 && heap_keys.size(0) == n && heap_sizes.numel() == n && num_close.numel() == n &&
                  lower.numel() == n && upper.numel() == n,
              "band_select_pairs: sq_norms, lower, upper, heap_sizes, num_close need N entries and heap_keys N rows");
  TORCH_CHECK(n < std::numeric_limits<int32_t>::max(), "band_select_pairs: N must be < 2^31");
  TORCH_CHECK(row0 >= 0 && col0 >= 0 && row0 + b <= n && col0 + c <= n, "band_select_pairs: block outside 0..N");
  TORCH_CHECK(row0 == col0 ? b == c : (row0 + b <= col0 || col0 + c <= row0),
              "band_select_pairs: a block is either diagonal (row0 == col0, square) or off the diagonal");
  const int64_t k = heap_keys.size(1);
  const float* d = dot.data_ptr<float>();
  const float* sq = sq_norms.data_ptr<float>();
  const float* lo = lower.data_ptr<float>();
  const float* hi = upper.data_ptr<float>();
  int64_t* keys = heap_keys.data_ptr<int64_t>();
  int32_t* sizes = heap_sizes.data_ptr<int32_t>();
  int32_t* close = num_close.data_ptr<int32_t>();
  const SelectIsa isa = select_isa();
  at::parallel_for(0, b, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = row0 + i;
      HeapRow heap(keys + r * k, sizes + r, k);
      // the row's own column, when this (diagonal) block holds it
      close[r] += select_row_dots(isa, d + i * c, sq + col0, sq[r], c, r - col0, lo[r], hi[r], heap, col0);
    }
  });
  if (row0 != col0) {  // the same products for the block's columns, as rows; each thread a range of columns
    at::parallel_for(0, c, 64, [&](int64_t begin, int64_t end) {
      select_columns(isa, d, b, c, row0, col0, begin, end, sq, lo, hi, keys, sizes, close, k);
    });
  }
}

}  // namespace tfp
