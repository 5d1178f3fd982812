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

}  // namespace tfp
