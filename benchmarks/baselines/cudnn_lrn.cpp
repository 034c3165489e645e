// Baseline for bench_lrn.py: cuDNN's cross-channel LRN, bound to PyTorch
// tensors. Built at benchmark time with torch.utils.cpp_extension.load, only
// where cuDNN headers are found; never part of the alexnet_ext package.
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <cudnn.h>

namespace {

#define CUDNN_OK(expr)                                                                   \
  do {                                                                                   \
    cudnnStatus_t s_ = (expr);                                                           \
    TORCH_CHECK(s_ == CUDNN_STATUS_SUCCESS, #expr, " failed: ", cudnnGetErrorString(s_)); \
  } while (0)

cudnnHandle_t handle() {
  static cudnnHandle_t h = [] {
    cudnnHandle_t created;
    CUDNN_OK(cudnnCreate(&created));
    return created;
  }();
  CUDNN_OK(cudnnSetStream(h, at::cuda::getCurrentCUDAStream()));
  return h;
}

cudnnDataType_t data_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return CUDNN_DATA_FLOAT;
    case at::kDouble: return CUDNN_DATA_DOUBLE;
    case at::kHalf: return CUDNN_DATA_HALF;
    case at::kBFloat16: return CUDNN_DATA_BFLOAT16;
    default: TORCH_CHECK(false, "cudnn_lrn: unsupported dtype");
  }
}

// A 4D descriptor with the tensor's own strides (NCHW or channels_last).
struct TensorDesc {
  cudnnTensorDescriptor_t d{};
  explicit TensorDesc(const at::Tensor& t) {
    TORCH_CHECK(t.dim() == 4, "cudnn_lrn: 4D tensors only");
    CUDNN_OK(cudnnCreateTensorDescriptor(&d));
    CUDNN_OK(cudnnSetTensor4dDescriptorEx(d, data_type(t), t.size(0), t.size(1), t.size(2), t.size(3),
                                          t.stride(0), t.stride(1), t.stride(2), t.stride(3)));
  }
  ~TensorDesc() { cudnnDestroyTensorDescriptor(d); }
};

struct LrnDesc {
  cudnnLRNDescriptor_t d{};
  LrnDesc(int64_t n, double alpha, double beta, double k) {
    CUDNN_OK(cudnnCreateLRNDescriptor(&d));
    CUDNN_OK(cudnnSetLRNDescriptor(d, static_cast<unsigned>(n), alpha, beta, k));
  }
  ~LrnDesc() { cudnnDestroyLRNDescriptor(d); }
};

at::Tensor forward(const at::Tensor& x, int64_t n, double alpha, double beta, double k) {
  at::Tensor y = at::empty_like(x);
  TensorDesc xd(x), yd(y);
  LrnDesc lrn(n, alpha, beta, k);
  const float one = 1.f, zero = 0.f;
  CUDNN_OK(cudnnLRNCrossChannelForward(handle(), lrn.d, CUDNN_LRN_CROSS_CHANNEL_DIM1, &one, xd.d, x.data_ptr(),
                                       &zero, yd.d, y.data_ptr()));
  return y;
}

at::Tensor backward(const at::Tensor& y, const at::Tensor& dy, const at::Tensor& x, int64_t n, double alpha,
                    double beta, double k) {
  at::Tensor dx = at::empty_like(x);
  TensorDesc yd(y), dyd(dy), xd(x), dxd(dx);
  LrnDesc lrn(n, alpha, beta, k);
  const float one = 1.f, zero = 0.f;
  CUDNN_OK(cudnnLRNCrossChannelBackward(handle(), lrn.d, CUDNN_LRN_CROSS_CHANNEL_DIM1, &one, yd.d, y.data_ptr(),
                                        dyd.d, dy.data_ptr(), xd.d, x.data_ptr(), &zero, dxd.d, dx.data_ptr()));
  return dx;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward);
  m.def("backward", &backward);
}
