// NF4 quantize / dequantize on the CPU: the scalar reference path and the
// dispatcher to the SIMD paths (nf4_avx2.cpp, nf4_avx512.cpp).
//
// Format and rounding rules: pykernels/nf4.h. A block is independent of every
// other (blocksize is even, so each block starts on a byte boundary), which is
// what lets callers split [0, num_blocks) freely across threads.
#include <cfloat>
#include <cmath>
#include <stdexcept>

#include "nf4_paths.h"
#include "pykernels/nf4.h"

namespace pykernels::cpu {
namespace {

template <DType D>
int64_t quantize_scalar(const typename Storage<D>::type* x, int64_t n, int64_t blocksize,
                        int64_t block_begin, int64_t block_end, uint8_t* packed, float* absmax) {
  int64_t first_bad = -1;
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t start = b * blocksize;
    const int64_t len = n - start < blocksize ? n - start : blocksize;
    const bool partial = len < blocksize;
    float block_max = 0.0f;
    bool finite = true;
    for (int64_t i = 0; i < len; ++i) {
      const float a = std::fabs(load_as_float<D>(x, start + i));
      finite &= a <= FLT_MAX;
      block_max = a > block_max ? a : block_max;
    }
    if (!finite && first_bad < 0) first_bad = b;
    absmax[b] = nf4_stored_absmax(block_max, partial);
    const float safe = nf4_safe_absmax(block_max);
    const float inverse = 1.0f / safe;
    auto code_of = [&](int64_t i) -> uint8_t {
      const float v = load_as_float<D>(x, start + i);
      return nf4_encode(partial ? v / safe : v * inverse);
    };
    for (int64_t i = 0; i < len; i += 2) {
      const uint8_t odd = i + 1 < len ? code_of(i + 1) : kNF4ZeroCode;
      packed[(start + i) >> 1] = nf4_pack(code_of(i), odd);
    }
  }
  return first_bad;
}

template <DType D>
void dequantize_scalar(const uint8_t* packed, const float* absmax, int64_t n, int64_t blocksize,
                       int64_t block_begin, int64_t block_end, typename Storage<D>::type* out) {
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t start = b * blocksize;
    const int64_t end = n - start < blocksize ? n : start + blocksize;
    const float scale = absmax[b];
    for (int64_t i = start; i < end; ++i)
      store_from_float<D>(out, i, nf4_decode(nf4_unpack(packed, i), scale));
  }
}

}  // namespace

int64_t nf4_quantize_scalar(DType dtype, const void* x, int64_t n, int64_t blocksize,
                            int64_t block_begin, int64_t block_end, uint8_t* packed,
                            float* absmax) {
  switch (dtype) {
    case DType::F32:
      return quantize_scalar<DType::F32>(static_cast<const float*>(x), n, blocksize, block_begin,
                                         block_end, packed, absmax);
    case DType::F16:
      return quantize_scalar<DType::F16>(static_cast<const uint16_t*>(x), n, blocksize,
                                         block_begin, block_end, packed, absmax);
    case DType::BF16:
      return quantize_scalar<DType::BF16>(static_cast<const uint16_t*>(x), n, blocksize,
                                          block_begin, block_end, packed, absmax);
  }
  throw std::invalid_argument("nf4_quantize: unknown dtype");
}

void nf4_dequantize_scalar(DType dtype, const uint8_t* packed, const float* absmax, int64_t n,
                           int64_t blocksize, int64_t block_begin, int64_t block_end,
                           void* out, bool /*reused_output: no streaming stores here*/) {
  switch (dtype) {
    case DType::F32:
      return dequantize_scalar<DType::F32>(packed, absmax, n, blocksize, block_begin, block_end,
                                           static_cast<float*>(out));
    case DType::F16:
      return dequantize_scalar<DType::F16>(packed, absmax, n, blocksize, block_begin, block_end,
                                           static_cast<uint16_t*>(out));
    case DType::BF16:
      return dequantize_scalar<DType::BF16>(packed, absmax, n, blocksize, block_begin, block_end,
                                            static_cast<uint16_t*>(out));
  }
  throw std::invalid_argument("nf4_dequantize: unknown dtype");
}

int64_t nf4_quantize(SimdPath path, DType dtype, const void* x, int64_t n, int64_t blocksize,
                     int64_t block_begin, int64_t block_end, uint8_t* packed, float* absmax) {
  switch (path) {
    case SimdPath::AVX512:
      return nf4_quantize_avx512(dtype, x, n, blocksize, block_begin, block_end, packed, absmax);
    case SimdPath::AVX2:
      return nf4_quantize_avx2(dtype, x, n, blocksize, block_begin, block_end, packed, absmax);
    case SimdPath::Scalar:
      break;
  }
  return nf4_quantize_scalar(dtype, x, n, blocksize, block_begin, block_end, packed, absmax);
}

void nf4_dequantize(SimdPath path, DType dtype, const uint8_t* packed, const float* absmax,
                    int64_t n, int64_t blocksize, int64_t block_begin, int64_t block_end,
                    void* out, bool reused_output) {
  switch (path) {
    case SimdPath::AVX512:
      return nf4_dequantize_avx512(dtype, packed, absmax, n, blocksize, block_begin, block_end,
                                   out, reused_output);
    case SimdPath::AVX2:
      return nf4_dequantize_avx2(dtype, packed, absmax, n, blocksize, block_begin, block_end,
                                 out);
    case SimdPath::Scalar:
      break;
  }
  nf4_dequantize_scalar(dtype, packed, absmax, n, blocksize, block_begin, block_end, out);
}

}  // namespace pykernels::cpu
