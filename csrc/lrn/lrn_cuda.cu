// LRN CUDA kernels: one pass over memory forward (read x, write y) and one
// kernel backward (read x and dy, write dx), no scale tensor. Window sums
// are always taken directly over the window (lrn_math.h says why).
//
// Three ways to cut the work, chosen on the host (lrn_forward_cuda):
//   - ChannelWalk (NCHW, window 3/5/7/9, float/half/bfloat16, 32-bit
//     offsets): one thread per pixel (kPix of them, a block's pixels apart,
//     so every load is coalesced) walks a segment of the channels, keeping
//     the window's x values and pair sums of its squares (PairWindow) in
//     registers. Each step loads one new channel per pixel: no shared
//     memory, no barrier, no runtime division. The segment's window halo
//     (size - 1 channels) is re-read by the neighbouring segment, from L2.
//   - ChunkWalk (channels_last, same windows): a thread owns kVec
//     consecutive channels of one pixel (32 bytes: two vector loads when the
//     row is aligned) and reads the few halo channels of its neighbours
//     (L1 hits). Backward exchanges the edge terms of its window sum with
//     the neighbouring threads through shared memory instead of recomputing
//     them. A block is (chunks of one pixel) x (pixels), so the neighbours
//     are always in the block.
//   - TileWalk: the exact generic fallback (any window up to kMaxCudaWindow,
//     float64, tensors past 2^31 elements): shared-memory tiles, int64
//     offsets, described below.
//
// Every kernel is a grid-stride loop over blockIdx.x.
//
// TileWalk in detail:
// A block owns a tile of kTileChannels output channels x kTilePixels pixels
// of one image. It stages the input rows the tile's windows need (the tile
// plus its halo of size-1 channels) in shared memory, then takes every
// window sum directly from shared memory (see lrn_math.h for why not a
// running sum with subtraction). The halo rows are re-read by the
// neighbouring tile, which runs next to it (channel tiles are the fastest
// grid index) and so finds them in L2: device memory sees each element once.
//
// Coalescing in both layouts comes from one mapping, tile_coords(): the
// index that is contiguous in memory (pixels for NCHW, channels for NHWC)
// varies fastest across threads. The shared-memory pitch kTilePixels + 1 is
// odd, so walking a row or a column of the tile is free of bank conflicts
// for either mapping.
#include <cstdint>
#include <type_traits>

#include "common/cuda_utils.cuh"
#include "lrn/lrn_cuda.h"

