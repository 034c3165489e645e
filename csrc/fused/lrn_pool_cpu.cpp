// Fused LRN + max-pool on the CPU, both layouts, any pool window.
//
// Forward: the LRN output never reaches memory. NCHW: a task is one (n, c)
// plane, whose LRN is taken straight from the input planes of its channel
// window into an L1/L2-resident plane buffer and pooled from there (see
// forward_nchw). channels_last: a task is one image and a band of pooled
// rows; the LRN of the rows their windows cover goes into a (rows, W, C)
// buffer and is pooled pixel by pixel, vectorised along the contiguous
// channels (see forward_channels_last). Both round the LRN output to the
// tensor's dtype before pooling, as the unfused LRN stores it, and follow
// pool_math.h's window_max() scan order and takes_max() rule (ties: first
// element; NaN: the last NaN).
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
// Backward buffers are channel-major in both layouts, so the inner loops
// run over contiguous pixels of a channel and vectorise; only the copies in
// and out know the layout. All hot loops are compiled for AVX-512/AVX2
// where the CPU has them (common/cpu_isa.h).
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

// out[b] = sum of f(buf[j*stride + b]) over the channels j in [c - lo, c + hi] ∩ [0, C),
// in ascending j (the order of the unfused LRN kernel): a channel's window,
// a row at a time so the pixel loop vectorises.
template <typename acc, typename F>
void window_rows(const acc* __restrict__ buf, int64_t stride, acc* __restrict__ out, int64_t c, int64_t C, int64_t B,
                 int lo, int hi, F f) {
  const int64_t first = std::max<int64_t>(0, c - lo), last = std::min<int64_t>(C - 1, c + hi);
  for (int64_t b = 0; b < B; ++b) out[b] = acc(0);
  for (int64_t j = first; j <= last; ++j) {
    const acc* row = buf + j * stride;
    for (int64_t b = 0; b < B; ++b) out[b] += f(row[b]);
  }
}

// Whether every pooling window is a whole 3x3 / stride 2 window inside the
// image (AlexNet's pools: no padding, no ceil_mode overhang).
bool whole_3x3s2_windows(const PoolGeometry& g) {
  return pool::is_alexnet_window(g) && g.ph == 0 && g.pw == 0 && 2 * (g.out_h - 1) + 3 <= g.in_h &&
         2 * (g.out_w - 1) + 3 <= g.in_w;
}

