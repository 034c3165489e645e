// Fused LRN + max-pool on the CPU, both layouts, any pool window.
//
// Forward: a task is one image and a band of pooled output rows. It copies
// the input rows those outputs' windows cover (all channels) into a (C, B)
// buffer of about kBufferBytes, so the band stays in L2; then, channel by
// channel, it takes the LRN window sums over the buffer, writes that
// channel's LRN rows into a B-element buffer (rounded to the tensor's dtype,
// as the unfused LRN stores them) and pools them with pool_math.h's
// window_max. The LRN output never reaches memory. Neighbouring bands share
// (kh - sh) input rows, recomputed: 1/8 extra work for 3x3/2 at AlexNet's
// band heights.
//
// Backward: a task is one image and a band of input rows (each dx element
// has exactly one writer). d loss / d lrn_out is the pooled gradients
// scattered to their argmax, so it is non-zero at about a quarter of the
// elements: the task recomputes the LRN denominators (lrn_math.h) only
// there, from x, adds their terms in output order (PyTorch's summation
// order) into zeroed (C, B) buffers, then takes the backward window sums
// and dx densely (adds and multiplies only). A band holding a non-finite x
// (or k = 0) takes the dense formula instead, so NaN and inf spread exactly
// as through the unfused pair.
//
// Buffers are channel-major in both layouts, so the inner loops run over
// contiguous pixels of a channel and vectorise (compiled for AVX-512/AVX2
// where the CPU has them, common/cpu_isa.h); only the copies in and out
// know the layout.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common/cpu_isa.h"
#include "fused/lrn_pool_cpu.h"

namespace alexnet_ext {
namespace fused {
namespace {

using lrn::Coefs;
using pool::PoolGeometry;

// Size of one (C, B) buffer a task aims for: its few buffers stay in L2.
constexpr int64_t kBufferBytes = 256 * 1024;

// Rows [r0, r0 + rows) of one (C, H, W) image in either layout, and their
// (C, B = rows * W) channel-major buffer: copies walk memory in order.
template <bool kChannelsLast>
struct Band {
  int64_t C, H, W, r0, rows;
  int64_t pixels() const { return rows * W; }

  template <typename acc, typename scalar_t>
  void load(const scalar_t* img, acc* buf) const {
    const int64_t B = pixels();
    if (kChannelsLast) {
      const scalar_t* src = img + r0 * W * C;
      for (int64_t b = 0; b < B; ++b)
        for (int64_t c = 0; c < C; ++c) buf[c * B + b] = static_cast<acc>(src[b * C + c]);
    } else {
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t* src = img + (c * H + r0) * W;
        for (int64_t b = 0; b < B; ++b) buf[c * B + b] = static_cast<acc>(src[b]);
      }
    }
  }

