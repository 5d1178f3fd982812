// Ordered next-fit bin packing on the CPU.
#include <ATen/ATen.h>

#include "checks.h"
#include "ops.h"

namespace tfp {

at::Tensor next_fit_pack_ids_cpu(const at::Tensor& lengths, int64_t max_len) {
  TFP_CHECK_CPU(lengths);
  TFP_CHECK_DIM(lengths, 1);
  TFP_CHECK_DTYPE(lengths, at::kLong);
  TORCH_CHECK(max_len > 0, "max_len must be positive, got ", max_len);
  const auto lens = lengths.contiguous();
  const int64_t n = lens.numel();
  auto pack_ids = at::empty({n}, lens.options());
  const int64_t* len = lens.data_ptr<int64_t>();
  int64_t* out = pack_ids.data_ptr<int64_t>();
  int64_t pack = -1;
  int64_t used = max_len;  // forces a new pack for the first item
  for (int64_t i = 0; i < n; ++i) {
    const int64_t l = len[i];
    TORCH_CHECK(l > 0 && l <= max_len, "lengths[", i, "] = ", l, " is outside [1, max_len=", max_len, "]");
    if (l > max_len - used) {  // used + l > max_len, without overflow for max_len near INT64_MAX
      ++pack;
      used = 0;
    }
    used += l;
    out[i] = pack;
  }
  return pack_ids;
}

}  // namespace tfp
