// Internal to csrc/cpu: the per-instruction-set LoRA kernels behind the
// dispatcher in lora.cpp, and the few rules every path shares so that all give
// the same bits. All take the same arguments as pykernels::cpu::lora_* in cpu.h.
#pragma once
#include <stdexcept>

#include "pykernels/cpu.h"

namespace pykernels::cpu {

// Rows per tile of lora_gt_x's two-level sum, in every path (results agree bit for bit).
constexpr int64_t kLoraGtxRows = 32;

template <DType D> using Elem = typename Storage<D>::type;

// Each takes fp32 scratch of lora_x_at_scratch / lora_gt_x_scratch floats,
// allocated by the dispatcher (lora.cpp) so the SIMD files use no std containers.
#define PK_LORA_PATH(suffix)                                                                   \
  void lora_x_at_##suffix(DType dtype, const void* x, const void* a, int64_t cols,             \
                          int64_t rank, const Dropout& d, int64_t row_begin, int64_t row_end,  \
                          void* out, float* scratch, const int64_t* row_map);                  \
  void lora_gt_x_##suffix(DType dtype, const float* g, const void* x, int64_t rows,            \
                          int64_t cols, int64_t rank, const Dropout& d, int64_t col_begin,     \
                          int64_t col_end, void* out, float* scratch, const int64_t* row_map); \
  void lora_add_g_a_##suffix(DType dtype, const float* g, const void* a, int64_t cols,         \
                             int64_t rank, float scale, const Dropout& d, int64_t row_begin,   \
                             int64_t row_end, void* out, const int64_t* row_map);
PK_LORA_PATH(scalar)
PK_LORA_PATH(avx2)
PK_LORA_PATH(avx512)
#undef PK_LORA_PATH

// Defines one path's entry points as calls of x_at, gt_x and add_g_a with the
// same arguments: lora_tiles.h's bodies for the path's traits, or the scalar
// path on machines the path does not exist on (the dispatcher never picks it).
#define PK_LORA_ENTRY_POINTS(suffix, x_at, gt_x, add_g_a)                                      \
  void lora_x_at_##suffix(DType dtype, const void* x, const void* a, int64_t cols,             \
                          int64_t rank, const Dropout& d, int64_t row_begin, int64_t row_end,  \
                          void* out, float* scratch, const int64_t* row_map) {                 \
    x_at(dtype, x, a, cols, rank, d, row_begin, row_end, out, scratch, row_map);               \
  }                                                                                            \
  void lora_gt_x_##suffix(DType dtype, const float* g, const void* x, int64_t rows,            \
                          int64_t cols, int64_t rank, const Dropout& d, int64_t col_begin,     \
                          int64_t col_end, void* out, float* scratch, const int64_t* row_map) { \
    gt_x(dtype, g, x, rows, cols, rank, d, col_begin, col_end, out, scratch, row_map);         \
  }                                                                                            \
  void lora_add_g_a_##suffix(DType dtype, const float* g, const void* a, int64_t cols,         \
                             int64_t rank, float scale, const Dropout& d, int64_t row_begin,   \
                             int64_t row_end, void* out, const int64_t* row_map) {             \
    add_g_a(dtype, g, a, cols, rank, scale, d, row_begin, row_end, out, row_map);              \
  }

void bf16_dots_avx512(const uint16_t* x, const uint16_t* a, int64_t cols, int64_t rank,
                      float alpha, int64_t row_begin, int64_t row_end, uint16_t* out);
void bf16_contract_rows_avx512(const uint16_t* g, const uint16_t* x, int64_t rows, int64_t cols,
                               int64_t rank, float alpha, bool transposed_out, int64_t col_begin,
                               int64_t col_end, uint16_t* out);
void bf16_transpose_avx512(const uint16_t* src, int64_t rows, int64_t cols, int64_t row_begin,
                           int64_t row_end, uint16_t* dst);
void f32_rank_rows_avx512(const float* m, int64_t a_stride, int64_t b_stride, int64_t count_b,
                          const float* v, int64_t rank, float alpha, int64_t a_begin,
                          int64_t a_end, float* out);
void bf16_expand_avx512(const uint16_t* g, const uint16_t* b, bool b_transposed,
                        const uint16_t* addend, int64_t stride, int64_t rows, int64_t cols,
                        int64_t rank, float alpha, int64_t col_begin, int64_t col_end,
                        uint16_t* out);

// Runs `call` with E (the element type) and D (the DType) bound to dtype's.
#define PK_LORA_DTYPE_SWITCH(name, call)                     \
  switch (dtype) {                                           \
    case DType::F32: {                                       \
      using E = float;                                       \
      constexpr DType D = DType::F32;                        \
      call;                                                  \
      return;                                                \
    }                                                        \
    case DType::F16: {                                       \
      using E = uint16_t;                                    \
      constexpr DType D = DType::F16;                        \
      call;                                                  \
      return;                                                \
    }                                                        \
    case DType::BF16: {                                      \
      using E = uint16_t;                                    \
      constexpr DType D = DType::BF16;                       \
      call;                                                  \
      return;                                                \
    }                                                        \
  }                                                          \
  throw std::invalid_argument(name ": unknown dtype")

// lora_x_at's dot products keep 16 fp32 partial sums on every path: element i
// of a row accumulates (fused multiply-add, i ascending) into partial i % 16,
// and the partials are reduced in this one pairwise order.
constexpr int64_t kLoraLanes = 16;

// Row t of a kernel's range is row row_map[t] of every row-indexed buffer and of
// the dropout hash (row_map null: row t itself).
inline int64_t lora_row(const int64_t* row_map, int64_t t) { return row_map ? row_map[t] : t; }

constexpr int64_t lora_min(int64_t a, int64_t b) { return a < b ? a : b; }
constexpr int64_t lora_round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Scratch: x_at keeps 16 partial sums per (row, rank) of a tile of up to
// kLoraMaxTileRows rows; gt_x keeps fp32 sums [rank, width] for its column
// range, each row padded to a whole number of kLoraMaxTileCols-column tiles.
constexpr int64_t kLoraMaxTileRows = 8;
constexpr int64_t kLoraMaxTileCols = 64;
constexpr int64_t lora_x_at_scratch(int64_t rank) { return kLoraMaxTileRows * rank * kLoraLanes; }
constexpr int64_t lora_gt_x_stride(int64_t col_begin, int64_t col_end) {
  return lora_round_up(col_end - col_begin, kLoraMaxTileCols);
}
constexpr int64_t lora_gt_x_scratch(int64_t rank, int64_t col_begin, int64_t col_end) {
  return rank * lora_gt_x_stride(col_begin, col_end);
}

inline float lora_reduce_lanes(float* lanes) {
  for (int64_t width = kLoraLanes / 2; width >= 1; width /= 2)
    for (int64_t j = 0; j < width; ++j) lanes[j] = lanes[j] + lanes[j + width];
  return lanes[0];
}

}  // namespace pykernels::cpu