namespace alexnet_ext {
namespace lrn {
namespace {

constexpr int kTilePixels = 64;
constexpr int kTileChannels = 32;
constexpr int kPitch = kTilePixels + 1;
constexpr int kThreads = 256;

struct TileGrid {
  int64_t pixel_tiles, channel_tiles, total;
};

TileGrid make_grid(const LrnParams& p) {
  TileGrid g;
  g.pixel_tiles = (p.inner + kTilePixels - 1) / kTilePixels;
  g.channel_tiles = (p.channels + kTileChannels - 1) / kTileChannels;
  g.total = p.outer * g.pixel_tiles * g.channel_tiles;
  return g;
}

struct Tile {
  int64_t n, p0, c0;
};

__device__ __forceinline__ Tile tile_at(const TileGrid& g, int64_t t) {
  Tile tile;
  tile.c0 = (t % g.channel_tiles) * kTileChannels;
  t /= g.channel_tiles;
  tile.p0 = (t % g.pixel_tiles) * kTilePixels;
  tile.n = t / g.pixel_tiles;
  return tile;
}

// Linear index e within a (rows x kTilePixels) tile -> (row, pixel), with the
// memory-contiguous index fastest so that a warp's accesses coalesce.
__device__ __forceinline__ void tile_coords(int e, int rows, bool channels_last, int& row, int& pixel) {
  if (channels_last) {
    row = e % rows;
    pixel = e / rows;
  } else {
    row = e / kTilePixels;
    pixel = e % kTilePixels;
  }
}

__device__ __forceinline__ int64_t element_offset(const LrnParams& p, int64_t n, int64_t c, int64_t pixel) {
  return p.channels_last ? (n * p.inner + pixel) * p.channels + c : (n * p.channels + c) * p.inner + pixel;
}

// Stages channels [c_first, c_first + rows) x pixels [p0, p0 + kTilePixels)
// of `src` in shared memory, in the accumulation type; zeros outside the
// tensor (the zero padding of the channel window).
template <typename T>
__device__ void load_tile(const T* __restrict__ src, acc_t<T>* tile, const LrnParams& p, int64_t n,
                          int64_t c_first, int rows, int64_t p0) {
  for (int e = threadIdx.x; e < rows * kTilePixels; e += blockDim.x) {
    int row, pixel;
    tile_coords(e, rows, p.channels_last, row, pixel);
    const int64_t c = c_first + row, pix = p0 + pixel;
    acc_t<T> v = 0;
    if (c >= 0 && c < p.channels && pix < p.inner) v = to_acc(src[element_offset(p, n, c, pix)]);
    tile[row * kPitch + pixel] = v;
  }
}

// Calls fn(oc, pixel, offset) for each of the tile's output elements that
// lies inside the tensor, with the coalescing thread mapping.
template <typename Fn>
__device__ __forceinline__ void for_each_tile_output(const Tile& tile, const LrnParams& p, Fn fn) {
  for (int e = threadIdx.x; e < kTileChannels * kTilePixels; e += blockDim.x) {
    int oc, pixel;
    tile_coords(e, kTileChannels, p.channels_last, oc, pixel);
    const int64_t c = tile.c0 + oc, pix = tile.p0 + pixel;
    if (c < p.channels && pix < p.inner) fn(oc, pixel, element_offset(p, tile.n, c, pix));
  }
}

template <typename acc>
__device__ __forceinline__ acc column_sum_sq(const acc* tile, int row, int count, int pixel) {
  acc s = 0;
  for (int d = 0; d < count; ++d) {
    const acc v = tile[(row + d) * kPitch + pixel];
    s += v * v;
  }
  return s;
}

template <typename acc>
__device__ __forceinline__ acc column_sum(const acc* tile, int row, int count, int pixel) {
  acc s = 0;
  for (int d = 0; d < count; ++d) s += tile[(row + d) * kPitch + pixel];
  return s;
}

template <typename T>
__device__ void tiled_forward(const T* __restrict__ x, T* __restrict__ y, const LrnParams& p, const TileGrid& g) {
  using acc = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem[];
  acc* xs = reinterpret_cast<acc*>(smem);  // channels [c0 - before, c0 + kTileChannels + after)
  const Coefs<acc> coefs = make_coefs<acc>(p);
  const int before = window_before(p.size);
  const int rows = kTileChannels + p.size - 1;
  for (int64_t t = blockIdx.x; t < g.total; t += gridDim.x) {
    const Tile tile = tile_at(g, t);
    load_tile(x, xs, p, tile.n, tile.c0 - before, rows, tile.p0);
    __syncthreads();
    for_each_tile_output(tile, p, [&](int oc, int pixel, int64_t offset) {
      // Output channel c0 + oc's window is rows [oc, oc + size) of the tile.
      const acc s = denominator_base(column_sum_sq(xs, oc, p.size, pixel), coefs);
      const acc xv = xs[(oc + before) * kPitch + pixel];
      y[offset] = from_acc<T>(xv * inv_pow(s, coefs));
    });
    __syncthreads();  // the next tile overwrites xs
  }
}

// Backward for output channels [c0, c0 + kTileChannels):
//   t rows:  channels [c0 - after, c0 + kTileChannels + before)   (the reverse windows R(i))
//   x rows:  channels [c0 - after - before, ...), rows_t + size - 1 of them (the windows of those t)
// Phase 1 turns the staged dy rows into t in place and keeps dy*s^-beta for
// the tile's own channels; phase 2 sums t over each R(i).
template <typename T>
__device__ void tiled_backward(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                               const LrnParams& p, const TileGrid& g) {
  using acc = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int before = window_before(p.size), after = window_after(p.size);
  const int rows_t = kTileChannels + p.size - 1;
  const int rows_x = rows_t + p.size - 1;
  acc* xs = reinterpret_cast<acc*>(smem);
  acc* ts = xs + rows_x * kPitch;
  acc* first = ts + rows_t * kPitch;  // dy[i] * s[i]^-beta for the tile's channels
  const Coefs<acc> coefs = make_coefs<acc>(p);
  for (int64_t t = blockIdx.x; t < g.total; t += gridDim.x) {
    const Tile tile = tile_at(g, t);
    const int64_t t_first = tile.c0 - after;
    load_tile(x, xs, p, tile.n, t_first - before, rows_x, tile.p0);
    load_tile(dy, ts, p, tile.n, t_first, rows_t, tile.p0);
    __syncthreads();
    for (int e = threadIdx.x; e < rows_t * kTilePixels; e += blockDim.x) {
      int r, pixel;
      tile_coords(e, rows_t, p.channels_last, r, pixel);
      const int64_t c = t_first + r;
      acc tv = 0;  // channels outside [0, C) contribute nothing
      if (c >= 0 && c < p.channels) {
        // Channel c's forward window is x rows [r, r + size); x[c] is row r + before.
        const acc s = denominator_base(column_sum_sq(xs, r, p.size, pixel), coefs);
        const acc ip = inv_pow(s, coefs);
        const acc dyv = ts[r * kPitch + pixel];
        tv = grad_term(dyv, xs[(r + before) * kPitch + pixel], ip, s);
        const int oc = r - after;
        if (oc >= 0 && oc < kTileChannels) first[oc * kPitch + pixel] = dyv * ip;
      }
      ts[r * kPitch + pixel] = tv;  // same thread read this element: no race
    }
    __syncthreads();
    for_each_tile_output(tile, p, [&](int oc, int pixel, int64_t offset) {
      // R(c0 + oc) is t rows [oc, oc + size); its x is x row oc + after + before.
      const acc sum_t = column_sum(ts, oc, p.size, pixel);
      const acc xv = xs[(oc + after + before) * kPitch + pixel];
      dx[offset] = from_acc<T>(grad_input(first[oc * kPitch + pixel], xv, sum_t, coefs));
    });
    __syncthreads();
  }
}


// ---------------------------------------------------------------------------
// Fast paths: compile-time window, 32-bit offsets.

template <int kSize>
struct Window {
  static constexpr int before = kSize / 2;       // window_before(kSize)
  static constexpr int after = (kSize - 1) / 2;  // window_after(kSize)
};

// The walks' coefficients, computed once on the host (make_coefs divides in
// double), with beta == 0.75 known at compile time (the host picks kBeta34
// by the same test), so the branch in inv_pow_and_over_s folds away.
template <bool kBeta34>
__device__ __forceinline__ Coefs<float> walk_coefs(Coefs<float> c) {
  c.fast_three_quarters = kBeta34;
  return c;
}

// Shifts a register window one place towards index 0 and puts `v` last.
template <int N, typename acc>
__device__ __forceinline__ void shift_in(acc (&w)[N], acc v) {
#pragma unroll
  for (int i = 0; i + 1 < N; ++i) w[i] = w[i + 1];
  w[N - 1] = v;
}

// Sliding window sum of the last kSize (odd) values pushed, taken directly
// as (v0 + v1) + (v2 + v3) + ... + v_last: each pair is added once, when
// its second value arrives, and reused by the windows after it, so a step
// costs kSize / 2 + 1 additions instead of kSize - 1. Only additions, no
// running sum with subtraction (lrn_math.h says why); the order differs
// from sum_of's by the grouping alone.
template <int kSize, typename acc>
struct PairWindow {
  static_assert(kSize % 2 == 1, "odd windows");
  acc last = acc(0);         // the newest value
  acc pair[kSize - 1] = {};  // pair[w] = v[w] + v[w + 1] of the window v[0 .. kSize)

