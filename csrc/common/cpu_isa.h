// Wider vectors for the CPU kernels whose inner loops run over contiguous
// channels (max-pool channels_last) or pixels (LRN NCHW).
//
// The extension is compiled for baseline x86-64 (SSE2: 4 floats a vector),
// so that it loads on every machine. PyTorch's own CPU kernels are compiled
// several times and pick AVX2 or AVX-512 at run time; a channel loop of ours
// compiled for SSE2 loses to them by the vector width alone. with_cpu_isa()
// does the same for one piece of work: it runs `fn` inside a function
// compiled for AVX-512 or AVX2 (flatten: everything `fn` calls is inlined,
// so the loops are vectorised for that ISA), or as it is.
//
// The choice follows PyTorch's (at::get_cpu_capability(), which honours
// ATEN_CPU_CAPABILITY=default|avx2|avx512), so one variable switches both,
// and the tests can run every variant on an AVX-512 machine
// (tests/test_cpu_isa.py).
#pragma once

namespace alexnet_ext {

enum class CpuIsa { kBaseline, kAvx2, kAvx512 };

// The ISA the vectorised CPU kernels run with in this process (decided once).
CpuIsa cpu_isa();

#if defined(__x86_64__) && defined(__GNUC__)
#define AX_HAVE_ISA_VARIANTS 1
template <typename Fn>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"), flatten)) void run_avx512(const Fn& fn) {
  fn();
}
template <typename Fn>
__attribute__((target("avx2,fma,f16c"), flatten)) void run_avx2(const Fn& fn) {
  fn();
}
#endif

template <typename Fn>
void with_cpu_isa(const Fn& fn) {
#ifdef AX_HAVE_ISA_VARIANTS
  switch (cpu_isa()) {
    case CpuIsa::kAvx512: return run_avx512(fn);
    case CpuIsa::kAvx2: return run_avx2(fn);
    case CpuIsa::kBaseline: break;
  }
#endif
  fn();
}

}  // namespace alexnet_ext
