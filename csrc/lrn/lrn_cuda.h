// CUDA launchers for LRN. Plain C++: included by lrn.cpp and lrn_cuda.cu.
#pragma once
#include "common/dtype.h"
#include "lrn/lrn_math.h"

namespace alexnet_ext {
namespace lrn {

// The largest window the CUDA kernels take; lrn.cpp routes larger ones to a
// composite of ATen ops (correct, not fast: AlexNet uses 5).
constexpr int kMaxCudaWindow = 32;

// y = lrn(x); x and y laid out as `p` says (NCP or NPC, contiguous).
LaunchStatus lrn_forward_cuda(DType dtype, const void* x, void* y, const LrnParams& p, void* stream);

// dx = d lrn(x) / dx applied to dy; dy and dx laid out like x.
LaunchStatus lrn_backward_cuda(DType dtype, const void* dy, const void* x, void* dx, const LrnParams& p,
                               void* stream);

}  // namespace lrn
}  // namespace alexnet_ext