  __device__ __forceinline__ void push(acc v) {
#pragma unroll
    for (int w = 0; w + 2 < kSize; ++w) pair[w] = pair[w + 1];
    pair[kSize - 2] = last + v;
    last = v;
  }
  __device__ __forceinline__ acc sum() const {
    acc s = pair[0];
#pragma unroll
    for (int w = 2; w + 1 < kSize; w += 2) s += pair[w];
    return s + last;
  }
};

// out[e] = sum of v[e .. e + kSize) for e < kOut, grouped as PairWindow
// does (the pairs v[i] + v[i + 1] are shared between the windows).
template <int kSize, int kOut, typename acc>
__device__ __forceinline__ void pair_window_sums(const acc (&v)[kOut + kSize - 1], acc (&out)[kOut]) {
  acc pair[kOut + kSize - 2];
#pragma unroll
  for (int i = 0; i < kOut + kSize - 2; ++i) pair[i] = v[i] + v[i + 1];
#pragma unroll
  for (int e = 0; e < kOut; ++e) {
    acc s = pair[e];
#pragma unroll
    for (int w = 2; w + 1 < kSize; w += 2) s += pair[e + w];
    out[e] = s + v[e + kSize - 1];
  }
}

// s^-beta for the forward walks. beta = 0.75 as 2^(-0.75 log2 s): two MUFU
// operations with their range checks, one instruction fewer than the two
// reciprocal square roots of inv_pow_and_over_s (which backward keeps: it
// needs s^-beta / s too). Within a few ulp of powf.
template <bool kBeta34>
__device__ __forceinline__ float forward_inv_pow(float s, const Coefs<float>& coefs) {
  if (kBeta34) return exp2f(-0.75f * __log2f(s));
  return inv_pow_and_over_s(s, coefs).inv_pow;
}

// dy * s^-beta and t = dy * x * s^-beta / s for beta = 0.75 from r = s^-1/2:
// s^-beta = r^2 rsqrt(r), s^-beta / s = s^-beta r^2, so t = (dy s^-beta) x r^2
// shares the product dy s^-beta with the first term of dx.
struct GradTerms {
  float dy_inv_pow, t;
};
template <bool kBeta34>
__device__ __forceinline__ GradTerms grad_terms(float dy, float x, float s, const Coefs<float>& coefs) {
  GradTerms g;
  if (kBeta34) {
    const float r = ax_rsqrt(s), r2 = r * r;
    g.dy_inv_pow = dy * (r2 * ax_rsqrt(r));
    g.t = g.dy_inv_pow * x * r2;
  } else {
    const InvPow<float> ip = inv_pow_and_over_s(s, coefs);
    g.dy_inv_pow = dy * ip.inv_pow;
    g.t = dy * x * ip.inv_pow_over_s;
  }
  return g;
}

// NCHW. Grid: x strides over tiles of kBlock * kPix pixels of one image (a
// thread's kPix pixels are kBlock apart, so one address serves all of them
// and each warp access is contiguous), y = channel segment. kFullTiles
// (P >= kTile): an image's last tile is moved back to end at P, so every
// pixel a thread loads exists and loads need neither a check nor a zero
// default; the pixels it shares with the tile before are not stored again.
template <int kSize, int kPix, bool kBeta34, bool kFullTiles>
struct ChannelWalk {
  static constexpr int kBlock = 64;  // threads per block
  static constexpr int kTile = kBlock * kPix;
  int tiles;            // N * tiles_per_image
  int tiles_per_image;  // ceil(P / kTile)
  int channels;         // C; N * C * P fits an int
  int inner;            // P
  int segment;          // channels per blockIdx.y
  Coefs<float> host_coefs;

