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

// The squared distance of column j as the torch epilogue forms it (from a dot product when FromDots).
template <bool FromDots>
inline float entry_s2(const float* row, const float* col_sq, float row_sq, int64_t j) {
  float x = row[j];
  if (FromDots) {
    x = (-2.0f * x + col_sq[j]) + row_sq;  // -2 x is exact: a fused multiply-add rounds the same
    x = x < 0.0f ? 0.0f : x;               // clamp_(min=0); never -0.0 here (sums of >= +0 terms)
  }
  return x;
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define TFP_SELECT_DISPATCH __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define TFP_SELECT_DISPATCH
#endif

// One row: the count of columns (self excluded) below `upper`, and the K smallest keys (value bits, column)
// of the columns >= `lower` in a max-heap. Columns go by chunks of 16: the chunk's values, its count below
// `upper` and whether any value may enter the heap are computed branch-free (vectorised); only chunks with
// a candidate (rare once the heap is full) are walked one by one.
template <bool FromDots>
TFP_SELECT_DISPATCH int32_t select_row(const float* row, const float* col_sq, float row_sq, int64_t n, int64_t self,
                                       float lower, float upper, int64_t k, std::vector<int64_t>& heap) {
  constexpr int kChunk = 16;
  int32_t below = 0;
  // value of the K-th best key once K are held: larger values cannot enter (equal ones may, by column)
  float cutoff = std::numeric_limits<float>::infinity();
  auto offer = [&](float x, int64_t j) {
    if (j == self || !(x >= lower) || x > cutoff) return;
    int32_t bits;
    std::memcpy(&bits, &x, sizeof(bits));
    const int64_t key = (static_cast<int64_t>(bits) << 32) | j;
    if (static_cast<int64_t>(heap.size()) < k) {
      heap.push_back(key);
      std::push_heap(heap.begin(), heap.end());
    } else if (key < heap.front()) {
      std::pop_heap(heap.begin(), heap.end());
      heap.back() = key;
      std::push_heap(heap.begin(), heap.end());
    } else {
      return;
    }
    if (static_cast<int64_t>(heap.size()) == k) {
      const int32_t worst = static_cast<int32_t>(heap.front() >> 32);
      std::memcpy(&cutoff, &worst, sizeof(cutoff));
    }
  };
  float xs[kChunk];
  int64_t j0 = 0;
  for (; j0 + kChunk <= n; j0 += kChunk) {
    int32_t count = 0, any = 0;
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
    std::vector<int64_t> heap;
    heap.reserve(k + 1);
    for (int64_t i = begin; i < end; ++i) {
      heap.clear();
      const float* row = v + i * n;
      const int64_t self = row_offset + i;
      const int32_t below = from_dots ? select_row<true>(row, csq_p, rsq_p[i], n, self, lo_p[i], hi_p[i], k, heap)
                                      : select_row<false>(row, nullptr, 0.0f, n, self, lo_p[i], hi_p[i], k, heap);
      std::sort_heap(heap.begin(), heap.end());
      close_p[i] = below;
      for (int64_t j = 0; j < k; ++j) {
        if (j < static_cast<int64_t>(heap.size())) {
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

}  // namespace tfp
