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
// Backward: d loss / d lrn_out is the pooled gradients scattered to their
// argmax, so it is non-zero at about a quarter of the elements: the LRN
// denominators (lrn_math.h) are recomputed from x only there, and their
// terms added in output order (PyTorch's summation order); the window sums
// and dx are dense passes (adds and multiplies only). Where the window sums
// are not all finite (or k = 0, alpha < 0) the dense formula runs instead,
// so NaN and inf spread exactly as through the unfused pair. Each dx
// element has one writer. NCHW 3x3 / stride 2 (backward_nchw_3x3s2): a task
// walks one image's channels in the planes' own layout: each output's
// window sum and x are gathered at its maximum (vector gathers), its two
// terms added back in output order (scalar), the dense passes read x and
// write dx in place. channels_last (backward_channels_last): a
// task is one image and a band of rows, vectorised along the channels in
// the layout, the maxima found and gathered the same way. Other NCHW windows (backward_nchw_bands): bands of rows in
// channel-major buffers. All hot loops are compiled for AVX-512/AVX2 where
// the CPU has them (common/cpu_isa.h).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common/cpu_isa.h"
#ifdef AX_HAVE_ISA_VARIANTS
#include <immintrin.h>
#endif
#include "fused/lrn_pool_cpu.h"

namespace alexnet_ext {
namespace fused {
namespace {

using lrn::Coefs;
using pool::PoolGeometry;

// Size of one (C, B) buffer a task aims for: its few buffers stay in L2.
constexpr int64_t kBufferBytes = 256 * 1024;

// Rows [r0, r0 + rows) of one NCHW (C, H, W) image, copied into their
// (C, B = rows * W) channel-major buffer in the accumulation type.
struct Band {
  int64_t C, H, W, r0, rows;
  int64_t pixels() const { return rows * W; }