  // Output channels [c_begin, c_end) of this block's segment.
  __device__ __forceinline__ void segment_bounds(int& c_begin, int& c_end) const {
    c_begin = static_cast<int>(blockIdx.y) * segment;
    c_end = ax_min(c_begin + segment, channels);
  }

  // Channel-0 offset of the thread's first pixel in tile t, and which of its
  // pixels it stores (with kFullTiles all are loaded; else the others are
  // neither loaded nor stored).
  __device__ __forceinline__ int tile_offset(int t, bool (&ok)[kPix]) const {
    const int n = t / tiles_per_image;  // once per tile
    const int start = (t - n * tiles_per_image) * kTile;
    const int first = kFullTiles ? ax_min(start, inner - kTile) : start;
    const int pix = first + static_cast<int>(threadIdx.x);
#pragma unroll
    for (int j = 0; j < kPix; ++j) ok[j] = kFullTiles ? pix + j * kBlock >= start : pix + j * kBlock < inner;
    return n * channels * inner + pix;
  }

  // Does pixel j exist for a load (a zero otherwise)?
  __device__ __forceinline__ static bool loads(const bool (&ok)[kPix], int j) { return kFullTiles || ok[j]; }

  template <typename T>
  __device__ void forward(const T* __restrict__ x, T* __restrict__ y, const LrnParams& p) const {
    using acc = acc_t<T>;
    using W = Window<kSize>;
    const Coefs<acc> coefs = walk_coefs<kBeta34>(host_coefs);
    const int C = channels, P = inner;
    int c_begin, c_end;
    segment_bounds(c_begin, c_end);
    const int c_full = ax_min(c_end, C - W::after);  // outputs whose lead channel is inside
    for (int t = static_cast<int>(blockIdx.x); t < tiles; t += static_cast<int>(gridDim.x)) {
      bool ok[kPix];
      const int base = tile_offset(t, ok);
      // xw[j][w] = x[c - before + w] of pixel j for the output channel c about
      // to be written; sq[j] sums the squares of the same window.
      acc xw[kPix][kSize];
      PairWindow<kSize, acc> sq[kPix];
#pragma unroll
      for (int j = 0; j < kPix; ++j) {
#pragma unroll
        for (int w = 0; w < kSize; ++w) {
          const int c = c_begin - 1 - W::before + w;
          xw[j][w] = (loads(ok, j) && c >= 0 && c < C) ? to_acc(x[base + c * P + j * kBlock]) : acc(0);
          sq[j].push(xw[j][w] * xw[j][w]);
        }
      }
      const auto step = [&](int c, const acc (&v)[kPix]) {
        T out[kPix];  // all values first, then plain predicated stores (no branches)
#pragma unroll
        for (int j = 0; j < kPix; ++j) {
          shift_in(xw[j], v[j]);
          sq[j].push(v[j] * v[j]);
          out[j] = from_acc<T>(xw[j][W::before] * forward_inv_pow<kBeta34>(denominator_base(sq[j].sum(), coefs), coefs));
        }
#pragma unroll
        for (int j = 0; j < kPix; ++j)
          if (ok[j]) y[base + c * P + j * kBlock] = out[j];
      };
      int c = c_begin;
      int lead = (c_begin + W::after) * P;
#pragma unroll kSize  // a multiple of kSize: the register windows rotate back in place, no moves
      for (; c < c_full; ++c, lead += P) {
        acc v[kPix];  // all loads of the step first: kPix in flight
#pragma unroll
        for (int j = 0; j < kPix; ++j) v[j] = loads(ok, j) ? to_acc(x[base + lead + j * kBlock]) : acc(0);
        step(c, v);
      }
      for (; c < c_end; ++c, lead += P) {
        const bool inside = c + W::after < C;
        acc v[kPix];
#pragma unroll
        for (int j = 0; j < kPix; ++j) v[j] = inside && loads(ok, j) ? to_acc(x[base + lead + j * kBlock]) : acc(0);
        step(c, v);
      }
    }
  }

  // Step m computes t[m] (its forward window is x[m - before .. m + after])
  // and, once t[i + before] exists, dx[i] for i = m - before:
  //   xw[j][w] = x[m - before + w]   (so xw[j][0] = x[i]); sq[j] sums their squares
  //   tw[j]: the window sum of t[m - kSize + 1 .. m] (= t[i - after .. i + before], R(i))
  //   dip[j][w] = dy * s^-beta of channel m - before + w
  template <typename T>
  struct BackwardState {
    using acc = acc_t<T>;
    using W = Window<kSize>;
    acc xw[kPix][kSize], dip[kPix][W::before + 1];
    PairWindow<kSize, acc> sq[kPix], tw[kPix];
    int base;
    bool ok[kPix];

