// Max-pool CUDA kernels. No PyTorch headers (see common/dtype.h); window
// arithmetic comes from pool_math.h, the functions the CPU tests exercise.
//
// 3x3 / stride 2 without padding (AlexNet's pools), float/half/bfloat16,
// 32-bit offsets: forward_3x3s2, backward_3x3s2_columns (NCHW) and
// backward_3x3s2 (channels_last) below (compile-time geometry, no division
// per element, threads walking down the plane so that neighbouring windows
// share loads, 16-byte channel vectors in channels_last). Everything else
// takes the general paths:
//
// Forward, three paths:
//   - NCHW, 3x3 / stride 2 (AlexNet), planes that fit kStageBytes: a block
//     copies whole consecutive planes (one contiguous, coalesced chunk) into
//     shared memory, then computes their outputs from there, so every input
//     element is read from device memory exactly once despite the overlap;
//     the outputs of those planes are again one contiguous chunk.
//   - channels_last: one thread per output, channels fastest, so loads and
//     stores are coalesced runs of C values; the up to 4x reuse of an input
//     pixel by neighbouring windows is served by L1/L2 (neighbouring output
//     pixels run in the same or adjacent blocks). 3x3 / stride 2 is a
//     compile-time window there too.
//   - everything else: one thread per output, output-order indexing.
// Backward: one thread per input element gathers the gradients of the
// windows whose argmax points at it; every dx element is written exactly
// once, with no zero-fill pass and no atomics.
#include <cstdint>
#include <type_traits>

#include "common/cuda_utils.cuh"
#include "maxpool/pool_cuda.h"
#include "maxpool/pool_math.h"

