// Assembly of a packed batch on the CPU: gather every piece's tokens (and labels) into the flat packed
// stream and write its position ids, in one pass over the pieces (parallel over pieces).
//
// pieces is a (4, M) int64 table, one column per piece in packed order:
//   row 0 src: first token of the piece in `values`;   row 1 dst: its first position in the output;
//   row 2 len: its number of tokens;                    row 3 pos: position id of its first token.
// Output token dst + t (t < len) gets input_ids = values[src + t], position_ids = pos + t and
// labels = (pos + t == 0) ? ignore_index : labels[src + t] (values[src + t] when labels is None): the
// label of every segment's first token is ignored, as transformers' DataCollatorWithFlattening does.
// The pieces must tile the output: dst[0] == 0, dst[i + 1] == dst[i] + len[i], sum(len) == num_tokens.
// Plain-Python definition: tfp_kernels/assembly/reference.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <optional>
#include <tuple>

#include "checks.h"
#include "ops.h"

namespace tfp {
namespace {

template <typename value_t, typename label_t>
void assemble_pieces(const value_t* values, const label_t* labels, const int64_t* src, const int64_t* dst,
                     const int64_t* len, const int64_t* pos, int64_t num_pieces, int64_t ignore_index,
                     int64_t* out_ids, int64_t* out_labels, int64_t* out_pos) {
  at::parallel_for(0, num_pieces, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const value_t* in = values + src[i];
      const label_t* lab = labels != nullptr ? labels + src[i] : nullptr;
      int64_t* ids = out_ids + dst[i];
      int64_t* out_lab = out_labels + dst[i];
      int64_t* positions = out_pos + dst[i];
      const int64_t n = len[i];
      const int64_t p0 = pos[i];
      for (int64_t t = 0; t < n; ++t) {
        const int64_t token = static_cast<int64_t>(in[t]);
        ids[t] = token;
        positions[t] = p0 + t;
        out_lab[t] = (p0 + t == 0) ? ignore_index : (lab != nullptr ? static_cast<int64_t>(lab[t]) : token);
      }
    }
  });
}

template <typename value_t>
void dispatch_labels(const at::Tensor& values, const std::optional<at::Tensor>& labels, const int64_t* src,
                     const int64_t* dst, const int64_t* len, const int64_t* pos, int64_t num_pieces,
                     int64_t ignore_index, int64_t* out_ids, int64_t* out_labels, int64_t* out_pos) {
  const value_t* v = values.data_ptr<value_t>();
  if (!labels.has_value()) {
    assemble_pieces<value_t, value_t>(v, nullptr, src, dst, len, pos, num_pieces, ignore_index, out_ids, out_labels,
                                      out_pos);
  } else if (labels->scalar_type() == at::kLong) {
    assemble_pieces(v, labels->data_ptr<int64_t>(), src, dst, len, pos, num_pieces, ignore_index, out_ids,
                    out_labels, out_pos);
  } else {
    assemble_pieces(v, labels->data_ptr<int32_t>(), src, dst, len, pos, num_pieces, ignore_index, out_ids,
                    out_labels, out_pos);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> assemble_cpu(const at::Tensor& values,
                                                            const std::optional<at::Tensor>& labels,
                                                            const at::Tensor& pieces, int64_t num_tokens,
                                                            int64_t ignore_index) {
  TFP_CHECK_CPU(values);
  TFP_CHECK_DIM(values, 1);
  TORCH_CHECK(values.scalar_type() == at::kLong || values.scalar_type() == at::kInt,
              "values must have dtype Long or Int, got ", values.scalar_type());
  TFP_CHECK_CPU(pieces);
  TFP_CHECK_DIM(pieces, 2);
  TFP_CHECK_DTYPE(pieces, at::kLong);
  TORCH_CHECK(pieces.size(0) == 4, "pieces must have shape (4, M), got ", pieces.sizes());
  TORCH_CHECK(num_tokens >= 0, "num_tokens must be >= 0, got ", num_tokens);
  const auto vals = values.contiguous();
  std::optional<at::Tensor> labs;
  if (labels.has_value()) {
    TFP_CHECK_CPU(*labels);
    TORCH_CHECK(labels->scalar_type() == at::kLong || labels->scalar_type() == at::kInt,
                "labels must have dtype Long or Int, got ", labels->scalar_type());
    TORCH_CHECK(labels->sizes() == values.sizes(), "labels must have the shape of values ", values.sizes(), ", got ",
                labels->sizes());
    labs = labels->contiguous();
  }
  const auto table = pieces.contiguous();
  const int64_t m = table.size(1);
  const int64_t* src = table.data_ptr<int64_t>();
  const int64_t* dst = src + m;
  const int64_t* len = src + 2 * m;
  const int64_t* pos = src + 3 * m;
  const int64_t num_values = vals.numel();
  int64_t expected_dst = 0;
  for (int64_t i = 0; i < m; ++i) {
    TORCH_CHECK(dst[i] == expected_dst, "pieces must tile the output: piece ", i, " starts at ", dst[i],
                ", expected ", expected_dst);
    TORCH_CHECK(len[i] >= 0 && src[i] >= 0 && src[i] <= num_values - len[i], "piece ", i, " reads values[", src[i],
                " : ", src[i] + len[i], "], outside [0, ", num_values, ")");
    TORCH_CHECK(pos[i] >= 0, "piece ", i, " has a negative first position ", pos[i]);
    expected_dst += len[i];
  }
  TORCH_CHECK(expected_dst == num_tokens, "pieces hold ", expected_dst, " tokens, but num_tokens = ", num_tokens);

  const auto options = vals.options().dtype(at::kLong);
  auto input_ids = at::empty({num_tokens}, options);
  auto out_labels = at::empty({num_tokens}, options);
  auto position_ids = at::empty({num_tokens}, options);
  if (vals.scalar_type() == at::kLong) {
    dispatch_labels<int64_t>(vals, labs, src, dst, len, pos, m, ignore_index, input_ids.data_ptr<int64_t>(),
                             out_labels.data_ptr<int64_t>(), position_ids.data_ptr<int64_t>());
  } else {
    dispatch_labels<int32_t>(vals, labs, src, dst, len, pos, m, ignore_index, input_ids.data_ptr<int64_t>(),
                             out_labels.data_ptr<int64_t>(), position_ids.data_ptr<int64_t>());
  }
  return {input_ids, out_labels, position_ids};
}

}  // namespace tfp
