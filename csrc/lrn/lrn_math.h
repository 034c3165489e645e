// Cross-channel Local Response Normalization: the arithmetic, written once
// and shared by the CPU kernel (lrn_cpu.cpp) and the CUDA kernels
// (lrn_cuda.cu).
//
// For an input viewed as (N, C, P) (P = product of the spatial sizes):
//   s[c]  = k + alpha/size * sum_{j in W(c)} x[j]^2,   W(c) = [c - size/2, c + (size-1)/2] clipped to [0, C)
//   y[c]  = x[c] * s[c]^-beta
// which is torch.nn.functional.local_response_norm exactly: zero padding,
// alpha divided by the window, PyTorch's placement of even windows.
//
// Backward, with t[c] = dy[c] * x[c] * s[c]^-beta / s[c]  (= dy*y/s):
//   dx[i] = dy[i] * s[i]^-beta - 2*alpha*beta/size * x[i] * sum_{c : i in W(c)} t[c]
// and i in W(c)  <=>  c in R(i) = [i - (size-1)/2, i + size/2].
//
// Window sums are taken directly over the window, never as a running sum
// with subtraction: subtracting a large square that leaves the window can
// cancel catastrophically (even go negative, and then pow() gives NaN).
#pragma once
#include <cstdint>

#include "common/host_device.h"

namespace alexnet_ext {
namespace lrn {

// Shape and hyper-parameters of one call. `channels_last` means the channel
// stride is 1 and the pixel stride is C; otherwise the channel stride is P.
struct LrnParams {
  int64_t outer = 0;     // N
  int64_t channels = 0;  // C
  int64_t inner = 0;     // P
  bool channels_last = false;
  int size = 1;
  double alpha = 1e-4, beta = 0.75, k = 1.0;
};

// Offsets of the forward window W(c) = [c - before, c + after].
AX_HD int window_before(int size) { return size / 2; }
AX_HD int window_after(int size) { return (size - 1) / 2; }

template <typename acc>
struct Coefs {
  acc alpha_over_size;  // alpha / size
  acc k;
  acc beta;
  acc grad_coef;  // 2 * alpha * beta / size
  bool fast_three_quarters;
};

template <typename acc>
AX_HD Coefs<acc> make_coefs(const LrnParams& p) {
  Coefs<acc> c;
  c.alpha_over_size = static_cast<acc>(p.alpha / p.size);
  c.k = static_cast<acc>(p.k);
  c.beta = static_cast<acc>(p.beta);
  c.grad_coef = static_cast<acc>(2.0 * p.alpha * p.beta / p.size);
  c.fast_three_quarters = p.beta == 0.75;
  return c;
}

// s = k + alpha/size * (sum of squares in the window)
template <typename acc>
AX_HD acc denominator_base(acc window_sum_sq, const Coefs<acc>& c) {
  return c.k + c.alpha_over_size * window_sum_sq;
}

// s^-beta. AlexNet's beta = 0.75 avoids pow(): s^-3/4 = r * sqrt(r), r = 1/sqrt(s).
template <typename acc>
AX_HD acc inv_pow(acc s, const Coefs<acc>& c) {
  if (c.fast_three_quarters) {
    const acc r = ax_rsqrt(s);
    return r * ax_sqrt(r);
  }
  return ax_pow(s, -c.beta);
}

// s^-beta and s^-beta / s together (the CUDA walks use it forward too; the
// unused half folds away). For beta = 0.75 both come from reciprocal square
// roots alone, r = s^-1/2: s^-3/4 = r^2 * rsqrt(r), s^-7/4 = s^-3/4 * r^2.
// No sqrt and no division: on the GPU that is 2 MUFU.RSQ and 3 FMUL, where
// r * sqrt(r) (inv_pow above) costs a correctly rounded sqrt with its slow
// path. The results differ from inv_pow's by a few ulp.
template <typename acc>
struct InvPow {
  acc inv_pow;         // s^-beta
  acc inv_pow_over_s;  // s^-beta / s
};

template <typename acc>
AX_HD InvPow<acc> inv_pow_and_over_s(acc s, const Coefs<acc>& c) {
  InvPow<acc> r;
  if (c.fast_three_quarters) {
    const acc rs = ax_rsqrt(s), rs2 = rs * rs;
    r.inv_pow = rs2 * ax_rsqrt(rs);
    r.inv_pow_over_s = r.inv_pow * rs2;
  } else {
    r.inv_pow = ax_pow(s, -c.beta);
    r.inv_pow_over_s = r.inv_pow / s;
  }
  return r;
}

// One term of the gradient's window sum: t = dy * x * s^-beta / s.
template <typename acc>
AX_HD acc grad_term(acc dy, acc x, acc s_inv_pow, acc s) {
  return dy * x * s_inv_pow / s;
}

// dx[i] from its first term dy[i] * s[i]^-beta and the window sum of t over R(i).
template <typename acc>
AX_HD acc grad_input(acc dy_times_inv_pow, acc x, acc sum_t, const Coefs<acc>& c) {
  return dy_times_inv_pow - c.grad_coef * x * sum_t;
}

// Sum of f(j) over the channels j in [c - lo, c + hi] clipped to [0, C), in
// ascending j: the forward window W(c) with (lo, hi) = (before, after), the
// backward window R(c) with them swapped. For kernels that visit one
// element at a time (the fused LRN + max-pool).
template <typename acc, typename F>
AX_HD acc channel_window_sum(const F& f, int64_t c, int64_t C, int lo, int hi) {
  const int64_t first = c - lo < 0 ? 0 : c - lo;
  const int64_t last = c + hi < C - 1 ? c + hi : C - 1;
  acc sum = acc(0);
  for (int64_t j = first; j <= last; ++j) sum += f(j);
  return sum;
}

}  // namespace lrn
}  // namespace alexnet_ext
