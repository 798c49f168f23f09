// The many-token path of the NF4 linear layer, for any device (design:
// nf4_linear.h): W is decoded one tile at a time into a reused buffer in the
// activation's dtype and each tile goes to at::mm (oneDNN / MKL, cuBLAS):
//   forward   row tiles     y[:, r0:r1] = x·tileᵀ (+ bias[r0:r1])
//   backward  column tiles  dx[:, c0:c1] = dy·tile, 64-column multiples
// Every output element comes from one GEMM over the whole inner dimension, so
// nothing accumulates in low precision across tiles. Extra memory: one tile of
// at most tile_bytes (one row or 64 columns when those are larger).
//
// decode(row_begin, row_end, col_begin, col_end, tile) writes that rectangle of
// W into the start of tile, row-major, in tile's dtype: the device's decoder.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include <algorithm>

namespace pykernels::binding {

// y [T, rows] = x2 [T, cols]·Wᵀ (+ bias [rows] when defined), W [rows, cols], rows >= 1.
template <class Decode>
void nf4_forward_tiled(const Decode& decode, int64_t rows, int64_t cols, int64_t tile_bytes,
                       const at::Tensor& x2, const at::Tensor& bias, at::Tensor& y) {
  const int64_t tile_elements = tile_bytes / x2.element_size();
  const int64_t tile_rows =
      std::clamp<int64_t>(tile_elements / std::max<int64_t>(cols, 1), 1, rows);
  at::Tensor tile = at::empty({tile_rows, cols}, x2.options());
  for (int64_t r0 = 0; r0 < rows; r0 += tile_rows) {
    const int64_t n = std::min(tile_rows, rows - r0);
    decode(r0, r0 + n, 0, cols, tile);
    const at::Tensor w_t = tile.narrow(0, 0, n).t();
    at::Tensor y_rows = y.narrow(1, r0, n);
    if (bias.defined()) at::addmm_out(y_rows, bias.narrow(0, r0, n), x2, w_t);
    else at::mm_out(y_rows, x2, w_t);
  }
}

// dx [T, cols] = dy2 [T, rows]·W, W [rows, cols], cols >= 1.
template <class Decode>
void nf4_backward_tiled(const Decode& decode, int64_t rows, int64_t cols, int64_t tile_bytes,
                        const at::Tensor& dy2, at::Tensor& dx) {
  const int64_t tile_elements = tile_bytes / dy2.element_size();
  const int64_t tile_cols = std::min(
      cols, std::max<int64_t>(64, tile_elements / std::max<int64_t>(rows, 1) / 64 * 64));
  at::Tensor tile = at::empty({rows * tile_cols}, dy2.options());
  for (int64_t c0 = 0; c0 < cols; c0 += tile_cols) {
    const int64_t n = std::min(tile_cols, cols - c0);
    decode(0, rows, c0, c0 + n, tile);
    at::Tensor dx_cols = dx.narrow(1, c0, n);
    at::mm_out(dx_cols, dy2, tile.narrow(0, 0, rows * n).view({rows, n}));
  }
}

}  // namespace pykernels::binding
