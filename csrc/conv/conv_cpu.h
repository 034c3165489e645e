#pragma once
#include <ATen/ATen.h>

#include "conv/conv_math.h"

namespace alexnet_ext {
namespace conv {

// out = relu(conv + bias[channel]) in one pass. `conv` is in the
// accumulation dtype, `out` in its own dtype; both contiguous in `fmt`
// (NCHW or channels_last); `bias` may be undefined (then no bias).
void bias_relu_cpu(const at::Tensor& conv, const at::Tensor& bias, at::Tensor& out, at::MemoryFormat fmt);

// out = relu_grad(dy, y) elementwise (ReLU's gradient from the saved output).
void relu_grad_cpu(const at::Tensor& dy, const at::Tensor& y, at::Tensor& out);

// One pass of conv_math.h (per group: D = A B) computed by plain loops over
// the header's offsets, on the operand layouts the CUDA kernels see (x NHWC,
// w KRSC, wt, masked dy NPQK, channels padded alike). Forward adds `bias`
// (may be undefined) and applies ReLU; wgrad sums `splits` split-K ranges of
// whole `tile`s in split order, as the CUDA reduction does. `d` is in the
// accumulation dtype. Tests compare the results with torch's convolution.
void gemm_reference_cpu(const ConvGeom& g, Pass pass, const at::Tensor& a, const at::Tensor& b,
                        const at::Tensor& bias, at::Tensor& d, int splits, int tile);

// The strided dgrad's gather (conv_math.h's col2im_sum, as the CUDA
// kernel runs it): dx (N, H, W, C) in the accumulation dtype from `cols`
// (accumulation dtype, Pass::DgradCols layout of geometry g).
void col2im_reference_cpu(const ConvGeom& g, const at::Tensor& cols, at::Tensor& dx);

}  // namespace conv
}  // namespace alexnet_ext
