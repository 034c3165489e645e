#include "common/op_utils.h"

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdlib>
#include <limits>
#include <string>

#include <c10/core/Stream.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

namespace alexnet_ext {

namespace {
std::atomic<bool> g_poison_outputs{false};
}

void check_float_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), "alexnet_ext: `", name, "` must be a defined tensor");
  const auto type = t.scalar_type();
  TORCH_CHECK(type == at::kDouble || type == at::kFloat || type == at::kHalf || type == at::kBFloat16,
              "alexnet_ext: `", name, "` must be float64, float32, float16 or bfloat16, got ", type);
  TORCH_CHECK(t.device().is_cpu() || t.device().is_cuda(), "alexnet_ext: `", name,
              "` must be on the CPU or a CUDA device, got ", t.device());
}

void check_same_device_dtype(const at::Tensor& t, const char* name, const at::Tensor& ref,
                             const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), "alexnet_ext: `", name, "` is on ", t.device(), " but `",
              ref_name, "` is on ", ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "alexnet_ext: `", name, "` has dtype ",
              t.scalar_type(), " but `", ref_name, "` has dtype ", ref.scalar_type());
}

DType dtype_tag(at::ScalarType type) {
  switch (type) {
    case at::kDouble: return DType::Float64;
    case at::kFloat: return DType::Float32;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    default: TORCH_CHECK(false, "alexnet_ext: unsupported dtype ", type);
  }
}

at::MemoryFormat suggested_format(const at::Tensor& t) {
  if (t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  if (t.dim() == 5 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast3d)) {
    return at::MemoryFormat::ChannelsLast3d;
  }
  return at::MemoryFormat::Contiguous;
}

bool is_channels_last(const at::Tensor& t) {
  return suggested_format(t) != at::MemoryFormat::Contiguous;
}

at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options, at::MemoryFormat format) {
  at::Tensor out = at::empty(sizes, options.memory_format(format));
  if (g_poison_outputs.load(std::memory_order_relaxed) && out.numel() > 0) {
    out.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  return out;
}

void set_poison_outputs(bool enabled) { g_poison_outputs.store(enabled); }
bool poison_outputs() { return g_poison_outputs.load(); }

void* current_stream(const at::Tensor& t) {
  // c10::Stream::native_handle() gives the cudaStream_t without including any
  // c10/cuda header, so this file compiles against the CPU-only wheel too.
  const auto* impl = c10::impl::getDeviceGuardImpl(t.device().type());
  return impl->getStream(t.device()).native_handle();
}

void throw_no_cuda_kernels(const char* op) {
  TORCH_CHECK(false, op, ": `input` is a CUDA tensor but alexnet_ext was built without CUDA kernels (CPU-only "
              "PyTorch, no nvcc, or USE_CUDA=0); see `python -m alexnet_ext.info` and rebuild with "
              "`pip install --no-build-isolation -e .` on a machine with CUDA");
}

bool parse_env_flag(const char* value) {
  if (value == nullptr) return false;
  std::string v(value);
  std::transform(v.begin(), v.end(), v.begin(), [](unsigned char c) { return std::tolower(c); });
  return !(v.empty() || v == "0" || v == "false" || v == "no" || v == "off");
}

bool sync_check_enabled() {
  static const bool enabled = parse_env_flag(std::getenv("ALEXNET_EXT_SYNC_CHECK"));
  return enabled;
}

namespace {
std::string launch_error_text(LaunchStatus status) {
#ifdef ALEXNET_EXT_WITH_CUDA
  return cuda_error_string(status);
#else
  return "CUDA error " + std::to_string(status);
#endif
}
}  // namespace

void check_launch(LaunchStatus status, const char* op, const char* kernel, void* stream) {
  TORCH_CHECK(status == 0, op, ": CUDA kernel ", kernel, " failed to launch: ", launch_error_text(status),
              sync_check_enabled()
                  ? " (with ALEXNET_EXT_SYNC_CHECK=1 the alexnet_ext kernels before it were checked as they finished)"
                  : ". A fault of a kernel that ran before is also reported at this point; run with "
                    "ALEXNET_EXT_SYNC_CHECK=1 to check every kernel as it finishes and name the one that failed");
#ifdef ALEXNET_EXT_WITH_CUDA
  if (sync_check_enabled()) {
    const LaunchStatus ran = cuda_stream_sync(stream);
    TORCH_CHECK(ran == 0, op, ": CUDA kernel ", kernel, " failed while running: ", launch_error_text(ran),
                " (found by ALEXNET_EXT_SYNC_CHECK=1, which waits for every kernel as it is launched)");
  }
#else
  (void)stream;
#endif
}

}  // namespace alexnet_ext
