// NF4 on AVX2 + F16C + FMA: 8 elements per step.
//
// Encode: 15 compares against the broadcast midpoints, each true lane adding 1
// (the count of midpoints strictly below the value). Decode: the 16-entry table
// as two 8-entry halves, looked up with permutevar8x32 and blended on bit 3.
#if defined(__x86_64__) || defined(_M_X64)
// GCC 12 reports its own intrinsics' _mm*_undefined_* temporaries as maybe-uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <cfloat>
#include <cstring>

#include "nf4_paths.h"
#include "pykernels/nf4.h"

#define PK_AVX2 __attribute__((target("avx2,f16c,fma")))

namespace pykernels::cpu {
namespace {

template <DType D> PK_AVX2 inline __m256 load8(const typename Storage<D>::type* p) {
  if constexpr (D == DType::F32) {
    return _mm256_loadu_ps(p);
  } else if constexpr (D == DType::F16) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  } else {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
}

template <DType D> PK_AVX2 inline void store8(typename Storage<D>::type* p, __m256 v) {
  if constexpr (D == DType::F32) {
    _mm256_storeu_ps(p, v);
  } else if constexpr (D == DType::F16) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_srli_epi32(
        _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd)), 16);
    // packus works per 128-bit lane: gather the two low quadwords afterwards.
    const __m256i narrow = _mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(narrow));
  }
}

PK_AVX2 inline __m256i encode8(__m256 scaled) {
  __m256i code = _mm256_setzero_si256();
  for (int j = 0; j < 15; ++j) {
    const __m256 above = _mm256_cmp_ps(scaled, _mm256_set1_ps(kNF4Midpoint[j]), _CMP_GT_OQ);
    code = _mm256_sub_epi32(code, _mm256_castps_si256(above));  // true lanes are -1
  }
  return code;
}

// 8 codes in 32-bit lanes -> 4 packed bytes.
PK_AVX2 inline void pack8(__m256i codes, uint8_t* dst) {
  const __m256i even_high = _mm256_slli_epi64(_mm256_and_si256(codes, _mm256_set1_epi64x(0xf)), 4);
  const __m256i bytes = _mm256_or_si256(even_high, _mm256_srli_epi64(codes, 32));
  // One byte per 64-bit lane: bytes 0 and 8 of each 128-bit half.
  const __m256i gathered = _mm256_shuffle_epi8(
      bytes, _mm256_setr_epi8(0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 8,
                              -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1));
  const uint32_t word = uint32_t(_mm_cvtsi128_si32(_mm256_castsi256_si128(gathered)) & 0xffff) |
                        (uint32_t(_mm_cvtsi128_si32(_mm256_extracti128_si256(gathered, 1))) << 16);
  std::memcpy(dst, &word, 4);
}

// 4 packed bytes -> 8 codes in 32-bit lanes, element order.
PK_AVX2 inline __m256i unpack8(const uint8_t* src) {
  int32_t word;
  std::memcpy(&word, src, 4);
  const __m256i bytes = _mm256_cvtepu8_epi64(_mm_cvtsi32_si128(word));
  const __m256i high = _mm256_srli_epi64(bytes, 4);
  const __m256i low = _mm256_and_si256(bytes, _mm256_set1_epi64x(0xf));
  return _mm256_or_si256(high, _mm256_slli_epi64(low, 32));
}

PK_AVX2 inline __m256 lookup8(__m256i codes, __m256 table_low, __m256 table_high) {
  const __m256 low = _mm256_permutevar8x32_ps(table_low, codes);
  const __m256 high = _mm256_permutevar8x32_ps(table_high, codes);
  const __m256 upper_half = _mm256_castsi256_ps(_mm256_cmpgt_epi32(codes, _mm256_set1_epi32(7)));
  return _mm256_blendv_ps(low, high, upper_half);
}

