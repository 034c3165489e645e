// Max-pool on the CPU, parallel over planes (N x C) for NCHW and over
// (image, row) for channels_last. All window arithmetic comes from
// pool_math.h, the same functions the CUDA kernels call.
//
// General windows use the CUDA kernels' own algorithms, so the CPU tests
// exercise them: window_max per output (NCHW forward) and gather_grad per
// input element (backward, both layouts). channels_last forward walks the
// window with the channel loop innermost, a register-sized block of channels
// at a time, compiled for AVX-512/AVX2 where the CPU has them
// (common/cpu_isa.h): PyTorch's channels_last kernel is vectorised the same
// way, and the baseline SSE2 build of this loop ran at half its speed.
// AlexNet's 3x3 / stride 2 window gets two CPU-specific fast paths:
//   - NCHW forward is separable: a max over 3 columns for every input row,
//     then over 3 of those rows per output row. Both passes are branch-free
//     selects over contiguous arrays, which the compiler vectorises
//     (PyTorch's NCHW kernel branches on every element). Row-then-column
//     order keeps the row-major "first maximum / last NaN wins" rule: the
//     running-maximum rule is associative over concatenated runs.
//   - backward scatters each output's gradient to its argmax inside a
//     zeroed plane (or image) that stays in cache, in output order: exactly
//     PyTorch's summation order, at one add per output instead of a search
//     of every covering window per input element. channels_last adds, for
//     each window position, the gradient where the argmax points there and
//     zero elsewhere: contiguous, vectorised, and the same sums (adding +0
//     changes no sum, which starts at +0 and so is never -0).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common/cpu_isa.h"
#include "maxpool/pool_cpu.h"
#include "maxpool/pool_math.h"

namespace alexnet_ext {
namespace pool {
namespace {

// Roughly this many elements of work per parallel task.
constexpr int64_t kGrainElements = 16384;

int64_t grain(int64_t work_per_item) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, work_per_item)); }

// NCHW, any window: one plane at a time, window_max() per output.
template <typename scalar_t, typename off_t, bool kSaveArgmax>
void forward_nchw(const scalar_t* x, scalar_t* y, off_t* argmax, const PoolGeometry& g) {
  using acc = at::opmath_type<scalar_t>;
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
          const acc m = window_max<acc>(oh, ow, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.in_h, g.in_w, load, &off);
          yp[oh * g.out_w + ow] = static_cast<scalar_t>(m);
          if (kSaveArgmax) ap[oh * g.out_w + ow] = static_cast<off_t>(off);
        }
      }
    }
  });
}

// Same-width integer for offsets kept next to acc values, so the selects
// below vectorise with one mask for both.
template <typename acc>
using lane_int = std::conditional_t<sizeof(acc) == 8, int64_t, int32_t>;

// Maximum over K consecutive columns starting every S columns, for n
// windows that lie inside the row: cm[i] and its column offset co[i].
template <int K, int S, typename scalar_t, typename acc, typename lane>
void column_max(const scalar_t* __restrict__ row, acc* __restrict__ cm, lane* __restrict__ co, int n) {
  for (int i = 0; i < n; ++i) {
    acc m = static_cast<acc>(row[i * S]);
    lane d = 0;
    for (int j = 1; j < K; ++j) {
      const acc v = static_cast<acc>(row[i * S + j]);
      const bool take = takes_max(v, m);
      m = take ? v : m;
      d = take ? lane(j) : d;
    }
    cm[i] = m;
    co[i] = d;
  }
}

// Folds a row of column maxima into the running maxima of a row of outputs:
// candidate i is cm[i] at offset row_offset + co[i].
template <typename acc, typename lane>
void merge_row(const acc* __restrict__ cm, const lane* __restrict__ co, lane row_offset, acc* __restrict__ best,
               lane* __restrict__ best_off, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const acc x = cm[i], m = best[i];
    const lane d = row_offset + co[i], md = best_off[i];
    const bool take = takes_max(x, m);
    best[i] = take ? x : m;
    best_off[i] = take ? d : md;
  }
}

// channels_last works on blocks of this many channels (four AVX-512
// vectors): a block's running maxima and offsets stay in registers while
// the window is walked.
template <typename acc>
constexpr int kChannelBlock = 128 / sizeof(acc);

