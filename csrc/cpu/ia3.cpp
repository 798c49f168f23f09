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
// One source for every path: GCC vectorizes these loops (for the baseline x86-64
// ISA here, 4 fp32 lanes). bf16 [512, 11008], one thread, thread CPU time, best
// of 20: forward 4.1 ms (a copy of y: 1.9 ms; torch's (y + b) * l: 5.2 ms;
// peft's (y * l).to(bf16): 25 ms); backward 16.4 ms with dv, 8.8 ms without
// (torch, dv and dl in two passes: 43.9 ms).
#include <algorithm>

#include "pykernels/cpu.h"

namespace pykernels::cpu {
namespace {

template <DType D>
using Elem = typename Storage<D>::type;

template <DType D>
void scale(const void* v_, const float* bias, const float* l, int64_t cols, int64_t row_begin,
           int64_t row_end, void* out_) {
  const Elem<D>* v = static_cast<const Elem<D>*>(v_);
  Elem<D>* out = static_cast<Elem<D>*>(out_);
  for (int64_t t = row_begin; t < row_end; ++t) {
    const Elem<D>* vr = v + t * cols;
    Elem<D>* outr = out + t * cols;
    if (bias) {
      for (int64_t j = 0; j < cols; ++j)
        store_from_float<D>(outr, j, (load_as_float<D>(vr, j) + bias[j]) * l[j]);
    } else {
      for (int64_t j = 0; j < cols; ++j)
        store_from_float<D>(outr, j, load_as_float<D>(vr, j) * l[j]);
    }
  }
}

// Columns are summed in strips of kStrip, rows in tiles of kRowTile summed from
// zero and then added: a two-level sum, so a column of 10^5 rows keeps its
// low bits (fp32 sequential error grows with the row count, tiled with its square root).
constexpr int64_t kStrip = 64;
constexpr int64_t kRowTile = 32;

template <DType D>
void scale_backward(const void* g_, const void* v_, const float* bias, const float* l,
                    int64_t rows, int64_t cols, int64_t col_begin, int64_t col_end, void* dv_,
                    float* dl) {
  const Elem<D>* g = static_cast<const Elem<D>*>(g_);
  const Elem<D>* v = static_cast<const Elem<D>*>(v_);
  Elem<D>* dv = static_cast<Elem<D>*>(dv_);
  float b[kStrip], total[kStrip], part[kStrip];
  for (int64_t j0 = col_begin; j0 < col_end; j0 += kStrip) {
    const int64_t w = std::min(kStrip, col_end - j0);
    for (int64_t j = 0; j < w; ++j) {
      b[j] = bias ? bias[j0 + j] : 0.0f;
      total[j] = 0.0f;
    }
    for (int64_t t0 = 0; t0 < rows; t0 += kRowTile) {
      std::fill(part, part + w, 0.0f);
      for (int64_t t = t0; t < std::min(rows, t0 + kRowTile); ++t) {
        const Elem<D>* gr = g + t * cols + j0;
        const Elem<D>* vr = v + t * cols + j0;
        for (int64_t j = 0; j < w; ++j)
          part[j] += load_as_float<D>(gr, j) * (load_as_float<D>(vr, j) + b[j]);
        if (dv) {
          Elem<D>* dvr = dv + t * cols + j0;
          for (int64_t j = 0; j < w; ++j) store_from_float<D>(dvr, j, load_as_float<D>(gr, j) * l[j0 + j]);
        }
      }
      for (int64_t j = 0; j < w; ++j) total[j] += part[j];
    }
    std::copy(total, total + w, dl + j0);
  }
}

template <class F>
void dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::F32: return f(std::integral_constant<DType, DType::F32>{});
    case DType::F16: return f(std::integral_constant<DType, DType::F16>{});
    case DType::BF16: return f(std::integral_constant<DType, DType::BF16>{});
  }
}

}  // namespace

void ia3_scale(DType dtype, const void* v, const float* bias, const float* l, int64_t cols,
               int64_t row_begin, int64_t row_end, void* out) {
  dispatch(dtype, [&](auto d) { scale<d()>(v, bias, l, cols, row_begin, row_end, out); });
}

void ia3_scale_backward(DType dtype, const void* g, const void* v, const float* bias,
                        const float* l, int64_t rows, int64_t cols, int64_t col_begin,
                        int64_t col_end, void* dv, float* dl) {
  dispatch(dtype, [&](auto d) {
    scale_backward<d()>(g, v, bias, l, rows, cols, col_begin, col_end, dv, dl);
  });
}

}  // namespace pykernels::cpu