  template <typename acc, typename scalar_t>
  void load(const scalar_t* img, acc* buf) const {
    const int64_t B = pixels();
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* src = img + (c * H + r0) * W;
      for (int64_t b = 0; b < B; ++b) buf[c * B + b] = static_cast<acc>(src[b]);
    }
  }
};

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

// out[i] (+)= f(rows[0][i]) + ... + f(rows[R - 1][i]), added in that order
// (onto 0 when kFirst): one pass, each sum kept in a register across the R
// rows and stored once.
template <int R, bool kFirst, typename acc, typename src_t, typename F>
void add_rows(acc* __restrict__ out, const src_t* const* rows, int64_t n, F f) {
  const src_t* __restrict__ row[R];
  for (int r = 0; r < R; ++r) row[r] = rows[r];
  for (int64_t i = 0; i < n; ++i) {
    acc sum = kFirst ? acc(0) : out[i];
    for (int r = 0; r < R; ++r) sum += f(static_cast<acc>(row[r][i]));
    out[i] = sum;
  }
}

// out[i] = sum of f(rows[r][i]) over r = 0 .. count - 1 (count >= 1) in
// ascending r, for i in [0, n): up to four rows a pass.
template <typename acc, typename src_t, typename F>
void sum_rows(acc* __restrict__ out, const src_t* const* rows, int count, int64_t n, F f) {
  for (int r = 0; r < count; r += 4) {
    const auto pass = [&](auto first) {
      constexpr bool kFirst = decltype(first)::value;
      switch (std::min(4, count - r)) {
        case 1: return add_rows<1, kFirst>(out, rows + r, n, f);
        case 2: return add_rows<2, kFirst>(out, rows + r, n, f);
        case 3: return add_rows<3, kFirst>(out, rows + r, n, f);
        default: return add_rows<4, kFirst>(out, rows + r, n, f);
      }
    };
    if (r == 0) pass(std::true_type{});
    else pass(std::false_type{});
  }
}

// Asks for the cache lines of [p, p + n) ahead of a pass that will read
// them. The NCHW kernels read each input plane first in a
// window sum, a short stream (a few 4 KiB pages, where the hardware
// prefetcher starts over) that then waits on memory; fetched during the
// previous plane's compute-bound work instead, it is in cache.
template <typename T>
void prefetch_lines(const T* p, int64_t n) {
  constexpr int64_t kLine = 64 / sizeof(T) > 0 ? 64 / sizeof(T) : 1;
  for (int64_t i = 0; i < n; i += kLine) __builtin_prefetch(p + i, 0, 3);
}

// Runs fn(i0, len) over [0, n) in blocks, asking before each block for
// its share of the cache lines of next[0, next_n) (none when null): a
// compute-bound pass hides the fetch of the data the next one reads.
template <typename T, typename Fn>
void blocks_with_prefetch(int64_t n, const T* next, int64_t next_n, Fn fn) {
  constexpr int64_t kBlocks = 16;
  if (n <= 0) return;
  const int64_t block = std::max<int64_t>(1, (n + kBlocks * 16 - 1) / (kBlocks * 16)) * 16;  // whole vectors
  const int64_t next_block = (next_n + (n + block - 1) / block - 1) / ((n + block - 1) / block);
  for (int64_t b = 0, i0 = 0; i0 < n; ++b, i0 += block) {
    if (next != nullptr && b * next_block < next_n)
      prefetch_lines(next + b * next_block, std::min(next_block, next_n - b * next_block));
    fn(i0, std::min(block, n - i0));
  }
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
    std::vector<const scalar_t*> x_planes(static_cast<size_t>(before + after + 1));
    with_cpu_isa([&] {
      acc* __restrict__ lrn_plane = plane.data();
      const auto load = [lrn_plane, W](int ih, int iw) { return lrn_plane[int64_t{ih} * W + iw]; };
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / C, c = t % C;
        const scalar_t* xn = x + n * C * P;
        const int64_t first = std::max<int64_t>(0, c - before), last = std::min<int64_t>(C - 1, c + after);
        // Window sums of squares in ascending channel order (the unfused LRN's).
        for (int64_t j = first; j <= last; ++j) x_planes[j - first] = xn + j * P;
        sum_rows(lrn_plane, x_planes.data(), static_cast<int>(last - first + 1), P, [](acc v) { return v * v; });
        // The square roots and divisions leave the memory idle: the next
        // plane's new input plane (its window's last) is fetched meanwhile.
        const scalar_t* __restrict__ xc = xn + c * P;
        const scalar_t* next_x = t + 1 < end && c + after + 1 < C ? xn + (c + after + 1) * P : nullptr;
        blocks_with_prefetch(P, next_x, P, [&](int64_t b0, int64_t len) {
          acc* __restrict__ out = lrn_plane + b0;
          const scalar_t* __restrict__ xb = xc + b0;
          for (int64_t b = 0; b < len; ++b)
            out[b] = static_cast<acc>(static_cast<scalar_t>(lrn_output(static_cast<acc>(xb[b]), out[b], coefs)));
        });
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

// Window offsets a channel window spans at most (the LRN size is checked
// against it where the windows are set up).
constexpr int kMaxWindowRows = 64;

// channels_last window sums over a contiguous run of `pixels` pixels:
// out[q * C + c] = sum of f(src[q * C + j]) over the channels j in
// [c - lo, c + hi] ∩ [0, C), in ascending j (the unfused LRN's order). The
// run is one contiguous array of E = pixels * C values, so the sums are
// taken over all of it at once (long loops, no per-pixel remainders), as
// sums of the run shifted by each window offset; the first `lo` and last
// `hi` channels of each pixel have clipped windows (the flat sums reached
// into the neighbouring pixels) and are redone one at a time. Forward: the
// sums of squares, (lo, hi) = (before, after); backward: the sums of terms
// over R(c), (after, before).
template <typename acc, typename src_t, typename F>
void channels_last_window_sums(const src_t* __restrict__ src, acc* __restrict__ out, int64_t pixels, int64_t C, int lo,
                               int hi, F f) {
  const int64_t E = pixels * C;
  const int64_t c_a = std::min<int64_t>(lo, C), c_b = std::max<int64_t>(c_a, C - hi);  // unclipped: [c_a, c_b)
  if (E - hi > lo && lo + hi < kMaxWindowRows) {
    const src_t* shifted[kMaxWindowRows];
    for (int d = -lo; d <= hi; ++d) shifted[d + lo] = src + lo + d;
    sum_rows(out + lo, shifted, lo + hi + 1, E - hi - lo, f);
  } else {
    for (int64_t e = lo; e < E - hi; ++e) {
      acc sum = acc(0);
      for (int d = -lo; d <= hi; ++d) sum += f(static_cast<acc>(src[e + d]));
      out[e] = sum;
    }
  }
  for (int64_t q = 0; q < pixels; ++q) {
    const src_t* __restrict__ sq = src + q * C;
    acc* __restrict__ oq = out + q * C;
    const auto clipped = [&](int64_t c) {
      acc sum = acc(0);
      for (int64_t j = std::max<int64_t>(0, c - lo); j <= std::min<int64_t>(C - 1, c + hi); ++j)
        sum += f(static_cast<acc>(sq[j]));
      oq[c] = sum;
    };
    for (int64_t c = 0; c < c_a; ++c) clipped(c);
    for (int64_t c = c_b; c < C; ++c) clipped(c);
  }
}

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
        channels_last_window_sums(xs, band, pixels, C, before, after, [](acc v) { return v * v; });
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

// ---- Backward building blocks, shared by both layouts. ----
//
// Lanes are outputs of one channel (NCHW) or channels of one output pixel
// (channels_last): each lane's maximum is found by its index into the
// plane or band, the values there gathered (vector gathers), the terms
// computed for the lanes at once and added back in lane order (scalar:
// lanes may share an element).

// Whether the sparse backward equals the dense formula for these window
// sums: t = 0 and g * s^-beta = 0 wherever g = 0 needs x finite and s > 0
// and not NaN; x is in its own window, so all of it holds when every sum
// is finite (sums - sums is 0, else NaN) and k > 0, alpha >= 0. An integer
// AND reduction (a floating-point sum would be one serial chain of adds).
template <typename acc>
bool sums_allow_sparse(const acc* __restrict__ sums, int64_t n, const Coefs<acc>& c) {
  int finite = 1;
  for (int64_t i = 0; i < n; ++i) finite &= static_cast<int>(sums[i] - sums[i] == acc(0));
  return finite != 0 && c.k > acc(0) && c.alpha_over_size >= acc(0);
}

// Dense LRN backward first half, for d lrn_out = g everywhere (the path
// that spreads NaN and inf exactly as the unfused pair): t into `terms`,
// g <- g * s^-beta.
template <typename acc, typename src_t>
void dense_terms(const acc* __restrict__ sums, const src_t* __restrict__ x, acc* __restrict__ g,
                 acc* __restrict__ terms, int64_t n, const Coefs<acc>& c) {
  for (int64_t i = 0; i < n; ++i) {
    const acc base = lrn::denominator_base(sums[i], c);
    const acc ip = lrn::inv_pow(base, c);
    terms[i] = lrn::grad_term(g[i], static_cast<acc>(x[i]), ip, base);
    g[i] *= ip;
  }
}

// dx = g * s^-beta - 2 alpha beta / size * x * (sum of t over R(c)).
template <typename acc, typename src_t, typename dst_t>
void grad_inputs(const acc* __restrict__ g_ip, const src_t* __restrict__ x, const acc* __restrict__ sum_t,
                 dst_t* __restrict__ dx, int64_t n, const Coefs<acc>& c) {
  for (int64_t i = 0; i < n; ++i) dx[i] = static_cast<dst_t>(lrn::grad_input(g_ip[i], static_cast<acc>(x[i]), sum_t[i], c));
}

// grad_inputs() with the window sum of t taken in the same pass:
// sum_t[i] = 0 + rows[0][i] + ... + rows[R - 1][i] (ascending channels, as
// sum_rows() adds them), never stored.
template <int R, typename acc, typename src_t, typename dst_t>
void grad_inputs_rows(const acc* __restrict__ g_ip, const src_t* __restrict__ x, const acc* const* rows,
                      dst_t* __restrict__ dx, int64_t n, const Coefs<acc>& c) {
  const acc* __restrict__ row[R];
  for (int r = 0; r < R; ++r) row[r] = rows[r];
  for (int64_t i = 0; i < n; ++i) {
    acc sum_t = acc(0);
    for (int r = 0; r < R; ++r) sum_t += row[r][i];
    dx[i] = static_cast<dst_t>(lrn::grad_input(g_ip[i], static_cast<acc>(x[i]), sum_t, c));
  }
}

// grad_inputs_rows() for any count >= 1 of rows (wide windows: the sums
// into `scratch` first).
template <typename acc, typename src_t, typename dst_t>
void grad_inputs_window(const acc* g_ip, const src_t* x, const acc* const* rows, int count, dst_t* dx,
                        acc* scratch, int64_t n, const Coefs<acc>& c) {
  switch (count) {
    case 1: return grad_inputs_rows<1>(g_ip, x, rows, dx, n, c);
    case 2: return grad_inputs_rows<2>(g_ip, x, rows, dx, n, c);
    case 3: return grad_inputs_rows<3>(g_ip, x, rows, dx, n, c);
    case 4: return grad_inputs_rows<4>(g_ip, x, rows, dx, n, c);
    case 5: return grad_inputs_rows<5>(g_ip, x, rows, dx, n, c);
    case 6: return grad_inputs_rows<6>(g_ip, x, rows, dx, n, c);
    case 7: return grad_inputs_rows<7>(g_ip, x, rows, dx, n, c);
    default:
      sum_rows(scratch, rows, count, n, [](acc v) { return v; });
      grad_inputs(g_ip, x, scratch, dx, n, c);
  }
}

#ifdef AX_HAVE_ISA_VARIANTS
// grad_inputs_rows<R>() for float on AVX-512 with non-temporal stores of
// dx: dx is written once and read much later (by the layer below's
// backward), so its lines go to memory without being read for ownership
// first (a third less traffic for that stream; it measured faster at one
// and two threads). The caller fences (store_fence()) before dx is read
// elsewhere.
template <int R>
__attribute__((target("avx512f"))) void grad_inputs_streamed(const float* g_ip, const float* x,
                                                             const float* const* rows, float* dx, int64_t n,
                                                             float coef) {
  const auto one = [&](int64_t i) {
    float sum_t = 0.0f;
    for (int r = 0; r < R; ++r) sum_t += rows[r][i];
    dx[i] = g_ip[i] - coef * x[i] * sum_t;
  };
  int64_t i = 0;
  for (; i < n && (reinterpret_cast<uintptr_t>(dx + i) & 63) != 0; ++i) one(i);
  const __m512 c = _mm512_set1_ps(coef);
  for (; i + 16 <= n; i += 16) {
    __m512 sum_t = _mm512_loadu_ps(rows[0] + i);
    for (int r = 1; r < R; ++r) sum_t = _mm512_add_ps(sum_t, _mm512_loadu_ps(rows[r] + i));
    const __m512 cx = _mm512_mul_ps(c, _mm512_loadu_ps(x + i));
    _mm512_stream_ps(dx + i, _mm512_fnmadd_ps(cx, sum_t, _mm512_loadu_ps(g_ip + i)));
  }
  for (; i < n; ++i) one(i);
}
inline void store_fence() { _mm_sfence(); }
#endif

// Where the maxima of whole 3x3 / stride 2 windows are: pos[i] = the flat
// plane index of output i's maximum (its window's first element
// window_start[i] plus the argmax offset a = 3 * dh + dw; dh = a / 3 taken
// as (a * 11) >> 5, exact for a < 9, so the loop vectorises), d[i] = its
// pooled gradient. An offset outside the window (a corrupted argmax) adds
// nothing and is never used as an index.
template <typename acc, typename scalar_t>
void argmax_positions(const uint8_t* __restrict__ a, const scalar_t* __restrict__ dy,
                      const int32_t* __restrict__ window_start, int32_t W, int32_t* __restrict__ pos,
                      acc* __restrict__ d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const int32_t off = a[i];
    const bool inside = off < 9;
    const int32_t dh = (off * 11) >> 5, dw = off - 3 * dh;
    pos[i] = window_start[i] + (inside ? dh * W + dw : 0);
    d[i] = inside ? static_cast<acc>(dy[i]) : acc(0);
  }
}

// The LRN backward's two per-element quantities at each output's maximum,
// from the window sum and x gathered there (vectorised gathers) and the
// pooled gradient d: t = d * x * s^-beta / s and d * s^-beta (lrn_math.h).
template <typename acc, typename src_t, typename idx_t>
void terms_at_positions(const idx_t* __restrict__ pos, const acc* __restrict__ d, const acc* __restrict__ sums,
                        const src_t* __restrict__ x, acc* __restrict__ t, acc* __restrict__ g_ip, int64_t n,
                        const Coefs<acc>& c) {
  for (int64_t i = 0; i < n; ++i) {
    const acc base = lrn::denominator_base(sums[pos[i]], c);
    const acc ip = lrn::inv_pow(base, c);
    t[i] = lrn::grad_term(d[i], static_cast<acc>(x[pos[i]]), ip, base);
    g_ip[i] = d[i] * ip;
  }
}

// dst[pos[i]] += v[i] (and dst2 with v2) in ascending i: an element that is
// the maximum of several windows sums them in output order, as PyTorch's
// pool backward does.
template <typename acc, typename idx_t>
void scatter_add(acc* dst, const idx_t* pos, const acc* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[pos[i]] += v[i];
}
template <typename acc, typename idx_t>
void scatter_add2(acc* dst, acc* dst2, const idx_t* pos, const acc* v, const acc* v2, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    dst[pos[i]] += v[i];
    dst2[pos[i]] += v2[i];
  }
}

// NCHW backward for whole 3x3 / stride 2 windows (whole_3x3s2_windows).
// A task is one image and a range of channels [c0, c1), walked a channel
// at a time in the planes' own layout. d loss / d lrn_out is non-zero only
// at the pooled maxima (at most a quarter of the plane), so only there are
// the denominators recomputed: the window sums of squares are one dense
// pass over the input planes of the channel window (read in place), the
// sums and x at each output's maximum are gathered, the two terms computed
// there and added into zeroed plane buffers in output order. The window
// sums of the terms and dx are dense passes, dx written straight into its
// plane. Pipeline over channels: the terms of channel ct (its window ends
// at ct + after, read from x), then dx of channel ct - before (its R window
// [cd - after, cd + before] ends at ct); the terms and d * s^-beta planes
// live in rings of the last `size` channels, L2-resident. A range starting
// past channel 0 first computes the terms of the `after` channels before
// it (halo), so images split over threads when N is small. A plane whose
// window sums are not all finite (or k = 0, alpha < 0) takes the dense
// formula (d lrn_out scattered, then every element), spreading NaN and inf
// as the unfused pair does.
template <typename scalar_t>
void backward_nchw_3x3s2(const scalar_t* dy, const uint8_t* argmax, const scalar_t* x, scalar_t* dx,
                         const LrnPoolParams& p) {
  using acc = at::opmath_type<scalar_t>;
  const Coefs<acc> coefs = lrn::make_coefs<acc>(p.lrn);
  const PoolGeometry& g = p.pool;
  const int64_t N = p.lrn.outer, C = p.lrn.channels, H = g.in_h, W = g.in_w, P = H * W;
  const int64_t out_w = g.out_w, out_plane = int64_t{g.out_h} * out_w;
  const int before = lrn::window_before(p.lrn.size), after = lrn::window_after(p.lrn.size);
  const int64_t ring = before + after + 1;
  const int64_t PP = (P + 15) / 16 * 16;  // plane stride in the rings: whole vectors
  // Channel ranges: enough tasks for every thread (halo recompute: the terms of `after` channels).
  const int64_t chunks = std::min<int64_t>(C, std::max<int64_t>(1, (2 * at::get_num_threads() + N - 1) / N));
  const int64_t chunk = (C + chunks - 1) / chunks;
  const bool stream_dx = cpu_isa() == CpuIsa::kAvx512;
  at::parallel_for(0, N * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc> t_ring(static_cast<size_t>(ring * PP)), g_ring(t_ring.size()), sums(static_cast<size_t>(PP)),
        sum_t(sums.size()), d(static_cast<size_t>(out_plane)), t_at(d.size()), g_at(d.size());
    std::vector<int32_t> window_start(static_cast<size_t>(out_plane)), pos(window_start.size());
    for (int64_t o = 0; o < out_plane; ++o) window_start[o] = static_cast<int32_t>(2 * (o / out_w) * W + 2 * (o % out_w));
    std::vector<const scalar_t*> x_planes(static_cast<size_t>(ring));
    std::vector<const acc*> t_planes(static_cast<size_t>(ring));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / chunks, c0 = (task % chunks) * chunk, c1 = std::min<int64_t>(C, c0 + chunk);
      if (c0 >= c1) continue;
      with_cpu_isa([&] {
        const scalar_t* xn = x + n * C * P;
        const auto tq = [&](int64_t c) { return t_ring.data() + (c % ring) * PP; };
        const auto gq = [&](int64_t c) { return g_ring.data() + (c % ring) * PP; };
        const auto terms_of = [&](int64_t c) {
          const int64_t first = std::max<int64_t>(0, c - before), last = std::min<int64_t>(C - 1, c + after);
          const int count = static_cast<int>(last - first + 1);
          for (int64_t j = first; j <= last; ++j) x_planes[j - first] = xn + j * P;
          sum_rows(sums.data(), x_planes.data(), count, P, [](acc v) { return v * v; });
          const scalar_t* xc = xn + c * P;
          acc* __restrict__ tc = tq(c);
          acc* __restrict__ gc = gq(c);
          for (int64_t b = 0; b < P; ++b) tc[b] = gc[b] = acc(0);
          argmax_positions(argmax + (n * C + c) * out_plane, dy + (n * C + c) * out_plane, window_start.data(),
                           static_cast<int32_t>(W), pos.data(), d.data(), out_plane);
          if (sums_allow_sparse(sums.data(), P, coefs)) {
            terms_at_positions(pos.data(), d.data(), sums.data(), xc, t_at.data(), g_at.data(), out_plane, coefs);
            scatter_add2(tc, gc, pos.data(), t_at.data(), g_at.data(), out_plane);
          } else {
            scatter_add(gc, pos.data(), d.data(), out_plane);
            dense_terms(sums.data(), xc, gc, tc, P, coefs);
          }
        };
        const auto grad_input_of = [&](int64_t c) {
          const int64_t first = std::max<int64_t>(0, c - after), last = std::min<int64_t>(C - 1, c + before);
          const int count = static_cast<int>(last - first + 1);
          scalar_t* dxc = dx + (n * C + c) * P;
          for (int64_t j = first; j <= last; ++j) t_planes[j - first] = tq(j);
#ifdef AX_HAVE_ISA_VARIANTS
          if constexpr (std::is_same<scalar_t, float>::value) {
            if (stream_dx && count == 5)
              return grad_inputs_streamed<5>(gq(c), xn + c * P, t_planes.data(), dxc, P, coefs.grad_coef);
          }
#endif
          grad_inputs_window(gq(c), xn + c * P, t_planes.data(), count, dxc, sum_t.data(), P, coefs);
        };
        for (int64_t ct = std::max<int64_t>(0, c0 - after); ct < c1 + before; ++ct) {
          if (ct < C) terms_of(ct);
          if (ct - before >= c0) grad_input_of(ct - before);
        }
      });
    }
#ifdef AX_HAVE_ISA_VARIANTS
    if (stream_dx) store_fence();  // the streamed dx is complete before parallel_for returns
#endif
  });
}

// One output pixel's C channels in a channels_last band (band rows
// [h0, h0 + rows) of W pixels; rows [h_lo, h_hi) of them inside the
// image): idx[c] = the band index of channel c's maximum, where it lies in
// the band, and d[c] its pooled gradient; elsewhere idx[c] = c, d[c] = 0,
// adding nothing (a maximum outside the band is another band's; an offset
// outside the window, a corrupted argmax, nobody's). The window row of
// offset a is a / kw taken as (a + 0.5) * (1 / kw) in float (exact: a and
// kw are at most 256, so the product is at least 0.5 / kw from an integer
// and its rounding error far smaller), with non-short-circuit tests, so
// the loop vectorises.
template <typename idx_t, typename acc, typename scalar_t>
void channels_last_positions(const uint8_t* __restrict__ a, const scalar_t* __restrict__ dy, int32_t kw,
                             int32_t window, float inv_kw, int32_t hs, int32_t ws, int32_t h_lo, int32_t h_hi,
                             int32_t h0, int32_t W, idx_t* __restrict__ idx, acc* __restrict__ d, int64_t C) {
  for (int64_t c = 0; c < C; ++c) {
    const int32_t off = a[c];
    const int32_t dh = static_cast<int32_t>((static_cast<float>(off) + 0.5f) * inv_kw), dw = off - dh * kw;
    const int32_t r = hs + dh, q = ws + dw;
    const bool inside = (off < window) & (r >= h_lo) & (r < h_hi) & (q >= 0) & (q < W);
    idx[c] = inside ? (idx_t(r - h0) * W + q) * idx_t(C) + idx_t(c) : idx_t(c);
    d[c] = inside ? static_cast<acc>(dy[c]) : acc(0);
  }
}

// channels_last backward, any window. A task is one image and a band of
// input rows [h0, h1) (each dx element has one writer); everything stays in
// the layout, vectorised along the contiguous channels as the forward is:
// the band's window sums of squares; then, for every output whose window
// reaches into the band (ascending), the band index of each channel's
// maximum, the window sum and x gathered there, the two terms computed
// there only and added into zeroed band buffers (in output order, as
// PyTorch's pool backward adds them); then the window sums of the terms and
// dx, written straight into the band's dx rows. A band whose sums are not
// all finite takes the dense formula (d lrn_out scattered, then every
// element).
template <typename scalar_t, typename idx_t>
void backward_channels_last_impl(const scalar_t* dy, const uint8_t* argmax, const scalar_t* x, scalar_t* dx,
                                 const LrnPoolParams& p, int64_t rows) {
  using acc = at::opmath_type<scalar_t>;
  const Coefs<acc> coefs = lrn::make_coefs<acc>(p.lrn);
  const PoolGeometry& g = p.pool;
  const int64_t N = p.lrn.outer, C = p.lrn.channels, H = g.in_h, W = g.in_w;
  const int before = lrn::window_before(p.lrn.size), after = lrn::window_after(p.lrn.size);
  const int64_t bands = (H + rows - 1) / rows;
  const int64_t in_image = C * H * W, out_image = C * g.out_h * g.out_w;
  const float inv_kw = 1.0f / static_cast<float>(g.kw);
  const bool stream_dx = cpu_isa() == CpuIsa::kAvx512;
  at::parallel_for(0, N * bands, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc> sums, terms, g_ip, d(static_cast<size_t>(C)), t_at(d.size()), g_at(d.size());
    std::vector<idx_t> idx(static_cast<size_t>(C));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / bands;
      const int h0 = static_cast<int>((task % bands) * rows), h1 = static_cast<int>(std::min<int64_t>(H, h0 + rows));
      if (h0 >= h1) continue;
      const int64_t E = int64_t{h1 - h0} * W * C;
      sums.resize(static_cast<size_t>(E));
      terms.assign(static_cast<size_t>(E), acc(0));
      g_ip.assign(static_cast<size_t>(E), acc(0));  // d loss / d lrn_out, then g * s^-beta
      const scalar_t* __restrict__ xs = x + n * in_image + int64_t{h0} * W * C;
      const scalar_t* dyn = dy + n * out_image;
      const uint8_t* an = argmax + n * out_image;
      int oh_lo, oh_hi, unused;  // the output rows whose windows reach into the band
      pool::covering_outputs(h0, g.kh, g.sh, g.ph, g.out_h, &oh_lo, &unused);
      pool::covering_outputs(h1 - 1, g.kh, g.sh, g.ph, g.out_h, &unused, &oh_hi);
      with_cpu_isa([&] {
        acc* __restrict__ sum = sums.data();
        acc* __restrict__ tb = terms.data();
        acc* __restrict__ gb = g_ip.data();
        channels_last_window_sums(xs, sum, E / C, C, before, after, [](acc v) { return v * v; });
        const bool sparse = sums_allow_sparse(sum, E, coefs);
        for (int oh = oh_lo; oh <= oh_hi; ++oh) {
          const int hs = pool::window_start(oh, g.sh, g.ph);
          for (int ow = 0; ow < g.out_w; ++ow) {
            const int64_t o = (int64_t{oh} * g.out_w + ow) * C;
            channels_last_positions(an + o, dyn + o, g.kw, g.kh * g.kw, inv_kw, hs, pool::window_start(ow, g.sw, g.pw),
                                    ax_max(h0, 0), ax_min(h1, g.in_h), h0, static_cast<int32_t>(W), idx.data(),
                                    d.data(), C);
            if (sparse) {
              terms_at_positions(idx.data(), d.data(), sum, xs, t_at.data(), g_at.data(), C, coefs);
              scatter_add2(tb, gb, idx.data(), t_at.data(), g_at.data(), C);
            } else {
              scatter_add(gb, idx.data(), d.data(), C);
            }
          }
        }
        if (!sparse) dense_terms(sum, xs, gb, tb, E, coefs);
        channels_last_window_sums(tb, sum, E / C, C, after, before, [](acc v) { return v; });
        scalar_t* dx_band = dx + n * in_image + int64_t{h0} * W * C;
#ifdef AX_HAVE_ISA_VARIANTS
        if constexpr (std::is_same<scalar_t, float>::value) {
          if (stream_dx) {
            const float* sum_rows_1[1] = {sum};
            return grad_inputs_streamed<1>(gb, xs, sum_rows_1, dx_band, E, coefs.grad_coef);
          }
        }
#endif
        grad_inputs(gb, xs, sum, dx_band, E, coefs);
      });
    }
#ifdef AX_HAVE_ISA_VARIANTS
    if (stream_dx) store_fence();  // the streamed dx is complete before parallel_for returns
#endif
  });
}