namespace alexnet_ext {
namespace pool {
namespace {

constexpr int kThreads = 256;
// Shared memory one block stages (dynamic, below the 48 KiB default limit).
constexpr int64_t kStageBytes = 32 * 1024;
// Outputs per block the plane-staging path aims for (several per thread).
constexpr int64_t kOutputsPerBlock = 1024;

template <typename IndexT>
__device__ __forceinline__ IndexT global_thread() {
  return static_cast<IndexT>(blockIdx.x) * blockDim.x + threadIdx.x;
}
template <typename IndexT>
__device__ __forceinline__ IndexT grid_threads() {
  return static_cast<IndexT>(gridDim.x) * blockDim.x;
}

// The window, with AlexNet's 3x3 / stride 2 fixed at compile time when kAlexNet.
template <bool kAlexNet>
struct Window {
  int kh, kw, sh, sw;
  __device__ __forceinline__ explicit Window(const PoolGeometry& g)
      : kh(kAlexNet ? 3 : g.kh), kw(kAlexNet ? 3 : g.kw), sh(kAlexNet ? 2 : g.sh), sw(kAlexNet ? 2 : g.sw) {}
};

// One thread per output element; i is the output's linear offset in either
// layout (outputs are contiguous in the input's layout).
template <typename T, typename OffT, bool kChannelsLast, bool kAlexNet, typename IndexT>
__global__ void __launch_bounds__(kThreads) forward_per_output(const T* __restrict__ x, T* __restrict__ y,
                                                              OffT* __restrict__ argmax, const PoolGeometry g,
                                                              IndexT total) {
  using acc = acc_t<T>;
  const Window<kAlexNet> win(g);
  for (IndexT i = global_thread<IndexT>(); i < total; i += grid_threads<IndexT>()) {
    int off;
    acc m;
    if (kChannelsLast) {
      const IndexT C = static_cast<IndexT>(g.channels);
      const IndexT c = i % C;
      IndexT t = i / C;
      const int ow = static_cast<int>(t % g.out_w);
      t /= g.out_w;
      const int oh = static_cast<int>(t % g.out_h);
      const IndexT n = t / g.out_h;
      const T* xn = x + n * g.in_h * g.in_w * C + c;
      const int in_w = g.in_w;
      const auto load = [xn, in_w, C](int ih, int iw) {
        return to_acc<T>(xn[(static_cast<IndexT>(ih) * in_w + iw) * C]);
      };
      m = window_max<acc>(oh, ow, win.kh, win.kw, win.sh, win.sw, g.ph, g.pw, g.in_h, g.in_w, load, &off);
    } else {
      const int ow = static_cast<int>(i % g.out_w);
      const IndexT t = i / g.out_w;
      const int oh = static_cast<int>(t % g.out_h);
      const IndexT plane = t / g.out_h;
      const T* xp = x + plane * g.in_h * g.in_w;
      const int in_w = g.in_w;
      const auto load = [xp, in_w](int ih, int iw) { return to_acc<T>(xp[static_cast<IndexT>(ih) * in_w + iw]); };
      m = window_max<acc>(oh, ow, win.kh, win.kw, win.sh, win.sw, g.ph, g.pw, g.in_h, g.in_w, load, &off);
    }
    y[i] = from_acc<T>(m);
    if (argmax != nullptr) argmax[i] = static_cast<OffT>(off);
  }
}

// NCHW, 3x3 / stride 2: block b stages planes [b*P, b*P + P) in shared memory.
template <typename T, typename OffT>
__global__ void __launch_bounds__(kThreads) forward_staged_planes(const T* __restrict__ x, T* __restrict__ y,
                                                                 OffT* __restrict__ argmax, const PoolGeometry g,
                                                                 int planes_per_block) {
  using acc = acc_t<T>;
  extern __shared__ __align__(16) unsigned char stage_bytes[];
  T* stage = reinterpret_cast<T*>(stage_bytes);
  const int64_t first_plane = static_cast<int64_t>(blockIdx.x) * planes_per_block;
  const int planes = static_cast<int>(
      first_plane + planes_per_block <= g.planes ? planes_per_block : g.planes - first_plane);
  const int in_plane = g.in_h * g.in_w, out_plane = g.out_h * g.out_w;
  // Block-local counts fit an int: they are bounded by kStageBytes.
  const T* src = x + first_plane * in_plane;
  const int n_in = planes * in_plane;
  for (int i = threadIdx.x; i < n_in; i += blockDim.x) stage[i] = src[i];
  __syncthreads();
  const int64_t out_base = first_plane * out_plane;
  const int n_out = planes * out_plane;
  for (int i = threadIdx.x; i < n_out; i += blockDim.x) {
    const int q = i / out_plane, r = i - q * out_plane;
    const int oh = r / g.out_w, ow = r - oh * g.out_w;
    const T* sp = stage + q * in_plane;
    const int in_w = g.in_w;
    const auto load = [sp, in_w](int ih, int iw) { return to_acc<T>(sp[ih * in_w + iw]); };
    int off;
    const acc m = window_max<acc>(oh, ow, 3, 3, 2, 2, g.ph, g.pw, g.in_h, g.in_w, load, &off);
    y[out_base + i] = from_acc<T>(m);
    if (argmax != nullptr) argmax[out_base + i] = static_cast<OffT>(off);
  }
}

// One thread per input element; i is its linear offset in either layout.
template <typename T, typename OffT, bool kChannelsLast, typename IndexT>
__global__ void __launch_bounds__(kThreads) backward_gather(const T* __restrict__ dy,
                                                           const OffT* __restrict__ argmax, T* __restrict__ dx,
                                                           const PoolGeometry g, IndexT total) {
  using acc = acc_t<T>;
  for (IndexT i = global_thread<IndexT>(); i < total; i += grid_threads<IndexT>()) {
    acc sum;
    if (kChannelsLast) {
      const IndexT C = static_cast<IndexT>(g.channels);
      const IndexT c = i % C;
      IndexT t = i / C;
      const int w = static_cast<int>(t % g.in_w);
      t /= g.in_w;
      const int h = static_cast<int>(t % g.in_h);
      const IndexT n = t / g.in_h;
      const IndexT base = n * g.out_h * g.out_w * C + c;
      const int out_w = g.out_w;
      const auto at = [base, out_w, C](int oh, int ow) { return base + (static_cast<IndexT>(oh) * out_w + ow) * C; };
      const auto arg = [argmax, &at](int oh, int ow) { return argmax[at(oh, ow)]; };
      const auto grad = [dy, &at](int oh, int ow) { return to_acc<T>(dy[at(oh, ow)]); };
      sum = gather_grad<acc>(h, w, g, arg, grad);
    } else {
      const int w = static_cast<int>(i % g.in_w);
      const IndexT t = i / g.in_w;
      const int h = static_cast<int>(t % g.in_h);
      const IndexT base = (t / g.in_h) * g.out_h * g.out_w;
      const OffT* ap = argmax + base;
      const T* gp = dy + base;
      const int out_w = g.out_w;
      const auto at = [out_w](int oh, int ow) { return static_cast<IndexT>(oh) * out_w + ow; };
      const auto arg = [ap, &at](int oh, int ow) { return ap[at(oh, ow)]; };
      const auto grad = [gp, &at](int oh, int ow) { return to_acc<T>(gp[at(oh, ow)]); };
      sum = gather_grad<acc>(h, w, g, arg, grad);
    }
    dx[i] = from_acc<T>(sum);
  }
}

// ---------------------------------------------------------------------------
// 3x3 / stride 2 / no padding, the AlexNet window, at compile time: 32-bit
// offsets, no runtime division (FastDiv), every window load unconditional.

// n / d for 0 <= n < 2^31 by a multiply-high and a shift (Granlund and
// Montgomery): the launch's divisors are fixed, so the magic number is
// computed once on the host.
struct FastDiv {
  unsigned d = 1, mul = 1, shift = 0;
  FastDiv() = default;
  explicit FastDiv(int divisor) : d(static_cast<unsigned>(divisor)) {
    while ((1u << shift) < d) ++shift;
    mul = static_cast<unsigned>(((uint64_t{1} << 32) * ((uint64_t{1} << shift) - d)) / d + 1);
  }
  __device__ __forceinline__ int div(int n) const {
    return static_cast<int>((__umulhi(static_cast<unsigned>(n), mul) + static_cast<unsigned>(n)) >> shift);
  }
};

// Elements per thread in channels_last (a 16-byte vector of T; 1 when the
// rows are not vector aligned).
template <typename T, int kVec>
struct alignas(kVec * sizeof(T)) Pack {
  T v[kVec];
};
template <int kVec>
struct alignas(kVec) BytePack {
  uint8_t v[kVec];
};

template <typename T, int kVec>
__device__ __forceinline__ Pack<T, kVec> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, kVec>*>(p);
}

// backward_3x3s2 launches at most this many blocks (about 8 per SM of a
// 132-SM GPU) and strides over the rest, so a thread's setup (magic-number
// divisions, parameter loads) is amortised over many items. The walks down
// the plane amortise it over their column instead.
constexpr int kMax3x3Blocks = 1024;

// Work items of forward_3x3s2 (out_w: items per output row, vecs) and of
// backward_3x3s2 (out_w, out_h: block columns and rows, vecs).
struct Grid3x3 {
  FastDiv out_w, out_h, vecs;  // vecs: channel vectors per pixel (channels_last)
  int total;                   // threads' work items
  int rows_per_segment = 0;    // forward: output rows each blockIdx.y walks
};

// The maximum of a run of window positions and its offset k = 3 dh + dw.
template <typename acc>
struct Best {
  acc v;
  int k;
};

// takes_max folded over one input row of a window (offsets 0, 1, 2).
template <typename acc>
__device__ __forceinline__ Best<acc> row_best(acc a, acc b, acc c) {
  Best<acc> r{a, 0};
  if (takes_max(b, r.v)) r = Best<acc>{b, 1};
  if (takes_max(c, r.v)) r = Best<acc>{c, 2};
  return r;
}

// The scan of `before` and then of window row dh (`row`, offsets 0..2).
// Folding by takes_max may be split into runs like this and give exactly
// the row-by-row scan of window_max: if `row` holds a NaN its best is its
// last NaN, which the scan ends on too and takes_max(NaN, .) picks; else a
// NaN in `before` stays (neither the scan nor takes_max replaces a NaN by a
// number); else the strictly larger value wins, and equal maxima keep the
// earlier one, in both.
template <typename acc>
__device__ __forceinline__ Best<acc> then_row(Best<acc> before, Best<acc> row, int dh) {
  return takes_max(row.v, before.v) ? Best<acc>{row.v, row.k + 3 * dh} : before;
}

// Forward, no window clipped (p = 0 and the last window ends inside). A
// thread walks kCols neighbouring columns of outputs down the output rows
// [oh0, oh1) of segment blockIdx.y: item (plane, ow0) in NCHW, or (n, ow0,
// channel vector v) in channels_last with kVec channels per vector. Input
// row 2 oh + 2 ends window oh and starts window oh + 1, so each step loads
// two new input rows and keeps the best of the shared row in registers;
// neighbouring windows share an input column, so the two rows are
// 2 kCols + 1 columns wide (5 loads per output for kCols = 2, not 9). The
// window's maximum is row_best of each of its rows combined by then_row.
// With kCols = 2 and out_w odd, the row's last item starts one column early
// (ow0 = out_w - 2) and leaves its first output to the item before it.
template <typename T, bool kChannelsLast, int kVec, int kCols, bool kArgmax>
__device__ __forceinline__ void forward_columns(const T* __restrict__ x, T* __restrict__ y,
                                                uint8_t* __restrict__ argmax, const PoolGeometry& g,
                                                const Grid3x3& grid) {
  using acc = acc_t<T>;
  constexpr int kInCols = 2 * kCols + 1;
  const int C = kChannelsLast ? static_cast<int>(g.channels) : 1;  // elements from one pixel to the next
  const int in_row = g.in_w * C, out_row = g.out_w * C;
  const int oh0 = static_cast<int>(blockIdx.y) * grid.rows_per_segment;
  const int oh1 = ax_min(oh0 + grid.rows_per_segment, g.out_h);
  const int items_w = static_cast<int>(grid.out_w.d);  // items per row: out_w / kCols rounded up
  const int stride = static_cast<int>(gridDim.x * blockDim.x);
  for (int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x); i < grid.total; i += stride) {
    int v = 0, t = i;
    if (kChannelsLast) {
      t = grid.vecs.div(i);
      v = i - t * static_cast<int>(grid.vecs.d);
    }
    const int plane = grid.out_w.div(t);  // n in channels_last
    const int item = t - plane * items_w;
    const int ow0 = kCols == 1 ? item : ax_min(kCols * item, g.out_w - kCols);
    const bool store_first = kCols == 1 || ow0 == kCols * item;
    const T* in = x + (plane * g.in_h + 2 * oh0) * in_row + 2 * ow0 * C + v * kVec;
    int out_at = (plane * g.out_h + oh0) * out_row + ow0 * C + v * kVec;
    Best<acc> top[kCols][kVec];  // best of input row 2 oh, the windows' first row
    {
      Pack<T, kVec> r[kInCols];
#pragma unroll
      for (int d = 0; d < kInCols; ++d) r[d] = load_pack<T, kVec>(in + d * C);
#pragma unroll
      for (int u = 0; u < kCols; ++u)
#pragma unroll
        for (int e = 0; e < kVec; ++e)
          top[u][e] = row_best(to_acc(r[2 * u].v[e]), to_acc(r[2 * u + 1].v[e]), to_acc(r[2 * u + 2].v[e]));
    }
#pragma unroll 1  // unrolled copies would only add per-thread code: the loads are already in flight
    for (int oh = oh0; oh < oh1; ++oh, out_at += out_row) {
      const T* mid = in + in_row;
      in = mid + in_row;  // row 2 oh + 2: these windows' last row, the next ones' first
      Pack<T, kVec> r[2][kInCols];  // all loads in flight
#pragma unroll
      for (int d = 0; d < kInCols; ++d) {
        r[0][d] = load_pack<T, kVec>(mid + d * C);
        r[1][d] = load_pack<T, kVec>(in + d * C);
      }
#pragma unroll
      for (int u = 0; u < kCols; ++u) {
        Pack<T, kVec> out;
        BytePack<kVec> off;
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          const Best<acc> row1 = row_best(to_acc(r[0][2 * u].v[e]), to_acc(r[0][2 * u + 1].v[e]),
                                          to_acc(r[0][2 * u + 2].v[e]));
          const Best<acc> row2 = row_best(to_acc(r[1][2 * u].v[e]), to_acc(r[1][2 * u + 1].v[e]),
                                          to_acc(r[1][2 * u + 2].v[e]));
          const Best<acc> w = then_row(then_row(top[u][e], row1, 1), row2, 2);
          out.v[e] = from_acc<T>(w.v);
          off.v[e] = static_cast<uint8_t>(w.k);
          top[u][e] = row2;
        }
        if (u > 0 || store_first) {
          *reinterpret_cast<Pack<T, kVec>*>(y + out_at + u * C) = out;
          if (kArgmax) *reinterpret_cast<BytePack<kVec>*>(argmax + out_at + u * C) = off;
        }
      }
    }
  }
}

