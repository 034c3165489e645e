// Implicit-GEMM CUDA kernels for conv2d + bias + ReLU (forward, dgrad,
// wgrad) and the small backward helpers. No PyTorch headers: conv.cpp
// prepares the operands (NHWC, KRSC, wt; channels padded to 16 bytes, or
// folded for few-channel inputs) and calls the launchers of conv_cuda.h,
// which launch the tile conv_cuda.h's plan_gemm chooses. The index math is
// conv_math.h's, the same the CPU reference loops run in tests/test_conv.py.
//
// One kernel template serves every pass. A block computes a BM x BN tile of
// D = A B for one group (and one split-K range in wgrad), 128 threads:
//  - global -> shared: cp.async vectors (16 bytes; 8 in 16-bit folded
//    operands) along each operand's contiguous dimension (the reduction
//    index t for forward and dgrad, the row/column index for wgrad),
//    zero-filled (src-size) where the header says the element is padding
//    or the tile runs past the problem; 3-stage pipeline; rows padded by 16
//    bytes against bank conflicts; indices split by multiply-shift FastDiv;
//  - math: mma.sync m16n8k16 (float16/bfloat16, fragments by ldmatrix.x4,
//    .trans for wgrad's MN-major tiles) or m16n8k8 TF32 (float32) with
//    float32 accumulators, 2 x 2 warps of (BM/2) x (BN/2); or exact FFMA
//    (float32 without TF32, float64), 4x8 per thread on a 64x64 tile;
//  - epilogue: bias + ReLU on the accumulators (forward); tensor-core
//    forward and dgrad stage the tile in shared memory and store 16-byte
//    vectors, the others bounds-checked scalars (wgrad: float32/64 partial
//    sums into its split's workspace slice; the strided dgrad's columns
//    GEMM: float32/64 columns, which col2im_kernel then gathers into dx).
// The tensor-core K-major kernels narrow the launch's pass to forward or
// dgrad at compile time, so the wgrad and columns branches of the shared
// index math are not compiled into them (fewer registers: see kMmaVariants'
// hints); the FFMA K-major kernel also runs the columns GEMM.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cstdint>
#include <type_traits>

#include "common/cuda_utils.cuh"
#include "conv/conv_cuda.h"
#include "conv/conv_math.h"

namespace alexnet_ext {
namespace conv {
namespace {

constexpr int kThreads = kGemmThreads;
constexpr int kStages = 3;

// Tile shape and shared-memory layout of one kernel variant.
template <typename T, int kKind, bool kMma, int kBM, int kBN>
struct Tiles {
  static constexpr bool kMNMajor = kKind == kKindWgrad || kKind == kKindFoldWgrad;
  static constexpr bool kFold = kKind == kKindFoldForward || kKind == kKindFoldWgrad;
  static constexpr int BM = kBM, BN = kBN;
  static constexpr int BK = tile_k(kKind, int(sizeof(T)));  // 32 half, 16 float, 8 double; columns: 16
  static constexpr int VEC = kVecBytes / int(sizeof(T));   // elements per 16-byte copy
  // Elements per copy of A and B: a folded operand (x, and the folded
  // weight whose reduction R*fold is a multiple of kFoldVec only) copies
  // kFoldVec elements (8 bytes in 16-bit types).
  static constexpr int AV = kFold ? kFoldVec : VEC;
  static constexpr int BV = kKind == kKindFoldForward ? kFoldVec : VEC;
  // K-major rows [BM][BK + VEC] (forward, dgrad); MN-major rows
  // [BK][BM + VEC] (wgrad). The VEC padding keeps rows 16-byte aligned and
  // shifts consecutive rows by 4 banks.
  static constexpr int A_ELEMS = kMNMajor ? BK * (BM + VEC) : BM * (BK + VEC);
  static constexpr int B_ELEMS = kMNMajor ? BK * (BN + VEC) : BN * (BK + VEC);
  __device__ __forceinline__ static int a_index(int m, int k) {
    return kMNMajor ? k * (BM + VEC) + m : m * (BK + VEC) + k;
  }
  __device__ __forceinline__ static int b_index(int n, int k) {
    return kMNMajor ? k * (BN + VEC) + n : n * (BK + VEC) + k;
  }
};

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// global -> shared copy of kBytes (16: .cg, 4/8: .ca); the destination
// past src_bytes (0..kBytes) is filled with zeros.
template <int kBytes>
__device__ __forceinline__ void cp_async(void* dst, const void* src, int src_bytes) {
  if constexpr (kBytes == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes));
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(smem_addr(dst)), "l"(src), "n"(kBytes),
                 "r"(src_bytes));
  }
}
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  cp_async<16>(dst, src, valid ? 16 : 0);
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// K-major A rows of this thread (forward, dgrad, folded forward): vector v
// of the A tile is c = threadIdx.x + v * kThreads, row c / (BK/AV), and
// always the same column (kThreads is a multiple of BK/AV), so the pixel
// part of the gather is computed once per block instead of once per k-tile.
template <typename L>
struct ARows {
  static constexpr int kVecsPerRow = L::BK / L::AV;
  static constexpr int kCount = L::kMNMajor ? 1 : L::BM * kVecsPerRow / kThreads;
  static_assert(L::kMNMajor || (kThreads % kVecsPerRow == 0 && (L::BM * kVecsPerRow) % kThreads == 0),
                "A tile split");
  PixelRow row[kCount];
  bool valid[kCount];
  __device__ __forceinline__ static int m_of(int v) { return (threadIdx.x + v * kThreads) / kVecsPerRow; }
  __device__ __forceinline__ static int k_of() { return (threadIdx.x % kVecsPerRow) * L::AV; }
};