    // kMain: every load is inside the tensor (no checks); kOut: dx[m - before] is written.
    template <bool kMain, bool kOut>
    __device__ __forceinline__ void step(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                                         int m, int C, int P, const Coefs<acc>& coefs) {
      const bool load_x = kMain || m + W::after < C;
      const bool has_t = kMain || (m >= 0 && m < C);
      acc xv[kPix], dyv[kPix];
#pragma unroll
      for (int j = 0; j < kPix; ++j) {
        xv[j] = load_x && loads(ok, j) ? to_acc(x[base + (m + W::after) * P + j * kBlock]) : acc(0);
        dyv[j] = has_t && loads(ok, j) ? to_acc(dy[base + m * P + j * kBlock]) : acc(0);
      }
#pragma unroll
      for (int j = 0; j < kPix; ++j) {
        shift_in(xw[j], xv[j]);
        sq[j].push(xv[j] * xv[j]);
        GradTerms g{acc(0), acc(0)};
        if (has_t) g = grad_terms<kBeta34>(dyv[j], xw[j][W::before], denominator_base(sq[j].sum(), coefs), coefs);
        tw[j].push(g.t);
        shift_in(dip[j], g.dy_inv_pow);
      }
      if (kOut) {
        T out[kPix];
#pragma unroll
        for (int j = 0; j < kPix; ++j) out[j] = from_acc<T>(grad_input(dip[j][0], xw[j][0], tw[j].sum(), coefs));
#pragma unroll
        for (int j = 0; j < kPix; ++j)
          if (ok[j]) dx[base + (m - W::before) * P + j * kBlock] = out[j];
      }
    }
  };

  template <typename T>
  __device__ void backward(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                           const LrnParams& p) const {
    using acc = acc_t<T>;
    using W = Window<kSize>;
    const Coefs<acc> coefs = walk_coefs<kBeta34>(host_coefs);
    const int C = channels, P = inner;
    int c_begin, c_end;
    segment_bounds(c_begin, c_end);
    const int m_first = c_begin - W::after, m_out = c_begin + W::before, m_last = c_end + W::before;
    const int m_full = ax_max(m_out, ax_min(m_last, C - W::after));
    for (int t = static_cast<int>(blockIdx.x); t < tiles; t += static_cast<int>(gridDim.x)) {
      BackwardState<T> st;
      st.base = tile_offset(t, st.ok);
#pragma unroll
      for (int j = 0; j < kPix; ++j) {
#pragma unroll
        for (int w = 0; w < kSize; ++w) {
          const int c = m_first - 1 - W::before + w;
          st.xw[j][w] = (loads(st.ok, j) && c >= 0 && c < C) ? to_acc(x[st.base + c * P + j * kBlock]) : acc(0);
          st.sq[j].push(st.xw[j][w] * st.xw[j][w]);
        }
#pragma unroll
        for (int w = 0; w <= W::before; ++w) st.dip[j][w] = acc(0);
      }
      // Outputs start at m_out; the steps before only fill the windows.
      int m = m_first;
      for (; m < m_out; ++m) st.template step<false, false>(dy, x, dx, m, C, P, coefs);
#pragma unroll kSize
      for (; m < m_full; ++m) st.template step<true, true>(dy, x, dx, m, C, P, coefs);
      for (; m < m_last; ++m) st.template step<false, true>(dy, x, dx, m, C, P, coefs);
    }
  }
};

// 16-byte vectors of T, for aligned channels_last rows.
template <typename T>
struct alignas(16) Vec16 {
  static constexpr int n = 16 / sizeof(T);
  T v[n];
};

// channels_last. Block (chunks, pixels per block); thread x owns channels
// [x * kVec, x * kVec + kVec) of pixel blockIdx.x * blockDim.y + y (grid-
// stride). kVector: C % kVec == 0 and 16-byte aligned rows, so the own
// channels are 16-byte vector loads/stores (kVec * sizeof(T) / 16 of them);
// else scalar, masked at C.
template <int kSize, int kVec, bool kVector, bool kBeta34>
struct ChunkWalk {
  int pixels;    // N * P
  int channels;  // C
  Coefs<float> host_coefs;
  static_assert(Window<kSize>::before <= kVec && Window<kSize>::after <= kVec, "halo wider than a neighbour");

  // win[w] = x[c0 - lo + w] for w < lo + kVec + hi, zero outside [0, C).
  template <typename T, int kLo, int kHi>
  __device__ __forceinline__ void load_row(const T* __restrict__ row, int c0, acc_t<T> (&win)[kLo + kVec + kHi]) const {
    const int C = channels;
    if constexpr (kVector) {
      constexpr int n = Vec16<T>::n;
#pragma unroll
      for (int h = 0; h < kVec / n; ++h) {
        const Vec16<T> v = *reinterpret_cast<const Vec16<T>*>(row + c0 + h * n);
#pragma unroll
        for (int e = 0; e < n; ++e) win[kLo + h * n + e] = to_acc(v.v[e]);
      }
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) win[kLo + e] = c0 + e < C ? to_acc(row[c0 + e]) : acc_t<T>(0);
    }
#pragma unroll
    for (int d = 0; d < kLo; ++d) {
      const int c = c0 - kLo + d;
      win[d] = c >= 0 ? to_acc(row[c]) : acc_t<T>(0);
    }
#pragma unroll
    for (int d = 0; d < kHi; ++d) {
      const int c = c0 + kVec + d;
      win[kLo + kVec + d] = c < C ? to_acc(row[c]) : acc_t<T>(0);
    }
  }