template <typename T, bool kChannelsLast, int kVec, int kCols>
__global__ void __launch_bounds__(kThreads) forward_3x3s2(const T* __restrict__ x, T* __restrict__ y,
                                                         uint8_t* __restrict__ argmax, const PoolGeometry g,
                                                         const Grid3x3 grid) {
  if (argmax != nullptr) forward_columns<T, kChannelsLast, kVec, kCols, true>(x, y, argmax, g, grid);
  else forward_columns<T, kChannelsLast, kVec, kCols, false>(x, y, argmax, g, grid);
}

// Backward, NCHW, no padding. Input block (bh, bw) is the inputs
// (2bh + a, 2bw + b), a, b in {0, 1}; the outputs that reach it are
// (bh - 1 .. bh) x (bw - 1 .. bw), routed as in backward_3x3s2 below. A
// thread owns kBackwardCols neighbouring block columns bw0 .. of kPlanes
// consecutive planes and walks them down together, bh = 0 .. blocks_h - 1:
// output row bh - 1 is the previous step's row bh, kept in registers, and
// neighbouring blocks share an output column, so a step loads
// kBackwardCols + 1 dy and argmax values per plane for 4 kBackwardCols
// inputs. An output that does not exist (column bw - 1 < 0 or >= out_w, row
// bh >= out_h) is read at a clamped position with 256 or-ed into its
// argmax, so that it routes nowhere; so does the missing row above bh = 0,
// as argmax 255. No separate loop for the last rows or the row's last
// columns: the checks are a few predicates per step.
constexpr int kBackwardCols = 2;

