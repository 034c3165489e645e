// Window checks, geometry and argmax allocation of the max-pool operators,
// shared with the fused LRN + max-pool operator (fused/lrn_pool.cpp).
#pragma once
#include <ATen/ATen.h>

#include "maxpool/pool_math.h"

namespace alexnet_ext {
namespace pool {

// The argmax dtype for a window: uint8 while offsets fit, else int32.
at::ScalarType offset_dtype(int64_t kh, int64_t kw);

// Checks the window against an (N, C, H, W) input size (PyTorch's messages)
// and returns the geometry with the output size filled in. `size_name`: the
// argument the size came from, named in errors (`input`, `input_size`).
PoolGeometry make_geometry(at::IntArrayRef input_size, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                           at::IntArrayRef padding, bool ceil_mode, bool channels_last, const char* size_name);

// Backward operators: every saved offset must lie in its window and inside
// the image (CPU tensors; see pool.cpp for why CUDA is not checked).
void check_argmax_offsets(const at::Tensor& argmax, const PoolGeometry& g);

// An argmax tensor, poisoned with an impossible offset when tests ask for it.
at::Tensor new_argmax(at::IntArrayRef sizes, const at::Tensor& like, at::ScalarType type, at::MemoryFormat fmt);

}  // namespace pool
}  // namespace alexnet_ext
