// Launchers of the raw next-fit kernels (csrc/cuda/binpack_cuda_kernels.cu). Plain pointers and a
// stream only, so that this header can be included from both nvcc and the host compiler.
#pragma once
#include <cuda_runtime_api.h>
#include <cstdint>

namespace tfp {

// dst[i] = src[src[i]] for i < count.
cudaError_t launch_jump(const int32_t* src, int32_t* dst, int64_t count, cudaStream_t stream);
// out[2j] = chain[j], out[2j+1] = jump[chain[j]] for j < chain_len.
cudaError_t launch_expand_chain(const int32_t* chain, int64_t chain_len, const int32_t* jump, int32_t* out,
                                cudaStream_t stream);
// is_start[chain[j]] = 1 for every chain[j] < n.
cudaError_t launch_mark_starts(const int32_t* chain, int64_t chain_len, int32_t n, int64_t* is_start,
                               cudaStream_t stream);

}  // namespace tfp
