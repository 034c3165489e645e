#pragma once
#include <ATen/ATen.h>

#include "lrn/lrn_math.h"

namespace alexnet_ext {
namespace lrn {

// Inputs are contiguous in the layout `p.channels_last` names.
void lrn_forward_cpu(const at::Tensor& x, at::Tensor& y, const LrnParams& p);
void lrn_backward_cpu(const at::Tensor& dy, const at::Tensor& x, at::Tensor& dx, const LrnParams& p);

}  // namespace lrn
}  // namespace alexnet_ext