  template <typename scalar_t, typename acc>
  void store(const acc* buf, scalar_t* img) const {
    const int64_t B = pixels();
    if (kChannelsLast) {
      scalar_t* dst = img + r0 * W * C;
      for (int64_t b = 0; b < B; ++b)
        for (int64_t c = 0; c < C; ++c) dst[b * C + c] = static_cast<scalar_t>(buf[c * B + b]);
    } else {
      for (int64_t c = 0; c < C; ++c) {
        scalar_t* dst = img + (c * H + r0) * W;
        for (int64_t b = 0; b < B; ++b) dst[b] = static_cast<scalar_t>(buf[c * B + b]);
      }
    }
  }
};

// Offset of pooled element (c, oh, ow) inside image n's output.
template <bool kChannelsLast>
int64_t pooled_offset(const PoolGeometry& g, int64_t c, int oh, int ow) {
  const int64_t pixel = int64_t{oh} * g.out_w + ow;
  return kChannelsLast ? pixel * g.channels + c : c * g.out_h * g.out_w + pixel;
}

// out[b] = sum of f(buf[j*B + b]) over the channels j in [c - lo, c + hi] ∩ [0, C),
// in ascending j (the order of the unfused LRN kernel): a channel's window,
// a row at a time so the pixel loop vectorises.
template <typename acc, typename F>
void window_rows(const acc* __restrict__ buf, acc* __restrict__ out, int64_t c, int64_t C, int64_t B, int lo, int hi,
                 F f) {
  const int64_t first = std::max<int64_t>(0, c - lo), last = std::min<int64_t>(C - 1, c + hi);
  for (int64_t b = 0; b < B; ++b) out[b] = acc(0);
  for (int64_t j = first; j <= last; ++j) {
    const acc* row = buf + j * B;
    for (int64_t b = 0; b < B; ++b) out[b] += f(row[b]);
  }
}

// 3x3 / stride 2 pooling of one output row, for the n outputs whose windows
// lie inside the row: `top` is the window's first present row at the first
// output's first column, `rows` the present rows, `first_dh` the first
// present row's offset in the window. window_max()'s row-major scan and
// takes_max() rule, turned inside out: each window position is one pass of
// branch-free selects over the n outputs, which vectorises (a per-output
// window_max() branches on every element). Rescanning the first element
// changes nothing (it does not exceed itself; a NaN replaces itself).
template <typename acc, typename lane>
void pool_row_3x3s2(const acc* __restrict__ top, int64_t W, int rows, int first_dh, int n, acc* __restrict__ best,
                    lane* __restrict__ best_off) {
  for (int i = 0; i < n; ++i) {
    best[i] = top[2 * i];
    best_off[i] = pool::encode_offset(first_dh, 0, 3);
  }
  for (int r = 0; r < rows; ++r) {
    const acc* row = top + r * W;
    for (int dw = 0; dw < 3; ++dw) {
      const lane off = pool::encode_offset(first_dh + r, dw, 3);
      for (int i = 0; i < n; ++i) {
        const acc v = row[2 * i + dw];
        const bool take = pool::takes_max(v, best[i]);
        best[i] = take ? v : best[i];
        best_off[i] = take ? off : best_off[i];
      }
    }
  }
}

// kAlexNet: 3x3 / stride 2, pooled by pool_row_3x3s2() away from the edges.
template <typename scalar_t, bool kChannelsLast, bool kSaveArgmax, bool kAlexNet>
void forward_impl(const scalar_t* x, scalar_t* y, uint8_t* argmax, const LrnPoolParams& p) {
  using acc = at::opmath_type<scalar_t>;
  const Coefs<acc> coefs = lrn::make_coefs<acc>(p.lrn);
  const PoolGeometry& g = p.pool;
  const int64_t C = p.lrn.channels, H = g.in_h, W = g.in_w;
  const int before = lrn::window_before(p.lrn.size), after = lrn::window_after(p.lrn.size);
  // Output rows per task: the input rows their windows need fill about one buffer.
  const int64_t rows_fit = std::max<int64_t>(g.kh, kBufferBytes / (int64_t{sizeof(acc)} * C * W));
  const int64_t rows_per_band_fit = std::max<int64_t>(1, (rows_fit - g.kh) / g.sh + 1);
  // As few bands as fit, of equal height: each band boundary recomputes
  // (kh - sh) input rows.
  const int64_t bands = (g.out_h + rows_per_band_fit - 1) / rows_per_band_fit;
  const int64_t out_rows = (g.out_h + bands - 1) / bands;
  const int64_t in_image = C * H * W, out_image = C * g.out_h * g.out_w;
  // Outputs whose windows lie inside a row (the others are clipped): [ow_a, ow_b).
  const int ow_a = ax_min((g.pw + 1) / 2, g.out_w);
  const int ow_b = ax_max(ow_a, ax_min(g.out_w, g.in_w + g.pw >= 3 ? (g.in_w + g.pw - 3) / 2 + 1 : 0));
  using lane = std::conditional_t<sizeof(acc) == 8, int64_t, int32_t>;  // mask width of acc
  at::parallel_for(0, p.lrn.outer * bands, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc> xs, sums, lrn_rows, best(static_cast<size_t>(g.out_w));
    std::vector<lane> best_off(static_cast<size_t>(g.out_w));
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / bands;
      const int oh0 = static_cast<int>((t % bands) * out_rows);
      const int oh1 = static_cast<int>(std::min<int64_t>(g.out_h, oh0 + out_rows));
      const int h_lo = ax_max(0, pool::window_start(oh0, g.sh, g.ph));
      const int h_hi = ax_min(g.in_h, pool::window_start(oh1 - 1, g.sh, g.ph) + g.kh);
      const Band<kChannelsLast> band{C, H, W, h_lo, h_hi - h_lo};
      const int64_t B = band.pixels();
      xs.resize(static_cast<size_t>(C * B));
      sums.resize(static_cast<size_t>(B));
      lrn_rows.resize(static_cast<size_t>(B));
      band.load(x + n * in_image, xs.data());
      scalar_t* yn = y + n * out_image;
      uint8_t* an = kSaveArgmax ? argmax + n * out_image : nullptr;
      with_cpu_isa([&] {
        const acc* lrn_band = lrn_rows.data();
        const auto load = [lrn_band, h_lo, W](int ih, int iw) { return lrn_band[(ih - h_lo) * W + iw]; };
        for (int64_t c = 0; c < C; ++c) {
          window_rows(xs.data(), sums.data(), c, C, B, before, after, [](acc v) { return v * v; });
          const acc* xc = xs.data() + c * B;
          for (int64_t b = 0; b < B; ++b)
            lrn_rows[b] = static_cast<acc>(static_cast<scalar_t>(lrn_output(xc[b], sums[b], coefs)));
          for (int oh = oh0; oh < oh1; ++oh) {
            const auto general = [&](int ow) {
              int off;
              const acc m = pool::window_max<acc>(oh, ow, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.in_h, g.in_w, load,
                                                  &off);
              const int64_t o = pooled_offset<kChannelsLast>(g, c, oh, ow);
              yn[o] = static_cast<scalar_t>(m);
              if (kSaveArgmax) an[o] = static_cast<uint8_t>(off);
            };
            if (!kAlexNet) {
              for (int ow = 0; ow < g.out_w; ++ow) general(ow);
              continue;
            }
            for (int ow = 0; ow < ow_a; ++ow) general(ow);
            for (int ow = ow_b; ow < g.out_w; ++ow) general(ow);
            const int h0 = pool::window_start(oh, 2, g.ph);
            const int lo = ax_max(h0, 0), hi = ax_min(h0 + 3, g.in_h);
            pool_row_3x3s2(lrn_band + int64_t{lo - h_lo} * W + pool::window_start(ow_a, 2, g.pw), W, hi - lo, lo - h0,
                           ow_b - ow_a, best.data(), best_off.data());
            for (int ow = ow_a; ow < ow_b; ++ow) {
              const int64_t o = pooled_offset<kChannelsLast>(g, c, oh, ow);
              yn[o] = static_cast<scalar_t>(best[ow - ow_a]);
              if (kSaveArgmax) an[o] = static_cast<uint8_t>(best_off[ow - ow_a]);
            }
          }
        }
      });
    }
  });
}

