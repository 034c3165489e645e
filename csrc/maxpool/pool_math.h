// Max-pool window arithmetic, written once and shared by the CPU kernels
// (pool_cpu.cpp), the CUDA kernels (pool_cuda.cu) and the op wrapper
// (pool.cpp). The CPU tests exercise every function here, which is how the
// CUDA kernels inherit their correctness without a GPU in CI.
//
// Semantics are torch.nn.functional.max_pool2d's (dilation 1):
//   - output size: floor((in + 2p - k) / s) + 1, or ceil(...) with ceil_mode,
//     minus one when ceil_mode would start the last window past the input
//     and its left padding;
//   - window of output o: [o*s - p, o*s - p + k) clipped to [0, in); padding
//     counts as -inf, so it never wins;
//   - scanning the window row by row, an element replaces the running
//     maximum when `v > max || isnan(v)`: the first of equal maxima wins and
//     the last NaN wins (exactly PyTorch's CPU and CUDA rule, so gradients
//     land on the same element).
//
// What backward needs is the position of the maximum inside its window,
// stored as offset = dh * kw + dw relative to the unclipped window start:
// one byte (uint8) when kh*kw <= 256, int32 for larger windows.
#pragma once
#include <cstdint>

#include "common/host_device.h"

namespace alexnet_ext {
namespace pool {

// Windows up to this many elements store their argmax offset in a uint8.
constexpr int64_t kMaxUint8Window = 256;

// One call's shape and window. Sizes that fit a plane are int; linear
// offsets over the whole tensor are int64 (tensors may pass 2^31 elements).
struct PoolGeometry {
  int64_t planes = 0;  // N * C
  int64_t channels = 0;
  int in_h = 0, in_w = 0, out_h = 0, out_w = 0;
  int kh = 1, kw = 1, sh = 1, sw = 1, ph = 0, pw = 0;
  bool channels_last = false;
};

// AlexNet's overlapping window, which both backends give a fast path.
inline bool is_alexnet_window(const PoolGeometry& g) { return g.kh == 3 && g.kw == 3 && g.sh == 2 && g.sw == 2; }

// PyTorch's pooling_output_shape for dilation 1.
inline int64_t pooled_size(int64_t in, int64_t k, int64_t s, int64_t p, bool ceil_mode) {
  const int64_t span = in + 2 * p - k + (ceil_mode ? s - 1 : 0);
  // Floor division that stays right when span is negative (output too small).
  int64_t out = (span >= 0 ? span / s : -((-span + s - 1) / s)) + 1;
  if (ceil_mode && (out - 1) * s >= in + p) --out;
  return out;
}

// Unclipped start of output o's window along one axis.
AX_HD int window_start(int o, int s, int p) { return o * s - p; }

// The outputs [*lo, *hi] whose windows contain input index i along one
// axis: o*s - p <= i < o*s - p + k. Empty when *lo > *hi.
// No intermediate may overflow for any i, k, s, p the op accepts (each up to
// INT_MAX, 0 <= p <= k/2, out >= 1): the first output is ceil(a / s) for
// a = i - (k - 1 - p), written (a - 1) / s + 1 (a + s - 1 wrapped for
// strides near INT_MAX and read the row before the plane), and the last is
// floor((i + p) / s) in unsigned arithmetic (i + p < 2^32). Both stay 32-bit
// divisions, which is what the CUDA gather runs per input element.
AX_HD void covering_outputs(int i, int k, int s, int p, int out, int* lo, int* hi) {
  const int a = i - (k - 1 - p);  // smallest o*s allowed; k - 1 - p >= 0
  *lo = a <= 0 ? 0 : (a - 1) / s + 1;
  const unsigned b = (static_cast<unsigned>(i) + static_cast<unsigned>(p)) / static_cast<unsigned>(s);
  *hi = b < static_cast<unsigned>(out) ? static_cast<int>(b) : out - 1;
}

// Does `v` replace the running maximum `m`? (v != v is isnan without <cmath>;
// `|` rather than `||` keeps it a branch-free select that vectorises.)
template <typename acc>
AX_HD bool takes_max(acc v, acc m) {
  return (v > m) | (v != v);
}

// Argmax offset inside the window <-> input position.
AX_HD int encode_offset(int dh, int dw, int kw) { return dh * kw + dw; }
AX_HD int offset_row(int offset, int kw) { return offset / kw; }
AX_HD int offset_col(int offset, int kw) { return offset % kw; }

// Row-by-row maximum over the clipped window of output (oh, ow).
// load(ih, iw) returns the input element in the accumulation type. Starting
// from the first element (not from -inf) gives the same result as PyTorch's
// -inf start: a -inf or larger first element is what PyTorch keeps too.
// Returns the value and writes the offset encoded as above.
template <typename acc, typename Load>
AX_HD acc window_max(int oh, int ow, int kh, int kw, int sh, int sw, int ph, int pw, int in_h, int in_w,
                     const Load& load, int* offset) {
  const int h0 = window_start(oh, sh, ph), w0 = window_start(ow, sw, pw);
  const int ih_lo = ax_max(h0, 0), ih_hi = ax_min(h0 + kh, in_h);
  const int iw_lo = ax_max(w0, 0), iw_hi = ax_min(w0 + kw, in_w);
  acc m = load(ih_lo, iw_lo);
  int best = encode_offset(ih_lo - h0, iw_lo - w0, kw);
  for (int ih = ih_lo; ih < ih_hi; ++ih) {
    for (int iw = ih == ih_lo ? iw_lo + 1 : iw_lo; iw < iw_hi; ++iw) {
      const acc v = load(ih, iw);
      if (takes_max(v, m)) {
        m = v;
        best = encode_offset(ih - h0, iw - w0, kw);
      }
    }
  }
  *offset = best;
  return m;
}

// Gradient of input element (h, w): the sum of grad(oh, ow) over every
// output whose window contains (h, w) and whose argmax offset points at it,
// in PyTorch's accumulation order (oh, then ow, ascending). argmax(oh, ow)
// returns the stored offset, grad(oh, ow) the upstream gradient in acc.
template <typename acc, typename Argmax, typename Grad>
AX_HD acc gather_grad(int h, int w, const PoolGeometry& g, const Argmax& argmax, const Grad& grad) {
  int oh_lo, oh_hi, ow_lo, ow_hi;
  covering_outputs(h, g.kh, g.sh, g.ph, g.out_h, &oh_lo, &oh_hi);
  covering_outputs(w, g.kw, g.sw, g.pw, g.out_w, &ow_lo, &ow_hi);
  acc sum = acc(0);
  for (int oh = oh_lo; oh <= oh_hi; ++oh) {
    const int dh = h - window_start(oh, g.sh, g.ph);
    for (int ow = ow_lo; ow <= ow_hi; ++ow) {
      const int dw = w - window_start(ow, g.sw, g.pw);
      if (static_cast<int>(argmax(oh, ow)) == encode_offset(dh, dw, g.kw)) sum += grad(oh, ow);
    }
  }
  return sum;
}

}  // namespace pool
}  // namespace alexnet_ext