template <typename L>
__device__ __forceinline__ void init_rows(const GemmLaunch& p, Pass pass, const GemmDims& dims, int64_t i0,
                                          ARows<L>& rows) {
#pragma unroll
  for (int v = 0; v < rows.kCount; ++v) {
    const int64_t i = i0 + rows.m_of(v);
    rows.valid[v] = i < dims.M;
    rows.row[v] = a_row(p.g, pass, rows.valid[v] ? i : 0);
  }
}

// Copies the k-tile starting at t0 (the reduction range ends at t_end) of
// both operands into one pipeline stage. Every copy is wholly inside the
// problem or wholly outside: M, N and Kred are multiples of the copy width
// along its direction, and a copy along t stays within one (r,s) (or one
// folded filter row, whose tail past the S*C taps is zero-filled). No
// division by a runtime value: the header's FastDiv (ConvGeom::div). The
// copy loops have compile-time trip counts (fully unrolled).
template <typename T, int kKind, typename L>
__device__ __forceinline__ void load_tile(const GemmLaunch& p, Pass pass, const GemmDims& dims, int grp, int64_t i0,
                                          int64_t j0, const ARows<L>& rows, int64_t t0, int64_t t_end, T* As,
                                          T* Bs) {
  const T* a = static_cast<const T*>(p.a);
  const T* b = static_cast<const T*>(p.b);
  constexpr int kAB = L::AV * int(sizeof(T)), kBB = L::BV * int(sizeof(T));
  if constexpr (L::kMNMajor) {  // wgrad: A = dy (vectors along k) or folded x (along (r,u))
    constexpr int A_VECS = L::BM * L::BK / L::AV;
#pragma unroll
    for (int v = 0; v < (A_VECS + kThreads - 1) / kThreads; ++v) {
      const int c = threadIdx.x + v * kThreads;
      if (A_VECS % kThreads != 0 && c >= A_VECS) break;
      const int k = c / (L::BM / L::AV), m = (c % (L::BM / L::AV)) * L::AV;
      const int64_t i = i0 + m, t = t0 + k;
      int64_t off = -1;
      int bytes = kAB;
      if (i < dims.M && t < t_end) {
        off = a_offset(p.g, pass, grp, i, t);
        if (L::kFold) bytes = fold_run_left(p.g, i) * int(sizeof(T));
      }
      cp_async<kAB>(As + L::a_index(m, k), off >= 0 ? a + off : a, off >= 0 ? bytes : 0);
    }
  } else {  // A = x (forward, folded or not) or dy (dgrad), vectors along t
    const int k = rows.k_of();
    const int64_t t = t0 + k;
    const bool t_ok = t < t_end;
    Tap tap{};
    int bytes = kAB;
    if constexpr (L::kFold) {
      bytes = t_ok ? fold_run_left(p.g, t) * int(sizeof(T)) : 0;
    } else {
      tap = a_tap(p.g, pass, t_ok ? t : 0);
    }
#pragma unroll
    for (int v = 0; v < rows.kCount; ++v) {
      int64_t off = -1;
      if constexpr (L::kFold) {
        if (rows.valid[v] && t_ok) off = fold_at(p.g, rows.row[v], t);
        cp_async<kAB>(As + L::a_index(rows.m_of(v), k), off >= 0 ? a + off : a, off >= 0 ? bytes : 0);
      } else {
        if (rows.valid[v] && t_ok) off = a_offset_at(p.g, pass, grp, rows.row[v], tap);
        cp_async_16(As + L::a_index(rows.m_of(v), k), off >= 0 ? a + off : a, off >= 0);
      }
    }
  }
  constexpr int B_VECS = L::BN * L::BK / L::BV;
#pragma unroll
  for (int v = 0; v < (B_VECS + kThreads - 1) / kThreads; ++v) {
    const int c = threadIdx.x + v * kThreads;
    if (B_VECS % kThreads != 0 && c >= B_VECS) break;
    int n, k;
    if (L::kMNMajor) {  // B = x (im2col, vectors along input channels) or dy (folded, along k)
      k = c / (L::BN / L::BV);
      n = (c % (L::BN / L::BV)) * L::BV;
    } else {  // B = w, folded w or wt, vectors along t
      n = c / (L::BK / L::BV);
      k = (c % (L::BK / L::BV)) * L::BV;
    }
    const int64_t j = j0 + n, t = t0 + k;
    int64_t off = -1;
    if (j < dims.N && t < t_end) off = b_offset(p.g, pass, grp, t, j);
    cp_async<kBB>(Bs + L::b_index(n, k), off >= 0 ? b + off : b, off >= 0 ? kBB : 0);
  }
}

