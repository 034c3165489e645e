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

// ---------------------------------------------------------------------------
// Launch plan: tile shape, grid and reduction tiling of one conv_gemm_cuda
// call, computed on the host. The launcher launches exactly this plan and
// tools/conv_model.py reads it (through the _conv2d_relu_plan op) to model
// the executed MMA work and the waves without a GPU.

// Block tiles of the kernel variants (conv_cuda.cu static_asserts them).
constexpr int kGemmThreads = 128;
constexpr int kMmaTileM = 128, kFmaTileM = 64, kTileN = 64;

inline int element_bytes(DType dtype) {
  switch (dtype) {
    case DType::Float64: return 8;
    case DType::Float32: return 4;
    default: return 2;
  }
}
// Tensor cores (mma.sync) for float16/bfloat16 and TF32; FFMA otherwise.
inline bool uses_mma(DType dtype, bool allow_tf32) {
  return dtype == DType::Float16 || dtype == DType::BFloat16 || (dtype == DType::Float32 && allow_tf32);
}

struct GemmPlan {
  int bm = 0, bn = 0, bk = 0;  // block tile: rows, columns, reduction step
  int threads = kGemmThreads;
  int splits = 1;              // split-K ranges (grid z = groups * splits)
  bool mma = false;
  int64_t grid_x = 0, grid_y = 0, grid_z = 0;
  GemmDims dims{};             // per-group GEMM of the (channel-padded) problem
  int64_t k_tiles = 0;         // BK tiles over the whole reduction (all splits)
};

inline GemmPlan plan_gemm(DType dtype, const GemmLaunch& p) {
  GemmPlan pl;
  pl.mma = uses_mma(dtype, p.allow_tf32);
  pl.bm = pl.mma ? kMmaTileM : kFmaTileM;
  pl.bn = kTileN;
  pl.bk = kTileKBytes / element_bytes(dtype);
  pl.splits = p.pass == Pass::Wgrad ? p.splits : 1;
  pl.dims = gemm_dims(p.g, p.pass);
  pl.grid_x = (pl.dims.M + pl.bm - 1) / pl.bm;
  pl.grid_y = (pl.dims.N + pl.bn - 1) / pl.bn;
  pl.grid_z = int64_t(p.g.groups) * pl.splits;
  pl.k_tiles = (pl.dims.Kred + pl.bk - 1) / pl.bk;
  return pl;
}

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