PK_AVX2 inline float horizontal_max(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

template <DType D>
PK_AVX2 int64_t quantize(const typename Storage<D>::type* x, int64_t n, int64_t blocksize,
                         int64_t block_begin, int64_t block_end, uint8_t* packed,
                         float* absmax) {
  const __m256 sign_off = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 largest = _mm256_set1_ps(FLT_MAX);
  const int64_t full_end = full_blocks_end(n, blocksize, block_end);
  int64_t first_bad = -1;
  for (int64_t b = block_begin; b < full_end; ++b) {
    const auto* block = x + b * blocksize;
    __m256 block_max = _mm256_setzero_ps();
    int not_finite = 0;
    for (int64_t i = 0; i < blocksize; i += 8) {
      _mm_prefetch(reinterpret_cast<const char*>(block + i) + kQuantizePrefetchBytes, _MM_HINT_T0);
      const __m256 a = _mm256_and_ps(load8<D>(block + i), sign_off);
      not_finite |= _mm256_movemask_ps(_mm256_cmp_ps(a, largest, _CMP_NLE_UQ));
      block_max = _mm256_max_ps(block_max, a);
    }
    if (not_finite && first_bad < 0) first_bad = b;
    const float m = horizontal_max(block_max);
    absmax[b] = m;
    const __m256 inverse = _mm256_set1_ps(1.0f / nf4_safe_absmax(m));
    uint8_t* dst = packed + b * blocksize / 2;
    for (int64_t i = 0; i < blocksize; i += 8)
      pack8(encode8(_mm256_mul_ps(load8<D>(block + i), inverse)), dst + i / 2);
  }
  if (full_end < block_end) {
    const int64_t bad = nf4_quantize_scalar(D, x, n, blocksize, full_end, block_end, packed, absmax);
    if (first_bad < 0) first_bad = bad;
  }
  return first_bad;
}

template <DType D>
PK_AVX2 void dequantize(const uint8_t* packed, const float* absmax, int64_t n, int64_t blocksize,
                        int64_t block_begin, int64_t block_end, typename Storage<D>::type* out) {
  const __m256 table_low = _mm256_loadu_ps(kNF4Code);
  const __m256 table_high = _mm256_loadu_ps(kNF4Code + 8);
  const int64_t full_end = full_blocks_end(n, blocksize, block_end);
  for (int64_t b = block_begin; b < full_end; ++b) {
    const __m256 scale = _mm256_set1_ps(absmax[b]);
    const uint8_t* src = packed + b * blocksize / 2;
    auto* dst = out + b * blocksize;
    for (int64_t i = 0; i < blocksize; i += 8)
      store8<D>(dst + i, _mm256_mul_ps(lookup8(unpack8(src + i / 2), table_low, table_high), scale));
  }
  if (full_end < block_end)
    nf4_dequantize_scalar(D, packed, absmax, n, blocksize, full_end, block_end, out);
}

}  // namespace

int64_t nf4_quantize_avx2(DType dtype, const void* x, int64_t n, int64_t blocksize,
                          int64_t block_begin, int64_t block_end, uint8_t* packed,
                          float* absmax) {
  switch (dtype) {
    case DType::F32:
      return quantize<DType::F32>(static_cast<const float*>(x), n, blocksize, block_begin,
                                  block_end, packed, absmax);
    case DType::F16:
      return quantize<DType::F16>(static_cast<const uint16_t*>(x), n, blocksize, block_begin,
                                  block_end, packed, absmax);
    case DType::BF16:
      return quantize<DType::BF16>(static_cast<const uint16_t*>(x), n, blocksize, block_begin,
                                   block_end, packed, absmax);
  }
  return nf4_quantize_scalar(dtype, x, n, blocksize, block_begin, block_end, packed, absmax);
}

void nf4_dequantize_avx2(DType dtype, const uint8_t* packed, const float* absmax, int64_t n,
                         int64_t blocksize, int64_t block_begin, int64_t block_end, void* out,
                         bool /*reused_output: no streaming stores here*/) {
  switch (dtype) {
    case DType::F32:
      return dequantize<DType::F32>(packed, absmax, n, blocksize, block_begin, block_end,
                                    static_cast<float*>(out));
    case DType::F16:
      return dequantize<DType::F16>(packed, absmax, n, blocksize, block_begin, block_end,
                                    static_cast<uint16_t*>(out));
    case DType::BF16:
      return dequantize<DType::BF16>(packed, absmax, n, blocksize, block_begin, block_end,
                                     static_cast<uint16_t*>(out));
  }
}

}  // namespace pykernels::cpu

#else  // not x86-64: the dispatcher never selects this path; keep the symbols.
#include "nf4_paths.h"
namespace pykernels::cpu {
int64_t nf4_quantize_avx2(DType d, const void* x, int64_t n, int64_t bs, int64_t b0, int64_t b1,
                          uint8_t* p, float* a) {
  return nf4_quantize_scalar(d, x, n, bs, b0, b1, p, a);
}
void nf4_dequantize_avx2(DType d, const uint8_t* p, const float* a, int64_t n, int64_t bs,
                         int64_t b0, int64_t b1, void* o, bool) {
  nf4_dequantize_scalar(d, p, a, n, bs, b0, b1, o);
}
}  // namespace pykernels::cpu
#endif
