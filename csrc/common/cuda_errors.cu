#include <cuda_runtime.h>

#include "common/dtype.h"

namespace alexnet_ext {

const char* cuda_error_string(LaunchStatus status) {
  return cudaGetErrorString(static_cast<cudaError_t>(status));
}

}  // namespace alexnet_ext