struct BackwardColumns {
  FastDiv groups;    // groups of kBackwardCols block columns per row
  int total = 0;     // plane runs * groups
  int blocks_h = 0;  // ceil(in_h / 2)
};

template <typename T, int kPlanes>
__global__ void __launch_bounds__(kThreads) backward_3x3s2_columns(const T* __restrict__ dy,
                                                                  const uint8_t* __restrict__ argmax,
                                                                  T* __restrict__ dx, const PoolGeometry g,
                                                                  const BackwardColumns cols) {
  using acc = acc_t<T>;
  constexpr int kOutCols = kBackwardCols + 1;
  const int stride = static_cast<int>(gridDim.x * blockDim.x);
  const int groups = static_cast<int>(cols.groups.d);
  const int out_plane = g.out_h * g.out_w, in_plane = g.in_h * g.in_w;
  for (int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x); i < cols.total; i += stride) {
    const int run = cols.groups.div(i);
    const int plane0 = run * kPlanes, bw0 = (i - run * groups) * kBackwardCols;
    int at[kOutCols], col_bias[kOutCols];  // output column bw0 - 1 + c, row bh, of plane0
#pragma unroll
    for (int c = 0; c < kOutCols; ++c) {
      const int col = bw0 - 1 + c;
      col_bias[c] = col >= 0 && col < g.out_w ? 0 : 256;
      at[c] = plane0 * out_plane + ax_min(ax_max(col, 0), g.out_w - 1);
    }
    bool in_col[2 * kBackwardCols];  // input column 2 bw0 + j exists
#pragma unroll
    for (int j = 0; j < 2 * kBackwardCols; ++j) in_col[j] = 2 * bw0 + j < g.in_w;
    int out_at = plane0 * in_plane + 2 * bw0;
    // Output row bh - 1 (gu, ku) and row bh (gl, kl) of each plane. A
    // gradient is held as g + 0, which is g but for -0 -> +0, so that a sum
    // may start with its first routed term instead of 0 + term and still
    // round the same.
    acc gu[kPlanes][kOutCols], gl[kPlanes][kOutCols];
    int ku[kPlanes][kOutCols], kl[kPlanes][kOutCols];
#pragma unroll
    for (int q = 0; q < kPlanes; ++q)
#pragma unroll
      for (int c = 0; c < kOutCols; ++c) {
        gu[q][c] = acc(0);
        ku[q][c] = 255;
      }
#pragma unroll 1
    for (int bh = 0; bh < cols.blocks_h; ++bh, out_at += 2 * g.in_w) {
      const int row_bias = bh < g.out_h ? 0 : 256;
#pragma unroll
      for (int q = 0; q < kPlanes; ++q)
#pragma unroll
        for (int c = 0; c < kOutCols; ++c) {
          gl[q][c] = to_acc(dy[at[c] + q * out_plane]) + acc(0);
          kl[q][c] = argmax[at[c] + q * out_plane] | col_bias[c] | row_bias;
        }
      const int next_row = bh + 1 < g.out_h ? g.out_w : 0;  // stays on the last row
#pragma unroll
      for (int c = 0; c < kOutCols; ++c) at[c] += next_row;
      const bool second_row = 2 * bh + 1 < g.in_h;
#pragma unroll
      for (int q = 0; q < kPlanes; ++q) {
        T* row = dx + out_at + q * in_plane;
        const acc* gu_q = gu[q];
        const acc* gl_q = gl[q];
        const int* ku_q = ku[q];
        const int* kl_q = kl[q];
#pragma unroll
        for (int j = 0; j < kBackwardCols; ++j) {
          // Left outputs column j, right j + 1; each input's terms in
          // PyTorch's order, (oh, ow) ascending.
          acc s00 = ku_q[j] == 8 ? gu_q[j] : acc(0);
          if (ku_q[j + 1] == 6) s00 += gu_q[j + 1];
          if (kl_q[j] == 2) s00 += gl_q[j];
          if (kl_q[j + 1] == 0) s00 += gl_q[j + 1];
          acc s01 = ku_q[j + 1] == 7 ? gu_q[j + 1] : acc(0);
          if (kl_q[j + 1] == 1) s01 += gl_q[j + 1];
          acc s10 = kl_q[j] == 5 ? gl_q[j] : acc(0);
          if (kl_q[j + 1] == 3) s10 += gl_q[j + 1];
          const acc s11 = kl_q[j + 1] == 4 ? gl_q[j + 1] : acc(0);
          if (in_col[2 * j]) row[2 * j] = from_acc<T>(s00);
          if (in_col[2 * j + 1]) row[2 * j + 1] = from_acc<T>(s01);
          if (second_row && in_col[2 * j]) row[g.in_w + 2 * j] = from_acc<T>(s10);
          if (second_row && in_col[2 * j + 1]) row[g.in_w + 2 * j + 1] = from_acc<T>(s11);
        }
      }
#pragma unroll
      for (int q = 0; q < kPlanes; ++q)
#pragma unroll
        for (int c = 0; c < kOutCols; ++c) {
          gu[q][c] = gl[q][c];
          ku[q][c] = kl[q][c];
        }
    }
  }
}

