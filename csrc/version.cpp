#include <ATen/Parallel.h>

#include <atomic>
#include <bitset>

#include "ops.h"
#ifdef WITH_CUDA
#include <cuda_runtime_api.h>  // CUDART_VERSION
#endif

namespace tfp {

int64_t cuda_version() {
#ifdef WITH_CUDA
  return static_cast<int64_t>(CUDART_VERSION);
#else
  return -1;
#endif
}

int64_t parallel_threads() {
  // the distinct threads an at::parallel_for of this extension runs on (1 when it was built without the
  // OpenMP flags that torch's OpenMP backend needs, whatever torch.get_num_threads() says)
  std::atomic<int64_t> seen{0};
  at::parallel_for(0, 1024, 1, [&](int64_t, int64_t) { seen.fetch_or(int64_t{1} << (at::get_thread_num() & 63)); });
  return static_cast<int64_t>(std::bitset<64>(static_cast<unsigned long long>(seen.load())).count());
}

}  // namespace tfp
