// LoRA's skinny products on the CPU, with dropout fused: the scalar reference
// path and the dispatcher to the SIMD paths (lora_avx512.cpp, lora_avx2.cpp,
// both built from lora_tiles.h).
//
// LoRA (peft semantics): y = x W^T + b + s (drop(x) A^T) B^T with A [r, in],
// B [out, r], x flattened to [T, in]. The dense products with W and the small
// ones with B stay with the matmul library (see csrc/torch/lora.cpp); these
// kernels are the products that touch drop(x), so the dropped input is never
// stored:
//   lora_x_at     xa = drop(x) A^T               [T, r]   forward
//   lora_gt_x     dA = dxa^T drop(x)             [r, in]  backward
//   lora_add_g_a  dx += mask * (dxa A) * c       [T, in]  backward, in place
//                 W  += s B A                    [out, in] merge, in place
// Without dropout they are plain products; the binding uses them where they beat
// the matmul library.
//
// Same bits on every path, whatever the split into ranges: every sum is in fp32
// with fused multiply-adds in index order (lora_x_at: into 16 partials by
// column % 16, reduced in one fixed order, lora_paths.h), each product of x and
// the dropout scale is rounded once (x * scale, or 0 when dropped), and each
// output is rounded to its dtype once.
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "lora_paths.h"

