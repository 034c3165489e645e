// The alexnet_ext operator library. Each op folder adds its own schemas with
// TORCH_LIBRARY_FRAGMENT and its kernels with TORCH_LIBRARY_IMPL; this file
// owns the library itself and the module stub Python imports.
#include <Python.h>
#include <torch/library.h>

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
  // Which vector ISA the channel-vectorised CPU kernels use (common/cpu_isa.h).
  m.def("_cpu_isa() -> str", []() -> std::string {
    switch (alexnet_ext::cpu_isa()) {
      case alexnet_ext::CpuIsa::kAvx512: return "avx512";
      case alexnet_ext::CpuIsa::kAvx2: return "avx2";
      default: return "baseline";
    }
  });
}
