// Fused conv2d + bias + ReLU as implicit GEMMs: the index math, written once
// and shared by the CUDA kernels (conv_cuda.cu) and the CPU reference of the
// same GEMMs (conv_cpu.cpp, exercised by tests/test_conv.py), so the
// mapping the GPU runs is the mapping the CPU tests check.
//
// Layouts (all contiguous, channels innermost):
//   x  (N, H, W, C)      input, NHWC
//   w  (K, R, S, Cg)     weight, KRSC (= torch's (K, Cg, R, S) in channels_last)
//   wt (G, Cg, R, S, Kg) weight rearranged for dgrad (conv.cpp builds it)
//   y  (N, P, Q, K)      output, NPQK; dy has the same layout
// with G groups, Cg = C / G input and Kg = K / G output channels per group.
//
// Each pass is, per group g, a GEMM  D[i][j] = sum_t A[i][t] * B[t][j]:
//   forward  i = output pixel (n,p,q)  j = out channel k   t = (r,s,c)  over R*S*Cg
//   dgrad    i = input pixel (n,h,w)   j = in channel c    t = (r,s,k)  over R*S*Kg
//   wgrad    i = out channel k         j = (r,s,c)         t = output pixel (n,p,q)
// The reduction index t = (r,s,c) puts channels innermost, so a run of
// consecutive t with the same (r,s) is a run of consecutive memory: that is
// what lets the CUDA kernels copy 16-byte vectors (when Cg and Kg are
// multiples of the vector width; conv.cpp pads channels with zeros otherwise).
#pragma once
#include <cstdint>

#include "common/host_device.h"

