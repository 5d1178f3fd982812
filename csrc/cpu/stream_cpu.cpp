// The TFP paper's packer on the CPU: concatenate the items in order and cut the token stream every
// max_len tokens; an item crossing a cut becomes one piece per pack it touches. Two sequential passes
// (count the pieces, then write them). Plain-Python definition:
// tfp_kernels/packing/reference.py::stream_reference; CUDA tensors use the vectorised torch version in
// tfp_kernels/packing/stream.py (the cut is embarrassingly parallel).
#include <ATen/ATen.h>

#include <tuple>

#include "checks.h"
#include "ops.h"

namespace tfp {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> stream_pack_cpu(const at::Tensor& lengths,
                                                                           int64_t max_len) {
  TFP_CHECK_CPU(lengths);
  TFP_CHECK_DIM(lengths, 1);
  TFP_CHECK_DTYPE(lengths, at::kLong);
  TORCH_CHECK(max_len > 0, "max_len must be positive, got ", max_len);
  const auto lens = lengths.contiguous();
  const int64_t n = lens.numel();
  const int64_t* len = lens.data_ptr<int64_t>();
  // pass 1: validate and count the pieces (an item starting at fill `used` touches
  // ceil((used + l) / max_len) packs counted from the current one, without overflow)
  int64_t count = 0;
  int64_t used = 0;  // tokens in the open pack, in [0, max_len)
  for (int64_t i = 0; i < n; ++i) {
    const int64_t l = len[i];
    TORCH_CHECK(l > 0, "lengths[", i, "] = ", l, " is not positive");
    const int64_t first = max_len - used;  // room left in the open pack
    if (l <= first) {
      count += 1;
      used = (l == first) ? 0 : used + l;
    } else {
      const int64_t rest = l - first;
      count += 1 + (rest - 1) / max_len + 1;
      used = rest % max_len;
    }
  }
  auto item = at::empty({count}, lens.options());
  auto offset = at::empty({count}, lens.options());
  auto length = at::empty({count}, lens.options());
  auto pack_id = at::empty({count}, lens.options());
  int64_t* item_ptr = item.data_ptr<int64_t>();
  int64_t* offset_ptr = offset.data_ptr<int64_t>();
  int64_t* length_ptr = length.data_ptr<int64_t>();
  int64_t* pack_ptr = pack_id.data_ptr<int64_t>();
  // pass 2: write them
  int64_t k = 0;
  int64_t pack = 0;
  used = 0;
  for (int64_t i = 0; i < n; ++i) {
    int64_t off = 0;
    const int64_t l = len[i];
    while (off < l) {
      if (used == max_len) {
        ++pack;
        used = 0;
      }
      const int64_t take = (l - off < max_len - used) ? l - off : max_len - used;
      item_ptr[k] = i;
      offset_ptr[k] = off;
      length_ptr[k] = take;
      pack_ptr[k] = pack;
      ++k;
      used += take;
      off += take;
    }
  }
  TORCH_CHECK(k == count, "stream_pack: counted ", count, " pieces but wrote ", k);
  return {item, offset, length, pack_id};
}

}  // namespace tfp
