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

bool cuda_stream_capturing(void* stream) {
#ifdef EMU_DEVICE_TU
  (void)stream;  // the CPU emulator (../shared/simt-emu) has no graph capture
  return false;
#else
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  // A failed query counts as capturing: callers then take their safe path.
  if (cudaStreamIsCapturing(static_cast<cudaStream_t>(stream), &status) != cudaSuccess) {
    cudaGetLastError();  // not sticky: do not leave it for the next launch check
    return true;
  }
  return status != cudaStreamCaptureStatusNone;
#endif
}

}  // namespace alexnet_ext
