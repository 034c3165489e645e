#pragma once
#include <ATen/ATen.h>

#include "maxpool/pool_math.h"

namespace alexnet_ext {
namespace pool {

// x, y, argmax (and dy, dx) are contiguous in the layout g.channels_last
// names. argmax is undefined when no gradient is needed; it is uint8, or
// int32 for windows larger than kMaxUint8Window elements.
void max_pool2d_forward_cpu(const at::Tensor& x, at::Tensor& y, at::Tensor* argmax, const PoolGeometry& g);
void max_pool2d_backward_cpu(const at::Tensor& dy, const at::Tensor& argmax, at::Tensor& dx,
                             const PoolGeometry& g);

}  // namespace pool
}  // namespace alexnet_ext
