// Bottleneck adapters on the CPU: the scalar reference path (bottleneck_body.h
// compiled without a target) and the dispatcher to the SIMD paths.
//
//   out = r + s·(act(h·W_downᵀ + b_down)·W_upᵀ + b_up),  W_down [m, d], W_up [d, m]
//
// The two products stay with the matmul library (oneDNN's AMX for bf16 here:
// a hand-written AVX-512 product would cost ~10% of a decoder block where the
// target is 2%); the binding (csrc/torch/bottleneck.cpp) runs them a tile of
// rows at a time, the down product into a small buffer and the up product into
// out's rows, and these kernels do the rest in place:
//   bottleneck_activate      z = act(h·W_downᵀ + b_down) on the [rows, m] tile, the
//                            pre-activation saved for the backward
//   bottleneck_epilogue      out = r + s·(out + b_up) on the tile's [rows, d] of out
//   bottleneck_act_backward  dz = s·(dy·W_up)·act'(pre) and a = act(pre), [T, m]
//   bottleneck_column_sum    the bias gradients' sums over rows, in fp32
#include <stdexcept>

#include "bottleneck_paths.h"

#define PK_BOTTLENECK_SUFFIX scalar
#include "bottleneck_body.h"

namespace pykernels::cpu {

// Calls name_<suffix>(args) for the chosen path.
#define PK_BOTTLENECK_DISPATCH(name, ...)  \
  switch (path) {                          \
    case SimdPath::AVX512:                 \
      return name##_avx512(__VA_ARGS__);   \
    case SimdPath::AVX2:                   \
      return name##_avx2(__VA_ARGS__);     \
    case SimdPath::Scalar:                 \
      break;                               \
  }                                        \
  name##_scalar(__VA_ARGS__)

void bottleneck_activate(SimdPath path, DType dtype, Act act, void* z, int64_t rows, int64_t m,
                         void* pre_out) {
  PK_BOTTLENECK_DISPATCH(bottleneck_activate, dtype, act, z, rows, m, pre_out);
}

void bottleneck_epilogue(SimdPath path, DType dtype, const void* up, const void* bias,
                         const void* residual, int64_t rows, int64_t d, float scale, void* out) {
  PK_BOTTLENECK_DISPATCH(bottleneck_epilogue, dtype, up, bias, residual, rows, d, scale, out);
}

void bottleneck_act_backward(SimdPath path, DType dtype, Act act, const void* pre, void* g,
                             int64_t rows, int64_t m, float scale, void* a_out) {
  PK_BOTTLENECK_DISPATCH(bottleneck_act_backward, dtype, act, pre, g, rows, m, scale, a_out);
}

void bottleneck_column_sum(SimdPath path, DType dtype, const void* x, int64_t rows, int64_t cols,
                           int64_t col_begin, int64_t col_end, float* out) {
  PK_BOTTLENECK_DISPATCH(bottleneck_column_sum, dtype, x, rows, cols, col_begin, col_end, out);
}

#undef PK_BOTTLENECK_DISPATCH

}  // namespace pykernels::cpu
