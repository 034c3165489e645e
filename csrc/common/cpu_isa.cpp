#include "common/cpu_isa.h"

#include <ATen/Version.h>

#include <string>

namespace alexnet_ext {

namespace {

CpuIsa detect() {
#ifdef AX_HAVE_ISA_VARIANTS
  // What PyTorch dispatches to (it already checked the CPU and the
  // ATEN_CPU_CAPABILITY override), confirmed against the CPU itself.
  const std::string torch_isa = at::get_cpu_capability();
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (torch_isa == "AVX512" && avx512) return CpuIsa::kAvx512;
  if ((torch_isa == "AVX512" || torch_isa == "AVX2") && avx2) return CpuIsa::kAvx2;
#endif
  return CpuIsa::kBaseline;
}

}  // namespace

CpuIsa cpu_isa() {
  static const CpuIsa isa = detect();
  return isa;
}

}  // namespace alexnet_ext
