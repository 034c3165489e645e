// Helpers for the thin C++ layer between PyTorch tensors and our kernels:
// argument checks with readable messages, dtype tags, memory formats,
// output allocation (optionally poisoned for tests) and stream lookup.
// Only this layer includes PyTorch headers; kernels never do.
#pragma once
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>

#include "common/dtype.h"

namespace alexnet_ext {

// Kernels support these floating dtypes; anything else is rejected by name.
void check_float_tensor(const at::Tensor& t, const char* name);

// Same device and dtype as `ref`, with both argument names in the message.
void check_same_device_dtype(const at::Tensor& t, const char* name,
                             const at::Tensor& ref, const char* ref_name);

DType dtype_tag(at::ScalarType type);

// channels_last(_3d) when `t` is laid out that way, contiguous otherwise.
// Kernels then see either NC* (channels stride = spatial size) or N*C
// (channels stride 1); other strides are made contiguous first.
at::MemoryFormat suggested_format(const at::Tensor& t);
bool is_channels_last(const at::Tensor& t);

// at::empty in `format`; filled with NaN when output poisoning is enabled
// (tests turn it on so that an element a kernel forgets to write shows up).
at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options,
                      at::MemoryFormat format = at::MemoryFormat::Contiguous);
void set_poison_outputs(bool enabled);
bool poison_outputs();

// The current CUDA stream of `t`'s device, as an opaque cudaStream_t.
void* current_stream(const at::Tensor& t);

// The error a CUDA tensor gets from a build without CUDA kernels; `op` is
// the user-facing name, e.g. "alexnet_ext.max_pool2d".
[[noreturn]] void throw_no_cuda_kernels(const char* op);

// Throws a RuntimeError naming the op (e.g. "alexnet_ext.max_pool2d
// backward") and the kernel launcher when `status` reports an error. A
// launcher's status comes from cudaGetLastError, which also reports a fault
// of any kernel that ran before, so with ALEXNET_EXT_SYNC_CHECK=1 this also
// waits for `stream` after every launch: a fault inside the kernel is then
// reported here, against the kernel that caused it (like CUDA_LAUNCH_BLOCKING,
// and as slow; not for use while capturing a CUDA graph).
void check_launch(LaunchStatus status, const char* op, const char* kernel, void* stream);

// ALEXNET_EXT_SYNC_CHECK, read once per process (the first launch or query):
// unset, "", "0", "false", "no" and "off" (any case) leave it off, any other
// value turns it on.
bool sync_check_enabled();
bool parse_env_flag(const char* value);

}  // namespace alexnet_ext