// Backward gather, no padding: item (bh, bw) owns inputs (2bh + a, 2bw + b),
// a, b in {0, 1}, and reads the four outputs whose windows reach them,
// (bh - 1 .. bh) x (bw - 1 .. bw), in PyTorch's order. Output (oh, ow)'s
// argmax k = 3 dh + dw points at input (2 oh + dh, 2 ow + dw), so:
//   (bh-1, bw-1): k == 8 -> (0, 0)        (bh-1, bw): k == 6, 7 -> (0, 0), (0, 1)
//   (bh, bw-1):   k == 2, 5 -> (0, 0), (1, 0)   (bh, bw): k == 0, 1, 3, 4 -> (a, b)
// Every dx element is written once; no division per element.
template <typename T, bool kChannelsLast, int kVec>
__global__ void __launch_bounds__(kThreads) backward_3x3s2(const T* __restrict__ dy,
                                                          const uint8_t* __restrict__ argmax, T* __restrict__ dx,
                                                          const PoolGeometry g, const Grid3x3 grid) {
  using acc = acc_t<T>;
  const int stride = static_cast<int>(gridDim.x * blockDim.x);
  const int C = kChannelsLast ? static_cast<int>(g.channels) : 1;
  // grid.out_w / out_h divide by the block counts here: ceil(in / 2).
  const int blocks_w = static_cast<int>(grid.out_w.d), blocks_h = static_cast<int>(grid.out_h.d);
  for (int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x); i < grid.total; i += stride) {
    int v = 0, t = i;
    if (kChannelsLast) {
      t = grid.vecs.div(i);
      v = i - t * static_cast<int>(grid.vecs.d);
    }
    const int q = grid.out_w.div(t), bw = t - q * blocks_w;
    const int plane = grid.out_h.div(q), bh = q - plane * blocks_h;
    const int out_base = plane * g.out_h * g.out_w * C + v * kVec;  // (oh, ow) at + (oh * out_w + ow) * C
    const int in_base = plane * g.in_h * g.in_w * C + v * kVec;
    acc sum[4][kVec];
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
      for (int e = 0; e < kVec; ++e) sum[a][e] = acc(0);
    // The four outputs in PyTorch's order. One that does not exist reads the
    // plane's first output (always there) and gets argmax 255, which routes
    // nowhere: no branches, all eight loads in flight.
    const int center = out_base + (bh * g.out_w + bw) * C;
    Pack<T, kVec> gp[4];
    BytePack<kVec> ap[4];
    bool exists[4];
#pragma unroll
    for (int o = 0; o < 4; ++o) {
      const int oh = bh - 1 + o / 2, ow = bw - 1 + o % 2;
      exists[o] = oh >= 0 && ow >= 0 && oh < g.out_h && ow < g.out_w;
      const int at = exists[o] ? center - (o < 2 ? g.out_w * C : 0) - (o % 2 == 0 ? C : 0) : out_base;
      gp[o] = load_pack<T, kVec>(dy + at);
      ap[o] = *reinterpret_cast<const BytePack<kVec>*>(argmax + at);
    }
#pragma unroll
    for (int o = 0; o < 4; ++o) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const int k = exists[o] ? ap[o].v[e] : 255;
        const acc gv = to_acc(gp[o].v[e]);
        if (o == 0) {
          if (k == 8) sum[0][e] += gv;
        } else if (o == 1) {
          if (k == 6) sum[0][e] += gv;
          if (k == 7) sum[1][e] += gv;
        } else if (o == 2) {
          if (k == 2) sum[0][e] += gv;
          if (k == 5) sum[2][e] += gv;
        } else {
          if (k == 0) sum[0][e] += gv;
          if (k == 1) sum[1][e] += gv;
          if (k == 3) sum[2][e] += gv;
          if (k == 4) sum[3][e] += gv;
        }
      }
    }
    Pack<T, kVec> out[4];