// NCHW forward. A task is one (n, c) plane: its LRN output is taken from
// the input planes of channels c - before .. c + after directly (the whole
// plane is one contiguous run of pixels, so the window sums vectorise and
// read neighbouring planes that the previous task left in cache), written
// into a plane buffer (rounded to the tensor's dtype, as the unfused LRN
// stores it) that stays in L1/L2, and pooled from there at once.
//
// kWhole3x3s2 (whole_3x3s2_windows): the plane is split by row and column
// parity into four (rows/2, S) quarters. Window position (dh, dw) of output
// (oh, ow) is then quarter (dh % 2, dw % 2) at (oh + dh / 2) * S + ow + dw / 2:
// for every window position one unit-stride pass over all outputs of the
// plane at once (flat index oh * S + ow; the columns ow >= out_w are
// computed from neighbouring data and never stored). Each pass is
// window_max()'s row-major scan step with takes_max()'s rule as branch-free
// selects, which vectorises; short per-row loops or stride-2 loads did not
// (scalar remainders branching on every comparison). Other windows use
// window_max() per output.
template <typename scalar_t, bool kSaveArgmax, bool kWhole3x3s2>
void forward_nchw(const scalar_t* x, scalar_t* y, uint8_t* argmax, const LrnPoolParams& p) {
  using acc = at::opmath_type<scalar_t>;
  using lane = std::conditional_t<sizeof(acc) == 8, int64_t, int32_t>;  // mask width of acc
  const Coefs<acc> coefs = lrn::make_coefs<acc>(p.lrn);
  const PoolGeometry& g = p.pool;
  const int64_t C = p.lrn.channels, W = g.in_w, P = int64_t{g.in_h} * W;
  const int64_t out_plane = int64_t{g.out_h} * g.out_w;
  const int before = lrn::window_before(p.lrn.size), after = lrn::window_after(p.lrn.size);
  // Quarter geometry: S columns (the even ones, the most), quarter_rows rows
  // (the even ones) plus one element of slack for the last flat pass.
  const int64_t S = (W + 1) / 2, quarter_rows = (g.in_h + 1) / 2, quarter = quarter_rows * S + 1;
  const int64_t flat = int64_t{g.out_h} * S;
  // Small planes: several per scheduling chunk, so each chunk has enough work.
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, P));
  at::parallel_for(0, p.lrn.outer * C, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc> plane(static_cast<size_t>(P));
    std::vector<acc> quarters(kWhole3x3s2 ? static_cast<size_t>(4 * quarter) : 0), best(kWhole3x3s2 ? flat : 0);
    std::vector<lane> best_off(kWhole3x3s2 ? flat : 0);
    with_cpu_isa([&] {
      acc* __restrict__ lrn_plane = plane.data();
      const auto load = [lrn_plane, W](int ih, int iw) { return lrn_plane[int64_t{ih} * W + iw]; };
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / C, c = t % C;
        const scalar_t* xn = x + n * C * P;
        const int64_t first = std::max<int64_t>(0, c - before), last = std::min<int64_t>(C - 1, c + after);
        // Window sums of squares in ascending channel order (the unfused LRN's).
        for (int64_t b = 0; b < P; ++b) lrn_plane[b] = acc(0);
        for (int64_t j = first; j <= last; ++j) {
          const scalar_t* __restrict__ xj = xn + j * P;
          for (int64_t b = 0; b < P; ++b) {
            const acc v = static_cast<acc>(xj[b]);
            lrn_plane[b] += v * v;
          }
        }
        const scalar_t* __restrict__ xc = xn + c * P;
        for (int64_t b = 0; b < P; ++b)
          lrn_plane[b] =
              static_cast<acc>(static_cast<scalar_t>(lrn_output(static_cast<acc>(xc[b]), lrn_plane[b], coefs)));
        scalar_t* __restrict__ yc = y + t * out_plane;
        uint8_t* __restrict__ ac = kSaveArgmax ? argmax + t * out_plane : nullptr;
        if (!kWhole3x3s2) {
          for (int oh = 0; oh < g.out_h; ++oh) {
            for (int ow = 0; ow < g.out_w; ++ow) {
              int off;
              const acc m =
                  pool::window_max<acc>(oh, ow, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.in_h, g.in_w, load, &off);
              const int64_t o = int64_t{oh} * g.out_w + ow;
              yc[o] = static_cast<scalar_t>(m);
              if (kSaveArgmax) ac[o] = static_cast<uint8_t>(off);
            }
          }
          continue;
        }
        // quarters[(row parity * 2 + column parity) * quarter + (row / 2) * S + column / 2]
        acc* __restrict__ q = quarters.data();
        for (int64_t h = 0; h < g.in_h; ++h) {
          const acc* __restrict__ row = lrn_plane + h * W;
          acc* __restrict__ even = q + (h % 2) * 2 * quarter + (h / 2) * S;
          acc* __restrict__ odd = even + quarter;
          for (int64_t i = 0; i < W / 2; ++i) {
            even[i] = row[2 * i];
            odd[i] = row[2 * i + 1];
          }
          if (W % 2 != 0) even[W / 2] = row[W - 1];
        }
        acc* __restrict__ m = best.data();
        lane* __restrict__ m_off = best_off.data();
        for (int64_t i = 0; i < flat; ++i) {
          m[i] = q[i];
          m_off[i] = 0;
        }
        for (int dh = 0; dh < 3; ++dh) {
          for (int dw = 0; dw < 3; ++dw) {
            const acc* __restrict__ src = q + ((dh % 2) * 2 + dw % 2) * quarter + (dh / 2) * S + dw / 2;
            const lane off = pool::encode_offset(dh, dw, 3);
            for (int64_t i = 0; i < flat; ++i) {
              const acc v = src[i];
              const bool take = pool::takes_max(v, m[i]);
              m[i] = take ? v : m[i];
              m_off[i] = take ? off : m_off[i];
            }
          }
        }
        for (int oh = 0; oh < g.out_h; ++oh) {
          for (int ow = 0; ow < g.out_w; ++ow) yc[int64_t{oh} * g.out_w + ow] = static_cast<scalar_t>(m[oh * S + ow]);
          if (kSaveArgmax)
            for (int ow = 0; ow < g.out_w; ++ow)
              ac[int64_t{oh} * g.out_w + ow] = static_cast<uint8_t>(m_off[oh * S + ow]);
        }
      }
    });
  });
}

// Elements of the channels_last window sums taken at a time (16 KiB of floats).
constexpr int64_t kSumChunk = 4096;

