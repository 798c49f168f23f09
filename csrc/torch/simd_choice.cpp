#include "simd_choice.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <initializer_list>

namespace pykernels::binding {
namespace {

bool parse(const char* name, cpu::SimdPath* path) {
  for (cpu::SimdPath p : {cpu::SimdPath::Scalar, cpu::SimdPath::AVX2, cpu::SimdPath::AVX512}) {
    if (std::strcmp(name, cpu::simd_path_name(p)) == 0 && cpu::simd_path_supported(p)) {
      *path = p;
      return true;
    }
  }
  return false;
}

std::atomic<cpu::SimdPath>& chosen() {
  static std::atomic<cpu::SimdPath> path([] {
    cpu::SimdPath p = cpu::best_simd_path();
    if (const char* env = std::getenv("PYKERNELS_CPU_PATH")) parse(env, &p);
    return p;
  }());
  return path;
}

}  // namespace

cpu::SimdPath active_cpu_path() { return chosen().load(std::memory_order_relaxed); }

bool set_active_cpu_path(const char* name) {
  cpu::SimdPath p;
  if (!parse(name, &p)) return false;
  chosen().store(p, std::memory_order_relaxed);
  return true;
}

}  // namespace pykernels::binding
