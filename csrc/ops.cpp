// The alexnet_ext operator library. Each op folder adds its own schemas with
// TORCH_LIBRARY_FRAGMENT and its kernels with TORCH_LIBRARY_IMPL; this file
// owns the library itself and the module stub Python imports.
#include <Python.h>
#include <torch/library.h>

#include <limits>
#include <string>

#include "common/cpu_isa.h"
#include "common/op_utils.h"

extern "C" {
// `import alexnet_ext._C` only has to load this shared object, whose static
// initialisers register the operators; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(alexnet_ext, m) {
  // Test hook: fill every output with NaN before kernels write it.
  m.def("_set_poison_outputs(bool enabled) -> ()", &alexnet_ext::set_poison_outputs);
  m.def("_cuda_kernels_compiled() -> bool", []() -> bool {
#ifdef ALEXNET_EXT_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  // ALEXNET_EXT_SYNC_CHECK as this process read it (common/op_utils.h).
  m.def("_sync_check_enabled() -> bool", &alexnet_ext::sync_check_enabled);
  // Test hook: the error check_launch raises for a launcher's status (no
  // stream: the synchronisation needs a GPU).
  m.def("_check_launch(int status, str op, str kernel) -> ()",
        [](int64_t status, const std::string& op, const std::string& kernel) {
          TORCH_CHECK(status >= 0 && status <= std::numeric_limits<int>::max(), "_check_launch: `status` out of range");
          alexnet_ext::check_launch(static_cast<alexnet_ext::LaunchStatus>(status), op.c_str(), kernel.c_str(),
                                    nullptr);
        });
  // Which vector ISA the channel-vectorised CPU kernels use (common/cpu_isa.h).
  m.def("_cpu_isa() -> str", []() -> std::string {
    switch (alexnet_ext::cpu_isa()) {
      case alexnet_ext::CpuIsa::kAvx512: return "avx512";
      case alexnet_ext::CpuIsa::kAvx2: return "avx2";
      default: return "baseline";
    }
  });
}
