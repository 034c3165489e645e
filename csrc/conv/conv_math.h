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
// and, folded (ConvGeom::fold, few input channels), with u = s*C + c:
//   forward  i = output pixel (n,p,q)  j = out channel k   t = (r,u)  over R*fold
//   wgrad    i = (r,u)                 j = out channel k   t = output pixel
// and the strided dgrad of few input channels in two steps (Pass::DgradCols):
//   columns  i = output pixel (n,p,q)  j = (r,s,c)         t = out channel k  over Kg
// into a float32/64 workspace `cols` (N*P*Q, G, R, S, Cg) with Cg unpadded,
// then col2im_sum gathers dx[n][c][h][w] from the columns of the (p, r),
// (q, s) with p*stride + r - pad == h, q*stride + s - pad == w. Every MMA of
// it is useful: the direct dgrad at stride s multiplies 1 - 1/s^2 of its
// taps by zeros and pads Cg to the vector width.
// The reduction index t = (r,s,c) puts channels innermost, so a run of
// consecutive t with the same (r,s) is a run of consecutive memory: that is
// what lets the CUDA kernels copy 16-byte vectors (when Cg and Kg are
// multiples of the vector width; conv.cpp pads channels with zeros otherwise).
#pragma once
#include <cstdint>

#include "common/host_device.h"

