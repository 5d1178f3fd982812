// Host side of packed-batch assembly on CUDA tensors: argument checks and one kernel launch
// (csrc/cuda/assemble_cuda_kernels.cu) on the current stream. No host sync: the piece table is not read
// here; the public Python function validates it (from host copies) before calling the op, and the kernel
// skips out-of-range reads and writes instead of faulting.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>
#include <tuple>

#include "checks.h"
#include "cuda/assemble_cuda_kernels.h"
#include "ops.h"

namespace tfp {
namespace {

template <typename value_t>
cudaError_t launch_with_labels(const at::Tensor& values, const std::optional<at::Tensor>& labels,
                               const at::Tensor& pieces, int64_t num_tokens, int64_t ignore_index,
                               at::Tensor& ids, at::Tensor& out_labels, at::Tensor& positions, cudaStream_t stream) {
  const value_t* v = values.data_ptr<value_t>();
  const int64_t m = pieces.size(1);
  int64_t* o_ids = ids.data_ptr<int64_t>();
  int64_t* o_lab = out_labels.data_ptr<int64_t>();
  int64_t* o_pos = positions.data_ptr<int64_t>();
  const int64_t* table = pieces.data_ptr<int64_t>();
  if (!labels.has_value()) {
    return launch_assemble<value_t, value_t>(v, nullptr, values.numel(), table, m, num_tokens, ignore_index, o_ids,
                                             o_lab, o_pos, stream);
  }
  if (labels->scalar_type() == at::kLong) {
    return launch_assemble<value_t, int64_t>(v, labels->data_ptr<int64_t>(), values.numel(), table, m, num_tokens,
                                             ignore_index, o_ids, o_lab, o_pos, stream);
  }
  return launch_assemble<value_t, int32_t>(v, labels->data_ptr<int32_t>(), values.numel(), table, m, num_tokens,
                                           ignore_index, o_ids, o_lab, o_pos, stream);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> assemble_cuda(const at::Tensor& values,
                                                             const std::optional<at::Tensor>& labels,
                                                             const at::Tensor& pieces, int64_t num_tokens,
                                                             int64_t ignore_index) {
  TFP_CHECK_CUDA(values);
  TFP_CHECK_DIM(values, 1);
  TORCH_CHECK(values.scalar_type() == at::kLong || values.scalar_type() == at::kInt,
              "values must have dtype Long or Int, got ", values.scalar_type());
  TFP_CHECK_CUDA(pieces);
  TFP_CHECK_DIM(pieces, 2);
  TFP_CHECK_DTYPE(pieces, at::kLong);
  TORCH_CHECK(pieces.size(0) == 4, "pieces must have shape (4, M), got ", pieces.sizes());
  TORCH_CHECK(pieces.device() == values.device(), "pieces must be on the device of values (", values.device(),
              "), got ", pieces.device());
  TORCH_CHECK(num_tokens >= 0, "num_tokens must be >= 0, got ", num_tokens);
  const c10::cuda::CUDAGuard guard(values.device());
  const auto vals = values.contiguous();
  const auto table = pieces.contiguous();
  std::optional<at::Tensor> labs;
  if (labels.has_value()) {
    TORCH_CHECK(labels->device() == values.device(), "labels must be on the device of values (", values.device(),
                "), got ", labels->device());
    TORCH_CHECK(labels->scalar_type() == at::kLong || labels->scalar_type() == at::kInt,
                "labels must have dtype Long or Int, got ", labels->scalar_type());
    TORCH_CHECK(labels->sizes() == values.sizes(), "labels must have the shape of values ", values.sizes(), ", got ",
                labels->sizes());
    labs = labels->contiguous();
  }
  const auto options = vals.options().dtype(at::kLong);
  auto input_ids = at::empty({num_tokens}, options);
  auto out_labels = at::empty({num_tokens}, options);
  auto position_ids = at::empty({num_tokens}, options);
  auto stream = c10::cuda::getCurrentCUDAStream(values.device().index()).stream();
  const cudaError_t err =
      vals.scalar_type() == at::kLong
          ? launch_with_labels<int64_t>(vals, labs, table, num_tokens, ignore_index, input_ids, out_labels,
                                        position_ids, stream)
          : launch_with_labels<int32_t>(vals, labs, table, num_tokens, ignore_index, input_ids, out_labels,
                                        position_ids, stream);
  TORCH_CHECK(err == cudaSuccess, "assemble kernel launch failed: ", cudaGetErrorString(err));
  return {input_ids, out_labels, position_ids};
}

}  // namespace tfp
