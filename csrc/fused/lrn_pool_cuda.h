// CUDA launchers for the fused LRN + max-pool. Plain C++: included by
// lrn_pool.cpp and lrn_pool_cuda.cu.
#pragma once
#include "common/dtype.h"
#include "fused/lrn_pool_math.h"

namespace alexnet_ext {
namespace fused {

// y = max_pool2d(lrn(x)); argmax (uint8 window offsets) may be null.
LaunchStatus lrn_max_pool2d_forward_cuda(DType dtype, const void* x, void* y, void* argmax, const LrnPoolParams& p,
                                         void* stream);

// dx from dy (pooled gradient), argmax and x; one thread per dx element.
LaunchStatus lrn_max_pool2d_backward_cuda(DType dtype, const void* dy, const void* argmax, const void* x, void* dx,
                                          const LrnPoolParams& p, void* stream);

}  // namespace fused
}  // namespace alexnet_ext
