// Declarations of every op implementation (CPU in csrc/cpu, CUDA host code in csrc/cuda).
#pragma once
#include <ATen/core/Tensor.h>
#include <cstdint>

namespace tfp {

int64_t cuda_version();

at::Tensor next_fit_pack_ids_cpu(const at::Tensor& lengths, int64_t max_len);
// --- ordering (the TFP walk over band lists) ---
int64_t tfp_walk_cpu(const at::Tensor& embeddings, const at::Tensor& norms, const at::Tensor& band_index,
                     const at::Tensor& band_s2, const at::Tensor& band_limit2, const at::Tensor& band_slack,
                     const at::Tensor& num_close, const at::Tensor& projections, at::Tensor& path,
                     at::Tensor& visited, at::Tensor& num_fallbacks, int64_t step, int64_t stop_step,
                     double threshold, int64_t window, int64_t max_rejections, bool cosine);

#ifdef WITH_CUDA
at::Tensor next_fit_pack_ids_cuda(const at::Tensor& lengths, int64_t max_len);
#endif

}  // namespace tfp
