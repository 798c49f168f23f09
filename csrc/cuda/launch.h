// Internal to csrc/cuda: the launch geometry and dtype dispatch every kernel
// file shares.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>
#include <type_traits>

#include "pykernels/common.h"

namespace pykernels::cuda {

constexpr int kThreads = 256;  // per CTA
constexpr int kWarpsPerCta = kThreads / 32;
constexpr int64_t kMaxCtas = int64_t(1) << 16;  // past this, kernels loop grid-stride

// CTAs for `items` work items, items_per_cta each: at least 1, at most kMaxCtas.
inline int64_t ctas_for(int64_t items, int64_t items_per_cta) {
  const int64_t ctas = ceil_div(items, items_per_cta);
  return ctas < 1 ? 1 : (ctas < kMaxCtas ? ctas : kMaxCtas);
}

inline bool aligned(const void* p, uintptr_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// f(std::integral_constant<DType, D>) for the run-time dtype: one launcher
// template instance per element type.
template <class F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::F32: return f(std::integral_constant<DType, DType::F32>{});
    case DType::F16: return f(std::integral_constant<DType, DType::F16>{});
    case DType::BF16: return f(std::integral_constant<DType, DType::BF16>{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace pykernels::cuda
