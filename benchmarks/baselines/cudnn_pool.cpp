// Baseline for bench_pool.py: cuDNN's max pooling, bound to PyTorch tensors.
// Built at benchmark time with torch.utils.cpp_extension.load, only where
// cuDNN headers are found; never part of the alexnet_ext package.
#include "cudnn_common.h"

namespace {

using namespace cudnn_baseline;

// Square window, no padding; NaN propagates like PyTorch.
struct PoolDesc {
  cudnnPoolingDescriptor_t d{};
  PoolDesc(int64_t kernel, int64_t stride) {
    CUDNN_OK(cudnnCreatePoolingDescriptor(&d));
    CUDNN_OK(cudnnSetPooling2dDescriptor(d, CUDNN_POOLING_MAX_DETERMINISTIC, CUDNN_PROPAGATE_NAN, kernel, kernel,
                                         0, 0, stride, stride));
  }
  ~PoolDesc() { cudnnDestroyPoolingDescriptor(d); }
};

at::Tensor forward(const at::Tensor& x, int64_t kernel, int64_t stride) {
  // The float scaling factors below are what cuDNN takes for these dtypes.
  TORCH_CHECK(x.scalar_type() != at::kDouble, "cudnn_pool: float32, float16 or bfloat16 only");
  const auto out = [&](int64_t size) { return (size - kernel) / stride + 1; };
  at::Tensor y = at::empty({x.size(0), x.size(1), out(x.size(2)), out(x.size(3))},
                           x.options().memory_format(x.suggest_memory_format()));
  TensorDesc xd(x), yd(y);
  PoolDesc pool(kernel, stride);
  const float one = 1.f, zero = 0.f;
  CUDNN_OK(cudnnPoolingForward(handle(), pool.d, &one, xd.d, x.data_ptr(), &zero, yd.d, y.data_ptr()));
  return y;
}

at::Tensor backward(const at::Tensor& y, const at::Tensor& dy, const at::Tensor& x, int64_t kernel, int64_t stride) {
  at::Tensor dx = at::empty_like(x);
  const at::Tensor dyc = dy.contiguous(y.suggest_memory_format());
  TensorDesc yd(y), dyd(dyc), xd(x), dxd(dx);
  PoolDesc pool(kernel, stride);
  const float one = 1.f, zero = 0.f;
  CUDNN_OK(cudnnPoolingBackward(handle(), pool.d, &one, yd.d, y.data_ptr(), dyd.d, dyc.data_ptr(), xd.d,
                                x.data_ptr(), &zero, dxd.d, dx.data_ptr()));
  return dx;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward);
  m.def("backward", &backward);
}