// ---------------------------------------------------------------------------
// Tensor-core math

template <bool kTrans>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row_addr) {
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row_addr)));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row_addr)));
  }
}
template <bool kTrans>
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* row_addr) {
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(smem_addr(row_addr)));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(smem_addr(row_addr)));
  }
}

__device__ __forceinline__ uint32_t to_tf32(float v) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(v));
  return r;
}

__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], __half) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                          __nv_bfloat16) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void mma_1688_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// 4 warps as 2 x 2, each a (BM/2) x (BN/2) warp tile of TM x TN mma tiles
// of 16 x 8.
template <typename L>
struct MmaAcc {
  static constexpr int WM = L::BM / 2, WN = L::BN / 2, TM = WM / 16, TN = WN / 8;
  static_assert(WM % 16 == 0 && WN % 8 == 0, "warp tile");
  float v[TM][TN][4];
};

// Fragment layouts (PTX ISA, mma.m16n8k16 / m16n8k8 .tf32), with
// g = lane / 4 and q = lane % 4:
//   A (row-major 16 x K): rows g and g+8; 16-bit: k = 2q,2q+1 and +8; tf32: k = q and q+4
//   B (col-major K x 8):  column g;       16-bit: k = 2q,2q+1 and +8; tf32: k = q and q+4
//   C (16 x 8, f32):      rows g and g+8, columns 2q and 2q+1
template <typename T, typename L>
__device__ __forceinline__ void mma_stage(const T* As, const T* Bs, MmaAcc<L>& acc) {
  using Acc = MmaAcc<L>;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = (warp / 2) * Acc::WM, wn = (warp % 2) * Acc::WN;
  const int g = lane / 4, q = lane % 4;
  constexpr bool kKMajor = !L::kMNMajor;
  if constexpr (sizeof(T) == 2) {
    // ldmatrix: lane l supplies the address of row l % 8 of 8x8 matrix
    // l / 8 (16 bytes, 16-byte aligned: rows are padded by VEC elements).
    // K-major tiles (rows m or n, k contiguous) load as they are, MN-major
    // ones (rows k) with .trans; either way register i is matrix i in the
    // mma fragment layout above. A 16x16 A fragment: matrices (m+0, k+0),
    // (m+8, k+0), (m+0, k+8), (m+8, k+8); a pair of 8-column B fragments:
    // (n+0, k+0), (n+0, k+8), (n+8, k+0), (n+8, k+8).
    const int mat = lane / 8, row = lane % 8;
#pragma unroll
    for (int ks = 0; ks < L::BK; ks += 16) {
      uint32_t a[Acc::TM][4], b[Acc::TN][2];
#pragma unroll
      for (int mt = 0; mt < Acc::TM; ++mt) {
        const int m = wm + mt * 16 + (mat & 1) * 8, k = ks + (mat >> 1) * 8;
        if constexpr (kKMajor) {
          ldmatrix_x4<false>(a[mt], As + L::a_index(m + row, k));
        } else {
          ldmatrix_x4<true>(a[mt], As + L::a_index(m, k + row));
        }
      }
#pragma unroll
      for (int nt = 0; nt < Acc::TN; nt += 2) {
        if (nt + 1 < Acc::TN) {
          const int n = wn + nt * 8 + (mat >> 1) * 8, k = ks + (mat & 1) * 8;
          uint32_t r[4];
          if constexpr (kKMajor) {
            ldmatrix_x4<false>(r, Bs + L::b_index(n + row, k));
          } else {
            ldmatrix_x4<true>(r, Bs + L::b_index(n, k + row));
          }
          b[nt][0] = r[0], b[nt][1] = r[1], b[nt + 1][0] = r[2], b[nt + 1][1] = r[3];
        } else {  // odd TN: the last fragment alone (lanes 16-31's addresses are ignored)
          const int n = wn + nt * 8, k = ks + (mat & 1) * 8;
          if constexpr (kKMajor) {
            ldmatrix_x2<false>(b[nt], Bs + L::b_index(n + row, k));
          } else {
            ldmatrix_x2<true>(b[nt], Bs + L::b_index(n, k + row));
          }
        }
      }
#pragma unroll
      for (int mt = 0; mt < Acc::TM; ++mt)
#pragma unroll
        for (int nt = 0; nt < Acc::TN; ++nt) mma_16816(acc.v[mt][nt], a[mt], b[nt], T{});
    }
  } else {  // float on TF32 tensor cores
#pragma unroll
    for (int ks = 0; ks < L::BK; ks += 8) {
      uint32_t a[Acc::TM][4], b[Acc::TN][2];
#pragma unroll
      for (int mt = 0; mt < Acc::TM; ++mt) {
        const int r = wm + mt * 16 + g;
#pragma unroll
        for (int h = 0; h < 4; ++h) a[mt][h] = to_tf32(As[L::a_index(r + (h & 1) * 8, ks + q + (h >> 1) * 4)]);
      }
#pragma unroll
      for (int nt = 0; nt < Acc::TN; ++nt) {
        const int c = wn + nt * 8 + g;
#pragma unroll
        for (int h = 0; h < 2; ++h) b[nt][h] = to_tf32(Bs[L::b_index(c, ks + q + h * 4)]);
      }
#pragma unroll
      for (int mt = 0; mt < Acc::TM; ++mt)
#pragma unroll
        for (int nt = 0; nt < Acc::TN; ++nt) mma_1688_tf32(acc.v[mt][nt], a[mt], b[nt]);
    }
  }
}

