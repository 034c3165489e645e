// LRN operators: schemas, argument checks, layout handling and the CPU/CUDA
// registrations. Kernels live in lrn_cpu.cpp and lrn_cuda.cu.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cmath>

#include "common/op_utils.h"
#include "lrn/lrn_args.h"
#include "lrn/lrn_cpu.h"
#include "lrn/lrn_cuda.h"

namespace alexnet_ext {
namespace lrn {

void check_hyper_parameters(int64_t size, double k) {
  TORCH_CHECK(size >= 1, "alexnet_ext.local_response_norm: `size` must be >= 1, got ", size);
  TORCH_CHECK(size <= (int64_t{1} << 30), "alexnet_ext.local_response_norm: `size` is too large: ", size);
  TORCH_CHECK(std::isfinite(k) && k >= 0.0,
              "alexnet_ext.local_response_norm: `k` must be finite and >= 0, got ", k);
}

void check_input(const at::Tensor& input, const char* name) {
  check_float_tensor(input, name);
  TORCH_CHECK(input.dim() >= 3, "alexnet_ext.local_response_norm: `", name,
              "` must have 3 or more dimensions (N, C, *), got shape ", input.sizes());
}

LrnParams make_params(const at::Tensor& x, at::MemoryFormat fmt, int64_t size, double alpha, double beta,
                      double k) {
  LrnParams p;
  p.outer = x.size(0);
  p.channels = x.size(1);
  p.inner = x.numel() / std::max<int64_t>(1, p.outer * p.channels);
  p.channels_last = fmt != at::MemoryFormat::Contiguous;
  p.size = static_cast<int>(size);
  p.alpha = alpha;
  p.beta = beta;
  p.k = k;
  return p;
}

namespace {

// Sum over the channel window [c - before, c + after] of a (N, C, P) tensor.
at::Tensor channel_window_sum(const at::Tensor& t, int before, int after) {
  return at::constant_pad_nd(t, {0, 0, before, after}).unfold(1, before + after + 1, 1).sum(-1);
}

// Composite of ATen ops for windows wider than the CUDA kernels take. It
// computes the same formulas as lrn_math.h in the accumulation dtype.
at::Tensor forward_composite(const at::Tensor& x, const LrnParams& p) {
  const auto acc = at::toOpMathType(x.scalar_type());
  const at::Tensor xa = x.reshape({p.outer, p.channels, p.inner}).to(acc);
  const at::Tensor s = channel_window_sum(xa * xa, window_before(p.size), window_after(p.size))
                           .mul(p.alpha / p.size).add(p.k);
  return (xa * s.pow(-p.beta)).to(x.scalar_type()).reshape(x.sizes());
}

at::Tensor backward_composite(const at::Tensor& dy, const at::Tensor& x, const LrnParams& p) {
  const auto acc = at::toOpMathType(x.scalar_type());
  const at::Tensor xa = x.reshape({p.outer, p.channels, p.inner}).to(acc);
  const at::Tensor dya = dy.reshape({p.outer, p.channels, p.inner}).to(acc);
  const at::Tensor s = channel_window_sum(xa * xa, window_before(p.size), window_after(p.size))
                           .mul(p.alpha / p.size).add(p.k);
  const at::Tensor ip = s.pow(-p.beta);
  const at::Tensor t_sum = channel_window_sum(dya * xa * ip / s, window_after(p.size), window_before(p.size));
  const at::Tensor dx = dya * ip - (2.0 * p.alpha * p.beta / p.size) * xa * t_sum;
  return dx.to(x.scalar_type()).reshape(x.sizes());
}

at::Tensor lrn_forward(const at::Tensor& input, int64_t size, double alpha, double beta, double k) {
  check_input(input, "input");
  check_hyper_parameters(size, k);
  const at::MemoryFormat fmt = suggested_format(input);
  at::Tensor y = new_output(input.sizes(), input.options(), fmt);
  if (input.numel() == 0) return y;
  const at::Tensor x = input.contiguous(fmt);
  const LrnParams p = make_params(x, fmt, size, alpha, beta, k);
  if (x.is_cuda()) {
#ifdef ALEXNET_EXT_WITH_CUDA
    if (size > kMaxCudaWindow) {
      y.copy_(forward_composite(x, p));
      return y;
    }
    c10::DeviceGuard guard(x.device());
    void* stream = current_stream(x);
    check_launch(lrn_forward_cuda(dtype_tag(x.scalar_type()), x.const_data_ptr(), y.mutable_data_ptr(), p, stream),
                 "alexnet_ext.local_response_norm", "lrn_forward_cuda", stream);
#endif
    return y;
  }
  lrn_forward_cpu(x, y, p);
  return y;
}

at::Tensor lrn_backward(const at::Tensor& grad_output, const at::Tensor& input, int64_t size, double alpha,
                        double beta, double k) {
  check_input(input, "input");
  check_float_tensor(grad_output, "grad_output");
  check_same_device_dtype(grad_output, "grad_output", input, "input");
  TORCH_CHECK(grad_output.sizes() == input.sizes(), "alexnet_ext.local_response_norm backward: `grad_output` has shape ",
              grad_output.sizes(), " but `input` has shape ", input.sizes());
  check_hyper_parameters(size, k);
  const at::MemoryFormat fmt = suggested_format(input);
  at::Tensor dx = new_output(input.sizes(), input.options(), fmt);
  if (input.numel() == 0) return dx;
  const at::Tensor x = input.contiguous(fmt);
  const at::Tensor dy = grad_output.contiguous(fmt);
  const LrnParams p = make_params(x, fmt, size, alpha, beta, k);
  if (x.is_cuda()) {
#ifdef ALEXNET_EXT_WITH_CUDA
    if (size > kMaxCudaWindow) {
      dx.copy_(backward_composite(dy, x, p));
      return dx;
    }
    c10::DeviceGuard guard(x.device());
    void* stream = current_stream(x);
    check_launch(lrn_backward_cuda(dtype_tag(x.scalar_type()), dy.const_data_ptr(), x.const_data_ptr(),
                                   dx.mutable_data_ptr(), p, stream),
                 "alexnet_ext.local_response_norm backward", "lrn_backward_cuda", stream);
#endif
    return dx;
  }
  lrn_backward_cpu(dy, x, dx, p);
  return dx;
}

#ifndef ALEXNET_EXT_WITH_CUDA
at::Tensor lrn_forward_no_cuda(const at::Tensor&, int64_t, double, double, double) {
  throw_no_cuda_kernels("alexnet_ext.local_response_norm");
}
at::Tensor lrn_backward_no_cuda(const at::Tensor&, const at::Tensor&, int64_t, double, double, double) {
  throw_no_cuda_kernels("alexnet_ext.local_response_norm");
}
#endif

}  // namespace
}  // namespace lrn
}  // namespace alexnet_ext

TORCH_LIBRARY_FRAGMENT(alexnet_ext, m) {
  m.def("lrn_forward(Tensor input, int size, float alpha, float beta, float k) -> Tensor");
  m.def("lrn_backward(Tensor grad_output, Tensor input, int size, float alpha, float beta, float k) -> Tensor");
}

TORCH_LIBRARY_IMPL(alexnet_ext, CPU, m) {
  m.impl("lrn_forward", &alexnet_ext::lrn::lrn_forward);
  m.impl("lrn_backward", &alexnet_ext::lrn::lrn_backward);
}

TORCH_LIBRARY_IMPL(alexnet_ext, CUDA, m) {
#ifdef ALEXNET_EXT_WITH_CUDA
  m.impl("lrn_forward", &alexnet_ext::lrn::lrn_forward);
  m.impl("lrn_backward", &alexnet_ext::lrn::lrn_backward);
#else
  m.impl("lrn_forward", &alexnet_ext::lrn::lrn_forward_no_cuda);
  m.impl("lrn_backward", &alexnet_ext::lrn::lrn_backward_no_cuda);
#endif
}
