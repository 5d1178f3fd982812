// Declarations of every op implementation (CPU in csrc/cpu, CUDA host code in csrc/cuda).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>
#include <cstdint>
#include <optional>  // packing/assembly block below
#include <tuple>

namespace tfp {

int64_t cuda_version();
int64_t parallel_threads();

at::Tensor next_fit_pack_ids_cpu(const at::Tensor& lengths, int64_t max_len);
// --- ordering (the TFP walk over band lists) ---
int64_t tfp_walk_cpu(const at::Tensor& embeddings, const at::Tensor& norms, const at::Tensor& band_index,
                     const at::Tensor& band_s2, const at::Tensor& band_limit2, const at::Tensor& band_slack,
                     const at::Tensor& num_close, const at::Tensor& scan_rows, const at::Tensor& scan_scale,
                     const at::Tensor& scan_sq_norms, const at::Tensor& scan_slack, at::Tensor& path,
                     at::Tensor& visited, at::Tensor& counters, int64_t step, int64_t stop_step,
                     double threshold, int64_t window, int64_t max_rejections, bool cosine,
                     const std::optional<at::Tensor>& group_of, const std::optional<at::Tensor>& group_offsets,
                     const std::optional<at::Tensor>& group_members, const std::optional<at::Tensor>& group_next,
                     const std::optional<at::Tensor>& long_row, const std::optional<at::Tensor>& long_index,
                     const std::optional<at::Tensor>& long_s2, const std::optional<at::Tensor>& long_slack,
                     const std::optional<at::Tensor>& close_offsets,
                     const std::optional<at::Tensor>& close_members, c10::string_view policy,
                     std::optional<at::TensorList> policy_groups);
std::tuple<at::Tensor, at::Tensor, at::Tensor> band_select_cpu(const at::Tensor& s2, int64_t row_offset,
                                                               const at::Tensor& lower, const at::Tensor& upper,
                                                               int64_t k, const std::optional<at::Tensor>& row_sq,
                                                               const std::optional<at::Tensor>& col_sq);
void band_select_pairs_cpu(const at::Tensor& dot, int64_t row0, int64_t col0, const at::Tensor& sq_norms,
                           const at::Tensor& lower, const at::Tensor& upper, at::Tensor& heap_keys,
                           at::Tensor& heap_sizes, at::Tensor& num_close);

// --- bin packing (best fit) and packed-batch assembly (tfp_kernels/packing, tfp_kernels/assembly) ---
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> best_fit_decreasing_cpu(const at::Tensor& lengths,
                                                                                   int64_t max_len, int64_t window);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> stream_pack_cpu(const at::Tensor& lengths,
                                                                           int64_t max_len);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fill_in_order_cpu(
    const at::Tensor& lengths, int64_t max_len, int64_t window, const std::optional<at::Tensor>& rows,
    double fill_weight, double min_distance, bool cosine, int64_t keep_apart);
std::tuple<at::Tensor, at::Tensor, at::Tensor> assemble_cpu(const at::Tensor& values,
                                                            const std::optional<at::Tensor>& labels,
                                                            const at::Tensor& pieces, int64_t num_tokens,
                                                            int64_t ignore_index);
// --- end of the packing/assembly block ---

#ifdef WITH_CUDA
at::Tensor next_fit_pack_ids_cuda(const at::Tensor& lengths, int64_t max_len);
// packed-batch assembly (packing/assembly block)
std::tuple<at::Tensor, at::Tensor, at::Tensor> assemble_cuda(const at::Tensor& values,
                                                             const std::optional<at::Tensor>& labels,
                                                             const at::Tensor& pieces, int64_t num_tokens,
                                                             int64_t ignore_index);
#endif

}  // namespace tfp