template <typename L>
__device__ __forceinline__ void zero(MmaAcc<L>& acc) {
#pragma unroll
  for (int mt = 0; mt < MmaAcc<L>::TM; ++mt)
#pragma unroll
    for (int nt = 0; nt < MmaAcc<L>::TN; ++nt)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc.v[mt][nt][c] = 0.f;
}

// Calls fn(row, col, v, w) for every pair of this thread's accumulators at
// (row, col) and (row, col + 1): rows g and g + 8, columns 2q and 2q + 1.
template <typename L, typename Fn>
__device__ __forceinline__ void for_each_acc_pair(const MmaAcc<L>& acc, Fn fn) {
  using Acc = MmaAcc<L>;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = (warp / 2) * Acc::WM, wn = (warp % 2) * Acc::WN;
#pragma unroll
  for (int mt = 0; mt < Acc::TM; ++mt)
#pragma unroll
    for (int nt = 0; nt < Acc::TN; ++nt)
#pragma unroll
      for (int h = 0; h < 2; ++h)
        fn(wm + mt * 16 + lane / 4 + h * 8, wn + nt * 8 + (lane % 4) * 2, acc.v[mt][nt][2 * h], acc.v[mt][nt][2 * h + 1]);
}

// Calls fn(row, col, value) for every accumulator of this thread.
template <typename L, typename Fn>
__device__ __forceinline__ void for_each_acc(const MmaAcc<L>& acc, Fn fn) {
  for_each_acc_pair(acc, [&](int r, int c, float v, float w) {
    fn(r, c, v);
    fn(r, c + 1, w);
  });
}

// ---------------------------------------------------------------------------
// Exact FFMA math: 16 x 8 threads, each rows ty + 16 i and columns tx + 8 j.

template <typename T>
struct FmaAcc {
  static constexpr int TM = 4, TN = 8;  // 64 x 64 tile / (16 x 8 threads)
  acc_t<T> v[TM][TN];
};

template <typename T, typename L>
__device__ __forceinline__ void fma_stage(const T* As, const T* Bs, FmaAcc<T>& acc) {
  static_assert(L::BM == 64 && L::BN == 64, "FFMA tile");
  using A = FmaAcc<T>;
  const int ty = threadIdx.x / 8, tx = threadIdx.x % 8;
#pragma unroll
  for (int k = 0; k < L::BK; ++k) {
    acc_t<T> a[A::TM], b[A::TN];
#pragma unroll
    for (int i = 0; i < A::TM; ++i) a[i] = to_acc(As[L::a_index(ty + 16 * i, k)]);
#pragma unroll
    for (int j = 0; j < A::TN; ++j) b[j] = to_acc(Bs[L::b_index(tx + 8 * j, k)]);
#pragma unroll
    for (int i = 0; i < A::TM; ++i)
#pragma unroll
      for (int j = 0; j < A::TN; ++j) acc.v[i][j] = fma(a[i], b[j], acc.v[i][j]);
  }
}

template <typename T>
__device__ __forceinline__ void zero(FmaAcc<T>& acc) {
#pragma unroll
  for (int i = 0; i < FmaAcc<T>::TM; ++i)
#pragma unroll
    for (int j = 0; j < FmaAcc<T>::TN; ++j) acc.v[i][j] = 0;
}

template <typename T, typename Fn>
__device__ __forceinline__ void for_each_acc(const FmaAcc<T>& acc, Fn fn) {
  const int ty = threadIdx.x / 8, tx = threadIdx.x % 8;
#pragma unroll
  for (int i = 0; i < FmaAcc<T>::TM; ++i)
#pragma unroll
    for (int j = 0; j < FmaAcc<T>::TN; ++j) fn(ty + 16 * i, tx + 8 * j, acc.v[i][j]);
}

// ---------------------------------------------------------------------------
// Vectorised epilogue of the tensor-core forward and dgrad kernels: the
// block's BM x BN result tile (bias + ReLU applied in forward, rounded to T)
// goes through shared memory, then out in 16-byte vectors along the
// contiguous channel dimension j, one masked row check per vector instead
// of a bounds check and a 2- or 4-byte store per element.

