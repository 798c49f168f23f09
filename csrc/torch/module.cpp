// The pykernels._C Python module. Ops live in the torch.library registry
// (schemas.cpp); this module holds only what is naturally a plain function:
// build facts and the CPU path in use.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <initializer_list>
#include <string>
#include <vector>

#include "pykernels/cpu.h"
#include "simd_choice.h"

namespace py = pybind11;
using pykernels::cpu::SimdPath;

PYBIND11_MODULE(_C, m) {
  m.doc() = "pykernels native extension: ops are under torch.ops.pykernels";
  m.def("cuda_compiled", [] {
#ifdef PYKERNELS_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether the CUDA kernels were built into this extension.");
  m.def("cpu_paths", [] {
    std::vector<std::string> paths;
    for (SimdPath p : {SimdPath::Scalar, SimdPath::AVX2, SimdPath::AVX512})
      if (pykernels::cpu::simd_path_supported(p)) paths.emplace_back(pykernels::cpu::simd_path_name(p));
    return paths;
  }, "CPU kernel paths this machine can run, best last.");
  m.def("cpu_path", [] { return std::string(pykernels::cpu::simd_path_name(pykernels::binding::active_cpu_path())); },
        "The CPU kernel path the ops use now.");
  m.def("set_cpu_path", [](const std::string& name) {
    if (!pykernels::binding::set_active_cpu_path(name.c_str()))
      throw py::value_error("set_cpu_path: '" + name + "' is not a CPU path this machine can run");
  }, "Force a CPU kernel path (scalar, avx2, avx512) for testing and benchmarks.");
}
