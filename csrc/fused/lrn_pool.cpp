// Fused LRN + max-pool operators: schemas, argument checks, layout handling
// and the CPU/CUDA registrations. Kernels live in lrn_pool_cpu.cpp and
// lrn_pool_cuda.cu. Arguments are checked by the LRN and max-pool
// operators' own functions (lrn/lrn_args.h, maxpool/pool_args.h), so the
// fused op accepts exactly what the unfused pair accepts.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "common/op_utils.h"
#include "fused/lrn_pool_cpu.h"
#include "fused/lrn_pool_cuda.h"
#include "lrn/lrn_args.h"
#include "maxpool/pool_args.h"

namespace alexnet_ext {
namespace fused {
namespace {

constexpr const char* kOp = "alexnet_ext.local_response_norm_max_pool2d";

LrnPoolParams make_params(const at::Tensor& x, at::MemoryFormat fmt, int64_t size, double alpha, double beta,
                          double k, at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                          bool ceil_mode) {
  LrnPoolParams p;
  p.pool = pool::make_geometry(x.sizes(), kernel_size, stride, padding, ceil_mode,
                               fmt != at::MemoryFormat::Contiguous, "input");
  TORCH_CHECK(pool::offset_dtype(p.pool.kh, p.pool.kw) == at::kByte, kOp, ": the fused operator takes windows of "
              "at most ", pool::kMaxUint8Window, " elements (uint8 argmax), got kernel_size ", kernel_size,
              "; alexnet_ext.functional.local_response_norm_max_pool2d runs larger ones as the two operators");
  p.lrn = lrn::make_params(x, fmt, size, alpha, beta, k);
  return p;
}

void check_input(const at::Tensor& input) {
  lrn::check_input(input, "input");
  TORCH_CHECK(input.dim() == 4, kOp, ": `input` must be 4-dimensional (N, C, H, W), got shape ", input.sizes());
}

std::vector<int64_t> pooled_sizes(const at::Tensor& input, const LrnPoolParams& p) {
  return {input.size(0), input.size(1), p.pool.out_h, p.pool.out_w};
}

std::tuple<at::Tensor, at::Tensor> lrn_max_pool2d_forward(const at::Tensor& input, int64_t size, double alpha,
                                                          double beta, double k, at::IntArrayRef kernel_size,
                                                          at::IntArrayRef stride, at::IntArrayRef padding,
                                                          bool ceil_mode, bool save_argmax) {
  check_input(input);
  lrn::check_hyper_parameters(size, k);
  const at::MemoryFormat fmt = suggested_format(input);
  const LrnPoolParams p = make_params(input, fmt, size, alpha, beta, k, kernel_size, stride, padding, ceil_mode);
  const std::vector<int64_t> out_size = pooled_sizes(input, p);
  at::Tensor y = new_output(out_size, input.options(), fmt);
  at::Tensor argmax = save_argmax ? pool::new_argmax(out_size, input, at::kByte, fmt)
                                  : at::empty({0}, input.options().dtype(at::kByte));
  if (y.numel() == 0) return {y, argmax};
  const at::Tensor x = input.contiguous(fmt);
  if (x.is_cuda()) {
#ifdef ALEXNET_EXT_WITH_CUDA
    c10::DeviceGuard guard(x.device());
    void* stream = current_stream(x);
    check_launch(lrn_max_pool2d_forward_cuda(dtype_tag(x.scalar_type()), x.const_data_ptr(), y.mutable_data_ptr(),
                                             save_argmax ? argmax.mutable_data_ptr() : nullptr, p, stream),
                 kOp, "lrn_max_pool2d_forward_cuda", stream);
#endif
    return {y, argmax};
  }
  lrn_max_pool2d_forward_cpu(x, y, save_argmax ? &argmax : nullptr, p);
  return {y, argmax};
}

at::Tensor lrn_max_pool2d_backward(const at::Tensor& grad_output, const at::Tensor& argmax, const at::Tensor& input,
                                   int64_t size, double alpha, double beta, double k, at::IntArrayRef kernel_size,
                                   at::IntArrayRef stride, at::IntArrayRef padding, bool ceil_mode) {
  check_input(input);
  check_float_tensor(grad_output, "grad_output");
  check_same_device_dtype(grad_output, "grad_output", input, "input");
  TORCH_CHECK(argmax.device() == input.device(), kOp, " backward: `argmax` is on ", argmax.device(),
              " but `input` is on ", input.device());
  TORCH_CHECK(argmax.scalar_type() == at::kByte, kOp, " backward: `argmax` must be uint8, got ",
              argmax.scalar_type(), " (it is the second output of lrn_max_pool2d_forward with save_argmax=True)");
  lrn::check_hyper_parameters(size, k);
  const at::MemoryFormat fmt = suggested_format(input);
  const LrnPoolParams p = make_params(input, fmt, size, alpha, beta, k, kernel_size, stride, padding, ceil_mode);
  const std::vector<int64_t> out_size = pooled_sizes(input, p);
  TORCH_CHECK(argmax.sizes() == at::IntArrayRef(out_size), kOp, " backward: `argmax` has shape ", argmax.sizes(),
              " but the pooled output of an input of size ", input.sizes(), " has shape ", out_size,
              " (was the forward run with save_argmax=True?)");
  TORCH_CHECK(grad_output.sizes() == argmax.sizes(), kOp, " backward: `grad_output` has shape ",
              grad_output.sizes(), " but `argmax` has shape ", argmax.sizes());
  at::Tensor dx = new_output(input.sizes(), input.options(), fmt);
  if (dx.numel() == 0) return dx;
  pool::check_argmax_offsets(argmax, p.pool);
  const at::Tensor x = input.contiguous(fmt);
  const at::Tensor dy = grad_output.contiguous(fmt);
  const at::Tensor arg = argmax.contiguous(fmt);
  if (x.is_cuda()) {
#ifdef ALEXNET_EXT_WITH_CUDA
    c10::DeviceGuard guard(x.device());
    void* stream = current_stream(x);
    check_launch(lrn_max_pool2d_backward_cuda(dtype_tag(x.scalar_type()), dy.const_data_ptr(), arg.const_data_ptr(),
                                              x.const_data_ptr(), dx.mutable_data_ptr(), p, stream),
                 "alexnet_ext.local_response_norm_max_pool2d backward", "lrn_max_pool2d_backward_cuda", stream);
#endif
    return dx;
  }
  lrn_max_pool2d_backward_cpu(dy, arg, x, dx, p);
  return dx;
}

#ifndef ALEXNET_EXT_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> lrn_max_pool2d_forward_no_cuda(const at::Tensor&, int64_t, double, double, double,
                                                                  at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                                                                  bool, bool) {
  throw_no_cuda_kernels(kOp);
}
at::Tensor lrn_max_pool2d_backward_no_cuda(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, double,
                                           double, double, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, bool) {
  throw_no_cuda_kernels(kOp);
}
#endif

}  // namespace
}  // namespace fused
}  // namespace alexnet_ext