// Staging rows of the result tile: BN elements padded so the fragment
// writes (8 rows x 4 lanes of a pair of columns per warp instruction) hit
// distinct banks and every row stays 16-byte aligned: 16 bytes of padding
// for 16-bit T (row stride = 4 mod 32 words, 32-bit pair writes), 32 bytes
// for float (stride = 8 mod 32 words, 64-bit pair writes in two half-warp
// phases).
template <typename T, typename L>
struct OutTile {
  static constexpr int VEC = L::VEC;
  static constexpr int LD = L::BN + (sizeof(T) == 2 ? VEC : 2 * VEC);
  static constexpr int ELEMS = L::BM * LD;
  static constexpr int VECS_PER_ROW = L::BN / VEC;
  static constexpr int VECS = L::BM * VECS_PER_ROW;
  static_assert(VECS % kThreads == 0, "every thread stores the same number of vectors");
};

template <typename T>
struct alignas(2 * sizeof(T)) Pair {
  T lo, hi;
};

template <typename T, typename L>
__device__ __forceinline__ void store_tile_vectorised(const GemmLaunch& p, Pass pass, const GemmDims& dims, int grp,
                                                      int64_t i0, int64_t j0, const MmaAcc<L>& acc,
                                                      const acc_t<T>* bias_s, T* tile) {
  using O = OutTile<T, L>;
  static_assert(O::ELEMS <= kStages * (L::A_ELEMS + L::B_ELEMS), "the result tile fits the pipeline's stages");
  const bool forward = pass == Pass::Forward;
  for_each_acc_pair(acc, [&](int r, int c, acc_t<T> a, acc_t<T> b) {
    if (forward) a = relu(a + bias_s[c]), b = relu(b + bias_s[c + 1]);
    *reinterpret_cast<Pair<T>*>(tile + r * O::LD + c) = Pair<T>{from_acc<T>(a), from_acc<T>(b)};
  });
  __syncthreads();
  T* d = static_cast<T*>(p.d);
#pragma unroll
  for (int k = 0; k < O::VECS / kThreads; ++k) {
    const int v = threadIdx.x + k * kThreads, r = v / O::VECS_PER_ROW, c = (v % O::VECS_PER_ROW) * O::VEC;
    const int64_t i = i0 + r, j = j0 + c;
    // N (Kg or Cg, padded) is a multiple of VEC: a vector is wholly in or out.
    if (i < dims.M && j < dims.N) {
      *reinterpret_cast<uint4*>(d + d_offset(p.g, pass, grp, i, j)) =
          *reinterpret_cast<const uint4*>(tile + r * O::LD + c);
    }
  }
}

// ---------------------------------------------------------------------------
// The kernel. Grid: x over BM row tiles, y over BN column tiles, z over
// groups x splits (z = grp * splits + split).

