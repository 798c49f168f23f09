// Internal to csrc/cpu: IA³'s loops (math: ia3.cpp), written once and compiled
// per instruction set: ia3.cpp includes this for the scalar path (GCC still
// vectorizes it for the baseline ISA), ia3_avx2.cpp and ia3_avx512.cpp include
// it under `#pragma GCC target`, so the same source is vectorized 8 or 16 lanes
// wide. Every path does the same fp32 operations per element in the same order
// (no FMA: the CPU sources build with -ffp-contract=off), so all give the same bits.
// The loops live in an anonymous namespace, one copy per file; each file defines
// its path's entry points with PK_IA3_PATH_DEFINE(suffix).
#pragma once
#include <algorithm>
#include <type_traits>

#include "pykernels/cpu.h"

namespace pykernels::cpu {
namespace {

template <DType D>
using Elem = typename Storage<D>::type;

template <DType D>
void scale_rows(const void* v_, const float* bias, const float* l, int64_t cols,
                int64_t row_begin, int64_t row_end, void* out_) {
  const Elem<D>* v = static_cast<const Elem<D>*>(v_);
  Elem<D>* out = static_cast<Elem<D>*>(out_);
  for (int64_t t = row_begin; t < row_end; ++t) {
    const Elem<D>* vr = v + t * cols;
    Elem<D>* outr = out + t * cols;
    if (bias) {
      for (int64_t j = 0; j < cols; ++j)
        store_from_float<D>(outr, j, (load_as_float<D>(vr, j) + bias[j]) * l[j]);
    } else {
      for (int64_t j = 0; j < cols; ++j) store_from_float<D>(outr, j, load_as_float<D>(vr, j) * l[j]);
    }
  }
}

// Rows in tiles of kIa3RowTile summed from zero into part, then added to total:
// a two-level sum (fp32 error grows with the square root of the row count, not
// linearly). Each row's slice [col_begin, col_end) is read front to back, so the
// three streams (g, v, dv) run contiguously. scratch: 2 * (col_end - col_begin) floats.
constexpr int64_t kIa3RowTile = 32;

template <DType D>
void scale_columns_backward(const void* g_, const void* v_, const float* bias, const float* l,
                            int64_t rows, int64_t cols, int64_t col_begin, int64_t col_end,
                            void* dv_, float* dl, float* scratch) {
  const Elem<D>* g = static_cast<const Elem<D>*>(g_) + col_begin;
  const Elem<D>* v = static_cast<const Elem<D>*>(v_) + col_begin;
  Elem<D>* dv = dv_ ? static_cast<Elem<D>*>(dv_) + col_begin : nullptr;
  const float* b = bias ? bias + col_begin : nullptr;
  const float* lj = l + col_begin;
  const int64_t w = col_end - col_begin;
  float* total = scratch;
  float* part = scratch + w;
  std::fill(total, total + w, 0.0f);
  for (int64_t t0 = 0; t0 < rows; t0 += kIa3RowTile) {
    std::fill(part, part + w, 0.0f);
    for (int64_t t = t0; t < std::min(rows, t0 + kIa3RowTile); ++t) {
      const Elem<D>* gr = g + t * cols;
      const Elem<D>* vr = v + t * cols;
      if (b) {
        for (int64_t j = 0; j < w; ++j)
          part[j] += load_as_float<D>(gr, j) * (load_as_float<D>(vr, j) + b[j]);
      } else {
        for (int64_t j = 0; j < w; ++j) part[j] += load_as_float<D>(gr, j) * load_as_float<D>(vr, j);
      }
      if (dv) {
        Elem<D>* dvr = dv + t * cols;
        for (int64_t j = 0; j < w; ++j) store_from_float<D>(dvr, j, load_as_float<D>(gr, j) * lj[j]);
      }
    }
    for (int64_t j = 0; j < w; ++j) total[j] += part[j];
  }
  std::copy(total, total + w, dl + col_begin);
}

template <class F>
void ia3_dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::F32: return f(std::integral_constant<DType, DType::F32>{});
    case DType::F16: return f(std::integral_constant<DType, DType::F16>{});
    case DType::BF16: return f(std::integral_constant<DType, DType::BF16>{});
  }
}

}  // namespace

#define PK_IA3_PATH_DEFINE(suffix)                                                            \
  void ia3_scale_##suffix(DType dtype, const void* v, const float* bias, const float* l,      \
                          int64_t cols, int64_t row_begin, int64_t row_end, void* out) {      \
    ia3_dispatch(dtype, [&](auto d) {                                                         \
      scale_rows<decltype(d)::value>(v, bias, l, cols, row_begin, row_end, out);              \
    });                                                                                       \
  }                                                                                           \
  void ia3_scale_backward_##suffix(DType dtype, const void* g, const void* v,                 \
                                   const float* bias, const float* l, int64_t rows,           \
                                   int64_t cols, int64_t col_begin, int64_t col_end,          \
                                   void* dv, float* dl, float* scratch) {                     \
    ia3_dispatch(dtype, [&](auto d) {                                                         \
      scale_columns_backward<decltype(d)::value>(g, v, bias, l, rows, cols, col_begin,        \
                                                 col_end, dv, dl, scratch);                   \
    });                                                                                       \
  }

#define PK_IA3_PATH_DECLARE(suffix)                                                           \
  void ia3_scale_##suffix(DType dtype, const void* v, const float* bias, const float* l,      \
                          int64_t cols, int64_t row_begin, int64_t row_end, void* out);       \
  void ia3_scale_backward_##suffix(DType dtype, const void* g, const void* v,                 \
                                   const float* bias, const float* l, int64_t rows,           \
                                   int64_t cols, int64_t col_begin, int64_t col_end,          \
                                   void* dv, float* dl, float* scratch);
PK_IA3_PATH_DECLARE(scalar)
PK_IA3_PATH_DECLARE(avx2)
PK_IA3_PATH_DECLARE(avx512)
#undef PK_IA3_PATH_DECLARE

}  // namespace pykernels::cpu
