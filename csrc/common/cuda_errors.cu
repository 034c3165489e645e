#include <cuda_runtime.h>

#include "common/dtype.h"

namespace alexnet_ext {

const char* cuda_error_string(LaunchStatus status) {
  return cudaGetErrorString(static_cast<cudaError_t>(status));
}

LaunchStatus cuda_stream_sync(void* stream) {
  cudaError_t err = cudaStreamSynchronize(static_cast<cudaStream_t>(stream));
  // A fault is sticky: the synchronisation returns it; otherwise pick up any
  // error the runtime recorded since the launch.
  if (err == cudaSuccess) err = cudaGetLastError();
  return static_cast<LaunchStatus>(err);
}

}  // namespace alexnet_ext
