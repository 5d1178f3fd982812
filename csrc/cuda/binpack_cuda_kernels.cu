// Raw CUDA kernels for next-fit bin packing (no ATen headers here: they dominate nvcc build time).
//
// Next fit packs items in order and opens a new pack when the next item does not fit. If a pack
// starts at item i, the next one starts at next[i] = the largest j with sum(len[i..j-1]) <= max_len.
// The pack starts are the chain 0, next[0], next[next[0]], ... < n. It is found without a
// sequential loop by pointer jumping: jump[k][i] = next applied 2^k times (jump_kernel), then the
// chain is expanded level by level from the top (expand_chain_kernel): knowing the chain elements
// s_{j*2^(k+1)}, the elements s_{j*2^(k+1) + 2^k} = jump[k][s_{j*2^(k+1)}] are filled in between.
#include <cuda_runtime.h>
#include <cstdint>

#include "cuda/binpack_cuda_kernels.h"

namespace tfp {
namespace {

constexpr int kThreads = 256;

__global__ void jump_kernel(const int32_t* __restrict__ src, int32_t* __restrict__ dst, int64_t count) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < count) dst[i] = src[src[i]];
}

__global__ void expand_chain_kernel(const int32_t* __restrict__ chain, int64_t chain_len,
                                    const int32_t* __restrict__ jump, int32_t* __restrict__ out) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j < chain_len) {
    const int32_t s = chain[j];
    out[2 * j] = s;
    out[2 * j + 1] = jump[s];
  }
}

__global__ void mark_starts_kernel(const int32_t* __restrict__ chain, int64_t chain_len, int32_t n,
                                   int64_t* __restrict__ is_start) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j < chain_len) {
    const int32_t s = chain[j];
    if (s < n) is_start[s] = 1;
  }
}

inline unsigned blocks_for(int64_t count) { return static_cast<unsigned>((count + kThreads - 1) / kThreads); }

}  // namespace

cudaError_t launch_jump(const int32_t* src, int32_t* dst, int64_t count, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  jump_kernel<<<blocks_for(count), kThreads, 0, stream>>>(src, dst, count);
  return cudaGetLastError();
}

cudaError_t launch_expand_chain(const int32_t* chain, int64_t chain_len, const int32_t* jump, int32_t* out,
                                cudaStream_t stream) {
  if (chain_len == 0) return cudaSuccess;
  expand_chain_kernel<<<blocks_for(chain_len), kThreads, 0, stream>>>(chain, chain_len, jump, out);
  return cudaGetLastError();
}

cudaError_t launch_mark_starts(const int32_t* chain, int64_t chain_len, int32_t n, int64_t* is_start,
                               cudaStream_t stream) {
  if (chain_len == 0) return cudaSuccess;
  mark_starts_kernel<<<blocks_for(chain_len), kThreads, 0, stream>>>(chain, chain_len, n, is_start);
  return cudaGetLastError();
}

}  // namespace tfp