TORCH_LIBRARY_FRAGMENT(alexnet_ext, m) {
  // max_pool2d(local_response_norm(input)) in one pass; argmax as
  // max_pool2d_forward's (uint8 window offsets, numel 0 without save_argmax).
  m.def("lrn_max_pool2d_forward(Tensor input, int size, float alpha, float beta, float k, int[2] kernel_size, "
        "int[2] stride, int[2] padding, bool ceil_mode, bool save_argmax) -> (Tensor, Tensor)");
  m.def("lrn_max_pool2d_backward(Tensor grad_output, Tensor argmax, Tensor input, int size, float alpha, "
        "float beta, float k, int[2] kernel_size, int[2] stride, int[2] padding, bool ceil_mode) -> Tensor");
}

TORCH_LIBRARY_IMPL(alexnet_ext, CPU, m) {
  m.impl("lrn_max_pool2d_forward", &alexnet_ext::fused::lrn_max_pool2d_forward);
  m.impl("lrn_max_pool2d_backward", &alexnet_ext::fused::lrn_max_pool2d_backward);
}

TORCH_LIBRARY_IMPL(alexnet_ext, CUDA, m) {
#ifdef ALEXNET_EXT_WITH_CUDA
  m.impl("lrn_max_pool2d_forward", &alexnet_ext::fused::lrn_max_pool2d_forward);
  m.impl("lrn_max_pool2d_backward", &alexnet_ext::fused::lrn_max_pool2d_backward);
#else
  m.impl("lrn_max_pool2d_forward", &alexnet_ext::fused::lrn_max_pool2d_forward_no_cuda);
  m.impl("lrn_max_pool2d_backward", &alexnet_ext::fused::lrn_max_pool2d_backward_no_cuda);
#endif
}