  template <typename T>
  __device__ __forceinline__ void store_row(T* __restrict__ row, int c0, const acc_t<T> (&out)[kVec]) const {
    if constexpr (kVector) {
      constexpr int n = Vec16<T>::n;
#pragma unroll
      for (int h = 0; h < kVec / n; ++h) {
        Vec16<T> v;
#pragma unroll
        for (int e = 0; e < n; ++e) v.v[e] = from_acc<T>(out[h * n + e]);
        *reinterpret_cast<Vec16<T>*>(row + c0 + h * n) = v;
      }
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e)
        if (c0 + e < channels) row[c0 + e] = from_acc<T>(out[e]);
    }
  }

  template <typename T>
  __device__ void forward(const T* __restrict__ x, T* __restrict__ y, const LrnParams& p) const {
    using acc = acc_t<T>;
    using W = Window<kSize>;
    const Coefs<acc> coefs = walk_coefs<kBeta34>(host_coefs);
    const int c0 = static_cast<int>(threadIdx.x) * kVec;
    const int stride = static_cast<int>(gridDim.x * blockDim.y);
    for (int pix = static_cast<int>(blockIdx.x * blockDim.y + threadIdx.y); pix < pixels; pix += stride) {
      const int base = pix * channels;
      acc win[W::before + kVec + W::after], sq[W::before + kVec + W::after];
      load_row<T, W::before, W::after>(x + base, c0, win);
#pragma unroll
      for (int w = 0; w < W::before + kVec + W::after; ++w) sq[w] = win[w] * win[w];
      acc sums[kVec], out[kVec];
      pair_window_sums<kSize>(sq, sums);
#pragma unroll
      for (int e = 0; e < kVec; ++e)
        out[e] = win[W::before + e] * forward_inv_pow<kBeta34>(denominator_base(sums[e], coefs), coefs);
      store_row(y + base, c0, out);
    }
  }

  // t = dy * x * s^-beta / s of the own channels; R(i) also needs the last
  // `after` t of the left neighbour and the first `before` of the right one,
  // which come through shared memory (same block by construction).
  template <typename T>
  __device__ void backward(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                           const LrnParams& p) const {
    using acc = acc_t<T>;
    using W = Window<kSize>;
    __shared__ acc head[kThreads][W::before];  // first `before` t of each thread
    __shared__ acc tail[kThreads][W::after];   // last `after` t
    const Coefs<acc> coefs = walk_coefs<kBeta34>(host_coefs);
    const int c0 = static_cast<int>(threadIdx.x) * kVec;
    const int tid = static_cast<int>(threadIdx.y * blockDim.x + threadIdx.x);
    const bool has_left = threadIdx.x > 0, has_right = threadIdx.x + 1 < blockDim.x;
    const int stride = static_cast<int>(gridDim.x * blockDim.y);
    // The loop condition is the same for the whole block (barriers inside).
    for (int pix0 = static_cast<int>(blockIdx.x * blockDim.y); pix0 < pixels; pix0 += stride) {
      const int pix = pix0 + static_cast<int>(threadIdx.y);
      const bool active = pix < pixels;
      const int base = active ? pix * channels : 0;
      acc xw[W::before + kVec + W::after], dyw[kVec];  // xw[w] = x[c0 - before + w]
      load_row<T, W::before, W::after>(x + base, c0, xw);
      load_row<T, 0, 0>(dy + base, c0, dyw);  // zero past C, so are those t
      acc sq[W::before + kVec + W::after], sums[kVec];
#pragma unroll
      for (int w = 0; w < W::before + kVec + W::after; ++w) sq[w] = xw[w] * xw[w];
      pair_window_sums<kSize>(sq, sums);
      acc t[kVec], dip[kVec];
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const GradTerms g = grad_terms<kBeta34>(dyw[e], xw[W::before + e], denominator_base(sums[e], coefs), coefs);
        t[e] = g.t;
        dip[e] = g.dy_inv_pow;
      }
#pragma unroll
      for (int d = 0; d < W::before; ++d) head[tid][d] = t[d];
#pragma unroll
      for (int d = 0; d < W::after; ++d) tail[tid][d] = t[kVec - W::after + d];
      __syncthreads();
      acc tt[W::after + kVec + W::before];  // t[c0 - after + w]
#pragma unroll
      for (int d = 0; d < W::after; ++d) tt[d] = has_left ? tail[tid - 1][d] : acc(0);
#pragma unroll
      for (int e = 0; e < kVec; ++e) tt[W::after + e] = t[e];
#pragma unroll
      for (int d = 0; d < W::before; ++d) tt[W::after + kVec + d] = has_right ? head[tid + 1][d] : acc(0);
      acc t_sums[kVec], out[kVec];
      pair_window_sums<kSize>(tt, t_sums);
#pragma unroll
      for (int e = 0; e < kVec; ++e) out[e] = grad_input(dip[e], xw[W::before + e], t_sums[e], coefs);
      if (active) store_row(dx + base, c0, out);
      __syncthreads();  // the next pixels overwrite head and tail
    }
  }
};

