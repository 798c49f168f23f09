// NF4 linear on the CPU, straight from the packed codes: the scalar reference
// path of the fused kernels, their dispatcher (SIMD paths: nf4_matmul_avx2.cpp,
// nf4_matmul_avx512.cpp), and the tile decoder the many-token path hands to a GEMM.
//
//   W[j, i] = code[q(g)] * absmax(g / blocksize),  g = j * cols + i
//   matvec    y[t, j]  = sum_i x[t, i] W[j, i] (+ bias[j])   rows split by the caller
//   matvec_t  dx[t, i] = sum_j dy[t, j] W[j, i]              columns split by the caller
//
// Both accumulate in fp32 and round once to the output dtype. Layouts of
// x_packed and of the transposed kernel's accumulators: nf4_matmul_paths.h.
#include <algorithm>
#include <cstring>

#include "nf4_matmul_paths.h"
#include "nf4_paths.h"
#include "pykernels/blockwise8.h"

namespace pykernels::cpu {
namespace {

int64_t element_size(DType dtype) { return dtype == DType::F32 ? 4 : 2; }

// Elements [begin, end) of the flattened W into out (dtype). Runs of whole
// blocks go to nf4_dequantize as they are; the part of a block at either end
// goes as a block of its own (a multiple of 32 elements from an even element,
// which every path decodes with its vector loop), the rest element by element.
void decode_range(SimdPath path, DType dtype, const NF4Matrix& w, const BlockAbsmax& absmax,
                  int64_t begin, int64_t end, char* out) {
  const int64_t bs = w.blocksize;
  const int64_t size = element_size(dtype);
  auto one = [&](int64_t g) { store_value(dtype, out, g - begin, absmax.weight(g)); };
  auto run = [&](int64_t from, int64_t to, int64_t blocksize) {  // from even
    const float* block_absmax = absmax.values() + (from / bs - absmax.first_block());
    nf4_dequantize(path, dtype, w.packed + from / 2, block_absmax, to - from, blocksize, 0,
                   ceil_div(to - from, blocksize), out + (from - begin) * size);
  };
  auto part_of_block = [&](int64_t from, int64_t to) {
    if (from < to && (from & 1)) one(from++);
    const int64_t vector_end = from + (to - from) / kChunk * kChunk;
    if (vector_end > from) run(from, vector_end, vector_end - from);
    for (int64_t g = vector_end; g < to; ++g) one(g);
  };
  const int64_t head_end = std::min(end, ceil_div(begin, bs) * bs);
  const int64_t tail_begin = end == w.rows * w.cols ? end : std::max(head_end, end / bs * bs);
  part_of_block(begin, head_end);
  if (tail_begin > head_end) run(head_end, tail_begin, bs);
  part_of_block(tail_begin, end);
}

}  // namespace

void nf4_decode_absmax(const NF4Matrix& w, int64_t block_begin, int64_t block_end, float* out) {
  if (w.absmax != nullptr) {
    std::memcpy(out, w.absmax + block_begin, size_t(block_end - block_begin) * sizeof(float));
    return;
  }
  for (int64_t b = block_begin; b < block_end; ++b)
    out[b - block_begin] = blockwise8_decode(w.absmax_code, w.absmax_q[b],
                                             w.absmax_scale[b / kDoubleQuantBlocksize],
                                             w.absmax_offset);
}

void nf4_dequantize_tile(SimdPath path, DType dtype, const NF4Matrix& w, int64_t row_begin,
                         int64_t row_end, int64_t col_begin, int64_t col_end, void* out) {
  BlockAbsmax absmax(w);
  char* dst = static_cast<char*>(out);
  if (col_begin == 0 && col_end == w.cols) {  // whole rows: one contiguous range
    const int64_t begin = row_begin * w.cols, end = row_end * w.cols;
    absmax.load(begin, end);
    decode_range(path, dtype, w, absmax, begin, end, dst);
    return;
  }
  const int64_t width = col_end - col_begin;
  for (int64_t j = row_begin; j < row_end; ++j) {
    const int64_t begin = j * w.cols + col_begin;
    absmax.load(begin, begin + width);
    decode_range(path, dtype, w, absmax, begin, begin + width,
                 dst + (j - row_begin) * width * element_size(dtype));
  }
}

int64_t nf4_matvec_x_size(int64_t tokens, int64_t cols) {
  return x_copies(cols) * tokens * padded_cols(cols);
}

bool nf4_matvec_bf16_dots(SimdPath path, DType dtype, const NF4Matrix& w) {
  return bf16_dots_run(path) && dtype == DType::BF16 && w.cols % kBf16Step == 0 &&
         w.blocksize % kBf16Step == 0;
}

void nf4_matvec_pack_x(SimdPath path, DType dtype, const NF4Matrix& w, const void* x,
                       int64_t tokens, float* x_packed) {
  const int64_t cols = w.cols;
  if (nf4_matvec_bf16_dots(path, dtype, w)) {
    const auto* src = static_cast<const uint16_t*>(x);
    auto* dst = reinterpret_cast<uint16_t*>(x_packed);
    for (int64_t r = 0; r < tokens * cols; ++r)
      dst[(r & ~(kBf16Step - 1)) | ((r & 1) << 5) | ((r & (kBf16Step - 1)) >> 1)] = src[r];
    return;
  }
  const int64_t stride = padded_cols(cols);
  for (int64_t copy = 0; copy < x_copies(cols); ++copy)
    for (int64_t t = 0; t < tokens; ++t) {
      float* dst = x_packed + (copy * tokens + t) * stride;
      std::fill(dst, dst + stride, 0.0f);
      for (int64_t r = 0; r + copy < cols; ++r)
        dst[chunk_position(r)] = load_value(dtype, x, t * cols + r + copy);
    }
}

// ---- scalar reference path: one element at a time, in column / row order ----

void nf4_matvec_scalar(DType dtype, const NF4Matrix& w, const float* x_packed, int64_t tokens,
                       int64_t row_begin, int64_t row_end, const void* bias, void* y) {
  const int64_t stride = padded_cols(w.cols);
  BlockAbsmax absmax(w);
  for (int64_t j = row_begin; j < row_end; ++j) {
    const int64_t start = j * w.cols;
    absmax.load(start, start + w.cols);
    for (int64_t t = 0; t < tokens; ++t) {
      const float* x = x_packed + t * stride;
      float sum = 0.0f;
      for (int64_t i = 0; i < w.cols; ++i) sum += x[chunk_position(i)] * absmax.weight(start + i);
      if (bias != nullptr) sum += load_value(dtype, bias, j);
      store_value(dtype, y, t * w.rows + j, sum);
    }
  }
}

void nf4_matvec_t_scalar(DType dtype, const NF4Matrix& w, const float* dy_t, int64_t tokens,
                         int64_t col_begin, int64_t col_end, void* dx) {
  const int64_t width = col_end - col_begin;
  std::vector<float> acc(size_t(tokens * width), 0.0f);
  BlockAbsmax absmax(w);
  for (int64_t j = 0; j < w.rows; ++j) {
    const int64_t start = j * w.cols + col_begin;
    absmax.load(start, start + width);
    for (int64_t i = 0; i < width; ++i) {
      const float weight = absmax.weight(start + i);
      for (int64_t t = 0; t < tokens; ++t)
        acc[size_t(t * width + i)] += dy_t[j * tokens + t] * weight;
    }
  }
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t i = 0; i < width; ++i)
      store_value(dtype, dx, t * w.cols + col_begin + i, acc[size_t(t * width + i)]);
}

