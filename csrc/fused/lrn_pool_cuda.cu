// Fused LRN + max-pool CUDA kernels. No PyTorch headers (see common/dtype.h);
// the arithmetic is lrn_math.h's and pool_math.h's, the functions the CPU
// tests exercise. Written to be correct first:
//   - forward: one thread per pooled output; for each element of its window
//     it computes the LRN output (window sum of squares over the channels,
//     rounded to T as the unfused LRN stores it) and feeds window_max(). The
//     up to 4x overlap of neighbouring windows and the `size`x reuse of
//     each input across channels are served by L1/L2; device memory sees x
//     once, y and the uint8 argmax once.
//   - backward: one thread per input element (each dx written once, no
//     zero-fill, no atomics). For each channel c' of its backward window
//     R(c) it gathers d loss / d lrn_out(c') through the argmax
//     (gather_grad) and recomputes that element's denominator, then applies
//     the LRN backward formula. Every term is computed even where the
//     pooled gradient is zero, so NaN/inf inputs propagate exactly as in
//     the unfused pair.
// The thread index runs over memory order in both layouts, so neighbouring
// threads touch neighbouring addresses.
#include "common/cuda_utils.cuh"
#include "fused/lrn_pool_cuda.h"

namespace alexnet_ext {
namespace fused {
namespace {

constexpr int kThreads = 256;

// Element (c, h, w) of image n, and pooled element (c, oh, ow), in either layout.
struct Indexer {
  int64_t C;
  int H, W, OH, OW;
  bool channels_last;
  __device__ __forceinline__ int64_t input(int64_t n, int64_t c, int h, int w) const {
    const int64_t pixel = int64_t{h} * W + w;
    return channels_last ? (n * H * W + pixel) * C + c : (n * C + c) * H * W + pixel;
  }
  __device__ __forceinline__ int64_t pooled(int64_t n, int64_t c, int oh, int ow) const {
    const int64_t pixel = int64_t{oh} * OW + ow;
    return channels_last ? (n * OH * OW + pixel) * C + c : (n * C + c) * OH * OW + pixel;
  }
  // Inverse of input() (rows = H, cols = W) or pooled() (rows = OH, cols = OW).
  __device__ __forceinline__ void split(int64_t i, int rows, int cols, int64_t& n, int64_t& c, int& r,
                                        int& q) const {
    if (channels_last) {
      c = i % C;
      int64_t t = i / C;
      q = static_cast<int>(t % cols);
      t /= cols;
      r = static_cast<int>(t % rows);
      n = t / rows;
    } else {
      q = static_cast<int>(i % cols);
      int64_t t = i / cols;
      r = static_cast<int>(t % rows);
      t /= rows;
      c = t % C;
      n = t / C;
    }
  }
};

Indexer make_indexer(const LrnPoolParams& p) {
  return Indexer{p.lrn.channels, p.pool.in_h, p.pool.in_w, p.pool.out_h, p.pool.out_w, p.lrn.channels_last};
}

// Sum of squares of x over the forward window W(c) at pixel (h, w) of image n.
template <typename T>
__device__ __forceinline__ acc_t<T> window_sum_sq(const T* __restrict__ x, const Indexer& ix, int before, int after,
                                                  int64_t n, int64_t c, int h, int w) {
  using acc = acc_t<T>;
  return lrn::channel_window_sum<acc>(
      [&](int64_t j) {
        const acc v = to_acc<T>(x[ix.input(n, j, h, w)]);
        return v * v;
      },
      c, ix.C, before, after);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) forward_per_output(const T* __restrict__ x, T* __restrict__ y,
                                                              uint8_t* __restrict__ argmax, const Indexer ix,
                                                              const pool::PoolGeometry g,
                                                              const lrn::Coefs<acc_t<T>> coefs, int before, int after,
                                                              int64_t total) {
  using acc = acc_t<T>;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t n, c;
    int oh, ow;
    ix.split(i, g.out_h, g.out_w, n, c, oh, ow);
    // Few values live across the LRN's pow() call (ptxas spills otherwise):
    // the element pointer and two strides.
    const T* xc = x + ix.input(n, c, 0, 0);
    const int64_t channel_stride = ix.channels_last ? 1 : int64_t{g.in_h} * g.in_w;
    const int pixel_stride = ix.channels_last ? static_cast<int>(ix.C) : 1;
    const int in_w = g.in_w;
    const int64_t C = ix.C;
    const auto lrn_at = [=](int ih, int iw) {
      const T* xp = xc + int64_t{ih * in_w + iw} * pixel_stride;
      const acc sum = lrn::channel_window_sum<acc>(
          [=](int64_t j) {
            const acc v = to_acc<T>(xp[(j - c) * channel_stride]);
            return v * v;
          },
          c, C, before, after);
      // Rounded to T: the unfused pair pools the LRN output as stored.
      return to_acc<T>(from_acc<T>(lrn_output(to_acc<T>(*xp), sum, coefs)));
    };
    int off;
    const acc m = pool::window_max<acc>(oh, ow, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.in_h, g.in_w, lrn_at, &off);
    y[i] = from_acc<T>(m);
    if (argmax != nullptr) argmax[i] = static_cast<uint8_t>(off);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) backward_per_input(const T* __restrict__ dy,
                                                              const uint8_t* __restrict__ argmax,
                                                              const T* __restrict__ x, T* __restrict__ dx,
                                                              const Indexer ix, const pool::PoolGeometry g,
                                                              const lrn::Coefs<acc_t<T>> coefs, int before,
                                                              int after, int64_t total) {
  using acc = acc_t<T>;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t n, c;
    int h, w;
    ix.split(i, g.in_h, g.in_w, n, c, h, w);
    acc own = acc(0);  // d loss / d lrn_out(c) * s(c)^-beta
    // sum over c' in R(c) = [c - after, c + before] of t(c') = g(c') * x(c') * s(c')^-beta / s(c').
    const acc sum_t = lrn::channel_window_sum<acc>(
        [&](int64_t c2) {
          const auto arg = [&](int oh, int ow) { return argmax[ix.pooled(n, c2, oh, ow)]; };
          const auto grad = [&](int oh, int ow) { return to_acc<T>(dy[ix.pooled(n, c2, oh, ow)]); };
          const acc g2 = pool::gather_grad<acc>(h, w, g, arg, grad);
          const acc base = lrn::denominator_base(window_sum_sq(x, ix, before, after, n, c2, h, w), coefs);
          const acc ip = lrn::inv_pow(base, coefs);
          if (c2 == c) own = g2 * ip;
          return lrn::grad_term(g2, to_acc<T>(x[ix.input(n, c2, h, w)]), ip, base);
        },
        c, ix.C, after, before);
    dx[i] = from_acc<T>(lrn::grad_input(own, to_acc<T>(x[i]), sum_t, coefs));
  }
}

}  // namespace

LaunchStatus lrn_max_pool2d_forward_cuda(DType dtype, const void* x, void* y, void* argmax, const LrnPoolParams& p,
                                         void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  const int64_t total = p.pool.planes * p.pool.out_h * p.pool.out_w;
  const int before = lrn::window_before(p.lrn.size), after = lrn::window_after(p.lrn.size);
  return dispatch_cuda_dtype(dtype, [&](auto tag) -> LaunchStatus {
    using T = decltype(tag);
    forward_per_output<T><<<grid_for(total, kThreads), kThreads, 0, s>>>(
        static_cast<const T*>(x), static_cast<T*>(y), static_cast<uint8_t*>(argmax), make_indexer(p), p.pool,
        lrn::make_coefs<acc_t<T>>(p.lrn), before, after, total);
    return cudaGetLastError();
  });
}

LaunchStatus lrn_max_pool2d_backward_cuda(DType dtype, const void* dy, const void* argmax, const void* x, void* dx,
                                          const LrnPoolParams& p, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  const int64_t total = p.pool.planes * p.pool.in_h * p.pool.in_w;
  const int before = lrn::window_before(p.lrn.size), after = lrn::window_after(p.lrn.size);
  return dispatch_cuda_dtype(dtype, [&](auto tag) -> LaunchStatus {
    using T = decltype(tag);
    backward_per_input<T><<<grid_for(total, kThreads), kThreads, 0, s>>>(
        static_cast<const T*>(dy), static_cast<const uint8_t*>(argmax), static_cast<const T*>(x),
        static_cast<T*>(dx), make_indexer(p), p.pool, lrn::make_coefs<acc_t<T>>(p.lrn), before, after, total);
    return cudaGetLastError();
  });
}

}  // namespace fused
}  // namespace alexnet_ext
