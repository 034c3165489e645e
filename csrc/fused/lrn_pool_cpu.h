#pragma once
#include <ATen/ATen.h>

#include "fused/lrn_pool_math.h"

namespace alexnet_ext {
namespace fused {

// x, y, argmax (and dy, dx) are contiguous in the layout p.lrn.channels_last
// names; argmax is uint8 (windows up to 256 elements), null when no
// gradient is needed.
void lrn_max_pool2d_forward_cpu(const at::Tensor& x, at::Tensor& y, at::Tensor* argmax, const LrnPoolParams& p);
void lrn_max_pool2d_backward_cpu(const at::Tensor& dy, const at::Tensor& argmax, const at::Tensor& x, at::Tensor& dx,
                                 const LrnPoolParams& p);

}  // namespace fused
}  // namespace alexnet_ext
