// CUDA launchers for max-pool. Plain C++: included by pool.cpp and pool_cuda.cu.
#pragma once
#include "common/dtype.h"
#include "maxpool/pool_math.h"

namespace alexnet_ext {
namespace pool {

// y = max_pool2d(x); argmax (may be null: no gradient needed) gets the window
// offsets, as int32 when `wide_offsets`, else uint8. Tensors are contiguous
// in the layout g.channels_last names.
LaunchStatus max_pool2d_forward_cuda(DType dtype, bool wide_offsets, const void* x, void* y, void* argmax,
                                     const PoolGeometry& g, void* stream);

// dx = gather of dy through argmax: one thread per input element, each dx
// element written exactly once (no zero-fill, no atomics).
LaunchStatus max_pool2d_backward_cuda(DType dtype, bool wide_offsets, const void* dy, const void* argmax,
                                      void* dx, const PoolGeometry& g, void* stream);

}  // namespace pool
}  // namespace alexnet_ext
