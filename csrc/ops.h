// Declarations of every op implementation (CPU in csrc/cpu, CUDA host code in csrc/cuda).
#pragma once
#include <ATen/core/Tensor.h>
#include <cstdint>

namespace tfp {

int64_t cuda_version();

at::Tensor next_fit_pack_ids_cpu(const at::Tensor& lengths, int64_t max_len);
#ifdef WITH_CUDA
at::Tensor next_fit_pack_ids_cuda(const at::Tensor& lengths, int64_t max_len);
#endif

}  // namespace tfp
