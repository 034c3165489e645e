// Lets one header of arithmetic serve both the CPU kernels (compiled by the
// host compiler) and the CUDA kernels (compiled by nvcc).
#pragma once
#include <cmath>

#if defined(__CUDACC__)
#define AX_HD __host__ __device__ __forceinline__
#else
#define AX_HD inline
#endif

namespace alexnet_ext {

AX_HD float ax_rsqrt(float x) {
#if defined(__CUDA_ARCH__)
  return rsqrtf(x);
#else
  return 1.0f / std::sqrt(x);
#endif
}
AX_HD double ax_rsqrt(double x) {
#if defined(__CUDA_ARCH__)
  return rsqrt(x);
#else
  return 1.0 / std::sqrt(x);
#endif
}
AX_HD float ax_sqrt(float x) { return sqrtf(x); }
AX_HD double ax_sqrt(double x) { return sqrt(x); }
AX_HD float ax_pow(float b, float e) { return powf(b, e); }
AX_HD double ax_pow(double b, double e) { return pow(b, e); }

template <typename T> AX_HD T ax_min(T a, T b) { return a < b ? a : b; }
template <typename T> AX_HD T ax_max(T a, T b) { return a < b ? b : a; }

}  // namespace alexnet_ext
