// Shared by the cuDNN baseline bindings (cudnn_lrn.cpp, cudnn_pool.cpp):
// error checks, one cuDNN handle bound to the current stream, dtypes and
// 4D tensor descriptors. Benchmark-only code, never part of alexnet_ext.
#pragma once
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <cudnn.h>

namespace cudnn_baseline {

#define CUDNN_OK(expr)                                                                   \
  do {                                                                                   \
    cudnnStatus_t s_ = (expr);                                                           \
    TORCH_CHECK(s_ == CUDNN_STATUS_SUCCESS, #expr, " failed: ", cudnnGetErrorString(s_)); \
  } while (0)

inline cudnnHandle_t handle() {
  static cudnnHandle_t h = [] {
    cudnnHandle_t created;
    CUDNN_OK(cudnnCreate(&created));
    return created;
  }();
  CUDNN_OK(cudnnSetStream(h, at::cuda::getCurrentCUDAStream()));
  return h;
}

inline cudnnDataType_t data_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return CUDNN_DATA_FLOAT;
    case at::kDouble: return CUDNN_DATA_DOUBLE;
    case at::kHalf: return CUDNN_DATA_HALF;
    case at::kBFloat16: return CUDNN_DATA_BFLOAT16;
    default: TORCH_CHECK(false, "cudnn baseline: unsupported dtype");
  }
}

// A 4D descriptor with the tensor's own strides (NCHW or channels_last).
struct TensorDesc {
  cudnnTensorDescriptor_t d{};
  explicit TensorDesc(const at::Tensor& t) {
    TORCH_CHECK(t.dim() == 4, "cudnn baseline: 4D tensors only");
    CUDNN_OK(cudnnCreateTensorDescriptor(&d));
    CUDNN_OK(cudnnSetTensor4dDescriptorEx(d, data_type(t), t.size(0), t.size(1), t.size(2), t.size(3),
                                          t.stride(0), t.stride(1), t.stride(2), t.stride(3)));
  }
  ~TensorDesc() { cudnnDestroyTensorDescriptor(d); }
};

}  // namespace cudnn_baseline