// channels_last forward. Channels are contiguous, so everything vectorises
// along them: a task is one image and a band of pooled rows; it takes the
// LRN of the input rows their windows cover into a (rows, W, C) buffer
// (window sums over neighbouring channels of one pixel, read straight from
// the input), then pools it pixel by pixel with branch-free selects over the
// C channels (window_max()'s row-major scan and takes_max() rule, one
// window position at a time). Neighbouring bands share (kh - sh) input rows,
// recomputed.
template <typename scalar_t, bool kSaveArgmax>
void forward_channels_last(const scalar_t* x, scalar_t* y, uint8_t* argmax, const LrnPoolParams& p) {
  using acc = at::opmath_type<scalar_t>;
  using lane = std::conditional_t<sizeof(acc) == 8, int64_t, int32_t>;  // mask width of acc
  const Coefs<acc> coefs = lrn::make_coefs<acc>(p.lrn);
  const PoolGeometry& g = p.pool;
  const int64_t C = p.lrn.channels, H = g.in_h, W = g.in_w;
  const int before = lrn::window_before(p.lrn.size), after = lrn::window_after(p.lrn.size);
  // Channels whose window is not clipped: [c_a, c_b).
  const int64_t c_a = std::min<int64_t>(before, C), c_b = std::max<int64_t>(c_a, C - after);
  // Output rows per task: their input rows fill about one buffer (L2).
  const int64_t rows_fit = std::max<int64_t>(g.kh, kBufferBytes / (int64_t{sizeof(acc)} * C * W));
  const int64_t rows_per_band_fit = std::max<int64_t>(1, (rows_fit - g.kh) / g.sh + 1);
  // Enough tasks for every thread, then as few bands as fit.
  const int64_t min_bands = (at::get_num_threads() + p.lrn.outer - 1) / p.lrn.outer;
  const int64_t bands = std::min<int64_t>(
      g.out_h, std::max<int64_t>(min_bands, (g.out_h + rows_per_band_fit - 1) / rows_per_band_fit));
  const int64_t out_rows = (g.out_h + bands - 1) / bands;
  const int64_t in_image = C * H * W, out_image = C * g.out_h * g.out_w;
  at::parallel_for(0, p.lrn.outer * bands, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc> lrn_band, best(static_cast<size_t>(C));
    std::vector<lane> best_off(static_cast<size_t>(C));
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / bands;
      const int oh0 = static_cast<int>((t % bands) * out_rows);
      const int oh1 = static_cast<int>(std::min<int64_t>(g.out_h, oh0 + out_rows));
      if (oh0 >= oh1) continue;
      const int h_lo = ax_max(0, pool::window_start(oh0, g.sh, g.ph));
      const int h_hi = ax_min(g.in_h, pool::window_start(oh1 - 1, g.sh, g.ph) + g.kh);
      lrn_band.resize(static_cast<size_t>(int64_t{h_hi - h_lo} * W * C));
      const scalar_t* xn = x + n * in_image;
      scalar_t* yn = y + n * out_image;
      uint8_t* an = kSaveArgmax ? argmax + n * out_image : nullptr;
      with_cpu_isa([&] {
        acc* __restrict__ band = lrn_band.data();
        const int64_t pixels = int64_t{h_hi - h_lo} * W, E = pixels * C;
        const scalar_t* __restrict__ xs = xn + int64_t{h_lo} * W * C;
        // The band's pixels are one contiguous run of E = pixels * C values,
        // so the window sums are taken over all of it at once (long loops,
        // no per-pixel remainders), a window offset at a time in ascending
        // channel order (the unfused LRN's). The first `before` and last
        // `after` channels of each pixel have clipped windows (the flat sums
        // reached into the neighbouring pixels): redone one at a time.
        // In chunks of kSumChunk, so the sums being added to stay in L1.
        for (int64_t e0 = before; e0 < E - after; e0 += kSumChunk) {
          const int64_t e1 = std::min<int64_t>(E - after, e0 + kSumChunk);
          for (int64_t e = e0; e < e1; ++e) band[e] = acc(0);
          for (int d = -before; d <= after; ++d) {
            const scalar_t* __restrict__ xd = xs + d;
            for (int64_t e = e0; e < e1; ++e) {
              const acc v = static_cast<acc>(xd[e]);
              band[e] += v * v;
            }
          }
        }
        for (int64_t q = 0; q < pixels; ++q) {
          const scalar_t* __restrict__ xq = xs + q * C;
          acc* __restrict__ out = band + q * C;
          const auto clipped = [&](int64_t c) {
            acc s = acc(0);
            for (int64_t j = std::max<int64_t>(0, c - before); j <= std::min<int64_t>(C - 1, c + after); ++j) {
              const acc v = static_cast<acc>(xq[j]);
              s += v * v;
            }
            out[c] = s;
          };
          for (int64_t c = 0; c < c_a; ++c) clipped(c);
          for (int64_t c = c_b; c < C; ++c) clipped(c);
        }
        for (int64_t e = 0; e < E; ++e)
          band[e] = static_cast<acc>(static_cast<scalar_t>(lrn_output(static_cast<acc>(xs[e]), band[e], coefs)));
        acc* __restrict__ m = best.data();
        lane* __restrict__ m_off = best_off.data();
        for (int oh = oh0; oh < oh1; ++oh) {
          const int h0 = pool::window_start(oh, g.sh, g.ph);
          const int ih_lo = ax_max(h0, 0), ih_hi = ax_min(h0 + g.kh, g.in_h);
          for (int ow = 0; ow < g.out_w; ++ow) {
            const int w0 = pool::window_start(ow, g.sw, g.pw);
            const int iw_lo = ax_max(w0, 0), iw_hi = ax_min(w0 + g.kw, g.in_w);
            // Starting from the first element, as window_max() does; rescanning it changes nothing.
            const acc* first = band + (int64_t{ih_lo - h_lo} * W + iw_lo) * C;
            const lane first_off = pool::encode_offset(ih_lo - h0, iw_lo - w0, g.kw);
            for (int64_t c = 0; c < C; ++c) {
              m[c] = first[c];
              m_off[c] = first_off;
            }
            for (int ih = ih_lo; ih < ih_hi; ++ih) {
              for (int iw = iw_lo; iw < iw_hi; ++iw) {
                const acc* __restrict__ v = band + (int64_t{ih - h_lo} * W + iw) * C;
                const lane off = pool::encode_offset(ih - h0, iw - w0, g.kw);
                for (int64_t c = 0; c < C; ++c) {
                  const bool take = pool::takes_max(v[c], m[c]);
                  m[c] = take ? v[c] : m[c];
                  m_off[c] = take ? off : m_off[c];
                }
              }
            }
            const int64_t o = (int64_t{oh} * g.out_w + ow) * C;
            for (int64_t c = 0; c < C; ++c) yn[o + c] = static_cast<scalar_t>(m[c]);
            if (kSaveArgmax)
              for (int64_t c = 0; c < C; ++c) an[o + c] = static_cast<uint8_t>(m_off[c]);
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
      sums.resize(static_cast<size_t>(B));
      grads.assign(static_cast<size_t>(C * B), acc(0));  // d loss / d lrn_out, then g * s^-beta
      terms.assign(static_cast<size_t>(C * B), acc(0));  // t = g * x * s^-beta / s
      // The band's x, channel-major with channels xstride apart: NCHW float
      // and double read it in place, the rest from a (C, B) copy in acc.
      const acc* xb;
      int64_t xstride;
      if constexpr (!kChannelsLast && std::is_same<acc, scalar_t>::value) {
        xb = x + n * in_image + int64_t{h0} * W;
        xstride = H * W;
      } else {
        xs.resize(static_cast<size_t>(C * B));
        band.load(x + n * in_image, xs.data());
        xb = xs.data();
        xstride = B;
      }
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
        for (int64_t c = 0; c < C; ++c)
          for (int64_t b = 0; b < B; ++b) finite &= static_cast<int>(xb[c * xstride + b] - xb[c * xstride + b] == acc(0));
        const bool sparse = finite != 0 && coefs.k > acc(0);
        for (int64_t c = 0; c < C; ++c) {
          window_rows(xb, xstride, sums.data(), c, C, B, before, after, [](acc v) { return v * v; });
          const acc* xc = xb + c * xstride;
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
        // dx over the mirrored window R(c). NCHW: straight into dx (the
        // band's rows of a channel are contiguous there); channels_last:
        // over grads[c], which no other channel needs, copied out below.
        for (int64_t c = 0; c < C; ++c) {
          window_rows(terms.data(), B, sums.data(), c, C, B, after, before, [](acc v) { return v; });
          const acc* xc = xb + c * xstride;
          acc* gc = grads.data() + c * B;
          if (kChannelsLast) {
            for (int64_t b = 0; b < B; ++b) gc[b] = lrn::grad_input(gc[b], xc[b], sums[b], coefs);
          } else {
            scalar_t* __restrict__ dxc = dx + n * in_image + (c * H + h0) * W;
            for (int64_t b = 0; b < B; ++b)
              dxc[b] = static_cast<scalar_t>(lrn::grad_input(gc[b], xc[b], sums[b], coefs));
          }
        }
      });
      if (kChannelsLast) band.store(grads.data(), dx + n * in_image);
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
      if constexpr (kCL) forward_channels_last<scalar_t, kSave>(xp, yp, ap, p);
      else if (whole_3x3s2_windows(p.pool)) forward_nchw<scalar_t, kSave, true>(xp, yp, ap, p);
      else forward_nchw<scalar_t, kSave, false>(xp, yp, ap, p);
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