template <typename scalar_t, bool kChannelsLast>
void backward_impl(const scalar_t* dy, const uint8_t* argmax, const scalar_t* x, scalar_t* dx,
                   const LrnPoolParams& p) {
  using acc = at::opmath_type<scalar_t>;
  const Coefs<acc> coefs = lrn::make_coefs<acc>(p.lrn);
  const PoolGeometry& g = p.pool;
  const int64_t C = p.lrn.channels, H = g.in_h, W = g.in_w;
  const int before = lrn::window_before(p.lrn.size), after = lrn::window_after(p.lrn.size);
  const int64_t rows = std::max<int64_t>(1, kBufferBytes / (int64_t{sizeof(acc)} * C * W));
  const int64_t bands = (H + rows - 1) / rows;
  const int64_t in_image = C * H * W, out_image = C * g.out_h * g.out_w;
  // Window offset -> (row, column) inside the window; offsets outside the
  // window (a corrupted argmax) are skipped rather than written out of bounds.
  const int window = g.kh * g.kw;
  std::vector<int> off_row(window), off_col(window);
  for (int off = 0; off < window; ++off) {
    off_row[off] = pool::offset_row(off, g.kw);
    off_col[off] = pool::offset_col(off, g.kw);
  }
  at::parallel_for(0, p.lrn.outer * bands, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc> xs, grads, terms, sums, hit_a, hit_t, hit_g;
    std::vector<int64_t> hit_pos;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / bands;
      const int h0 = static_cast<int>((t % bands) * rows);
      const int h1 = static_cast<int>(std::min<int64_t>(H, h0 + rows));
      const Band<kChannelsLast> band{C, H, W, h0, h1 - h0};
      const int64_t B = band.pixels();
      xs.resize(static_cast<size_t>(C * B));
      sums.resize(static_cast<size_t>(B));
      grads.assign(static_cast<size_t>(C * B), acc(0));  // d loss / d lrn_out, then g * s^-beta
      terms.assign(static_cast<size_t>(C * B), acc(0));  // t = g * x * s^-beta / s
      band.load(x + n * in_image, xs.data());
      int oh_lo, oh_hi, unused;  // the output rows whose windows reach into the band
      pool::covering_outputs(h0, g.kh, g.sh, g.ph, g.out_h, &oh_lo, &unused);
      pool::covering_outputs(h1 - 1, g.kh, g.sh, g.ph, g.out_h, &unused, &oh_hi);
      const int64_t max_hits = int64_t{ax_max(0, oh_hi - oh_lo + 1)} * g.out_w;
      hit_pos.resize(static_cast<size_t>(max_hits));
      hit_g.resize(static_cast<size_t>(max_hits));
      hit_a.resize(static_cast<size_t>(max_hits));
      hit_t.resize(static_cast<size_t>(max_hits));
      const scalar_t* dyn = dy + n * out_image;
      const uint8_t* an = argmax + n * out_image;
      // Channel c's pooled gradients whose argmax lands in the band, in
      // output order: their band positions and values. Returns the count.
      const auto collect_hits = [&](int64_t c) {
        int64_t count = 0;
        for (int oh = oh_lo; oh <= oh_hi; ++oh) {
          const int row0 = pool::window_start(oh, g.sh, g.ph);
          for (int ow = 0; ow < g.out_w; ++ow) {
            const int64_t o = pooled_offset<kChannelsLast>(g, c, oh, ow);
            const int off = an[o];
            if (off >= window) continue;  // not an offset of this window: skipped, never written out of bounds
            const int ih = row0 + off_row[off];
            if (ih < h0 || ih >= h1) continue;
            hit_pos[count] = int64_t{ih - h0} * W + pool::window_start(ow, g.sw, g.pw) + off_col[off];
            hit_g[count++] = static_cast<acc>(dyn[o]);
          }
        }
        return count;
      };
      // d lrn_out is non-zero only at argmax positions (a quarter of the
      // elements for 3x3/2), so only there are denominators recomputed.
      // That equals the dense formula (t = 0 and g * s^-beta = 0 elsewhere)
      // when every x in the band is finite and k > 0; otherwise the dense
      // formula runs, so NaN and inf spread exactly as in the unfused pair.
      with_cpu_isa([&] {
        // x - x is 0 for finite x, NaN otherwise; an integer AND reduction
        // (a floating-point sum would be one serial chain of adds).
        int finite = 1;
        for (int64_t i = 0; i < C * B; ++i) finite &= static_cast<int>(xs[i] - xs[i] == acc(0));
        const bool sparse = finite != 0 && coefs.k > acc(0);
        for (int64_t c = 0; c < C; ++c) {
          window_rows(xs.data(), sums.data(), c, C, B, before, after, [](acc v) { return v * v; });
          const acc* xc = xs.data() + c * B;
          acc* gc = grads.data() + c * B;
          acc* tc = terms.data() + c * B;
          const int64_t hits = collect_hits(c);
          if (sparse) {
            // Gather, compute contiguously (vectorised), scatter in output order.
            for (int64_t k = 0; k < hits; ++k) {
              hit_a[k] = sums[hit_pos[k]];
              hit_t[k] = xc[hit_pos[k]];
            }
            for (int64_t k = 0; k < hits; ++k) {
              const acc base = lrn::denominator_base(hit_a[k], coefs);
              const acc ip = lrn::inv_pow(base, coefs);
              hit_t[k] = lrn::grad_term(hit_g[k], hit_t[k], ip, base);
              hit_a[k] = hit_g[k] * ip;
            }
            for (int64_t k = 0; k < hits; ++k) {
              gc[hit_pos[k]] += hit_a[k];
              tc[hit_pos[k]] += hit_t[k];
            }
          } else {
            for (int64_t k = 0; k < hits; ++k) gc[hit_pos[k]] += hit_g[k];
            for (int64_t b = 0; b < B; ++b) {
              const acc base = lrn::denominator_base(sums[b], coefs);
              const acc ip = lrn::inv_pow(base, coefs);
              tc[b] = lrn::grad_term(gc[b], xc[b], ip, base);
              gc[b] *= ip;
            }
          }
        }
        // dx over the mirrored window R(c); written over grads[c], which no
        // other channel needs.
        for (int64_t c = 0; c < C; ++c) {
          window_rows(terms.data(), sums.data(), c, C, B, after, before, [](acc v) { return v; });
          const acc* xc = xs.data() + c * B;
          acc* gc = grads.data() + c * B;
          for (int64_t b = 0; b < B; ++b) gc[b] = lrn::grad_input(gc[b], xc[b], sums[b], coefs);
        }
      });
      band.store(grads.data(), dx + n * in_image);
    }
  });
}

}  // namespace

