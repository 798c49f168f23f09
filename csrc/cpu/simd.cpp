// Run-time choice of the CPU kernel path: the build compiles every path (with
// per-function target attributes), the CPU we run on decides which may run.
#include "pykernels/cpu.h"

namespace pykernels::cpu {

bool simd_path_supported(SimdPath path) {
  switch (path) {
    case SimdPath::Scalar:
      return true;
#if defined(__x86_64__) || defined(_M_X64)
    case SimdPath::AVX2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c");
    case SimdPath::AVX512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#endif
    default:
      return false;
  }
}

// Read once: the ops ask on every call.
bool cpu_has_avx512_bf16() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool has =
      simd_path_supported(SimdPath::AVX512) && __builtin_cpu_supports("avx512bf16");
  return has;
#else
  return false;
#endif
}

bool cpu_has_amx_bf16() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool has = __builtin_cpu_supports("amx-bf16");
  return has;
#else
  return false;
#endif
}

bool bf16_dots_run(SimdPath path) { return path == SimdPath::AVX512 && cpu_has_avx512_bf16(); }

SimdPath best_simd_path() {
  static const SimdPath best = simd_path_supported(SimdPath::AVX512) ? SimdPath::AVX512
                               : simd_path_supported(SimdPath::AVX2) ? SimdPath::AVX2
                                                                     : SimdPath::Scalar;
  return best;
}

const char* simd_path_name(SimdPath path) {
  switch (path) {
    case SimdPath::Scalar: return "scalar";
    case SimdPath::AVX2: return "avx2";
    case SimdPath::AVX512: return "avx512";
  }
  return "unknown";
}

}  // namespace pykernels::cpu
