// Baseline for bench_lrn.py: cuDNN's cross-channel LRN, bound to PyTorch
// tensors. Built at benchmark time with torch.utils.cpp_extension.load, only
// where cuDNN headers are found; never part of the alexnet_ext package.
#include "cudnn_common.h"

namespace {

using namespace cudnn_baseline;

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
