// Max-pool on the CPU, parallel over planes (N x C) for NCHW and over
// (image, row) for channels_last. All window arithmetic comes from
// pool_math.h, the same functions the CUDA kernels call.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <vector>

#include "maxpool/pool_cpu.h"
#include "maxpool/pool_math.h"

namespace alexnet_ext {
namespace pool {
namespace {

// Roughly this many elements of work per parallel task.
constexpr int64_t kGrainElements = 16384;

int64_t grain(int64_t work_per_item) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, work_per_item)); }

// NCHW: one plane at a time. kAlexNet fixes AlexNet's 3x3 / stride 2 /
// padding 0 window at compile time so the compiler unrolls the window scan;
// the arithmetic is the same function either way.
template <typename scalar_t, typename off_t, bool kAlexNet, bool kSaveArgmax>
void forward_nchw(const scalar_t* x, scalar_t* y, off_t* argmax, const PoolGeometry& g) {
  using acc = at::opmath_type<scalar_t>;
  const int kh = kAlexNet ? 3 : g.kh, kw = kAlexNet ? 3 : g.kw;
  const int sh = kAlexNet ? 2 : g.sh, sw = kAlexNet ? 2 : g.sw;
  const int ph = kAlexNet ? 0 : g.ph, pw = kAlexNet ? 0 : g.pw;
  const int64_t in_plane = int64_t{g.in_h} * g.in_w, out_plane = int64_t{g.out_h} * g.out_w;
  at::parallel_for(0, g.planes, grain(in_plane), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const scalar_t* xp = x + p * in_plane;
      const int in_w = g.in_w;
      const auto load = [xp, in_w](int ih, int iw) { return static_cast<acc>(xp[int64_t{ih} * in_w + iw]); };
      scalar_t* yp = y + p * out_plane;
      off_t* ap = kSaveArgmax ? argmax + p * out_plane : nullptr;
      for (int oh = 0; oh < g.out_h; ++oh) {
        for (int ow = 0; ow < g.out_w; ++ow) {
          int off;
          const acc m = window_max<acc>(oh, ow, kh, kw, sh, sw, ph, pw, g.in_h, g.in_w, load, &off);
          yp[oh * g.out_w + ow] = static_cast<scalar_t>(m);
          if (kSaveArgmax) ap[oh * g.out_w + ow] = static_cast<off_t>(off);
        }
      }
    }
  });
}

// channels_last: one output row of one image per task. The window is walked
// element by element with the channel loop innermost, so every load is a
// contiguous run of C values (the compiler vectorises the select below);
// this is window_max() with its channel loop moved inside.
template <typename scalar_t, typename off_t, bool kSaveArgmax>
void forward_channels_last(const scalar_t* x, scalar_t* y, off_t* argmax, const PoolGeometry& g) {
  using acc = at::opmath_type<scalar_t>;
  const int64_t C = g.channels, images = g.planes / std::max<int64_t>(1, C);
  at::parallel_for(0, images * g.out_h, grain(int64_t{g.out_w} * g.kh * g.kw * C), [&](int64_t begin, int64_t end) {
    std::vector<acc> best(C);
    std::vector<int> best_off(C);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / g.out_h;
      const int oh = static_cast<int>(t % g.out_h);
      const int h0 = window_start(oh, g.sh, g.ph);
      const int ih_lo = ax_max(h0, 0), ih_hi = ax_min(h0 + g.kh, g.in_h);
      for (int ow = 0; ow < g.out_w; ++ow) {
        const int w0 = window_start(ow, g.sw, g.pw);
        const int iw_lo = ax_max(w0, 0), iw_hi = ax_min(w0 + g.kw, g.in_w);
        for (int ih = ih_lo; ih < ih_hi; ++ih) {
          for (int iw = iw_lo; iw < iw_hi; ++iw) {
            const scalar_t* px = x + ((n * g.in_h + ih) * g.in_w + iw) * C;
            const int off = encode_offset(ih - h0, iw - w0, g.kw);
            if (ih == ih_lo && iw == iw_lo) {
              for (int64_t c = 0; c < C; ++c) {
                best[c] = static_cast<acc>(px[c]);
                best_off[c] = off;
              }
              continue;
            }
            for (int64_t c = 0; c < C; ++c) {
              const acc v = static_cast<acc>(px[c]);
              const bool take = takes_max(v, best[c]);
              best[c] = take ? v : best[c];
              best_off[c] = take ? off : best_off[c];
            }
          }
        }
        const int64_t o = ((n * g.out_h + oh) * g.out_w + ow) * C;
        for (int64_t c = 0; c < C; ++c) y[o + c] = static_cast<scalar_t>(best[c]);
        if (kSaveArgmax)
          for (int64_t c = 0; c < C; ++c) argmax[o + c] = static_cast<off_t>(best_off[c]);
      }
    }
  });
}

