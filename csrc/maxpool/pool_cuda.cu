// Max-pool CUDA kernels. No PyTorch headers (see common/dtype.h); window
// arithmetic comes from pool_math.h, the functions the CPU tests exercise.
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
