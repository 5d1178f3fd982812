// Host side of next-fit bin packing on CUDA tensors: prefix sums and binary search with ATen, the
// pointer jumping in csrc/cuda/binpack_cuda_kernels.cu. Memory: O(n log n) int32 for the jump tables.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>
#include <vector>

#include "checks.h"
#include "cuda/binpack_cuda_kernels.h"
#include "ops.h"

namespace tfp {
namespace {

inline void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

}  // namespace

at::Tensor next_fit_pack_ids_cuda(const at::Tensor& lengths, int64_t max_len) {
  TFP_CHECK_CUDA(lengths);
  TFP_CHECK_DIM(lengths, 1);
  TFP_CHECK_DTYPE(lengths, at::kLong);
  TORCH_CHECK(max_len > 0, "max_len must be positive, got ", max_len);
  const int64_t n = lengths.numel();
  TORCH_CHECK(n < std::numeric_limits<int32_t>::max(), "next_fit on CUDA supports < 2^31 items, got ", n);
  const c10::cuda::CUDAGuard guard(lengths.device());
  if (n == 0) return at::empty({0}, lengths.options());
  const auto lens = lengths.contiguous();
  // One host sync: a length outside [1, max_len] would break the chain (next[i] == i).
  const bool bad = at::logical_or(lens.lt(1), lens.gt(max_len)).any().item<bool>();
  TORCH_CHECK(!bad, "every length must lie in [1, max_len=", max_len, "]");

  const auto ends = at::cumsum(lens, 0);              // inclusive prefix sums
  const auto begins = ends - lens;                     // exclusive prefix sums
  // next[i] = number of items whose inclusive end is <= begins[i] + max_len (> i since len_i <= max_len).
  // min(max_len, total tokens) gives the same packs and keeps the sum from overflowing int64.
  const auto capacity = at::clamp_max(ends.slice(0, n - 1, n), max_len);
  auto next = at::searchsorted(ends, begins + capacity, /*out_int32=*/true, /*right=*/true);
  const auto sentinel = at::full({1}, static_cast<int32_t>(n), next.options());
  next = at::cat({next, sentinel});                    // next[n] = n: the chain stays at the end

  auto stream = c10::cuda::getCurrentCUDAStream(lengths.device().index()).stream();
  int levels = 0;
  while ((int64_t{1} << levels) < n + 1) ++levels;     // 2^levels >= n + 1 > number of packs
  std::vector<at::Tensor> jumps;
  jumps.reserve(levels);
  jumps.push_back(next);
  for (int k = 1; k < levels; ++k) {
    auto dst = at::empty_like(next);
    check_cuda(launch_jump(jumps.back().data_ptr<int32_t>(), dst.data_ptr<int32_t>(), n + 1, stream),
               "next_fit jump kernel");
    jumps.push_back(dst);
  }
  auto chain = at::zeros({1}, next.options());         // s_0 = 0
  for (int k = levels - 1; k >= 0; --k) {
    auto out = at::empty({2 * chain.numel()}, next.options());
    check_cuda(launch_expand_chain(chain.data_ptr<int32_t>(), chain.numel(), jumps[k].data_ptr<int32_t>(),
                                   out.data_ptr<int32_t>(), stream),
               "next_fit expand kernel");
    chain = out;
  }
  auto is_start = at::zeros({n}, lens.options());
  check_cuda(launch_mark_starts(chain.data_ptr<int32_t>(), chain.numel(), static_cast<int32_t>(n),
                                is_start.data_ptr<int64_t>(), stream),
             "next_fit mark kernel");
  return at::cumsum(is_start, 0).sub_(1);
}

}  // namespace tfp
