// Launcher of the raw packed-batch assembly kernel (csrc/cuda/assemble_cuda_kernels.cu). Plain pointers
// and a stream only, so that this header can be included from both nvcc and the host compiler.
#pragma once
#include <cuda_runtime_api.h>
#include <cstdint>

namespace tfp {

// For every piece i < num_pieces (columns of the (4, M) table: src = pieces[0], dst = pieces[M], len =
// pieces[2M], pos = pieces[3M]) and t < len[i]:
//   out_ids[dst + t] = values[src + t], out_pos[dst + t] = pos + t,
//   out_labels[dst + t] = pos + t == 0 ? ignore_index : (labels ? labels[src + t] : values[src + t]).
// Reads outside [0, num_values) and writes outside [0, num_tokens) are skipped (the caller validates).
// One launch; explicitly instantiated for value_t, label_t in {int32_t, int64_t}; labels may be null.
template <typename value_t, typename label_t>
cudaError_t launch_assemble(const value_t* values, const label_t* labels, int64_t num_values, const int64_t* pieces,
                            int64_t num_pieces, int64_t num_tokens, int64_t ignore_index, int64_t* out_ids,
                            int64_t* out_labels, int64_t* out_pos, cudaStream_t stream);

}  // namespace tfp