template <typename T, int kKind, bool kMma, int kBM, int kBN>
__global__ void __launch_bounds__(kThreads, 2) conv_gemm_kernel(const GemmLaunch p) {
  using L = Tiles<T, kKind, kMma, kBM, kBN>;
  using Acc = typename std::conditional<kMma, MmaAcc<L>, FmaAcc<T>>::type;
  constexpr bool kWgrad = L::kMNMajor;
  // Tensor-core forward and dgrad stage their result tile for 16-byte
  // stores (store_tile_vectorised) in the pipeline's shared memory, free
  // once the k-loop is done: one raw buffer holds both.
  constexpr bool kVecEpilogue = kMma && !kWgrad && kKind != kKindDgradCols;
  constexpr int kPipeBytes = kStages * (L::A_ELEMS + L::B_ELEMS) * int(sizeof(T));
  __shared__ __align__(16) unsigned char smem[kPipeBytes];
  T(*As)[L::A_ELEMS] = reinterpret_cast<T(*)[L::A_ELEMS]>(smem);
  T(*Bs)[L::B_ELEMS] = reinterpret_cast<T(*)[L::B_ELEMS]>(smem + kStages * L::A_ELEMS * int(sizeof(T)));
  __shared__ acc_t<T> bias_s[L::BN];

  // The pass: fixed by the kind, else the launch's (forward or dgrad; the
  // FFMA kernels also run the columns GEMM).
  const Pass pass = kWgrad                       ? Pass::Wgrad
                    : kKind == kKindFoldForward  ? Pass::Forward
                    : kKind == kKindDgradCols    ? Pass::DgradCols
                    : kMma && p.pass != Pass::Forward ? Pass::Dgrad
                                                 : p.pass;
  const GemmDims dims = gemm_dims(p.g, pass);
  const int splits = kWgrad ? p.splits : 1;
  const int grp = blockIdx.z / splits, split = blockIdx.z % splits;
  const int64_t i0 = int64_t(blockIdx.x) * L::BM, j0 = int64_t(blockIdx.y) * L::BN;
  const Range range = kWgrad ? split_range(dims.Kred, L::BK, split, splits) : Range{0, dims.Kred};
  const int64_t t_begin = range.begin, t_end = range.end;
  const int k_tiles = int((t_end - t_begin + L::BK - 1) / L::BK);

  Acc acc;
  zero(acc);
  ARows<L> rows;
  if constexpr (!kWgrad) init_rows(p, pass, dims, i0, rows);
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles) {
      load_tile<T, kKind>(p, pass, dims, grp, i0, j0, rows, t_begin + int64_t(s) * L::BK, t_end, As[s], Bs[s]);
    }
    cp_async_commit();
  }
  for (int kt = 0; kt < k_tiles; ++kt) {
    // Tile kt has landed once at most kStages - 2 newer groups are pending;
    // the barrier also retires every warp's reads of the stage refilled below.
    cp_async_wait<kStages - 2>();
    __syncthreads();
    const int next = kt + kStages - 1;
    if (next < k_tiles) {
      load_tile<T, kKind>(p, pass, dims, grp, i0, j0, rows, t_begin + int64_t(next) * L::BK, t_end,
                          As[next % kStages], Bs[next % kStages]);
    }
    cp_async_commit();
    const int st = kt % kStages;
    if constexpr (kMma) {
      mma_stage<T, L>(As[st], Bs[st], acc);
    } else {
      fma_stage<T, L>(As[st], Bs[st], acc);
    }
  }
  cp_async_wait<0>();

  // Epilogue: bias + ReLU (forward), then tensor-core forward and dgrad
  // store 16-byte vectors through shared memory (store_tile_vectorised);
  // the others one bounds-checked store per element (wgrad: float32/64
  // partial sums into its split's workspace slice). The block's BN bias
  // values are read from global memory once, into shared memory (0 without
  // bias: relu(v + 0) == relu(v), NaN included).
  const int64_t slice = dims.M * dims.N * p.g.groups;
  if (!kWgrad && pass == Pass::Forward) {  // uniform over the block
    const T* bias = static_cast<const T*>(p.bias);
    for (int c = threadIdx.x; c < L::BN; c += kThreads) {
      const int64_t j = j0 + c;
      bias_s[c] = bias != nullptr && j < dims.N ? to_acc(bias[int64_t(grp) * p.g.Kg + j]) : acc_t<T>(0);
    }
    __syncthreads();
  }
  if constexpr (kVecEpilogue) {
    // Every warp's last fragment reads of the stages are retired before
    // the tile overwrites them.
    if (pass != Pass::Forward) __syncthreads();
    store_tile_vectorised<T, L>(p, pass, dims, grp, i0, j0, acc, bias_s, reinterpret_cast<T*>(smem));
    return;
  }
  for_each_acc(acc, [&](int r, int c, acc_t<T> v) {
    const int64_t i = i0 + r, j = j0 + c;
    if (i >= dims.M || j >= dims.N) return;
    const int64_t off = d_offset(p.g, pass, grp, i, j);
    if (kWgrad) {
      static_cast<acc_t<T>*>(p.d)[int64_t(split) * slice + off] = v;
    } else if (pass == Pass::DgradCols) {  // float32/64 columns, rounded only by the gather
      static_cast<acc_t<T>*>(p.d)[off] = v;
    } else if (pass == Pass::Forward) {
      v += bias_s[c];
      static_cast<T*>(p.d)[off] = from_acc<T>(relu(v));
    } else {
      static_cast<T*>(p.d)[off] = from_acc<T>(v);
    }
  });
}

template <typename T, int kKind, bool kMma, int kBM, int kBN>
LaunchStatus launch_gemm(const GemmPlan& plan, const GemmLaunch& p, cudaStream_t stream) {
  static_assert(kThreads == kGemmThreads, "conv_cuda.h's plan_gemm describes these kernels");
  if (plan.grid_x > 0x7fffffff || plan.grid_y > 65535 || plan.grid_z > 65535) {
    return static_cast<LaunchStatus>(cudaErrorInvalidConfiguration);
  }
  dim3 grid(unsigned(plan.grid_x), unsigned(plan.grid_y), unsigned(plan.grid_z));
  conv_gemm_kernel<T, kKind, kMma, kBM, kBN><<<grid, kThreads, 0, stream>>>(p);
  return static_cast<LaunchStatus>(cudaGetLastError());
}

// The compiled variants, in the order of conv_cuda.h's kMmaVariants.
template <typename T>
LaunchStatus launch_mma(const GemmPlan& plan, const GemmLaunch& p, cudaStream_t s) {
  switch (plan.variant) {
    case 0: return launch_gemm<T, kKindKMajor, true, 128, 64>(plan, p, s);
    case 1: return launch_gemm<T, kKindKMajor, true, 128, 48>(plan, p, s);
    case 2: return launch_gemm<T, kKindKMajor, true, 64, 64>(plan, p, s);
    case 3: return launch_gemm<T, kKindKMajor, true, 64, 32>(plan, p, s);
    case 4: return launch_gemm<T, kKindWgrad, true, 128, 64>(plan, p, s);
    case 5: return launch_gemm<T, kKindWgrad, true, 64, 64>(plan, p, s);
    case 6: return launch_gemm<T, kKindFoldForward, true, 128, 48>(plan, p, s);
    case 7: return launch_gemm<T, kKindFoldForward, true, 128, 64>(plan, p, s);
    case 8: return launch_gemm<T, kKindFoldWgrad, true, 32, 48>(plan, p, s);
    case 9: return launch_gemm<T, kKindFoldWgrad, true, 32, 64>(plan, p, s);
    case 10: return launch_gemm<T, kKindKMajor, true, 64, 48>(plan, p, s);
    case 11: return launch_gemm<T, kKindDgradCols, true, 128, 64>(plan, p, s);
  }
  return static_cast<LaunchStatus>(cudaErrorInvalidValue);
}
template <typename T>
LaunchStatus launch_ffma(const GemmPlan& plan, const GemmLaunch& p, cudaStream_t s) {
  if (plan.variant == kFfmaKMajor) return launch_gemm<T, kKindKMajor, false, 64, 64>(plan, p, s);
  if (plan.variant == kFfmaWgrad) return launch_gemm<T, kKindWgrad, false, 64, 64>(plan, p, s);
  return static_cast<LaunchStatus>(cudaErrorInvalidValue);
}

