// Max-pool operators: schemas, argument checks, layout handling and the
// CPU/CUDA registrations. Kernels live in pool_cpu.cpp and pool_cuda.cu.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>

#include "common/op_utils.h"
#include "maxpool/pool_args.h"
#include "maxpool/pool_cpu.h"
#include "maxpool/pool_cuda.h"
#include "maxpool/pool_math.h"

namespace alexnet_ext {
namespace pool {

constexpr const char* kOp = "alexnet_ext.max_pool2d";

// The argmax dtype for a window: one byte while offsets fit, else int32.
at::ScalarType offset_dtype(int64_t kh, int64_t kw) {
  return kh * kw <= kMaxUint8Window ? at::kByte : at::kInt;
}

static void check_pair(at::IntArrayRef v, const char* name) {
  TORCH_CHECK(v.size() == 2, kOp, ": `", name, "` must have 2 elements (height, width), got ", v);
}

// Checks the window against a (N, C, H, W) input size and returns the
// geometry with the output size filled in. Messages follow PyTorch's;
// `size_name` is the argument the size came from (`input` or, for the
// backward operator, `input_size`).
PoolGeometry make_geometry(at::IntArrayRef input_size, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                           at::IntArrayRef padding, bool ceil_mode, bool channels_last, const char* size_name) {
  check_pair(kernel_size, "kernel_size");
  check_pair(stride, "stride");
  check_pair(padding, "padding");
  TORCH_CHECK(input_size.size() == 4, kOp, ": `", size_name, "` must be 4-dimensional (N, C, H, W), got size ",
              input_size);
  for (const int64_t d : input_size) {
    TORCH_CHECK(d >= 0, kOp, ": `", size_name, "` sizes must be non-negative, got ", input_size);
  }
  // An empty plane has no element to take the maximum of, yet padding or
  // ceil_mode can still give it output windows (PyTorch rejects it too).
  // Only the batch and channel dimensions may be empty.
  TORCH_CHECK(input_size[2] > 0 && input_size[3] > 0, kOp, ": `", size_name,
              "` must have a non-zero height and width (only the batch and channel dimensions may be 0), got size ",
              input_size);
  const int64_t int_max = std::numeric_limits<int>::max();
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK(kernel_size[i] > 0 && kernel_size[i] <= int_max, kOp, ": `kernel_size` must be positive, got ",
                kernel_size);
    TORCH_CHECK(stride[i] > 0 && stride[i] <= int_max, kOp, ": `stride` must be positive, got ", stride);
    TORCH_CHECK(padding[i] >= 0, kOp, ": `padding` must be non-negative, got ", padding);
    TORCH_CHECK(padding[i] <= kernel_size[i] / 2, kOp, ": `padding` should be at most half of the kernel size, "
                "but got padding=", padding, " and kernel_size=", kernel_size);
    TORCH_CHECK(input_size[i + 2] <= int_max, kOp, ": `", size_name, "` spatial size too large: ", input_size);
  }
  TORCH_CHECK(kernel_size[0] * kernel_size[1] <= int_max, kOp, ": `kernel_size` window too large: ", kernel_size);
  const int64_t oh = pooled_size(input_size[2], kernel_size[0], stride[0], padding[0], ceil_mode);
  const int64_t ow = pooled_size(input_size[3], kernel_size[1], stride[1], padding[1], ceil_mode);
  TORCH_CHECK(oh >= 1 && ow >= 1, kOp, ": given `", size_name, "` ", input_size, ", the calculated output size (", oh,
              ", ", ow, ") is too small; `kernel_size`=", kernel_size, ", `stride`=", stride, ", `padding`=",
              padding);
  PoolGeometry g;
  g.planes = input_size[0] * input_size[1];
  g.channels = input_size[1];
  g.in_h = static_cast<int>(input_size[2]);
  g.in_w = static_cast<int>(input_size[3]);
  g.out_h = static_cast<int>(oh);
  g.out_w = static_cast<int>(ow);
  g.kh = static_cast<int>(kernel_size[0]);
  g.kw = static_cast<int>(kernel_size[1]);
  g.sh = static_cast<int>(stride[0]);
  g.sw = static_cast<int>(stride[1]);
  g.ph = static_cast<int>(padding[0]);
  g.pw = static_cast<int>(padding[1]);
  g.channels_last = channels_last;
  return g;
}

// argmax is allocated with at::empty: the NaN poison of new_output() does
// not exist for integers, so tests poison it with an offset no window of
// this size can produce (255 for uint8 unless the window has 256 elements).
at::Tensor new_argmax(at::IntArrayRef sizes, const at::Tensor& like, at::ScalarType type, at::MemoryFormat fmt) {
  at::Tensor a = at::empty(sizes, like.options().dtype(type).memory_format(fmt));
  if (poison_outputs() && a.numel() > 0) a.fill_(type == at::kByte ? 255 : -1);
  return a;
}

// The backward operator trusts nothing it is given: the CPU scatter path
// (AlexNet's 3x3/2 window) adds dy at the input position an offset names, so
// an offset outside the window, or on the padding of a border window, would
// write out of bounds (the gather paths would silently drop that gradient).
// One reduction over the argmax tensor bounds every offset by the window
// size; only border windows (overlapping the padding or the ceil_mode
// overhang: a few rows and columns) then need their offsets checked against
// the image. Cheap next to the backward pass itself. The CUDA kernels only
// compare offsets (a gather, never an index), so a bad offset cannot make
// them touch memory out of bounds, and checking there would cost a
// device-to-host synchronisation per backward: not done.
void check_argmax_offsets(const at::Tensor& argmax, const PoolGeometry& g) {
  if (!argmax.device().is_cpu() || argmax.numel() == 0) return;
  const int64_t window = int64_t{g.kh} * g.kw;
  int64_t lo = 0, hi = 0;
  if (argmax.scalar_type() == at::kByte) {
    hi = argmax.max().item<int64_t>();
  } else {
    const auto [mn, mx] = at::aminmax(argmax);
    lo = mn.item<int64_t>();
    hi = mx.item<int64_t>();
  }
  TORCH_CHECK(lo >= 0 && hi < window, kOp, " backward: `argmax` holds offsets in [", lo, ", ", hi,
              "] but a window of kernel_size (", g.kh, ", ", g.kw, ") has offsets 0..", window - 1,
              " (pass the argmax the forward returned)");
  // Along one axis (dim 2: rows, offset / kw; dim 3: columns, offset % kw),
  // the window positions inside the image are [max(0, -start), min(k, in - start)).
  const auto check_axis = [&](int64_t dim, int out, int k, int s, int p, int in) {
    for (int o = 0; o < out; ++o) {
      const int start = window_start(o, s, p);
      const int first = std::max(0, -start);
      const int64_t end = std::min<int64_t>(k, int64_t{in} - start);
      if (first == 0 && end == k) continue;  // the window lies inside the image along this axis
      const at::Tensor off = argmax.select(dim, o).to(at::kInt);
      const at::Tensor d = dim == 2 ? at::div(off, g.kw, "trunc") : at::remainder(off, g.kw);
      TORCH_CHECK(!at::logical_or(d < first, d >= end).any().item<bool>(), kOp, " backward: `argmax` of the ",
                  dim == 2 ? "output row " : "output column ", o, " points at padding, which never holds the maximum",
                  " (pass the argmax the forward returned)");
    }
  };
  check_axis(2, g.out_h, g.kh, g.sh, g.ph, g.in_h);
  check_axis(3, g.out_w, g.kw, g.sw, g.pw, g.in_w);
}
namespace {

std::tuple<at::Tensor, at::Tensor> max_pool2d_forward(const at::Tensor& input, at::IntArrayRef kernel_size,
                                                      at::IntArrayRef stride, at::IntArrayRef padding,
                                                      bool ceil_mode, bool save_argmax) {
  check_float_tensor(input, "input");
  TORCH_CHECK(input.dim() == 4, kOp, ": `input` must be 4-dimensional (N, C, H, W), got shape ", input.sizes());
  const at::MemoryFormat fmt = suggested_format(input);
  const PoolGeometry g = make_geometry(input.sizes(), kernel_size, stride, padding, ceil_mode,
                                       fmt != at::MemoryFormat::Contiguous, "input");
  const std::vector<int64_t> out_size{input.size(0), input.size(1), g.out_h, g.out_w};
  at::Tensor y = new_output(out_size, input.options(), fmt);
  const at::ScalarType off_type = offset_dtype(g.kh, g.kw);
  at::Tensor argmax = save_argmax ? new_argmax(out_size, input, off_type, fmt)
                                  : at::empty({0}, input.options().dtype(off_type));
  if (y.numel() == 0) return {y, argmax};
  const at::Tensor x = input.contiguous(fmt);
  if (x.is_cuda()) {
#ifdef ALEXNET_EXT_WITH_CUDA
    c10::DeviceGuard guard(x.device());
    void* stream = current_stream(x);
    check_launch(max_pool2d_forward_cuda(dtype_tag(x.scalar_type()), off_type == at::kInt, x.const_data_ptr(),
                                         y.mutable_data_ptr(), save_argmax ? argmax.mutable_data_ptr() : nullptr,
                                         g, stream),
                 kOp, "max_pool2d_forward_cuda", stream);
#endif
    return {y, argmax};
  }
  max_pool2d_forward_cpu(x, y, save_argmax ? &argmax : nullptr, g);
  return {y, argmax};
}

at::Tensor max_pool2d_backward(const at::Tensor& grad_output, const at::Tensor& argmax, at::IntArrayRef input_size,
                               at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                               bool ceil_mode) {
  check_float_tensor(grad_output, "grad_output");
  TORCH_CHECK(argmax.device() == grad_output.device(), kOp, " backward: `argmax` is on ", argmax.device(),
              " but `grad_output` is on ", grad_output.device());
  const at::MemoryFormat fmt = suggested_format(argmax);
  const PoolGeometry g = make_geometry(input_size, kernel_size, stride, padding, ceil_mode,
                                       fmt != at::MemoryFormat::Contiguous, "input_size");
  const at::ScalarType off_type = offset_dtype(g.kh, g.kw);
  TORCH_CHECK(argmax.scalar_type() == off_type, kOp, " backward: `argmax` must be ", off_type, " for kernel_size ",
              kernel_size, ", got ", argmax.scalar_type(),
              " (it is the second output of max_pool2d_forward with save_argmax=True)");
  const std::vector<int64_t> out_size{input_size[0], input_size[1], g.out_h, g.out_w};
  TORCH_CHECK(argmax.sizes() == at::IntArrayRef(out_size), kOp, " backward: `argmax` has shape ", argmax.sizes(),
              " but the pooled output of an input of size ", input_size, " has shape ", out_size,
              " (was the forward run with save_argmax=True?)");
  TORCH_CHECK(grad_output.sizes() == argmax.sizes(), kOp, " backward: `grad_output` has shape ",
              grad_output.sizes(), " but `argmax` has shape ", argmax.sizes());
  at::Tensor dx = new_output(input_size, grad_output.options(), fmt);
  if (dx.numel() == 0) return dx;
  check_argmax_offsets(argmax, g);
  const at::Tensor dy = grad_output.contiguous(fmt);
  const at::Tensor arg = argmax.contiguous(fmt);
  if (dy.is_cuda()) {
#ifdef ALEXNET_EXT_WITH_CUDA
    c10::DeviceGuard guard(dy.device());
    void* stream = current_stream(dy);
    check_launch(max_pool2d_backward_cuda(dtype_tag(dy.scalar_type()), off_type == at::kInt, dy.const_data_ptr(),
                                          arg.const_data_ptr(), dx.mutable_data_ptr(), g, stream),
                 "alexnet_ext.max_pool2d backward", "max_pool2d_backward_cuda", stream);
#endif
    return dx;
  }
  max_pool2d_backward_cpu(dy, arg, dx, g);
  return dx;
}

#ifndef ALEXNET_EXT_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> max_pool2d_forward_no_cuda(const at::Tensor&, at::IntArrayRef, at::IntArrayRef,
                                                              at::IntArrayRef, bool, bool) {
  throw_no_cuda_kernels(kOp);
}
at::Tensor max_pool2d_backward_no_cuda(const at::Tensor&, const at::Tensor&, at::IntArrayRef, at::IntArrayRef,
                                       at::IntArrayRef, at::IntArrayRef, bool) {
  throw_no_cuda_kernels(kOp);
}
#endif

}  // namespace
}  // namespace pool
}  // namespace alexnet_ext