// The generic path as a walk, so every path runs through the same kernels.
struct TileWalk {
  TileGrid g;
  template <typename T>
  __device__ void forward(const T* __restrict__ x, T* __restrict__ y, const LrnParams& p) const {
    tiled_forward(x, y, p, g);
  }
  template <typename T>
  __device__ void backward(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                           const LrnParams& p) const {
    tiled_backward(dy, x, dx, p, g);
  }
};

// (kThreads, 1): without the minimum-blocks hint ptxas caps some walks at 80
// registers and spills; they need ~124.
template <typename T, typename Walk>
__global__ void __launch_bounds__(kThreads, 1)
    lrn_forward_kernel(const T* __restrict__ x, T* __restrict__ y, const LrnParams p, const Walk walk) {
  walk.forward(x, y, p);
}

// (kThreads, 1): without the minimum-blocks hint ptxas caps some walks at 80
// registers and spills; they need ~124.
template <typename T, typename Walk>
__global__ void __launch_bounds__(kThreads, 1)
    lrn_backward_kernel(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx, const LrnParams p,
                        const Walk walk) {
  walk.backward(dy, x, dx, p);
}

// ---------------------------------------------------------------------------
// Launch

unsigned blocks_for(const TileGrid& g) {
  // Grid-stride over tiles; 2^30 blocks is far beyond any real tensor.
  return static_cast<unsigned>(g.total < (int64_t{1} << 30) ? g.total : (int64_t{1} << 30));
}

// Pixels per thread of the NCHW walk: forward keeps kSize registers per
// pixel, backward about 2.5 kSize.
constexpr int kForwardPix = 4, kBackwardPix = 4;

// The fast paths index with int: every offset, plus a grid-stride step, must fit.
bool fits_int32(const LrnParams& p) {
  const int64_t limit = (int64_t{1} << 31) - int64_t{kThreads} * 65535 * 8 * kForwardPix;
  return p.outer * p.channels * p.inner < limit;
}

// Grid-stride walks launch at most this many blocks (about 8 per SM of a
// 132-SM GPU): each thread then walks several pixels, so its setup is
// amortised.
constexpr int kMaxWalkBlocks = 1024;

struct Launch {
  dim3 grid, block;
  size_t smem = 0;
};

// Channel segments for the NCHW walk: whole columns when there are pixels
// enough to fill the GPU, else shorter segments (more threads, each
// re-reading a halo of size - 1 channels from L2).
template <int kSize, int kPix, bool kBeta34, bool kFullTiles>
Launch channel_walk_launch(const LrnParams& p, ChannelWalk<kSize, kPix, kBeta34, kFullTiles>& walk) {
  using Walk = ChannelWalk<kSize, kPix, kBeta34, kFullTiles>;
  walk.channels = static_cast<int>(p.channels);
  walk.inner = static_cast<int>(p.inner);
  walk.tiles_per_image = static_cast<int>((p.inner + Walk::kTile - 1) / Walk::kTile);
  walk.tiles = static_cast<int>(p.outer) * walk.tiles_per_image;
  walk.host_coefs = make_coefs<float>(p);
  const int64_t threads = int64_t{walk.tiles} * Walk::kBlock;
  // Enough threads for the loads in flight a GPU needs: each has kPix x kSize
  // independent loads in its unrolled loop, so 2^15 threads keep about 2 MB
  // of bfloat16 in flight (copy bandwidth x latency on an H100 is ~1.8 MB);
  // more would only add halo work and per-thread setup.
  constexpr int64_t kWantThreads = int64_t{1} << 15;
  int segment = walk.channels;
  while (segment > 16 && threads * ((walk.channels + segment - 1) / segment) < kWantThreads) segment = (segment + 1) / 2;
  walk.segment = segment;
  Launch l;
  l.block = dim3(Walk::kBlock);
  l.grid = dim3(static_cast<unsigned>(ax_min(walk.tiles, kMaxWalkBlocks * (kThreads / Walk::kBlock))),
                static_cast<unsigned>((walk.channels + segment - 1) / segment));
  return l;
}