// One output pixel, channels [0, n) of one block (n == B but for the last
// block): the clipped window [ih_lo, ih_hi) x [iw_lo, iw_hi) of image
// pixels `x_img`, channel loop innermost. This is window_max() with its
// channel loop moved inside; starting from the first element and scanning it
// again changes nothing (it does not exceed itself; a NaN replacing itself is
// the same).
template <int B, bool kFullBlock, bool kSaveArgmax, typename scalar_t, typename off_t>
inline void window_max_channels(const scalar_t* x_img, int64_t C, const PoolGeometry& g, int h0, int w0, int ih_lo,
                                int ih_hi, int iw_lo, int iw_hi, int n, scalar_t* y, off_t* argmax) {
  using acc = at::opmath_type<scalar_t>;
  using lane = lane_int<acc>;
  const int count = kFullBlock ? B : n;  // a constant trip count lets the block live in registers
  acc best[B];
  lane best_off[B];
  const scalar_t* first = x_img + (int64_t{ih_lo} * g.in_w + iw_lo) * C;
  const lane first_off = encode_offset(ih_lo - h0, iw_lo - w0, g.kw);
  for (int i = 0; i < count; ++i) {
    best[i] = static_cast<acc>(first[i]);
    best_off[i] = first_off;
  }
  for (int ih = ih_lo; ih < ih_hi; ++ih) {
    for (int iw = iw_lo; iw < iw_hi; ++iw) {
      const scalar_t* px = x_img + (int64_t{ih} * g.in_w + iw) * C;
      const lane off = encode_offset(ih - h0, iw - w0, g.kw);
      for (int i = 0; i < count; ++i) {
        const acc v = static_cast<acc>(px[i]);
        const bool take = takes_max(v, best[i]);
        best[i] = take ? v : best[i];
        if (kSaveArgmax) best_off[i] = take ? off : best_off[i];
      }
    }
  }
  for (int i = 0; i < count; ++i) y[i] = static_cast<scalar_t>(best[i]);
  if (kSaveArgmax)
    for (int i = 0; i < count; ++i) argmax[i] = static_cast<off_t>(best_off[i]);
}

// channels_last, any window: one output row of one image per task.
template <typename scalar_t, typename off_t, bool kSaveArgmax>
void forward_channels_last(const scalar_t* x, scalar_t* y, off_t* argmax, const PoolGeometry& g) {
  constexpr int B = kChannelBlock<at::opmath_type<scalar_t>>;
  const int64_t C = g.channels, images = g.planes / std::max<int64_t>(1, C);
  at::parallel_for(0, images * g.out_h, grain(int64_t{g.out_w} * g.kh * g.kw * C), [&](int64_t begin, int64_t end) {
    with_cpu_isa([&] {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / g.out_h;
        const int oh = static_cast<int>(t % g.out_h);
        const int h0 = window_start(oh, g.sh, g.ph);
        const int ih_lo = ax_max(h0, 0), ih_hi = ax_min(h0 + g.kh, g.in_h);
        const scalar_t* x_img = x + n * g.in_h * g.in_w * C;
        for (int ow = 0; ow < g.out_w; ++ow) {
          const int w0 = window_start(ow, g.sw, g.pw);
          const int iw_lo = ax_max(w0, 0), iw_hi = ax_min(w0 + g.kw, g.in_w);
          const int64_t o = ((n * g.out_h + oh) * g.out_w + ow) * C;
          int64_t c = 0;
          for (; c + B <= C; c += B)
            window_max_channels<B, true, kSaveArgmax>(x_img + c, C, g, h0, w0, ih_lo, ih_hi, iw_lo, iw_hi, B,
                                                      y + o + c, kSaveArgmax ? argmax + o + c : nullptr);
          if (c < C)
            window_max_channels<B, false, kSaveArgmax>(x_img + c, C, g, h0, w0, ih_lo, ih_hi, iw_lo, iw_hi,
                                                       static_cast<int>(C - c), y + o + c,
                                                       kSaveArgmax ? argmax + o + c : nullptr);
        }
      }
    });
  });
}

// Input offsets (in pixels) of each argmax offset, so the scatter below never
// divides: delta[dh * kw + dw] = dh * in_w + dw.
std::vector<int64_t> offset_deltas(const PoolGeometry& g) {
  std::vector<int64_t> delta(static_cast<size_t>(g.kh) * g.kw);
  for (int dh = 0; dh < g.kh; ++dh)
    for (int dw = 0; dw < g.kw; ++dw) delta[encode_offset(dh, dw, g.kw)] = int64_t{dh} * g.in_w + dw;
  return delta;
}

