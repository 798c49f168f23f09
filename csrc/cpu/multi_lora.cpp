// Multi-LoRA on the CPU (punica's SGMV, segment by segment): many adapters
// resident in one layer, each batch row picking its own,
//   y[t] = base(x[t]) + s[id] (drop(x[t]) A[id]^T) B[id]^T,   id = ids[row of t]
// with A_all [n, r, in], B_all [n, out, r] and t a token row (a batch row spans
// `tokens` of them; id -1: the base only).
//
// The batch's token rows are grouped by adapter once (multi_lora_segments, a
// counting sort), and each adapter's rows run as one skinny product through the
// LoRA kernels (lora.cpp, the SIMD tile bodies of lora_tiles.h) with the segment
// as their row map: x, xa, dy and dx are read and written where they lie, never
// gathered, and the dropout hash sees a row's own index, so a batch whose rows
// all pick one adapter draws the single-adapter op's mask.
//
// The products (per adapter a, over its rows; B^T is bt [r, out]):
//   x_at     xa = drop(x) A[a]^T                          (forward)
//   add_g_a  y += s[a] xa B[a]^T;  dx += drop'(dxa A[a])  (forward, backward)
//   x_at     dxa = dy bt[a]^T = dy B[a]                    (backward, then scaled)
//   gt_x     dA[a] = dxa^T drop(x);  dB[a]^T = s[a] xa^T dy (backward)
// Bits: those of the LoRA kernels, row by row, whatever the split into ranges.
#include <algorithm>

#include "lora_paths.h"

namespace pykernels::cpu {
namespace {

int64_t elem_size(DType dtype) { return dtype == DType::F32 ? 4 : 2; }

const char* adapter_ptr(const void* all, DType dtype, int64_t adapter, int64_t per_adapter) {
  return static_cast<const char*>(all) + adapter * per_adapter * elem_size(dtype);
}

// Calls f(adapter, begin, end) for each adapter's share of positions [pos_begin, pos_end).
template <class F>
void for_segments(const int64_t* offsets, int64_t n_adapters, int64_t pos_begin, int64_t pos_end,
                  F f) {
  // The first adapter whose segment ends past pos_begin.
  int64_t a = std::upper_bound(offsets + 1, offsets + n_adapters + 1, pos_begin) - (offsets + 1);
  for (; a < n_adapters && offsets[a] < pos_end; ++a) {
    const int64_t begin = std::max(pos_begin, offsets[a]), end = std::min(pos_end, offsets[a + 1]);
    if (begin < end) f(a, begin, end);
  }
}

}  // namespace

int64_t multi_lora_segments(const int64_t* ids, int64_t batch_rows, int64_t tokens,
                            int64_t n_adapters, int64_t* order, int64_t* offsets) {
  std::fill(offsets, offsets + n_adapters + 1, 0);
  for (int64_t b = 0; b < batch_rows; ++b)
    if (ids[b] >= 0) offsets[ids[b] + 1] += tokens;
  for (int64_t a = 0; a < n_adapters; ++a) offsets[a + 1] += offsets[a];
  // offsets[a] is then the next free position of adapter a; shifted back after.
  for (int64_t b = 0; b < batch_rows; ++b) {
    if (ids[b] < 0) continue;
    int64_t& next = offsets[ids[b]];
    for (int64_t t = 0; t < tokens; ++t) order[next++] = b * tokens + t;
  }
  for (int64_t a = n_adapters; a > 0; --a) offsets[a] = offsets[a - 1];
  offsets[0] = 0;
  return offsets[n_adapters];
}

void multi_lora_x_at(SimdPath path, DType dtype, const void* x, const void* a_all, int64_t cols,
                     int64_t rank, const Dropout& d, const int64_t* order, const int64_t* offsets,
                     int64_t n_adapters, int64_t pos_begin, int64_t pos_end, void* out) {
  for_segments(offsets, n_adapters, pos_begin, pos_end, [&](int64_t a, int64_t b, int64_t e) {
    lora_x_at(path, dtype, x, adapter_ptr(a_all, dtype, a, rank * cols), cols, rank, d, b, e, out,
              order);
  });
}

void multi_lora_add_g_a(SimdPath path, DType dtype, const float* g, const void* a_all,
                        int64_t cols, int64_t rank, const float* scales, float scale,
                        const Dropout& d, const int64_t* order, const int64_t* offsets,
                        int64_t n_adapters, int64_t pos_begin, int64_t pos_end, void* out) {
  for_segments(offsets, n_adapters, pos_begin, pos_end, [&](int64_t a, int64_t b, int64_t e) {
    lora_add_g_a(path, dtype, g, adapter_ptr(a_all, dtype, a, rank * cols), cols, rank,
                 scales ? scale * scales[a] : scale, d, b, e, out, order);
  });
}

void multi_lora_gt_x(SimdPath path, DType dtype, const float* g, const void* x, int64_t cols,
                     int64_t rank, const Dropout& d, const int64_t* order, const int64_t* offsets,
                     int64_t adapter, int64_t col_begin, int64_t col_end, void* out_all) {
  const int64_t begin = offsets[adapter], rows = offsets[adapter + 1] - begin;
  void* out = const_cast<char*>(adapter_ptr(out_all, dtype, adapter, rank * cols));
  lora_gt_x(path, dtype, g, x, rows, cols, rank, d, col_begin, col_end, out, order + begin);
}

}  // namespace pykernels::cpu
