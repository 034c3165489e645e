// The contract between the C++ op wrappers and the CUDA launchers.
//
// .cu files must not include PyTorch headers (the CPU wheel cannot compile
// them), so launchers take raw pointers, sizes, a dtype tag and the stream as
// an opaque pointer. Both sides include only this plain header.
#pragma once
#include <cstdint>

namespace alexnet_ext {

enum class DType : int { Float64 = 0, Float32 = 1, Float16 = 2, BFloat16 = 3 };

// A launcher returns 0 on success or a cudaError_t value; the C++ side turns
// it into a RuntimeError through cuda_error_string().
using LaunchStatus = int;

const char* cuda_error_string(LaunchStatus status);

// Waits for the work queued on `stream` (a cudaStream_t) and returns the
// first error it raised, 0 if none (ALEXNET_EXT_SYNC_CHECK).
LaunchStatus cuda_stream_sync(void* stream);

// Whether `stream` (a cudaStream_t) is capturing a CUDA graph. Asked of the
// CUDA runtime: c10::Stream::is_capturing() is newer than the PyTorch 2.11
// of the GPU machines.
bool cuda_stream_capturing(void* stream);

}  // namespace alexnet_ext