void lrn_max_pool2d_forward_cpu(const at::Tensor& x, at::Tensor& y, at::Tensor* argmax, const LrnPoolParams& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lrn_max_pool2d_forward_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    uint8_t* ap = argmax != nullptr ? argmax->mutable_data_ptr<uint8_t>() : nullptr;
    const auto run = [&](auto channels_last, auto save_argmax) {
      constexpr bool kCL = decltype(channels_last)::value, kSave = decltype(save_argmax)::value;
      if (pool::is_alexnet_window(p.pool)) forward_impl<scalar_t, kCL, kSave, true>(xp, yp, ap, p);
      else forward_impl<scalar_t, kCL, kSave, false>(xp, yp, ap, p);
    };
    using yes = std::true_type;
    using no = std::false_type;
    if (p.lrn.channels_last) {
      if (ap) run(yes{}, yes{});
      else run(yes{}, no{});
    } else {
      if (ap) run(no{}, yes{});
      else run(no{}, no{});
    }
  });
}

void lrn_max_pool2d_backward_cpu(const at::Tensor& dy, const at::Tensor& argmax, const at::Tensor& x, at::Tensor& dx,
                                 const LrnPoolParams& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lrn_max_pool2d_backward_cpu", [&] {
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    const uint8_t* ap = argmax.const_data_ptr<uint8_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    if (p.lrn.channels_last) backward_impl<scalar_t, true>(dyp, ap, xp, dxp, p);
    else backward_impl<scalar_t, false>(dyp, ap, xp, dxp, p);
  });
}

}  // namespace fused
}  // namespace alexnet_ext
