// CUDA launchers for conv2d + bias + ReLU. Plain C++: included by conv.cpp
// and the .cu files. Operand layouts are those of conv_math.h.
#pragma once
#include <cstdint>

#include "common/dtype.h"
#include "conv/conv_math.h"

namespace alexnet_ext {
namespace conv {

// Operands are copied global -> shared in 16-byte vectors along their
// contiguous dimension, so every channel count per group the kernels see
// (Cg, Kg) must be a multiple of kVecBytes / sizeof(element); conv.cpp pads
// channels with zeros to get there (conv1's 3 input channels, odd tests).
constexpr int kVecBytes = 16;

// Reduction tile of the GEMM kernels in bytes of one operand row: wgrad's
// split-K ranges are whole tiles of kTileKBytes / sizeof(element) elements.
constexpr int kTileKBytes = 64;

struct GemmLaunch {
  ConvGeom g;
  Pass pass = Pass::Forward;
  const void* a = nullptr;  // forward: x, dgrad: masked dy, wgrad: masked dy
  const void* b = nullptr;  // forward: w (KRSC), dgrad: wt, wgrad: x
  void* d = nullptr;        // forward: y, dgrad: dx (element dtype); wgrad: float32/64 workspace
  const void* bias = nullptr;  // forward only, may be null; ReLU is applied in forward only
  int splits = 1;              // wgrad: split-K count; d holds splits * K * R*S*Cg partial sums
  bool allow_tf32 = true;      // float32 on tensor cores (TF32) or exact FFMA
};

// One pass of conv_math.h as a tiled implicit GEMM (tensor cores for
// float16/bfloat16 and TF32, FFMA for float32 without TF32 and float64).
LaunchStatus conv_gemm_cuda(DType dtype, const GemmLaunch& p, void* stream);

// out[i] = relu_grad(dy[i], y[i]) over n elements.
LaunchStatus relu_grad_cuda(DType dtype, const void* dy, const void* y, void* out, int64_t n, void* stream);

// Column sums of a (rows, cols) row-major matrix in `splits` row ranges:
// partial[split][col] in the accumulation dtype (bias gradient, pass 1).
LaunchStatus column_sum_cuda(DType dtype, const void* in, void* partial, int64_t rows, int cols, int splits,
                             void* stream);

// out[i] = sum over s in order of partial[s][i], converted to the element
// dtype: the deterministic second pass of split-K wgrad and of column_sum.
LaunchStatus reduce_splits_cuda(DType dtype, const void* partial, void* out, int64_t n, int splits, void* stream);

}  // namespace conv
}  // namespace alexnet_ext