namespace pykernels::cpu {
namespace {

float dropped(const Dropout& d, DropoutRow key, int64_t col, float x) {
  if (!d.active()) return x;
  return dropout_keep(d, key, uint32_t(col)) ? x * d.scale : 0.0f;
}

// lanes: [rank][16] of the scratch.
template <DType D>
void x_at(const Elem<D>* x, const Elem<D>* a, int64_t cols, int64_t rank, const Dropout& d,
          int64_t row_begin, int64_t row_end, Elem<D>* out, float* lanes, const int64_t* row_map) {
  for (int64_t tt = row_begin; tt < row_end; ++tt) {
    const int64_t t = lora_row(row_map, tt);
    const DropoutRow key = dropout_row(d.seed, uint64_t(t));
    std::fill(lanes, lanes + rank * kLoraLanes, 0.0f);
    for (int64_t i = 0; i < cols; ++i) {
      const float v = dropped(d, key, i, load_as_float<D>(x, t * cols + i));
      float* lane = lanes + i % kLoraLanes;
      for (int64_t k = 0; k < rank; ++k)
        lane[k * kLoraLanes] = std::fma(v, load_as_float<D>(a, k * cols + i), lane[k * kLoraLanes]);
    }
    for (int64_t k = 0; k < rank; ++k)
      store_from_float<D>(out, t * rank + k, lora_reduce_lanes(lanes + k * kLoraLanes));
  }
}

// sums: [rank][stride] of the scratch.
template <DType D>
void gt_x(const float* g, const Elem<D>* x, int64_t rows, int64_t cols, int64_t rank,
          const Dropout& d, int64_t col_begin, int64_t col_end, Elem<D>* out, float* sums,
          const int64_t* row_map) {
  const int64_t stride = lora_gt_x_stride(col_begin, col_end);
  std::fill(sums, sums + rank * stride, 0.0f);
  // As the SIMD paths: each tile of kLoraGtxRows rows sums from zero, then adds to the total.
  for (int64_t t0 = 0; t0 < rows; t0 += kLoraGtxRows) {
    const int64_t t1 = std::min(rows, t0 + kLoraGtxRows);
    for (int64_t i = col_begin; i < col_end; ++i)
      for (int64_t k = 0; k < rank; ++k) {
        float partial = 0.0f;
        for (int64_t tt = t0; tt < t1; ++tt) {
          const int64_t t = lora_row(row_map, tt);
          const float v = dropped(d, dropout_row(d.seed, uint64_t(t)), i,
                                  load_as_float<D>(x, t * cols + i));
          partial = std::fma(g[t * rank + k], v, partial);
        }
        sums[k * stride + i - col_begin] += partial;
      }
  }
  for (int64_t k = 0; k < rank; ++k)
    for (int64_t i = col_begin; i < col_end; ++i)
      store_from_float<D>(out, k * cols + i, sums[k * stride + i - col_begin]);
}

template <DType D>
void add_g_a(const float* g, const Elem<D>* a, int64_t cols, int64_t rank, float scale,
             const Dropout& d, int64_t row_begin, int64_t row_end, Elem<D>* out,
             const int64_t* row_map) {
  for (int64_t tt = row_begin; tt < row_end; ++tt) {
    const int64_t t = lora_row(row_map, tt);
    const DropoutRow key = dropout_row(d.seed, uint64_t(t));
    for (int64_t i = 0; i < cols; ++i) {
      if (d.active() && !dropout_keep(d, key, uint32_t(i))) continue;
      float sum = 0.0f;
      for (int64_t k = 0; k < rank; ++k)
        sum = std::fma(g[t * rank + k], load_as_float<D>(a, k * cols + i), sum);
      store_from_float<D>(out, t * cols + i, load_as_float<D>(out, t * cols + i) + scale * sum);
    }
  }
}

}  // namespace


void lora_x_at_scalar(DType dtype, const void* x, const void* a, int64_t cols, int64_t rank,
                      const Dropout& d, int64_t row_begin, int64_t row_end, void* out,
                      float* scratch, const int64_t* row_map) {
  PK_LORA_DTYPE_SWITCH("lora_x_at", (x_at<D>(static_cast<const E*>(x), static_cast<const E*>(a),
                                             cols, rank, d, row_begin, row_end,
                                             static_cast<E*>(out), scratch, row_map)));
}

void lora_gt_x_scalar(DType dtype, const float* g, const void* x, int64_t rows, int64_t cols,
                      int64_t rank, const Dropout& d, int64_t col_begin, int64_t col_end,
                      void* out, float* scratch, const int64_t* row_map) {
  PK_LORA_DTYPE_SWITCH("lora_gt_x", (gt_x<D>(g, static_cast<const E*>(x), rows, cols, rank, d,
                                             col_begin, col_end, static_cast<E*>(out), scratch,
                                             row_map)));
}

void lora_add_g_a_scalar(DType dtype, const float* g, const void* a, int64_t cols, int64_t rank,
                         float scale, const Dropout& d, int64_t row_begin, int64_t row_end,
                         void* out, const int64_t* row_map) {
  PK_LORA_DTYPE_SWITCH("lora_add_g_a", (add_g_a<D>(g, static_cast<const E*>(a), cols, rank, scale,
                                                   d, row_begin, row_end, static_cast<E*>(out),
                                                   row_map)));
}

void lora_x_at(SimdPath path, DType dtype, const void* x, const void* a, int64_t cols,
               int64_t rank, const Dropout& d, int64_t row_begin, int64_t row_end, void* out,
               const int64_t* row_map) {
  std::vector<float> scratch(size_t(lora_x_at_scratch(rank)));
  switch (path) {
    case SimdPath::AVX512:
      return lora_x_at_avx512(dtype, x, a, cols, rank, d, row_begin, row_end, out, scratch.data(),
                              row_map);
    case SimdPath::AVX2:
      return lora_x_at_avx2(dtype, x, a, cols, rank, d, row_begin, row_end, out, scratch.data(),
                              row_map);
    case SimdPath::Scalar:
      break;
  }
  lora_x_at_scalar(dtype, x, a, cols, rank, d, row_begin, row_end, out, scratch.data(), row_map);
}

void lora_gt_x(SimdPath path, DType dtype, const float* g, const void* x, int64_t rows,
               int64_t cols, int64_t rank, const Dropout& d, int64_t col_begin, int64_t col_end,
               void* out, const int64_t* row_map) {
  std::vector<float> scratch(size_t(lora_gt_x_scratch(rank, col_begin, col_end)));
  switch (path) {
    case SimdPath::AVX512:
      return lora_gt_x_avx512(dtype, g, x, rows, cols, rank, d, col_begin, col_end, out,
                              scratch.data(), row_map);
    case SimdPath::AVX2:
      return lora_gt_x_avx2(dtype, g, x, rows, cols, rank, d, col_begin, col_end, out,
                            scratch.data(), row_map);
    case SimdPath::Scalar:
      break;
  }
  lora_gt_x_scalar(dtype, g, x, rows, cols, rank, d, col_begin, col_end, out, scratch.data(),
                   row_map);
}

void lora_add_g_a(SimdPath path, DType dtype, const float* g, const void* a, int64_t cols,
                  int64_t rank, float scale, const Dropout& d, int64_t row_begin,
                  int64_t row_end, void* out, const int64_t* row_map) {
  switch (path) {
    case SimdPath::AVX512:
      return lora_add_g_a_avx512(dtype, g, a, cols, rank, scale, d, row_begin, row_end, out,
                                 row_map);
    case SimdPath::AVX2:
      return lora_add_g_a_avx2(dtype, g, a, cols, rank, scale, d, row_begin, row_end, out,
                                 row_map);
    case SimdPath::Scalar:
      break;
  }
  lora_add_g_a_scalar(dtype, g, a, cols, rank, scale, d, row_begin, row_end, out, row_map);
}

namespace {
void require_bf16_dots(const char* name) {
  if (!cpu_has_avx512_bf16())
    throw std::invalid_argument(std::string(name) + ": this CPU has no AVX512-BF16 dot products");
}
}  // namespace

void bf16_dots(const uint16_t* x, const uint16_t* a, int64_t cols, int64_t rank, float alpha,
               int64_t row_begin, int64_t row_end, uint16_t* out) {
  require_bf16_dots("bf16_dots");
  bf16_dots_avx512(x, a, cols, rank, alpha, row_begin, row_end, out);
}

void bf16_contract_rows(const uint16_t* g, const uint16_t* x, int64_t rows, int64_t cols,
                        int64_t rank, float alpha, bool transposed_out, int64_t col_begin,
                        int64_t col_end, uint16_t* out) {
  require_bf16_dots("bf16_contract_rows");
  bf16_contract_rows_avx512(g, x, rows, cols, rank, alpha, transposed_out, col_begin, col_end,
                            out);
}

void bf16_transpose(const uint16_t* src, int64_t rows, int64_t cols, int64_t row_begin,
                    int64_t row_end, uint16_t* dst) {
  require_bf16_dots("bf16_transpose");
  bf16_transpose_avx512(src, rows, cols, row_begin, row_end, dst);
}

void bf16_expand(const uint16_t* g, const uint16_t* b, bool b_transposed, const uint16_t* addend,
                 int64_t stride, int64_t rows, int64_t cols, int64_t rank, float alpha,
                 int64_t col_begin, int64_t col_end, uint16_t* out) {
  require_bf16_dots("bf16_expand");
  bf16_expand_avx512(g, b, b_transposed, addend, stride, rows, cols, rank, alpha, col_begin,
                     col_end, out);
}

void f32_rank_rows(SimdPath path, const float* m, int64_t a_stride, int64_t b_stride,
                   int64_t count_b, const float* v, int64_t rank, float alpha, int64_t a_begin,
                   int64_t a_end, float* out) {
  if (path == SimdPath::AVX512)
    return f32_rank_rows_avx512(m, a_stride, b_stride, count_b, v, rank, alpha, a_begin, a_end,
                                out);
  for (int64_t a = a_begin; a < a_end; ++a)
    for (int64_t k = 0; k < rank; ++k) {
      float sum = 0.0f;
      for (int64_t b = 0; b < count_b; ++b) sum += m[a * a_stride + b * b_stride] * v[b * rank + k];
      out[a * rank + k] = alpha * sum;
    }
}

void dropout_keep_mask(const Dropout& d, int64_t cols, int64_t row_begin, int64_t row_end,
                       uint8_t* keep) {
  for (int64_t t = row_begin; t < row_end; ++t) {
    const DropoutRow key = dropout_row(d.seed, uint64_t(t));
    for (int64_t i = 0; i < cols; ++i)
      keep[(t - row_begin) * cols + i] = !d.active() || dropout_keep(d, key, uint32_t(i));
  }
}

}  // namespace pykernels::cpu
