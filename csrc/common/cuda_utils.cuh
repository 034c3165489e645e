// Device-side helpers shared by every .cu file. No PyTorch headers here.
#pragma once
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include "common/dtype.h"

namespace alexnet_ext {

// Accumulation type: reduced precision accumulates in float32.
template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };
template <typename T> using acc_t = typename AccType<T>::type;

template <typename T> __device__ __forceinline__ acc_t<T> to_acc(T v) { return static_cast<acc_t<T>>(v); }
template <> __device__ __forceinline__ float to_acc<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_acc<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(acc_t<T> v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Calls `fn(T{})` with the CUDA element type matching `dtype`; returns the
// launch status of the last launch.
template <typename Fn>
LaunchStatus dispatch_cuda_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::Float64: fn(double{}); break;
    case DType::Float32: fn(float{}); break;
    case DType::Float16: fn(__half{}); break;
    case DType::BFloat16: fn(__nv_bfloat16{}); break;
    default: return static_cast<LaunchStatus>(cudaErrorInvalidValue);
  }
  return static_cast<LaunchStatus>(cudaGetLastError());
}

// Grid size for a grid-stride loop over `work` items: enough blocks to fill
// the GPU, never more than the work needs.
inline unsigned grid_for(long long work, int threads, int max_blocks = 65535 * 8) {
  long long blocks = (work + threads - 1) / threads;
  if (blocks < 1) blocks = 1;
  if (blocks > max_blocks) blocks = max_blocks;
  return static_cast<unsigned>(blocks);
}

}  // namespace alexnet_ext
