// Raw CUDA kernel of packed-batch assembly (no ATen headers here: they dominate nvcc build time).
//
// One launch does the whole batch: every block takes pieces (block-stride loop over the columns of the
// (4, M) piece table), and its threads copy the piece's tokens and labels into the flat output and write
// the position ids. Reads and writes are coalesced within a piece. The label of a token whose position
// id is 0 (the first token of every attention segment) is ignore_index. Definition and CPU twin:
// csrc/cpu/assemble_cpu.cpp, tfp_kernels/assembly/reference.py.
#include <cuda_runtime.h>
#include <cstdint>

#include "cuda/assemble_cuda_kernels.h"

namespace tfp {
namespace {

constexpr int kAssembleThreads = 256;
constexpr int64_t kMaxBlocks = 65535;

template <typename value_t, typename label_t>
__global__ void assemble_kernel(const value_t* __restrict__ values, const label_t* __restrict__ labels,
                                int64_t num_values, const int64_t* __restrict__ pieces, int64_t num_pieces,
                                int64_t num_tokens, int64_t ignore_index, int64_t* __restrict__ out_ids,
                                int64_t* __restrict__ out_labels, int64_t* __restrict__ out_pos) {
  for (int64_t i = blockIdx.x; i < num_pieces; i += gridDim.x) {
    const int64_t src = pieces[i];
    const int64_t dst = pieces[num_pieces + i];
    const int64_t len = pieces[2 * num_pieces + i];
    const int64_t pos = pieces[3 * num_pieces + i];
    for (int64_t t = threadIdx.x; t < len; t += blockDim.x) {
      const int64_t from = src + t;
      const int64_t to = dst + t;
      if (from < 0 || from >= num_values || to < 0 || to >= num_tokens) continue;
      const int64_t token = static_cast<int64_t>(values[from]);
      const int64_t position = pos + t;
      out_ids[to] = token;
      out_pos[to] = position;
      out_labels[to] = position == 0 ? ignore_index : (labels != nullptr ? static_cast<int64_t>(labels[from]) : token);
    }
  }
}

}  // namespace

template <typename value_t, typename label_t>
cudaError_t launch_assemble(const value_t* values, const label_t* labels, int64_t num_values, const int64_t* pieces,
                            int64_t num_pieces, int64_t num_tokens, int64_t ignore_index, int64_t* out_ids,
                            int64_t* out_labels, int64_t* out_pos, cudaStream_t stream) {
  if (num_pieces == 0 || num_tokens == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>(num_pieces < kMaxBlocks ? num_pieces : kMaxBlocks);
  assemble_kernel<value_t, label_t><<<blocks, kAssembleThreads, 0, stream>>>(
      values, labels, num_values, pieces, num_pieces, num_tokens, ignore_index, out_ids, out_labels, out_pos);
  return cudaGetLastError();
}

#define TFP_INSTANTIATE_ASSEMBLE(V, L)                                                                           \
  template cudaError_t launch_assemble<V, L>(const V*, const L*, int64_t, const int64_t*, int64_t, int64_t, int64_t, \
                                             int64_t*, int64_t*, int64_t*, cudaStream_t);
TFP_INSTANTIATE_ASSEMBLE(int64_t, int64_t)
TFP_INSTANTIATE_ASSEMBLE(int64_t, int32_t)
TFP_INSTANTIATE_ASSEMBLE(int32_t, int64_t)
TFP_INSTANTIATE_ASSEMBLE(int32_t, int32_t)
#undef TFP_INSTANTIATE_ASSEMBLE

}  // namespace tfp