namespace alexnet_ext {
namespace conv {

// Division of an index in [0, 2^31) by a runtime divisor d >= 1 as a
// multiply and a shift (Granlund-Montgomery): m = ceil(2^p / d) with
// p = 31 + ceil(log2 d) fits in 32 bits and n * m >> p is exact for every
// n < 2^31. Integer `/` and `%` by a runtime value cost ~20 SASS each on the
// GPU; the kernels' gathers divide in their k-loops, so every divisor is
// prepared once on the host (ConvGeom::div) and this runs instead.
struct FastDiv {
  uint32_t d = 1, mul = 1u << 31, shift = 31;
};
inline FastDiv make_fast_div(int d) {
  FastDiv f;
  // An empty extent (an empty batch's zero-sized plane): nothing is ever
  // divided by it, so any valid divisor will do.
  if (d < 1) d = 1;
  f.d = uint32_t(d);
  int log2d = 0;
  while ((uint64_t(1) << log2d) < uint64_t(d)) ++log2d;
  f.shift = uint32_t(31 + log2d);
  f.mul = uint32_t(((uint64_t(1) << f.shift) + uint64_t(d) - 1) / uint64_t(d));
  return f;
}
AX_HD int operator/(int n, const FastDiv& f) {
  return int((uint64_t(uint32_t(n)) * f.mul) >> f.shift);
}
AX_HD int operator%(int n, const FastDiv& f) { return n - (n / f) * int(f.d); }

// The divisors of the index math below.
struct Divisors {
  FastDiv S, Cg, Kg, PQ, Q, HW, W, stride_h, stride_w, fold;
};

// Shape of one convolution. Sizes fit in int32 (conv.cpp checks every
// tensor's element count), offsets are computed in int64. `div` must be
// refreshed (with_divisors) whenever a size changes.
struct ConvGeom {
  int N, H, W, C;   // input
  int K, R, S;      // output channels, filter size
  int P, Q;         // output size
  int stride_h, stride_w, pad_h, pad_w;
  int groups, Cg, Kg;
  // Folded reduction (forward and wgrad of few-channel inputs, conv1's
  // C = 3; groups == 1): the S*C taps (s, c) of one filter row are one
  // contiguous run of x, so t = r * fold + u with u = s*C + c, the run
  // padded to fold = S*C rounded up to 4 elements. x is then stored with its
  // width already zero-padded (pad_w == 0, W the padded width). 0: off.
  int fold = 0;
  Divisors div;
};

// Elements per copy of a folded operand, and the run length it pads to.
constexpr int kFoldVec = 4;

inline ConvGeom with_divisors(ConvGeom g) {
  g.div.S = make_fast_div(g.S);
  g.div.Cg = make_fast_div(g.Cg);
  g.div.Kg = make_fast_div(g.Kg);
  g.div.PQ = make_fast_div(g.P * g.Q);
  g.div.Q = make_fast_div(g.Q);
  g.div.HW = make_fast_div(g.H * g.W);
  g.div.W = make_fast_div(g.W);
  g.div.stride_h = make_fast_div(g.stride_h);
  g.div.stride_w = make_fast_div(g.stride_w);
  g.div.fold = make_fast_div(g.fold > 0 ? g.fold : 1);
  return g;
}

AX_HD int conv_out_size(int in, int kernel, int stride, int pad) {
  return (in + 2 * pad - kernel) / stride + 1;
}

enum class Pass : int { Forward = 0, Dgrad = 1, Wgrad = 2, DgradCols = 3 };

// GEMM extents of one group.
struct GemmDims {
  int64_t M, N, Kred;
};

// Folded forward: i = output pixel, j = out channel, t = (r, u);
// folded wgrad: i = (r, u), j = out channel, t = output pixel (the long
// (r, u) side on M, the few output channels on N).
AX_HD GemmDims gemm_dims(const ConvGeom& g, Pass pass) {
  const int64_t RS = int64_t(g.R) * g.S;
  if (g.fold > 0 && (pass == Pass::Forward || pass == Pass::Wgrad)) {
    const int64_t NPQ = int64_t(g.N) * g.P * g.Q, RF = int64_t(g.R) * g.fold;
    return pass == Pass::Forward ? GemmDims{NPQ, g.Kg, RF} : GemmDims{RF, g.Kg, NPQ};
  }
  switch (pass) {
    case Pass::Forward: return {int64_t(g.N) * g.P * g.Q, g.Kg, RS * g.Cg};
    case Pass::Dgrad: return {int64_t(g.N) * g.H * g.W, g.Cg, RS * g.Kg};
    case Pass::DgradCols: return {int64_t(g.N) * g.P * g.Q, RS * g.Cg, g.Kg};
    default: return {g.Kg, RS * g.Cg, int64_t(g.N) * g.P * g.Q};
  }
}

// (n, a, b) from a flat pixel index over an (N, A, B) grid. Pixel and tap
// indices are below 2^31 (conv.cpp checks every tensor's element count), so
// the divisions run in 32 bits (64-bit division is slow on the GPU).
struct Pixel {
  int n, a, b;
};
AX_HD Pixel split_pixel(int64_t m, const FastDiv& AB, const FastDiv& B) {
  const int mi = int(m), n = mi / AB, ab = mi - n * int(AB.d), a = ab / B;
  return {n, a, ab - a * int(B.d)};
}

// (r, s, ch) from a reduction/filter index t = (r*S + s)*Cch + ch.
struct Tap {
  int r, s, ch;
};
AX_HD Tap split_tap(int64_t t, const FastDiv& S, const FastDiv& Cch) {
  const int ti = int(t), rs = ti / Cch, r = rs / S;
  return {r, rs - r * int(S.d), ti - rs * int(Cch.d)};
}

// A gathers are split in two: the part that depends only on the GEMM row
// (its pixel; the CUDA kernels compute it once per thread, outside the
// reduction loop) and the per-tap rest.
struct PixelRow {
  int n, a, b;  // image and the row's base coordinates (see below)
};

// im2col (forward A, wgrad B): output pixel m = (n,p,q) has base input
// coordinates (p*stride - pad, q*stride - pad); tap (r,s,c) adds (r, s).
AX_HD PixelRow im2col_row(const ConvGeom& g, int64_t m) {
  const Pixel px = split_pixel(m, g.div.PQ, g.div.Q);
  return {px.n, px.a * g.stride_h - g.pad_h, px.b * g.stride_w - g.pad_w};
}
// Offset into x, or -1 where the tap falls into the zero padding.
AX_HD int64_t im2col_at(const ConvGeom& g, int grp, const PixelRow& row, const Tap& tap) {
  const int h = row.a + tap.r, w = row.b + tap.s;
  if (h < 0 || h >= g.H || w < 0 || w >= g.W) return -1;
  return ((int64_t(row.n) * g.H + h) * g.W + w) * g.C + int64_t(grp) * g.Cg + tap.ch;
}
AX_HD int64_t im2col_offset(const ConvGeom& g, int grp, int64_t m, int64_t t) {
  return im2col_at(g, grp, im2col_row(g, m), split_tap(t, g.div.S, g.div.Cg));
}

// Folded x (see ConvGeom::fold): element t = (r, u) of output pixel row
// `row`'s filter row r, or -1 where it is zero (u past the S*C taps, or h
// in the vertical padding). The horizontal padding is stored.
AX_HD int64_t fold_at(const ConvGeom& g, const PixelRow& row, int64_t t) {
  const int ti = int(t), r = ti / g.div.fold, u = ti - r * g.fold, h = row.a + r;
  if (u >= g.S * g.C || h < 0 || h >= g.H) return -1;
  return ((int64_t(row.n) * g.H + h) * g.W + row.b) * g.C + u;
}
// Elements of the kFoldVec-run starting at t that hold taps (the rest are
// zero): a copy's source size.
AX_HD int fold_run_left(const ConvGeom& g, int64_t t) {
  const int ti = int(t), u = ti - (ti / g.div.fold) * g.fold;
  return ax_min(kFoldVec, g.S * g.C - u);
}

// dgrad A: input pixel m = (n,h,w) receives dy at the output pixel p with
// p*stride - pad + r = h through tap (r,s,k); base coordinates (h+pad, w+pad).
AX_HD PixelRow dgrad_row(const ConvGeom& g, int64_t m) {
  const Pixel px = split_pixel(m, g.div.HW, g.div.W);
  return {px.n, px.a + g.pad_h, px.b + g.pad_w};
}
// Offset into dy, or -1 where no such p exists (not divisible by the
// stride, or outside the output).
AX_HD int64_t dgrad_dy_at(const ConvGeom& g, int grp, const PixelRow& row, const Tap& tap) {
  const int ph = row.a - tap.r, qw = row.b - tap.s;
  if (ph < 0 || qw < 0) return -1;
  const int p = ph / g.div.stride_h, q = qw / g.div.stride_w;
  if (p * g.stride_h != ph || q * g.stride_w != qw) return -1;
  if (p >= g.P || q >= g.Q) return -1;
  return ((int64_t(row.n) * g.P + p) * g.Q + q) * g.K + int64_t(grp) * g.Kg + tap.ch;
}

// The columns GEMM's A is dy itself: row i = output pixel, t = channel k
// of the group, contiguous. No gather, no division.
AX_HD int64_t cols_dy_at(const ConvGeom& g, int grp, const PixelRow& row, const Tap& tap) {
  return int64_t(row.n) * g.K + int64_t(grp) * g.Kg + tap.ch;
}
// Element (r, s, c) = j of output pixel i's columns (layout above); also
// the columns GEMM's result element (i, j).
AX_HD int64_t cols_offset(const ConvGeom& g, int grp, int64_t i, int64_t j) {
  const int64_t rsc = int64_t(g.R) * g.S * g.Cg;
  return (i * g.groups + grp) * rsc + j;
}

// The A gather of forward, dgrad and the columns GEMM in its two parts
// (DgradCols: the row is the output pixel index itself, the tap its channel).
AX_HD PixelRow a_row(const ConvGeom& g, Pass pass, int64_t i) {
  if (pass == Pass::DgradCols) return {int(i), 0, 0};
  return pass == Pass::Forward ? im2col_row(g, i) : dgrad_row(g, i);
}
AX_HD Tap a_tap(const ConvGeom& g, Pass pass, int64_t t) {
  if (pass == Pass::DgradCols) return {0, 0, int(t)};
  return split_tap(t, g.div.S, pass == Pass::Forward ? g.div.Cg : g.div.Kg);
}
AX_HD int64_t a_offset_at(const ConvGeom& g, Pass pass, int grp, const PixelRow& row, const Tap& tap) {
  if (pass == Pass::DgradCols) return cols_dy_at(g, grp, row, tap);
  return pass == Pass::Forward ? im2col_at(g, grp, row, tap) : dgrad_dy_at(g, grp, row, tap);
}

// Offsets of the A operand element (i, t) and the B operand element (t, j)
// of one pass, and of the result element (i, j). -1 means zero.
// B is the weight (forward: w, dgrad: wt, columns: wc), dy, or x, as the
// table above says; wc is (G, R, S, Cg, Kg), Cg unpadded.
AX_HD int64_t a_offset(const ConvGeom& g, Pass pass, int grp, int64_t i, int64_t t) {
  if (g.fold > 0 && pass == Pass::Forward) return fold_at(g, im2col_row(g, i), t);
  if (g.fold > 0 && pass == Pass::Wgrad) return fold_at(g, im2col_row(g, t), i);  // x, folded
  switch (pass) {
    case Pass::Forward:
    case Pass::Dgrad:
    case Pass::DgradCols: return a_offset_at(g, pass, grp, a_row(g, pass, i), a_tap(g, pass, t));
    default: return t * g.K + int64_t(grp) * g.Kg + i;  // dy[t][grp*Kg + i]
  }
}

AX_HD int64_t b_offset(const ConvGeom& g, Pass pass, int grp, int64_t t, int64_t j) {
  const int64_t RS = int64_t(g.R) * g.S;
  if (g.fold > 0 && pass == Pass::Forward) return j * g.R * g.fold + t;  // wf[j][t], (K, R*fold)
  if (g.fold > 0 && pass == Pass::Wgrad) return t * g.K + j;             // dy[t][j]
  switch (pass) {
    case Pass::Forward: return (int64_t(grp) * g.Kg + j) * RS * g.Cg + t;  // w[grp*Kg + j][t]
    case Pass::Dgrad: return (int64_t(grp) * g.Cg + j) * RS * g.Kg + t;    // wt[grp][j][t]
    case Pass::DgradCols: return (int64_t(grp) * RS * g.Cg + j) * g.Kg + t;  // wc[grp][j][t]
    default: return im2col_offset(g, grp, t, j);
  }
}

AX_HD int64_t d_offset(const ConvGeom& g, Pass pass, int grp, int64_t i, int64_t j) {
  if (g.fold > 0 && pass == Pass::Wgrad) return j * g.R * g.fold + i;  // dwf[j][i], (K, R*fold)
  switch (pass) {
    case Pass::Forward: return i * g.K + int64_t(grp) * g.Kg + j;  // y[i][grp*Kg + j]
    case Pass::Dgrad: return i * g.C + int64_t(grp) * g.Cg + j;    // dx[i][grp*Cg + j]
    case Pass::DgradCols: return cols_offset(g, grp, i, j);
    default: return (int64_t(grp) * g.Kg + i) * int64_t(g.R) * g.S * g.Cg + j;  // dw[grp*Kg + i][j]
  }
}

// Which operand dimension is contiguous in memory: the reduction index t
// (forward and dgrad, both operands) or the row/column index (wgrad: dy is
// contiguous along k, x along c). A 16-byte vector runs along it.
// (Folded wgrad too: x along (r, u), dy along k.)
AX_HD bool a_contiguous_along_reduction(Pass pass) { return pass != Pass::Wgrad; }
AX_HD bool b_contiguous_along_reduction(Pass pass) { return pass != Pass::Wgrad; }

// The reduction range [begin, end) of split `split` out of `splits` (wgrad's
// split-K), in whole tiles of `tile` so splits never share a tile. Late
// splits may be empty; they still write their (zero) partial sums.
struct Range {
  int64_t begin, end;
};
AX_HD Range split_range(int64_t kred, int tile, int split, int splits) {
  const int64_t tiles = (kred + tile - 1) / tile;
  const int64_t per = (tiles + splits - 1) / splits;
  return {ax_min<int64_t>(kred, per * split * tile), ax_min<int64_t>(kred, per * (split + 1) * tile)};
}

// col2im: the output positions p (and filter taps r = a + pad - p*stride)
// whose tap reaches input coordinate a along one axis: 0 <= r < R and
// 0 <= p < P. p runs over [p_begin, p_end) while r falls from r_begin by
// `stride` per step; empty where no tap lands on a (stride > R, or a row
// past the last window: the stride does not divide H + 2*pad - R).
struct Reach {
  int p_begin, p_end, r_begin;
};
AX_HD Reach col2im_reach(int a, int pad, int R, int P, int stride, const FastDiv& stride_div) {
  const int ap = a + pad;  // >= 0
  const int p_begin = ap >= R ? (ap - R) / stride_div + 1 : 0;
  const int p_end = ax_min(P, ap / stride_div + 1);
  return {p_begin, p_end, ap - p_begin * stride};
}

// dx at (n, c, h, w) of one workspace of columns (DgradCols layout, n the
// image within it): the sum over every (p, r) x (q, s) that reaches (h, w),
// in a fixed order (p, then q), in the accumulation type. The CUDA gather
// kernel and the CPU reference both call this.
template <typename acc>
AX_HD acc col2im_sum(const ConvGeom& g, const acc* cols, int n, int c, int h, int w) {
  const int grp = c / g.div.Cg, cg = c - grp * g.Cg;
  const Reach rh = col2im_reach(h, g.pad_h, g.R, g.P, g.stride_h, g.div.stride_h);
  const Reach rw = col2im_reach(w, g.pad_w, g.S, g.Q, g.stride_w, g.div.stride_w);
  acc sum = 0;
  for (int p = rh.p_begin, r = rh.r_begin; p < rh.p_end; ++p, r -= g.stride_h) {
    const int64_t row = (int64_t(n) * g.P + p) * g.Q;
    for (int q = rw.p_begin, s = rw.r_begin; q < rw.p_end; ++q, s -= g.stride_w) {
      sum += cols[cols_offset(g, grp, row + q, (int64_t(r) * g.S + s) * g.Cg + cg)];
    }
  }
  return sum;
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
