// Argument checks and parameters of the LRN operators, shared with the fused
// LRN + max-pool operator (fused/lrn_pool.cpp) so both reject the same inputs
// with the same messages.
#pragma once
#include <ATen/ATen.h>

#include "lrn/lrn_math.h"

namespace alexnet_ext {
namespace lrn {

void check_hyper_parameters(int64_t size, double k);
void check_input(const at::Tensor& input, const char* name);
// x is contiguous in `fmt`.
LrnParams make_params(const at::Tensor& x, at::MemoryFormat fmt, int64_t size, double alpha, double beta, double k);

}  // namespace lrn
}  // namespace alexnet_ext