template <typename scalar_t>
void backward_channels_last(const scalar_t* dy, const uint8_t* argmax, const scalar_t* x, scalar_t* dx,
                            const LrnPoolParams& p) {
  using acc = at::opmath_type<scalar_t>;
  const int64_t N = p.lrn.outer, C = p.lrn.channels, H = p.pool.in_h, W = p.pool.in_w;
  // Bands of rows whose buffers stay in L2, and enough tasks for every thread.
  const int64_t rows_fit = std::max<int64_t>(1, kBufferBytes / (int64_t{sizeof(acc)} * C * W));
  const int64_t min_bands = (at::get_num_threads() + N - 1) / N;
  const int64_t bands = std::min<int64_t>(H, std::max<int64_t>(min_bands, (H + rows_fit - 1) / rows_fit));
  const int64_t rows = (H + bands - 1) / bands;
  if (rows * W * C <= INT32_MAX) backward_channels_last_impl<scalar_t, int32_t>(dy, argmax, x, dx, p, rows);
  else backward_channels_last_impl<scalar_t, int64_t>(dy, argmax, x, dx, p, rows);
}

// NCHW backward, any window (the 3x3 / stride 2 one has backward_nchw_3x3s2):
// a task is one image and a band of input rows, in channel-major buffers.
template <typename scalar_t>
void backward_nchw_bands(const scalar_t* dy, const uint8_t* argmax, const scalar_t* x, scalar_t* dx,
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
      const Band band{C, H, W, h0, h1 - h0};
      const int64_t B = band.pixels();
      sums.resize(static_cast<size_t>(B));
      grads.assign(static_cast<size_t>(C * B), acc(0));  // d loss / d lrn_out, then g * s^-beta
      terms.assign(static_cast<size_t>(C * B), acc(0));  // t = g * x * s^-beta / s
      // The band's x, channel-major with channels xstride apart: float and
      // double read it in place, the rest from a (C, B) copy in acc.
      const acc* xb;
      int64_t xstride;
      if constexpr (std::is_same<acc, scalar_t>::value) {
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
            const int64_t o = (c * g.out_h + oh) * g.out_w + ow;
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
        // dx over the mirrored window R(c), straight into dx (the band's
        // rows of a channel are contiguous).
        for (int64_t c = 0; c < C; ++c) {
          window_rows(terms.data(), B, sums.data(), c, C, B, after, before, [](acc v) { return v; });
          const acc* xc = xb + c * xstride;
          const acc* gc = grads.data() + c * B;
          scalar_t* __restrict__ dxc = dx + n * in_image + (c * H + h0) * W;
          for (int64_t b = 0; b < B; ++b) dxc[b] = static_cast<scalar_t>(lrn::grad_input(gc[b], xc[b], sums[b], coefs));
        }
      });
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
    if (p.lrn.channels_last) backward_channels_last(dyp, ap, xp, dxp, p);
    else if (whole_3x3s2_windows(p.pool) && p.lrn.inner <= INT32_MAX) backward_nchw_3x3s2(dyp, ap, xp, dxp, p);
    else backward_nchw_bands(dyp, ap, xp, dxp, p);
  });
}

}  // namespace fused
}  // namespace alexnet_ext
