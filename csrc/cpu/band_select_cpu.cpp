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
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "checks.h"
#include "ops.h"

namespace tfp {

namespace {

// The per-element loops are compiled for AVX-512, AVX2 and baseline x86-64 (picked by CPU feature at load): the
// dispatched functions below, and the helpers they call, which must be inlined into each of them (a helper
// compiled once, outside the clones, runs at the baseline's 4 lanes: measured, 1 ms per 1,024 x 1,024 block
// of the row side instead of ~0.2 ms).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define TFP_SELECT_DISPATCH __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define TFP_SELECT_DISPATCH
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
  auto offer = [&](float x, int64_t j) {
    if (j == self || !(x >= lower) || x > heap.cutoff) return;
    heap.offer(x, col_base + j);
  };
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
    for (int l = 0; l < kChunk; ++l) offer(xs[l], j0 + l);
  }
  for (int64_t j = j0; j < n; ++j) {
    const float x = entry_s2<FromDots>(row, col_sq, row_sq, j);
    below += x < upper;
    offer(x, j);
  }
  if (self >= 0 && self < n) below -= entry_s2<FromDots>(row, col_sq, row_sq, self) < upper;  // not itself
  return below;
}

// select_row's two instances, compiled for AVX-512, AVX2 and baseline x86-64 (picked by CPU feature).
TFP_SELECT_DISPATCH int32_t select_row_dots(const float* row, const float* col_sq, float row_sq, int64_t n,
                                            int64_t self, float lower, float upper, HeapRow& heap,
                                            int64_t col_base) {
  return select_row<true>(row, col_sq, row_sq, n, self, lower, upper, heap, col_base);
}

TFP_SELECT_DISPATCH int32_t select_row_s2(const float* row, int64_t n, int64_t self, float lower, float upper,
                                          HeapRow& heap) {
  return select_row<false>(row, nullptr, 0.0f, n, self, lower, upper, heap);
}

// Column side of an off-diagonal block for its columns j_begin .. j_end - 1 (global rows col0 + j) against the
// block's b rows. The block is read row by row, in memory order (a walk down each column, 4 KB apart at 1,024
// columns, missed the caches and the prefetchers on every row: 5x the row side's time), with each column's
// bounds, cutoff and count in arrays beside the row, so that a row's chunk of 16 columns is branch-free.
TFP_SELECT_DISPATCH void select_columns(const float* dot, int64_t b, int64_t c, int64_t row0, int64_t col0,
                                        int64_t j_begin, int64_t j_end, const float* sq, const float* lower,
                                        const float* upper, int64_t* keys, int32_t* sizes, int32_t* close,
                                        int64_t k) {
  constexpr int64_t kChunk = 16;
  const int64_t width = j_end - j_begin;
  std::vector<HeapRow> heaps(width);
  // (cut[j] mirrors heaps[j].cutoff)
  std::vector<float> lo(width), hi(width), c_sq(width), cut(width);
  std::vector<int32_t> below(width, 0);
  for (int64_t j = 0; j < width; ++j) {
    const int64_t g = col0 + j_begin + j;
    heaps[j] = HeapRow(keys + g * k, sizes + g, k);
    lo[j] = lower[g];
    hi[j] = upper[g];
    c_sq[j] = sq[g];
    cut[j] = heaps[j].cutoff;
  }
  auto offer = [&](int64_t j, float x, int64_t i) {
    if (x >= lo[j] && x <= cut[j]) {
      heaps[j].offer(x, row0 + i);
      cut[j] = heaps[j].cutoff;
    }
  };
  for (int64_t i = 0; i < b; ++i) {
    const float* row = dot + i * c + j_begin;
    const float r_sq = sq[row0 + i];
    int64_t j0 = 0;
    for (; j0 + kChunk <= width; j0 += kChunk) {
      float xs[kChunk];
      int32_t any = 0;
      for (int64_t l = 0; l < kChunk; ++l) {
        // the s2 of pair (col0 + j, row0 + i) as that column's own row epilogue forms it: (-2 dot + sq[row0 + i])
        // + sq[col0 + j]
        float x = (-2.0f * row[j0 + l] + r_sq) + c_sq[j0 + l];
        x = x < 0.0f ? 0.0f : x;
        xs[l] = x;
        below[j0 + l] += x < hi[j0 + l];
        any |= (x >= lo[j0 + l]) & (x <= cut[j0 + l]);
      }
      if (!any) continue;
      for (int64_t l = 0; l < kChunk; ++l) offer(j0 + l, xs[l], i);
    }
    for (int64_t j = j0; j < width; ++j) {
      float x = (-2.0f * row[j] + r_sq) + c_sq[j];
      x = x < 0.0f ? 0.0f : x;
      below[j] += x < hi[j];
      offer(j, x, i);
    }
  }
  for (int64_t j = 0; j < width; ++j) close[col0 + j_begin + j] += below[j];
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
  at::parallel_for(0, b, 16, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> heap(k);
    int32_t held = 0;
    for (int64_t i = begin; i < end; ++i) {
      held = 0;
      const float* row = v + i * n;
      const int64_t self = row_offset + i;
      HeapRow selection(heap.data(), &held, k);
      const int32_t below = from_dots ? select_row_dots(row, csq_p, rsq_p[i], n, self, lo_p[i], hi_p[i], selection, 0)
                                      : select_row_s2(row, n, self, lo_p[i], hi_p[i], selection);
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
  at::parallel_for(0, b, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = row0 + i;
      HeapRow heap(keys + r * k, sizes + r, k);
      // the row's own column, when this (diagonal) block holds it
      close[r] += select_row_dots(d + i * c, sq + col0, sq[r], c, r - col0, lo[r], hi[r], heap, col0);
    }
  });
  if (row0 != col0) {  // the same products for the block's columns, as rows; each thread a range of columns
    at::parallel_for(0, c, 64, [&](int64_t begin, int64_t end) {
      select_columns(d, b, c, row0, col0, begin, end, sq, lo, hi, keys, sizes, close, k);
    });
  }
}

}  // namespace tfp
