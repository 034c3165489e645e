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
  const void* a = nullptr;  // forward: x, dgrad (columns too): masked dy, wgrad: masked dy (folded wgrad: x)
  const void* b = nullptr;  // forward: w (KRSC), dgrad: wt, columns: wc, wgrad: x (folded wgrad: masked dy)
  void* d = nullptr;        // forward: y, dgrad: dx (element dtype); wgrad, columns: float32/64 workspace
  const void* bias = nullptr;  // forward only, may be null; ReLU is applied in forward only
  int splits = 1;              // wgrad: split-K count; d holds splits * K * R*S*Cg partial sums
  bool allow_tf32 = true;      // float32 on tensor cores (TF32) or exact FFMA
  int force_variant = -1;      // test hook: this kMmaVariants entry if its kind fits, else the plan's choice
};

// One pass of conv_math.h as a tiled implicit GEMM (tensor cores for
// float16/bfloat16 and TF32, FFMA for float32 without TF32 and float64).
LaunchStatus conv_gemm_cuda(DType dtype, const GemmLaunch& p, void* stream);

// ---------------------------------------------------------------------------
// Launch plan: tile shape, grid and reduction tiling of one conv_gemm_cuda
// call, computed on the host. The launcher launches exactly this plan and
// tools/conv_model.py reads it (through the _conv2d_relu_plan op) to model
// the executed MMA work and the waves without a GPU.

// Kernel variants. Kinds: K-major operands (forward, dgrad), MN-major
// (wgrad), the folded forward / wgrad of ConvGeom::fold, and the columns
// GEMM of the strided dgrad (Pass::DgradCols: K-major, float32 result).
constexpr int kGemmThreads = 128;
constexpr int kKindKMajor = 0, kKindWgrad = 1, kKindFoldForward = 2, kKindFoldWgrad = 3, kKindDgradCols = 4;

// Reduction step BK of a kind's tile, in elements. The columns GEMM reduces
// over the Kg output channels of a group only (conv1: 48), so a 64-byte
// step (32 16-bit elements) would execute 64 for 48; it steps 16 elements
// in every type (one m16n8k16, or two TF32 m16n8k8, per k-tile).
constexpr int tile_k(int kind, int element_bytes) {
  return kind == kKindDgradCols ? 16 : kTileKBytes / element_bytes;
}
struct TileVariant {
  int kind, bm, bn;
  // Blocks per SM its registers and shared memory allow on sm_90, for the
  // 16-bit and the TF32 build (as tools/conv_model.py reads them from the
  // cubin): only steers the choice of tile and split-K count towards two
  // full waves. Update them when the kernels' register use changes.
  int resident, resident_tf32;
};
// Tensor-core variants, indexed by GemmPlan::variant (conv_cuda.cu's
// launch_mma instantiates exactly these): 2 x 2 warps of (BM/2) x (BN/2).
// (sm_90 registers in bf16 / tf32, conv_model.md: K-major 128x64 160/152,
// 128x48 146/154, 64x64 126/118, 64x32 87/89, 64x48 125/117; wgrad 128x64
// 182/168; dgrad columns 138/154.)
constexpr TileVariant kMmaVariants[] = {
    {kKindKMajor, 128, 64, 3, 3},      {kKindKMajor, 128, 48, 3, 3},      {kKindKMajor, 64, 64, 4, 4},
    {kKindKMajor, 64, 32, 5, 5},       {kKindWgrad, 128, 64, 2, 3},       {kKindWgrad, 64, 64, 4, 4},
    {kKindFoldForward, 128, 48, 2, 3}, {kKindFoldForward, 128, 64, 2, 3}, {kKindFoldWgrad, 32, 48, 5, 5},
    {kKindFoldWgrad, 32, 64, 5, 5},    {kKindKMajor, 64, 48, 4, 4},       {kKindDgradCols, 128, 64, 3, 3}};
constexpr int kNumMmaVariants = int(sizeof(kMmaVariants) / sizeof(kMmaVariants[0]));
// FFMA variants (float32 without TF32, float64): 64 x 64 tiles, no fold.
constexpr int kFfmaKMajor = 100, kFfmaWgrad = 101;
// A grid "fills" the GPU with two waves on an H100's 132 SMs.
constexpr int64_t kSms = 132, kFillWaves = 2;

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

// Blocks of variant `v` resident per SM for this element type.
inline int resident_blocks(const TileVariant& v, DType dtype) {
  return element_bytes(dtype) == 4 ? v.resident_tf32 : v.resident;
}

struct GemmPlan {
  int variant = -1;            // index into kMmaVariants, kFfma*, or -1: no kernel for this launch
  int kind = kKindKMajor;
  int bm = 0, bn = 0, bk = 0;  // block tile: rows, columns, reduction step
  int threads = kGemmThreads;
  int splits = 1;              // split-K ranges (grid z = groups * splits)
  bool mma = false;
  int64_t grid_x = 0, grid_y = 0, grid_z = 0;
  GemmDims dims{};             // per-group GEMM of the (channel-padded or folded) problem
  int64_t k_tiles = 0;         // BK tiles over the whole reduction (all splits)
};