// Runs fn(acc* buffer) on n zeroed accumulators, then stores them in dx:
// float and double accumulate in dx itself, reduced precision in float.
template <typename scalar_t, typename Fn>
void accumulate_into(scalar_t* dx, int64_t n, std::vector<at::opmath_type<scalar_t>>& scratch, Fn fn) {
  using acc = at::opmath_type<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, acc>) {
    std::fill(dx, dx + n, acc(0));
    fn(dx);
  } else {
    scratch.assign(n, acc(0));
    fn(scratch.data());
    for (int64_t i = 0; i < n; ++i) dx[i] = static_cast<scalar_t>(scratch[i]);
  }
}

// NCHW forward for a K x K window with stride S (any padding, ceil_mode).
template <typename scalar_t, typename off_t, int K, int S, bool kSaveArgmax>
void forward_nchw_separable(const scalar_t* x, scalar_t* y, off_t* argmax, const PoolGeometry& g) {
  using acc = at::opmath_type<scalar_t>;
  using lane = lane_int<acc>;
  const int64_t in_plane = int64_t{g.in_h} * g.in_w, out_plane = int64_t{g.out_h} * g.out_w;
  const int OW = g.out_w;
  // Outputs whose windows lie inside the row: [ow_a, ow_b).
  const int ow_a = ax_min((g.pw + S - 1) / S, OW);
  const int ow_b = ax_max(ow_a, ax_min(OW, g.in_w + g.pw >= K ? (g.in_w + g.pw - K) / S + 1 : 0));
  at::parallel_for(0, g.planes, grain(in_plane), [&](int64_t begin, int64_t end) {
    // Column maxima of every input row of one plane, and their column offsets.
    std::vector<acc> col_max(static_cast<size_t>(g.in_h) * OW), best(OW);
    std::vector<lane> col_off(col_max.size()), best_off(OW);
    for (int64_t p = begin; p < end; ++p) {
      const scalar_t* xp = x + p * in_plane;
      for (int ih = 0; ih < g.in_h; ++ih) {
        const scalar_t* row = xp + int64_t{ih} * g.in_w;
        acc* cm = col_max.data() + int64_t{ih} * OW;
        lane* co = col_off.data() + int64_t{ih} * OW;
        const auto clipped = [&](int ow) {  // edge windows: the general rule
          const int w0 = window_start(ow, S, g.pw);
          const int lo = ax_max(w0, 0), hi = ax_min(w0 + K, g.in_w);
          acc m = static_cast<acc>(row[lo]);
          int d = lo - w0;
          for (int iw = lo + 1; iw < hi; ++iw) {
            const acc v = static_cast<acc>(row[iw]);
            if (takes_max(v, m)) m = v, d = iw - w0;
          }
          cm[ow] = m;
          co[ow] = d;
        };
        for (int ow = 0; ow < ow_a; ++ow) clipped(ow);
        if (ow_b > ow_a)
          column_max<K, S>(row + window_start(ow_a, S, g.pw), cm + ow_a, co + ow_a, ow_b - ow_a);
        for (int ow = ow_b; ow < OW; ++ow) clipped(ow);
      }
      scalar_t* yp = y + p * out_plane;
      for (int oh = 0; oh < g.out_h; ++oh) {
        const int h0 = window_start(oh, S, g.ph);
        const int lo = ax_max(h0, 0), hi = ax_min(h0 + K, g.in_h);
        const acc* cm = col_max.data() + int64_t{lo} * OW;
        const lane* co = col_off.data() + int64_t{lo} * OW;
        const lane first_row = encode_offset(lo - h0, 0, K);
        for (int ow = 0; ow < OW; ++ow) {
          best[ow] = cm[ow];
          best_off[ow] = first_row + co[ow];
        }
        for (int ih = lo + 1; ih < hi; ++ih)
          merge_row(col_max.data() + int64_t{ih} * OW, col_off.data() + int64_t{ih} * OW,
                    lane(encode_offset(ih - h0, 0, K)), best.data(), best_off.data(), OW);
        for (int ow = 0; ow < OW; ++ow) yp[int64_t{oh} * OW + ow] = static_cast<scalar_t>(best[ow]);
        if (kSaveArgmax) {
          off_t* ap = argmax + p * out_plane + int64_t{oh} * OW;
          for (int ow = 0; ow < OW; ++ow) ap[ow] = static_cast<off_t>(best_off[ow]);
        }
      }
    }
  });
}