template <typename scalar_t, typename off_t>
void backward_nchw(const scalar_t* dy, const off_t* argmax, scalar_t* dx, const PoolGeometry& g) {
  using acc = at::opmath_type<scalar_t>;
  const int64_t in_plane = int64_t{g.in_h} * g.in_w, out_plane = int64_t{g.out_h} * g.out_w;
  at::parallel_for(0, g.planes, grain(in_plane), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const off_t* ap = argmax + p * out_plane;
      const scalar_t* gp = dy + p * out_plane;
      const int out_w = g.out_w;
      const auto arg = [ap, out_w](int oh, int ow) { return ap[oh * out_w + ow]; };
      const auto grad = [gp, out_w](int oh, int ow) { return static_cast<acc>(gp[oh * out_w + ow]); };
      scalar_t* dxp = dx + p * in_plane;
      for (int h = 0; h < g.in_h; ++h)
        for (int w = 0; w < g.in_w; ++w)
          dxp[int64_t{h} * g.in_w + w] = static_cast<scalar_t>(gather_grad<acc>(h, w, g, arg, grad));
    }
  });
}

template <typename scalar_t, typename off_t>
void backward_channels_last(const scalar_t* dy, const off_t* argmax, scalar_t* dx, const PoolGeometry& g) {
  using acc = at::opmath_type<scalar_t>;
  const int64_t C = g.channels, images = g.planes / std::max<int64_t>(1, C);
  at::parallel_for(0, images * g.in_h, grain(int64_t{g.in_w} * C * 4), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / g.in_h;
      const int h = static_cast<int>(t % g.in_h);
      const off_t* an = argmax + n * g.out_h * g.out_w * C;
      const scalar_t* gn = dy + n * g.out_h * g.out_w * C;
      for (int w = 0; w < g.in_w; ++w) {
        scalar_t* dxp = dx + ((n * g.in_h + h) * g.in_w + w) * C;
        for (int64_t c = 0; c < C; ++c) {
          const auto at_c = [C, c, &g](int oh, int ow) { return (int64_t{oh} * g.out_w + ow) * C + c; };
          const auto arg = [an, &at_c](int oh, int ow) { return an[at_c(oh, ow)]; };
          const auto grad = [gn, &at_c](int oh, int ow) { return static_cast<acc>(gn[at_c(oh, ow)]); };
          dxp[c] = static_cast<scalar_t>(gather_grad<acc>(h, w, g, arg, grad));
        }
      }
    }
  });
}

template <typename scalar_t, typename off_t, bool kSaveArgmax>
void forward_typed(const scalar_t* x, scalar_t* y, off_t* argmax, const PoolGeometry& g) {
  if (g.channels_last) {
    forward_channels_last<scalar_t, off_t, kSaveArgmax>(x, y, argmax, g);
  } else if (g.kh == 3 && g.kw == 3 && g.sh == 2 && g.sw == 2 && g.ph == 0 && g.pw == 0) {
    forward_nchw<scalar_t, off_t, true, kSaveArgmax>(x, y, argmax, g);
  } else {
    forward_nchw<scalar_t, off_t, false, kSaveArgmax>(x, y, argmax, g);
  }
}

}  // namespace

void max_pool2d_forward_cpu(const at::Tensor& x, at::Tensor& y, at::Tensor* argmax, const PoolGeometry& g) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "max_pool2d_forward_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    if (argmax == nullptr) {
      forward_typed<scalar_t, uint8_t, false>(xp, yp, nullptr, g);
    } else if (argmax->scalar_type() == at::kByte) {
      forward_typed<scalar_t, uint8_t, true>(xp, yp, argmax->mutable_data_ptr<uint8_t>(), g);
    } else {
      forward_typed<scalar_t, int32_t, true>(xp, yp, argmax->mutable_data_ptr<int32_t>(), g);
    }
  });
}

void max_pool2d_backward_cpu(const at::Tensor& dy, const at::Tensor& argmax, at::Tensor& dx, const PoolGeometry& g) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "max_pool2d_backward_cpu", [&] {
    const scalar_t* gp = dy.const_data_ptr<scalar_t>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    const auto run = [&](const auto* ap) {
      if (g.channels_last) backward_channels_last(gp, ap, dxp, g);
      else backward_nchw(gp, ap, dxp, g);
    };
    if (argmax.scalar_type() == at::kByte) run(argmax.const_data_ptr<uint8_t>());
    else run(argmax.const_data_ptr<int32_t>());
  });
}

}  // namespace pool
}  // namespace alexnet_ext