TORCH_LIBRARY_FRAGMENT(alexnet_ext, m) {
  // argmax: offsets of each maximum inside its window (uint8, or int32 for
  // windows over 256 elements), shaped like the output; numel 0 when
  // save_argmax is false (no gradient needed).
  m.def("max_pool2d_forward(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, bool ceil_mode, "
        "bool save_argmax) -> (Tensor, Tensor)");
  m.def("max_pool2d_backward(Tensor grad_output, Tensor argmax, SymInt[] input_size, int[2] kernel_size, "
        "int[2] stride, int[2] padding, bool ceil_mode) -> Tensor");
}

TORCH_LIBRARY_IMPL(alexnet_ext, CPU, m) {
  m.impl("max_pool2d_forward", &alexnet_ext::pool::max_pool2d_forward);
  m.impl("max_pool2d_backward", &alexnet_ext::pool::max_pool2d_backward);
}

TORCH_LIBRARY_IMPL(alexnet_ext, CUDA, m) {
#ifdef ALEXNET_EXT_WITH_CUDA
  m.impl("max_pool2d_forward", &alexnet_ext::pool::max_pool2d_forward);
  m.impl("max_pool2d_backward", &alexnet_ext::pool::max_pool2d_backward);
#else
  m.impl("max_pool2d_forward", &alexnet_ext::pool::max_pool2d_forward_no_cuda);
  m.impl("max_pool2d_backward", &alexnet_ext::pool::max_pool2d_backward_no_cuda);
#endif
}
