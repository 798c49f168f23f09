// 8-bit blockwise quantize / dequantize on the CPU (format: pykernels/blockwise8.h).
// It only ever runs on NF4's absmax vector (n / 64 values), so one scalar path
// is enough: 4096x11008 has 704k absmax values, about 1 ms here.
#include "pykernels/blockwise8.h"

#include <cmath>

#include "pykernels/cpu.h"

namespace pykernels::cpu {

void blockwise8_build_lut(const float* code, uint8_t* lut) {
  int j = 0;
  for (int64_t i = 0; i < kBlockwise8LutSize; ++i) {
    const float value = blockwise8_lut_value(i);
    while (j < 255 && blockwise8_midpoint(code, j) < value) ++j;
    lut[i] = uint8_t(j);
  }
}

void blockwise8_quantize(const float* x, int64_t n, int64_t blocksize, const uint8_t* lut,
                         int64_t block_begin, int64_t block_end, uint8_t* q, float* absmax) {
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t start = b * blocksize;
    const int64_t end = n - start < blocksize ? n : start + blocksize;
    float block_max = 0.0f;
    for (int64_t i = start; i < end; ++i) block_max = std::fmax(block_max, std::fabs(x[i]));
    absmax[b] = block_max;
    if (block_max == 0.0f) {
      for (int64_t i = start; i < end; ++i) q[i] = 0;
      continue;
    }
    const float inverse = 1.0f / block_max;
    for (int64_t i = start; i < end; ++i) q[i] = lut[blockwise8_lut_index(x[i] * inverse)];
  }
}

void blockwise8_dequantize(const uint8_t* q, const float* absmax, const float* code,
                           float offset, int64_t n, int64_t blocksize, int64_t block_begin,
                           int64_t block_end, float* out) {
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t start = b * blocksize;
    const int64_t end = n - start < blocksize ? n : start + blocksize;
    for (int64_t i = start; i < end; ++i) out[i] = blockwise8_decode(code, q[i], absmax[b], offset);
  }
}

}  // namespace pykernels::cpu