namespace alexnet_ext {
namespace conv {

// Shape of one convolution. Sizes fit in int32 (conv.cpp checks every
// tensor's element count), offsets are computed in int64.
struct ConvGeom {
  int N, H, W, C;   // input
  int K, R, S;      // output channels, filter size
  int P, Q;         // output size
  int stride_h, stride_w, pad_h, pad_w;
  int groups, Cg, Kg;
};

AX_HD int conv_out_size(int in, int kernel, int stride, int pad) {
  return (in + 2 * pad - kernel) / stride + 1;
}

enum class Pass : int { Forward = 0, Dgrad = 1, Wgrad = 2 };

// GEMM extents of one group.
struct GemmDims {
  int64_t M, N, Kred;
};

AX_HD GemmDims gemm_dims(const ConvGeom& g, Pass pass) {
  const int64_t RS = int64_t(g.R) * g.S;
  switch (pass) {
    case Pass::Forward: return {int64_t(g.N) * g.P * g.Q, g.Kg, RS * g.Cg};
    case Pass::Dgrad: return {int64_t(g.N) * g.H * g.W, g.Cg, RS * g.Kg};
    default: return {g.Kg, RS * g.Cg, int64_t(g.N) * g.P * g.Q};
  }
}

// (n, a, b) from a flat pixel index over an (N, A, B) grid.
struct Pixel {
  int n, a, b;
};
AX_HD Pixel split_pixel(int64_t m, int A, int B) {
  const int ab = int(m % (int64_t(A) * B));
  return {int(m / (int64_t(A) * B)), ab / B, ab % B};
}

// (r, s, ch) from a reduction/filter index t = (r*S + s)*Cch + ch.
struct Tap {
  int r, s, ch;
};
AX_HD Tap split_tap(int64_t t, int S, int Cch) {
  const int rs = int(t / Cch);
  return {rs / S, rs % S, int(t % Cch)};
}

// Offset into x of im2col element (output pixel m, tap t) of group `grp`,
// or -1 where the tap falls into the zero padding.
AX_HD int64_t im2col_offset(const ConvGeom& g, int grp, int64_t m, int64_t t) {
  const Pixel px = split_pixel(m, g.P, g.Q);
  const Tap tap = split_tap(t, g.S, g.Cg);
  const int h = px.a * g.stride_h - g.pad_h + tap.r;
  const int w = px.b * g.stride_w - g.pad_w + tap.s;
  if (h < 0 || h >= g.H || w < 0 || w >= g.W) return -1;
  return ((int64_t(px.n) * g.H + h) * g.W + w) * g.C + int64_t(grp) * g.Cg + tap.ch;
}

// Offset into dy of the element that input pixel m (n,h,w) receives through
// tap t = (r,s,k) in dgrad: the output pixel p with p*stride - pad + r = h,
// or -1 where no such p exists (not divisible by the stride, or outside).
AX_HD int64_t dgrad_dy_offset(const ConvGeom& g, int grp, int64_t m, int64_t t) {
  const Pixel px = split_pixel(m, g.H, g.W);
  const Tap tap = split_tap(t, g.S, g.Kg);
  const int ph = px.a + g.pad_h - tap.r;
  const int qw = px.b + g.pad_w - tap.s;
  if (ph < 0 || qw < 0 || ph % g.stride_h != 0 || qw % g.stride_w != 0) return -1;
  const int p = ph / g.stride_h, q = qw / g.stride_w;
  if (p >= g.P || q >= g.Q) return -1;
  return ((int64_t(px.n) * g.P + p) * g.Q + q) * g.K + int64_t(grp) * g.Kg + tap.ch;
}

// Offsets of the A operand element (i, t) and the B operand element (t, j)
// of one pass, and of the result element (i, j). -1 means zero.
// B is the weight (forward: w, dgrad: wt), dy, or x, as the table above says.
AX_HD int64_t a_offset(const ConvGeom& g, Pass pass, int grp, int64_t i, int64_t t) {
  switch (pass) {
    case Pass::Forward: return im2col_offset(g, grp, i, t);
    case Pass::Dgrad: return dgrad_dy_offset(g, grp, i, t);
    default: return t * g.K + int64_t(grp) * g.Kg + i;  // dy[t][grp*Kg + i]
  }
}

AX_HD int64_t b_offset(const ConvGeom& g, Pass pass, int grp, int64_t t, int64_t j) {
  const int64_t RS = int64_t(g.R) * g.S;
  switch (pass) {
    case Pass::Forward: return (int64_t(grp) * g.Kg + j) * RS * g.Cg + t;  // w[grp*Kg + j][t]
    case Pass::Dgrad: return (int64_t(grp) * g.Cg + j) * RS * g.Kg + t;    // wt[grp][j][t]
    default: return im2col_offset(g, grp, t, j);
  }
}

AX_HD int64_t d_offset(const ConvGeom& g, Pass pass, int grp, int64_t i, int64_t j) {
  switch (pass) {
    case Pass::Forward: return i * g.K + int64_t(grp) * g.Kg + j;  // y[i][grp*Kg + j]
    case Pass::Dgrad: return i * g.C + int64_t(grp) * g.Cg + j;    // dx[i][grp*Cg + j]
    default: return (int64_t(grp) * g.Kg + i) * int64_t(g.R) * g.S * g.Cg + j;  // dw[grp*Kg + i][j]
  }
}

// Which operand dimension is contiguous in memory: the reduction index t
// (forward and dgrad, both operands) or the row/column index (wgrad: dy is
// contiguous along k, x along c). A 16-byte vector runs along it.
AX_HD bool a_contiguous_along_reduction(Pass pass) { return pass != Pass::Wgrad; }
AX_HD bool b_contiguous_along_reduction(Pass pass) { return pass != Pass::Wgrad; }

// The reduction range [begin, end) of split `split` out of `splits` (wgrad's
// split-K), in whole tiles of `tile` so splits never share a tile.
AX_HD void split_range(int64_t kred, int tile, int split, int splits, int64_t* begin, int64_t* end) {
  const int64_t tiles = (kred + tile - 1) / tile;
  const int64_t per = (tiles + splits - 1) / splits;
  *begin = ax_min<int64_t>(kred, per * split * tile);
  *end = ax_min<int64_t>(kred, per * (split + 1) * tile);
}

// ReLU and its gradient, with NaN semantics of torch.relu and
// threshold_backward: relu(NaN) = NaN, and the gradient passes wherever the
// output is not <= 0 (so also where it is NaN).
template <typename acc>
AX_HD acc relu(acc v) {
  return v <= acc(0) ? acc(0) : v;
}
template <typename acc>
AX_HD acc relu_grad(acc dy, acc y) {
  return y <= acc(0) ? acc(0) : dy;
}

}  // namespace conv
}  // namespace alexnet_ext