// ---- dispatch ----

void nf4_matvec(SimdPath path, DType dtype, const NF4Matrix& w, const float* x_packed,
                int64_t tokens, int64_t row_begin, int64_t row_end, const void* bias, void* y) {
  if (nf4_matvec_bf16_dots(path, dtype, w))
    return nf4_matvec_bf16_avx512(w, reinterpret_cast<const uint16_t*>(x_packed), tokens,
                                  row_begin, row_end, bias, y);
  switch (path) {
    case SimdPath::AVX512:
      return nf4_matvec_avx512(dtype, w, x_packed, tokens, row_begin, row_end, bias, y);
    case SimdPath::AVX2:
      return nf4_matvec_avx2(dtype, w, x_packed, tokens, row_begin, row_end, bias, y);
    case SimdPath::Scalar:
      break;
  }
  nf4_matvec_scalar(dtype, w, x_packed, tokens, row_begin, row_end, bias, y);
}

void nf4_matvec_t(SimdPath path, DType dtype, const NF4Matrix& w, const float* dy_t,
                  int64_t tokens, int64_t col_begin, int64_t col_end, void* dx) {
  switch (path) {
    case SimdPath::AVX512:
      return nf4_matvec_t_avx512(dtype, w, dy_t, tokens, col_begin, col_end, dx);
    case SimdPath::AVX2:
      return nf4_matvec_t_avx2(dtype, w, dy_t, tokens, col_begin, col_end, dx);
    case SimdPath::Scalar:
      break;
  }
  nf4_matvec_t_scalar(dtype, w, dy_t, tokens, col_begin, col_end, dx);
}

}  // namespace pykernels::cpu