#pragma unroll
    for (int slot = 0; slot < 4; ++slot)
#pragma unroll
      for (int e = 0; e < kVec; ++e) out[slot].v[e] = from_acc<T>(sum[slot][e]);
    const int in_at = in_base + (2 * bh * g.in_w + 2 * bw) * C;
#pragma unroll
    for (int slot = 0; slot < 4; ++slot) {
      const int h = 2 * bh + slot / 2, w = 2 * bw + slot % 2;
      if (h < g.in_h && w < g.in_w)
        *reinterpret_cast<Pack<T, kVec>*>(dx + in_at + ((slot / 2) * g.in_w + slot % 2) * C) = out[slot];
    }
  }
}

// 3x3 / stride 2 with no padding; forward also needs no window clipped.
bool is_3x3s2_unpadded(const PoolGeometry& g) { return is_alexnet_window(g) && g.ph == 0 && g.pw == 0; }
bool no_window_clipped(const PoolGeometry& g) {
  return 2 * (g.out_h - 1) + 3 <= g.in_h && 2 * (g.out_w - 1) + 3 <= g.in_w;
}

// Channels per thread in channels_last: a 16-byte vector when C allows it.
template <typename T>
int vec_for(const PoolGeometry& g, const void* a, const void* b) {
  constexpr int kVec = 16 / sizeof(T);
  const bool aligned = reinterpret_cast<uintptr_t>(a) % 16 == 0 && reinterpret_cast<uintptr_t>(b) % 16 == 0;
  return (g.channels_last && aligned && g.channels % kVec == 0) ? kVec : 1;
}