// ---------------------------------------------------------------------------
// The strided dgrad's gather (after the columns GEMM)

// One thread per input pixel (n, h, w), over its channels: pixel indices
// fit in 32 bits (conv.cpp checks), so they split by FastDiv. Neighbouring
// threads store neighbouring pixels (NCHW: w innermost; channels_last:
// a pixel's channels are one run). Grid-stride.
template <typename T>
__global__ void col2im_kernel(const ConvGeom g, const acc_t<T>* __restrict__ cols, T* __restrict__ dx,
                              const Col2imStrides st) {
  const int64_t pixels = int64_t(g.N) * g.H * g.W;
  for (int64_t m = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; m < pixels; m += int64_t(gridDim.x) * blockDim.x) {
    const Pixel px = split_pixel(m, g.div.HW, g.div.W);
    T* out = dx + px.n * st.n + px.a * st.h + px.b * st.w;
    for (int c = 0; c < g.C; ++c) out[c * st.c] = from_acc<T>(col2im_sum(g, cols, px.n, c, px.a, px.b));
  }
}

// ---------------------------------------------------------------------------
// Backward helpers

// The backward's preparation pass (conv_cuda.h's ReluGradPrep). A block
// (32, 8) walks its split's row range in 32 x 32 tiles (rows x padded
// channels): both operands are staged in shared memory, each read with the
// lanes along its contiguous dimension (channels for NHWC, pixels for NCHW:
// the transpose through shared memory keeps both reads coalesced), then
// every thread writes one padded channel of 4 rows, coalesced along the
// channels of dym, and adds them to its column sum. Each column's sum
// follows one fixed order (rows by thread row, then the 8 thread rows in
// order): deterministic, no atomics.
constexpr int kPrepRowsPerThread = kPrepTile / 8;

// The caller's channel of padded channel `col`, -1 for a group's padding
// channels and past the last group.
__device__ __forceinline__ int source_channel(int col, const ReluGradPrep& p) {
  const int group = col / p.kg_pad, k = col - group * p.kg_pad;
  return group < p.groups && k < p.kg ? group * p.kg + k : -1;
}

// The source channels of a thread's tile columns, fixed for the whole
// block (no division in the row loop): its lane's column for NHWC loads,
// its kPrepRowsPerThread row-lane columns for NCHW loads.
struct PrepColumns {
  int lane;
  int rows[kPrepRowsPerThread];
};

// dy or y's tile [row][padded channel] -> shared memory; zeros in padded
// channels and past the last row/channel (the compute phase reads them all).
template <typename T>
__device__ __forceinline__ void load_prep_tile(T (*tile)[kPrepTile + 1], const T* __restrict__ src,
                                               const PlaneStrides& st, const ReluGradPrep& p,
                                               const PrepColumns& cols, int64_t row0) {
  const bool pixels_inner = st.k != 1;
#pragma unroll
  for (int i = 0; i < kPrepRowsPerThread; ++i) {
    // NHWC: lane -> channel, NCHW: lane -> row (pixel).
    const int r = pixels_inner ? int(threadIdx.x) : int(threadIdx.y) + 8 * i;
    const int c = pixels_inner ? int(threadIdx.y) + 8 * i : int(threadIdx.x);
    const int channel = pixels_inner ? cols.rows[i] : cols.lane;
    const int64_t row = row0 + r;
    T v = from_acc<T>(acc_t<T>(0));
    if (row < p.rows && channel >= 0) {
      const int n = int(row) / p.pixels, pix = int(row) - n * int(p.pixels.d);
      v = src[n * st.n + channel * st.k + pix * st.pix];
    }
    tile[r][c] = v;
  }
}