// The tile: least MMA work (M and N tile overhang); among tiles within 1%
// of it, the largest whose grid fills two waves, else the one with the
// most waves.
inline GemmPlan plan_gemm(DType dtype, const GemmLaunch& p) {
  GemmPlan pl;
  pl.mma = uses_mma(dtype, p.allow_tf32);
  const bool wgrad = p.pass == Pass::Wgrad, fold = p.g.fold > 0 && (wgrad || p.pass == Pass::Forward);
  pl.kind = wgrad ? (fold ? kKindFoldWgrad : kKindWgrad) : (fold ? kKindFoldForward : kKindKMajor);
  // The FFMA kernels run the columns GEMM as a K-major pass (runtime pass).
  if (p.pass == Pass::DgradCols && pl.mma) pl.kind = kKindDgradCols;
  pl.bk = tile_k(pl.kind, element_bytes(dtype));
  pl.splits = wgrad ? p.splits : 1;
  pl.dims = gemm_dims(p.g, p.pass);
  const auto cdiv = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
  if (!pl.mma) {
    pl.variant = pl.kind == kKindKMajor ? kFfmaKMajor : pl.kind == kKindWgrad ? kFfmaWgrad : -1;
    pl.bm = pl.bn = 64;
  } else {
    const auto work = [&](const TileVariant& v) { return cdiv(pl.dims.M, v.bm) * v.bm * cdiv(pl.dims.N, v.bn) * v.bn; };
    const auto blocks = [&](const TileVariant& v) {
      return cdiv(pl.dims.M, v.bm) * cdiv(pl.dims.N, v.bn) * int64_t(p.g.groups) * pl.splits;
    };
    int64_t least = -1;
    for (const TileVariant& v : kMmaVariants)
      if (v.kind == pl.kind && (least < 0 || work(v) < least)) least = work(v);
    for (int i = 0; i < kNumMmaVariants; ++i) {
      const TileVariant& v = kMmaVariants[i];
      if (v.kind != pl.kind || work(v) * 100 > least * 101) continue;
      if (pl.variant < 0) {
        pl.variant = i;
        continue;
      }
      const TileVariant& b = kMmaVariants[pl.variant];
      const auto waves = [&](const TileVariant& t) { return double(blocks(t)) / double(kSms * resident_blocks(t, dtype)); };
      const bool v_fills = waves(v) >= kFillWaves, b_fills = waves(b) >= kFillWaves;
      const bool better = v_fills != b_fills ? v_fills
                          : v_fills          ? v.bm * v.bn > b.bm * b.bn
                                             : waves(v) > waves(b);
      if (better) pl.variant = i;
    }
    if (p.force_variant >= 0 && p.force_variant < kNumMmaVariants && kMmaVariants[p.force_variant].kind == pl.kind) {
      pl.variant = p.force_variant;
    }
    if (pl.variant >= 0) {
      pl.bm = kMmaVariants[pl.variant].bm;
      pl.bn = kMmaVariants[pl.variant].bn;
    }
  }
  if (pl.variant < 0) return pl;
  pl.grid_x = cdiv(pl.dims.M, pl.bm);
  pl.grid_y = cdiv(pl.dims.N, pl.bn);
  pl.grid_z = int64_t(p.g.groups) * pl.splits;
  pl.k_tiles = cdiv(pl.dims.Kred, pl.bk);
  return pl;
}

// Multiply-adds the plan's grid executes: every block's whole BM x BN tile
// over every BK step of the reduction (tile overhang and padding included).
inline int64_t planned_macs(const GemmPlan& pl) {
  if (pl.variant < 0) return 0;
  return pl.grid_x * pl.bm * pl.grid_y * pl.bn * (pl.grid_z / pl.splits) * pl.k_tiles * pl.bk;
}

// The backward's one preparation pass over grad_output and the saved output
// (N, K, P, Q), each read where it lies, NCHW or NHWC: dym =
// relu_grad(dy, y) as the contiguous (N*P*Q, groups * kg_pad) matrix the
// dgrad/wgrad GEMMs read (zeros in the padded channels of every group) and,
// when `partial` is set, dym's column sums per row range (the bias gradient
// before reduce_splits_cuda). The grid is (column tiles, splits) of
// kPrepTile x kPrepTile tiles; split s covers split_range(rows, kPrepTile,
// s, splits).
constexpr int kPrepTile = 32;
struct PlaneStrides {
  int64_t n = 0, k = 0, pix = 0;  // element strides of image, channel and pixel p * Q + q
};
struct ReluGradPrep {
  const void* dy = nullptr;
  const void* y = nullptr;
  PlaneStrides dy_strides, y_strides;
  void* dym = nullptr;
  void* partial = nullptr;  // (splits, groups * kg_pad) in the accumulation dtype, or null
  int64_t rows = 0;         // N * P * Q, below 2^31
  FastDiv pixels;           // P * Q
  int groups = 1, kg = 1, kg_pad = 1;  // output channels per group: the caller's and padded
  int splits = 1;                      // 1..65535
};
LaunchStatus relu_grad_prep_cuda(DType dtype, const ReluGradPrep& p, void* stream);

// out[i] = sum over s in order of partial[s][i], converted to the element
// dtype: the deterministic second pass of split-K wgrad and of the bias
// gradient's column sums.
LaunchStatus reduce_splits_cuda(DType dtype, const void* partial, void* out, int64_t n, int splits, void* stream);

// The strided dgrad's gather (conv_math.h's col2im_sum): dx[n][c][h][w] of
// images [0, g.N) from their columns (accumulation dtype, DgradCols layout),
// rounded once to the element dtype, for c < g.C. dx is written through its
// element strides (any dense layout: the caller's NCHW or channels_last
// tensor, no copy), no atomics: one thread per input pixel and its channels.
struct Col2imStrides {
  int64_t n, c, h, w;
};
LaunchStatus col2im_cuda(DType dtype, const ConvGeom& g, const void* cols, void* dx, const Col2imStrides& dx_strides,
                         void* stream);

}  // namespace conv
}  // namespace alexnet_ext