// Output-row segments of the forward column walk: whole columns when there
// are columns enough to keep a GPU's loads in flight (a thread has six
// loads, of up to 16 bytes, in flight per step), else shorter ones, each
// re-reading the input row above it.
int column_segments(int columns, int out_h) {
  constexpr int64_t kWantThreads = int64_t{1} << 15;
  int segments = 1;
  while (segments < out_h && int64_t{columns} * segments < kWantThreads) ++segments;
  return segments;
}

// 32-bit index arithmetic (much cheaper on the GPU) when every linear offset
// into the input and the output fits, with room for the grid-stride step.
bool fits_int32(const PoolGeometry& g) {
  const int64_t limit = (int64_t{1} << 31) - int64_t{kThreads} * 65535 * 8;
  return g.planes * g.in_h * g.in_w < limit && g.planes * g.out_h * g.out_w < limit;
}

template <typename T, typename OffT, bool kChannelsLast, bool kAlexNet>
void launch_per_output(const T* x, T* y, OffT* argmax, const PoolGeometry& g, int64_t total, cudaStream_t s) {
  const unsigned blocks = grid_for(total, kThreads);
  if (fits_int32(g)) {
    forward_per_output<T, OffT, kChannelsLast, kAlexNet, int><<<blocks, kThreads, 0, s>>>(
        x, y, argmax, g, static_cast<int>(total));
  } else {
    forward_per_output<T, OffT, kChannelsLast, kAlexNet, int64_t><<<blocks, kThreads, 0, s>>>(x, y, argmax, g, total);
  }
}

template <typename T, typename OffT>
void launch_forward(const T* x, T* y, OffT* argmax, const PoolGeometry& g, cudaStream_t s) {
  const int64_t out_plane = int64_t{g.out_h} * g.out_w;
  const int64_t total = g.planes * out_plane;
  // A 3x3 window always has uint8 offsets: the fast paths exist only for those.
  if constexpr (sizeof(OffT) == 1 && !std::is_same<T, double>::value) {
    if (is_3x3s2_unpadded(g) && no_window_clipped(g) && fits_int32(g)) {
      // NCHW: two output columns per thread (out_w >= 2), sharing an input
      // column; channels_last: one column of kVec-channel vectors.
      Grid3x3 grid;
      const int cols = !g.channels_last && g.out_w >= 2 ? 2 : 1;
      const int items_w = (g.out_w + cols - 1) / cols;
      grid.out_w = FastDiv(items_w);
      const int vec = vec_for<T>(g, x, y);
      grid.vecs = FastDiv(static_cast<int>(g.channels_last ? g.channels / vec : 1));
      grid.total = static_cast<int>(total / vec / g.out_h / g.out_w * items_w);
      const int segments = column_segments(grid.total, g.out_h);
      grid.rows_per_segment = (g.out_h + segments - 1) / segments;
      const dim3 blocks(grid_for(grid.total, kThreads), (g.out_h + grid.rows_per_segment - 1) / grid.rows_per_segment);
      if (!g.channels_last) {
        if (cols == 2) forward_3x3s2<T, false, 1, 2><<<blocks, kThreads, 0, s>>>(x, y, argmax, g, grid);
        else forward_3x3s2<T, false, 1, 1><<<blocks, kThreads, 0, s>>>(x, y, argmax, g, grid);
      } else if (vec == 1) {
        forward_3x3s2<T, true, 1, 1><<<blocks, kThreads, 0, s>>>(x, y, argmax, g, grid);
      } else {
        forward_3x3s2<T, true, 16 / sizeof(T), 1><<<blocks, kThreads, 0, s>>>(x, y, argmax, g, grid);
      }
      return;
    }
  }
  if constexpr (sizeof(OffT) == 1) {
    if (is_alexnet_window(g)) {
      const int64_t plane_bytes = int64_t{g.in_h} * g.in_w * static_cast<int64_t>(sizeof(T));
      if (g.channels_last) {
        launch_per_output<T, OffT, true, true>(x, y, argmax, g, total, s);
        return;
      }
      if (plane_bytes <= kStageBytes) {
        int64_t per_block = (kOutputsPerBlock + out_plane - 1) / out_plane;
        per_block = ax_min(per_block, kStageBytes / plane_bytes);
        per_block = ax_max<int64_t>(1, ax_min(per_block, g.planes));
        const int64_t blocks = (g.planes + per_block - 1) / per_block;
        forward_staged_planes<T, OffT><<<static_cast<unsigned>(blocks), kThreads, per_block * plane_bytes, s>>>(
            x, y, argmax, g, static_cast<int>(per_block));
        return;
      }
    }
  }
  if (g.channels_last) launch_per_output<T, OffT, true, false>(x, y, argmax, g, total, s);
  else launch_per_output<T, OffT, false, false>(x, y, argmax, g, total, s);
}

