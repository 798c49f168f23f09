// IA³'s elementwise halves on the CPU (peft semantics, the layer: pykernels/nn/ia3.py):
//   output scaling (attention k, v)   y = (x·Wᵀ + b) ⊙ l,  l [out]
//   input scaling  (FFN down-proj)    y = (x ⊙ l)·Wᵀ + b,  l [in]
// The matmul stays with the matmul library (or the NF4 tile decoder); these are
// the passes around it, over a row-major [rows, cols] matrix and a vector l [cols]:
//   ia3_scale           out = (v + b) ⊙ l                      forward epilogue / input scaling
//   ia3_scale_backward  dv = g ⊙ l,  dl = Σ_rows g ⊙ (v + b)   both in one pass over g and v
// For output scaling g = dy and v = x·Wᵀ (b the bias); for input scaling
// g = dy·W and v = x (no b). Math in fp32, each output rounded once.
//
// One source for every path (ia3_loops.h), vectorized by the compiler per
// instruction set; this file is the scalar path and the dispatcher.
// bf16 [512, 11008], one thread, thread CPU time, best of 20 (ms), by path
// scalar (GCC's 4-lane baseline) / AVX2 / AVX-512:
//   forward (v + b) ⊙ l      5.2 / 2.6 / 1.5-1.7   (a copy of v: 1.05; torch's
//                            (y + b) * l: 3.5-3.9; peft's (y * l).to(bf16): 7.3-8.1)
//   backward, dv and dl      6.8 / 4.7 / 3.0-3.7   (torch, two passes: 45-49)
//   backward, dl only        2.1 / 1.4 / 1.4
// Each row's slice is read front to back: an earlier layout walking 64-column
// strips down all rows (a new page per row) took 16.4 ms for the backward.
#include <vector>

#include "ia3_loops.h"

namespace pykernels::cpu {

PK_IA3_PATH_DEFINE(scalar)

void ia3_scale(SimdPath path, DType dtype, const void* v, const float* bias, const float* l,
               int64_t cols, int64_t row_begin, int64_t row_end, void* out) {
  switch (path) {
    case SimdPath::AVX512: return ia3_scale_avx512(dtype, v, bias, l, cols, row_begin, row_end, out);
    case SimdPath::AVX2: return ia3_scale_avx2(dtype, v, bias, l, cols, row_begin, row_end, out);
    case SimdPath::Scalar: break;
  }
  ia3_scale_scalar(dtype, v, bias, l, cols, row_begin, row_end, out);
}

void ia3_scale_backward(SimdPath path, DType dtype, const void* g, const void* v,
                        const float* bias, const float* l, int64_t rows, int64_t cols,
                        int64_t col_begin, int64_t col_end, void* dv, float* dl) {
  std::vector<float> scratch(2 * std::max<int64_t>(col_end - col_begin, 0));
  float* s = scratch.data();
  switch (path) {
    case SimdPath::AVX512:
      return ia3_scale_backward_avx512(dtype, g, v, bias, l, rows, cols, col_begin, col_end, dv,
                                       dl, s);
    case SimdPath::AVX2:
      return ia3_scale_backward_avx2(dtype, g, v, bias, l, rows, cols, col_begin, col_end, dv, dl,
                                     s);
    case SimdPath::Scalar: break;
  }
  ia3_scale_backward_scalar(dtype, g, v, bias, l, rows, cols, col_begin, col_end, dv, dl, s);
}

}  // namespace pykernels::cpu
