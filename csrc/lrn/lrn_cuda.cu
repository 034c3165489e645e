// LRN CUDA kernels: one pass over memory forward (read x, write y) and one
// kernel backward (read x and dy, write dx), no scale tensor.
//
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
__global__ void __launch_bounds__(kThreads)
    lrn_forward_kernel(const T* __restrict__ x, T* __restrict__ y, const LrnParams p, const TileGrid g) {
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
__global__ void __launch_bounds__(kThreads)
    lrn_backward_kernel(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx, const LrnParams p,
                        const TileGrid g) {
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

unsigned blocks_for(const TileGrid& g) {
  // Grid-stride over tiles; 2^30 blocks is far beyond any real tensor.
  return static_cast<unsigned>(g.total < (int64_t{1} << 30) ? g.total : (int64_t{1} << 30));
}

}  // namespace

LaunchStatus lrn_forward_cuda(DType dtype, const void* x, void* y, const LrnParams& p, void* stream) {
  if (p.size < 1 || p.size > kMaxCudaWindow) return static_cast<LaunchStatus>(cudaErrorInvalidValue);
  const TileGrid g = make_grid(p);
  if (g.total == 0) return 0;
  return dispatch_cuda_dtype(dtype, [&](auto tag) -> LaunchStatus {
    using T = decltype(tag);
    const size_t smem = size_t(kTileChannels + p.size - 1) * kPitch * sizeof(acc_t<T>);
    cudaError_t err = allow_dynamic_smem(lrn_forward_kernel<T>, smem);
    if (err != cudaSuccess) return err;
    lrn_forward_kernel<T><<<blocks_for(g), kThreads, smem, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(x), static_cast<T*>(y), p, g);
    return cudaGetLastError();
  });
}

LaunchStatus lrn_backward_cuda(DType dtype, const void* dy, const void* x, void* dx, const LrnParams& p,
                               void* stream) {
  if (p.size < 1 || p.size > kMaxCudaWindow) return static_cast<LaunchStatus>(cudaErrorInvalidValue);
  const TileGrid g = make_grid(p);
  if (g.total == 0) return 0;
  return dispatch_cuda_dtype(dtype, [&](auto tag) -> LaunchStatus {
    using T = decltype(tag);
    const int rows_t = kTileChannels + p.size - 1;
    const size_t smem = size_t(rows_t + p.size - 1 + rows_t + kTileChannels) * kPitch * sizeof(acc_t<T>);
    cudaError_t err = allow_dynamic_smem(lrn_backward_kernel<T>, smem);
    if (err != cudaSuccess) return err;
    lrn_backward_kernel<T><<<blocks_for(g), kThreads, smem, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<T*>(dx), p, g);
    return cudaGetLastError();
  });
}

}  // namespace lrn
}  // namespace alexnet_ext