template <typename T>
__global__ void __launch_bounds__(256) relu_grad_prep_kernel(const ReluGradPrep p) {
  __shared__ T dy_tile[kPrepTile][kPrepTile + 1];
  __shared__ T y_tile[kPrepTile][kPrepTile + 1];
  __shared__ acc_t<T> sums[8][kPrepTile + 1];
  const T* __restrict__ dy = static_cast<const T*>(p.dy);
  const T* __restrict__ y = static_cast<const T*>(p.y);
  T* __restrict__ dym = static_cast<T*>(p.dym);
  const int cols = p.groups * p.kg_pad;
  const int col0 = blockIdx.x * kPrepTile, col = col0 + threadIdx.x;
  const Range range = split_range(p.rows, kPrepTile, blockIdx.y, p.splits);
  PrepColumns source;
  source.lane = source_channel(col, p);
#pragma unroll
  for (int i = 0; i < kPrepRowsPerThread; ++i) source.rows[i] = source_channel(col0 + threadIdx.y + 8 * i, p);
  acc_t<T> sum = 0;
  for (int64_t row0 = range.begin; row0 < range.end; row0 += kPrepTile) {
    __syncthreads();  // the previous tile's reads are done
    load_prep_tile(dy_tile, dy, p.dy_strides, p, source, row0);
    load_prep_tile(y_tile, y, p.y_strides, p, source, row0);
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kPrepRowsPerThread; ++i) {
      const int r = threadIdx.y + 8 * i;
      if (row0 + r < p.rows && col < cols) {
        const acc_t<T> g = relu_grad(to_acc(dy_tile[r][threadIdx.x]), to_acc(y_tile[r][threadIdx.x]));
        dym[(row0 + r) * cols + col] = from_acc<T>(g);
        sum += g;
      }
    }
  }
  if (p.partial == nullptr) return;
  sums[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    acc_t<T> total = 0;
#pragma unroll
    for (int k = 0; k < 8; ++k) total += sums[k][threadIdx.x];
    static_cast<acc_t<T>*>(p.partial)[int64_t(blockIdx.y) * cols + col] = total;
  }
}

template <typename T>
__global__ void reduce_splits_kernel(const acc_t<T>* __restrict__ partial, T* __restrict__ out, int64_t n,
                                     int splits) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    acc_t<T> s = 0;
    for (int k = 0; k < splits; ++k) s += partial[int64_t(k) * n + i];
    out[i] = from_acc<T>(s);
  }
}

}  // namespace

LaunchStatus conv_gemm_cuda(DType dtype, const GemmLaunch& p, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  // The index math divides through ConvGeom::div: prepared here, whoever
  // filled in the geometry.
  GemmLaunch q = p;
  q.g = with_divisors(p.g);
  const GemmPlan plan = plan_gemm(dtype, q);
  if (plan.variant < 0) return static_cast<LaunchStatus>(cudaErrorInvalidValue);
  switch (dtype) {
    case DType::Float16: return launch_mma<__half>(plan, q, s);
    case DType::BFloat16: return launch_mma<__nv_bfloat16>(plan, q, s);
    case DType::Float32: return plan.mma ? launch_mma<float>(plan, q, s) : launch_ffma<float>(plan, q, s);
    case DType::Float64: return launch_ffma<double>(plan, q, s);
  }
  return static_cast<LaunchStatus>(cudaErrorInvalidValue);
}

LaunchStatus relu_grad_prep_cuda(DType dtype, const ReluGradPrep& p, void* stream) {
  if (p.rows <= 0 || p.splits < 1 || p.splits > 65535) return static_cast<LaunchStatus>(cudaErrorInvalidValue);
  return dispatch_cuda_dtype(dtype, [&](auto tag) -> LaunchStatus {
    using T = decltype(tag);
    const dim3 grid(unsigned((p.groups * p.kg_pad + kPrepTile - 1) / kPrepTile), unsigned(p.splits));
    relu_grad_prep_kernel<T><<<grid, dim3(32, 8), 0, static_cast<cudaStream_t>(stream)>>>(p);
    return static_cast<LaunchStatus>(cudaGetLastError());
  });
}

LaunchStatus reduce_splits_cuda(DType dtype, const void* partial, void* out, int64_t n, int splits, void* stream) {
  return dispatch_cuda_dtype(dtype, [&](auto tag) -> LaunchStatus {
    using T = decltype(tag);
    reduce_splits_kernel<T><<<grid_for(n, 256), 256, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const acc_t<T>*>(partial), static_cast<T*>(out), n, splits);
    return static_cast<LaunchStatus>(cudaGetLastError());
  });
}

LaunchStatus col2im_cuda(DType dtype, const ConvGeom& g, const void* cols, void* dx, const Col2imStrides& dx_strides,
                         void* stream) {
  const ConvGeom gd = with_divisors(g);
  const int64_t pixels = int64_t(gd.N) * gd.H * gd.W;
  return dispatch_cuda_dtype(dtype, [&](auto tag) -> LaunchStatus {
    using T = decltype(tag);
    col2im_kernel<T><<<grid_for(pixels, 256), 256, 0, static_cast<cudaStream_t>(stream)>>>(
        gd, static_cast<const acc_t<T>*>(cols), static_cast<T*>(dx), dx_strides);
    return static_cast<LaunchStatus>(cudaGetLastError());
  });
}

}  // namespace conv
}  // namespace alexnet_ext