template <typename T, typename OffT>
void launch_backward(const T* dy, const OffT* argmax, T* dx, const PoolGeometry& g, cudaStream_t s) {
  const int64_t total = g.planes * g.in_h * g.in_w;
  if constexpr (sizeof(OffT) == 1 && !std::is_same<T, double>::value) {
    if (is_3x3s2_unpadded(g) && fits_int32(g)) {
      const int blocks_w = (g.in_w + 1) / 2, blocks_h = (g.in_h + 1) / 2;
      if (!g.channels_last) {
        // Two planes per thread when the plane count is even: twice the
        // work per thread for the same setup (AlexNet's small planes).
        BackwardColumns cols;
        const int groups = (blocks_w + kBackwardCols - 1) / kBackwardCols;
        const int planes_per_thread = g.planes % 2 == 0 ? 2 : 1;
        cols.groups = FastDiv(groups);
        cols.total = static_cast<int>(g.planes / planes_per_thread) * groups;
        cols.blocks_h = blocks_h;
        const unsigned blocks = grid_for(cols.total, kThreads);
        if (planes_per_thread == 2)
          backward_3x3s2_columns<T, 2><<<blocks, kThreads, 0, s>>>(dy, argmax, dx, g, cols);
        else
          backward_3x3s2_columns<T, 1><<<blocks, kThreads, 0, s>>>(dy, argmax, dx, g, cols);
        return;
      }
      Grid3x3 grid;
      grid.out_w = FastDiv(blocks_w);
      grid.out_h = FastDiv(blocks_h);
      const int vec = vec_for<T>(g, dy, dx);
      const int64_t per_plane_pixel = g.channels / vec;
      grid.vecs = FastDiv(static_cast<int>(per_plane_pixel));
      grid.total = static_cast<int>(g.planes / g.channels * blocks_h * blocks_w * per_plane_pixel);
      const unsigned blocks = grid_for(grid.total, kThreads, kMax3x3Blocks);
      if (vec == 1) backward_3x3s2<T, true, 1><<<blocks, kThreads, 0, s>>>(dy, argmax, dx, g, grid);
      else backward_3x3s2<T, true, 16 / sizeof(T)><<<blocks, kThreads, 0, s>>>(dy, argmax, dx, g, grid);
      return;
    }
  }
  const unsigned blocks = grid_for(total, kThreads);
  if (fits_int32(g)) {
    if (g.channels_last)
      backward_gather<T, OffT, true, int><<<blocks, kThreads, 0, s>>>(dy, argmax, dx, g, static_cast<int>(total));
    else
      backward_gather<T, OffT, false, int><<<blocks, kThreads, 0, s>>>(dy, argmax, dx, g, static_cast<int>(total));
  } else {
    if (g.channels_last) backward_gather<T, OffT, true, int64_t><<<blocks, kThreads, 0, s>>>(dy, argmax, dx, g, total);
    else backward_gather<T, OffT, false, int64_t><<<blocks, kThreads, 0, s>>>(dy, argmax, dx, g, total);
  }
}

}  // namespace

LaunchStatus max_pool2d_forward_cuda(DType dtype, bool wide_offsets, const void* x, void* y, void* argmax,
                                     const PoolGeometry& g, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  return dispatch_cuda_dtype(dtype, [&](auto tag) -> LaunchStatus {
    using T = decltype(tag);
    if (wide_offsets) {
      launch_forward<T, int32_t>(static_cast<const T*>(x), static_cast<T*>(y), static_cast<int32_t*>(argmax), g, s);
    } else {
      launch_forward<T, uint8_t>(static_cast<const T*>(x), static_cast<T*>(y), static_cast<uint8_t*>(argmax), g, s);
    }
    return cudaGetLastError();
  });
}

LaunchStatus max_pool2d_backward_cuda(DType dtype, bool wide_offsets, const void* dy, const void* argmax, void* dx,
                                      const PoolGeometry& g, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  return dispatch_cuda_dtype(dtype, [&](auto tag) -> LaunchStatus {
    using T = decltype(tag);
    if (wide_offsets) {
      launch_backward<T, int32_t>(static_cast<const T*>(dy), static_cast<const int32_t*>(argmax), static_cast<T*>(dx),
                                  g, s);
    } else {
      launch_backward<T, uint8_t>(static_cast<const T*>(dy), static_cast<const uint8_t*>(argmax), static_cast<T*>(dx),
                                  g, s);
    }
    return cudaGetLastError();
  });
}

}  // namespace pool
}  // namespace alexnet_ext