// sum[c] += grad[c] where argmax[c] == k, for one input pixel's n channels
// (restrict: the uint8 argmax could otherwise alias the sums, which would
// stop the loop from vectorising).
template <typename acc, typename scalar_t, typename off_t>
inline void add_where_argmax(acc* __restrict__ sum, const scalar_t* __restrict__ grad,
                             const off_t* __restrict__ argmax, int k, int64_t n) {
  for (int64_t c = 0; c < n; ++c) sum[c] += static_cast<int>(argmax[c]) == k ? static_cast<acc>(grad[c]) : acc(0);
}

// Backward by scatter into zeroed accumulators, in output order. NCHW: one
// plane per step; channels_last: one image per step.
template <typename scalar_t, typename off_t>
void backward_scatter(const scalar_t* dy, const off_t* argmax, scalar_t* dx, const PoolGeometry& g) {
  using acc = at::opmath_type<scalar_t>;
  const std::vector<int64_t> delta = offset_deltas(g);
  const int64_t C = g.channels_last ? g.channels : 1;
  const int64_t in_size = int64_t{g.in_h} * g.in_w * C, out_size = int64_t{g.out_h} * g.out_w * C;
  const int64_t steps = g.planes / C;
  at::parallel_for(0, steps, grain(in_size), [&](int64_t begin, int64_t end) {
    std::vector<acc> scratch;
    for (int64_t s = begin; s < end; ++s) {
      const scalar_t* gs = dy + s * out_size;
      const off_t* as = argmax + s * out_size;
      accumulate_into(dx + s * in_size, in_size, scratch, [&](acc* sum) {
        if (C == 1) {
          // Offsets index memory here: pool.cpp checked that each names a
          // position inside the image (check_argmax_offsets).
          for (int oh = 0; oh < g.out_h; ++oh) {
            const int64_t h0 = window_start(oh, g.sh, g.ph);
            for (int ow = 0; ow < g.out_w; ++ow) {
              const int64_t o = int64_t{oh} * g.out_w + ow;
              sum[h0 * g.in_w + window_start(ow, g.sw, g.pw) + delta[as[o]]] += static_cast<acc>(gs[o]);
            }
          }
          return;
        }
        with_cpu_isa([&] {
          for (int oh = 0; oh < g.out_h; ++oh) {
            const int h0 = window_start(oh, g.sh, g.ph);
            const int ih_lo = ax_max(h0, 0), ih_hi = ax_min(h0 + g.kh, g.in_h);
            for (int ow = 0; ow < g.out_w; ++ow) {
              const int w0 = window_start(ow, g.sw, g.pw);
              const int iw_lo = ax_max(w0, 0), iw_hi = ax_min(w0 + g.kw, g.in_w);
              const int64_t o = (int64_t{oh} * g.out_w + ow) * C;
              // Only the window's positions inside the image: padding has no
              // accumulator (and never holds the maximum).
              for (int ih = ih_lo; ih < ih_hi; ++ih) {
                for (int iw = iw_lo; iw < iw_hi; ++iw) {
                  add_where_argmax(sum + (int64_t{ih} * g.in_w + iw) * C, gs + o, as + o,
                                   encode_offset(ih - h0, iw - w0, g.kw), C);
                }
              }
            }
          }
        });
      });
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
  } else if (is_alexnet_window(g)) {
    forward_nchw_separable<scalar_t, off_t, 3, 2, kSaveArgmax>(x, y, argmax, g);
  } else {
    forward_nchw<scalar_t, off_t, kSaveArgmax>(x, y, argmax, g);
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
      if (is_alexnet_window(g)) backward_scatter(gp, ap, dxp, g);
      else if (g.channels_last) backward_channels_last(gp, ap, dxp, g);
      else backward_nchw(gp, ap, dxp, g);
    };
    if (argmax.scalar_type() == at::kByte) run(argmax.const_data_ptr<uint8_t>());
    else run(argmax.const_data_ptr<int32_t>());
  });
}

}  // namespace pool
}  // namespace alexnet_ext