template <int kSize, int kVec, bool kVector, bool kBeta34>
Launch chunk_walk_launch(const LrnParams& p, ChunkWalk<kSize, kVec, kVector, kBeta34>& walk) {
  walk.pixels = static_cast<int>(p.outer * p.inner);
  walk.channels = static_cast<int>(p.channels);
  walk.host_coefs = make_coefs<float>(p);
  const int chunks = static_cast<int>((p.channels + kVec - 1) / kVec);
  const int per_block = kThreads / chunks;
  Launch l;
  l.block = dim3(chunks, per_block);
  l.grid = dim3(grid_for(walk.pixels, per_block, kMaxWalkBlocks));
  return l;
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// Calls fn(walk, launch) with the fastest walk that serves `p`. The fast
// walks take float/half/bfloat16, windows 3, 5, 7, 9, int offsets and, for
// channels_last, at most kThreads chunks per pixel.
template <typename T, bool kBackward, typename Fn>
LaunchStatus with_walk(const LrnParams& p, bool rows_aligned, Fn&& fn) {
  constexpr int kVec = 32 / sizeof(T);  // channels per thread in channels_last: two 16-byte vectors
  const bool fast = !std::is_same<T, double>::value && fits_int32(p) &&
                    (p.size == 3 || p.size == 5 || p.size == 7 || p.size == 9) &&
                    (!p.channels_last || (p.channels + kVec - 1) / kVec <= kThreads);
  if constexpr (!std::is_same<T, double>::value) {
    if (fast) {
      const auto sized = [&](auto size_tag, auto beta_tag) -> LaunchStatus {
        constexpr int kSize = decltype(size_tag)::value;
        constexpr bool kBeta34 = decltype(beta_tag)::value;
        if (p.channels_last) {
          if (rows_aligned && p.channels % kVec == 0) {
            ChunkWalk<kSize, kVec, true, kBeta34> walk;
            return fn(walk, chunk_walk_launch(p, walk));
          }
          ChunkWalk<kSize, kVec, false, kBeta34> walk;
          return fn(walk, chunk_walk_launch(p, walk));
        }
        constexpr int kPix = kBackward ? kBackwardPix : kForwardPix;
        if (p.inner >= ChannelWalk<kSize, kPix, kBeta34, true>::kTile) {
          ChannelWalk<kSize, kPix, kBeta34, true> walk;
          return fn(walk, channel_walk_launch(p, walk));
        }
        ChannelWalk<kSize, kPix, kBeta34, false> walk;
        return fn(walk, channel_walk_launch(p, walk));
      };
      const auto beta_sized = [&](auto size_tag) -> LaunchStatus {
        if (p.beta == 0.75) return sized(size_tag, std::true_type{});
        return sized(size_tag, std::false_type{});
      };
      switch (p.size) {
        case 3: return beta_sized(std::integral_constant<int, 3>{});
        case 5: return beta_sized(std::integral_constant<int, 5>{});
        case 7: return beta_sized(std::integral_constant<int, 7>{});
        default: return beta_sized(std::integral_constant<int, 9>{});
      }
    }
  }
  TileWalk walk;
  walk.g = make_grid(p);
  Launch l;
  l.grid = dim3(blocks_for(walk.g));
  l.block = dim3(kThreads);
  const int rows_t = kTileChannels + p.size - 1;
  l.smem = (kBackward ? size_t(rows_t + p.size - 1 + rows_t + kTileChannels) : size_t(rows_t)) * kPitch *
           sizeof(acc_t<T>);
  return fn(walk, l);
}

}  // namespace

LaunchStatus lrn_forward_cuda(DType dtype, const void* x, void* y, const LrnParams& p, void* stream) {
  if (p.size < 1 || p.size > kMaxCudaWindow) return static_cast<LaunchStatus>(cudaErrorInvalidValue);
  if (p.outer * p.channels * p.inner == 0) return 0;
  const bool aligned = aligned16(x) && aligned16(y);
  return dispatch_cuda_dtype(dtype, [&](auto tag) -> LaunchStatus {
    using T = decltype(tag);
    return with_walk<T, false>(p, aligned, [&](const auto& walk, const Launch& l) -> LaunchStatus {
      using Walk = std::decay_t<decltype(walk)>;
      cudaError_t err = allow_dynamic_smem(lrn_forward_kernel<T, Walk>, l.smem);
      if (err != cudaSuccess) return err;
      lrn_forward_kernel<T, Walk><<<l.grid, l.block, l.smem, static_cast<cudaStream_t>(stream)>>>(
          static_cast<const T*>(x), static_cast<T*>(y), p, walk);
      return cudaGetLastError();
    });
  });
}

LaunchStatus lrn_backward_cuda(DType dtype, const void* dy, const void* x, void* dx, const LrnParams& p,
                               void* stream) {
  if (p.size < 1 || p.size > kMaxCudaWindow) return static_cast<LaunchStatus>(cudaErrorInvalidValue);
  if (p.outer * p.channels * p.inner == 0) return 0;
  const bool aligned = aligned16(dy) && aligned16(x) && aligned16(dx);
  return dispatch_cuda_dtype(dtype, [&](auto tag) -> LaunchStatus {
    using T = decltype(tag);
    return with_walk<T, true>(p, aligned, [&](const auto& walk, const Launch& l) -> LaunchStatus {
      using Walk = std::decay_t<decltype(walk)>;
      cudaError_t err = allow_dynamic_smem(lrn_backward_kernel<T, Walk>, l.smem);
      if (err != cudaSuccess) return err;
      lrn_backward_kernel<T, Walk><<<l.grid, l.block, l.smem, static_cast<cudaStream_t>(stream)>>>(
          static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<T*>(dx), p, walk);
      return cudaGetLastError();
    });
  });
}

}  // namespace lrn
}  // namespace alexnet_ext
