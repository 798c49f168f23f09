// NF4 on AVX-512 (F, BW, VL, DQ): 16 elements per step.
//
// Encode: the code of a scaled value v in [-1, 1] is the count of midpoints
// strictly below it, as the scalar path takes it. [-1, 1] is cut into 32 cells
// of 1/16; no two midpoints are closer than 0.08, so a cell holds at most one.
// A cell's lookup gives the count of midpoints below the cell and the midpoint
// inside it (or +max), and one compare against that midpoint finishes the
// count: two permutes and a compare instead of a 4-step binary search's four of
// each (2048^2 quantize in cache, one thread: fp32 1.37x, bf16 1.31x faster).
// The cell index is computed in float and may land one cell off for v within
// ~1e-7 of a cell edge; no midpoint lies within 0.001 of an edge, so the count
// is still exact.
// Decode: a lookup of the block's 16 values, scaled and rounded once per block
// (below). Nibble packing works on 64-bit lanes holding an (even, odd) pair of
// 32-bit codes.
#if defined(__x86_64__) || defined(_M_X64)
// GCC 12 reports its own intrinsics' _mm*_undefined_* temporaries as maybe-uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include <cfloat>

#include "nf4_paths.h"
#include "pykernels/nf4.h"

#define PK_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")))

namespace pykernels::cpu {
namespace {

template <DType D> PK_AVX512 inline __m512 load16(const typename Storage<D>::type* p) {
  if constexpr (D == DType::F32) {
    return _mm512_loadu_ps(p);
  } else if constexpr (D == DType::F16) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  } else {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
}

// 16 values in a half-precision dtype's bits.
template <DType D> PK_AVX512 inline __m256i to_half16(__m512 v) {
  if constexpr (D == DType::F16) {
    return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  } else {
    // Round to nearest even on the bits, as float_to_bf16 does (values are finite).
    const __m512i u = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
  }
}

// 32 floats to p. Streaming (non-temporal) stores skip the read-for-ownership a
// normal store does, so a large output costs its bytes once instead of twice;
// p must then be 64-byte aligned.
template <bool Stream> PK_AVX512 inline void store32(float* p, __m512 a, __m512 b) {
  if constexpr (Stream) {
    _mm512_stream_ps(p, a);
    _mm512_stream_ps(p + 16, b);
  } else {
    _mm512_storeu_ps(p, a);
    _mm512_storeu_ps(p + 16, b);
  }
}

// The 32 cells of 1/16 over [-1, 1]: midpoints below each cell, and the
// midpoint inside it (FLT_MAX where none, so the compare is false).
struct EncodeCells {
  float inner_midpoint[32];
  int32_t midpoints_below[32];
};

constexpr EncodeCells make_encode_cells() {
  EncodeCells cells{};
  for (int c = 0; c < 32; ++c) {
    const float lo = -1.0f + float(c) / 16.0f, hi = lo + 1.0f / 16.0f;
    cells.inner_midpoint[c] = FLT_MAX;
    for (int k = 0; k < 15; ++k) {
      if (kNF4Midpoint[k] < lo) ++cells.midpoints_below[c];
      else if (kNF4Midpoint[k] < hi) cells.inner_midpoint[c] = kNF4Midpoint[k];
    }
  }
  return cells;
}

constexpr EncodeCells kEncodeCells = make_encode_cells();

// What the cell lookup relies on: one midpoint per cell at most, none near an edge.
constexpr bool encode_cells_sound() {
  for (int k = 0; k < 15; ++k) {
    if (k > 0 && kNF4Midpoint[k] - kNF4Midpoint[k - 1] <= 1.0f / 16.0f) return false;
    const float position = (kNF4Midpoint[k] + 1.0f) * 16.0f;
    const float to_edge = position - float(int(position));
    if (to_edge < 0.016f || to_edge > 1.0f - 0.016f) return false;
  }
  return true;
}
static_assert(encode_cells_sound(), "NF4 midpoints too close for the 32-cell encoder");

struct Encoder {
  __m512 midpoint_lo, midpoint_hi;
  __m512i below_lo, below_hi;
  PK_AVX512 Encoder()
      : midpoint_lo(_mm512_loadu_ps(kEncodeCells.inner_midpoint)),
        midpoint_hi(_mm512_loadu_ps(kEncodeCells.inner_midpoint + 16)),
        below_lo(_mm512_loadu_si512(kEncodeCells.midpoints_below)),
        below_hi(_mm512_loadu_si512(kEncodeCells.midpoints_below + 16)) {}

  PK_AVX512 __m512i operator()(__m512 scaled) const {
    // v < -1 by rounding truncates to cell 0; v = 1 (or above) clamps to 31.
    const __m512 position = _mm512_mul_ps(_mm512_add_ps(scaled, _mm512_set1_ps(1.0f)), _mm512_set1_ps(16.0f));
    const __m512i cell = _mm512_min_epi32(_mm512_cvttps_epi32(position), _mm512_set1_epi32(31));
    const __m512 inner = _mm512_permutex2var_ps(midpoint_lo, cell, midpoint_hi);
    const __m512i below = _mm512_permutex2var_epi32(below_lo, cell, below_hi);
    const __mmask16 above = _mm512_cmp_ps_mask(scaled, inner, _CMP_GT_OQ);
    return _mm512_mask_add_epi32(below, above, below, _mm512_set1_epi32(1));
  }
};

// 16 codes in 32-bit lanes -> 8 packed bytes.
PK_AVX512 inline void pack16(__m512i codes, uint8_t* dst) {
  const __m512i even_high = _mm512_slli_epi64(_mm512_and_si512(codes, _mm512_set1_epi64(0xf)), 4);
  const __m512i odd_low = _mm512_srli_epi64(codes, 32);
  _mm_storel_epi64(reinterpret_cast<__m128i*>(dst),
                   _mm512_cvtepi64_epi8(_mm512_or_si512(even_high, odd_low)));
}

// 8 packed bytes -> 16 codes in 32-bit lanes, element order.
PK_AVX512 inline __m512i unpack16(const uint8_t* src) {
  const __m512i bytes =
      _mm512_cvtepu8_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src)));
  const __m512i high = _mm512_srli_epi64(bytes, 4);
  const __m512i low = _mm512_and_si512(bytes, _mm512_set1_epi64(0xf));
  return _mm512_or_si512(high, _mm512_slli_epi64(low, 32));
}

template <DType D>
PK_AVX512 int64_t quantize(const typename Storage<D>::type* x, int64_t n, int64_t blocksize,
                           int64_t block_begin, int64_t block_end, uint8_t* packed,
                           float* absmax) {
  const Encoder encode16;
  const __m512 largest = _mm512_set1_ps(FLT_MAX);
  const int64_t full_end = full_blocks_end(n, blocksize, block_end);
  int64_t first_bad = -1;
  for (int64_t b = block_begin; b < full_end; ++b) {
    const auto* block = x + b * blocksize;
    __m512 block_max = _mm512_setzero_ps();
    __mmask16 not_finite = 0;
    for (int64_t i = 0; i < blocksize; i += 16) {
      _mm_prefetch(reinterpret_cast<const char*>(block + i) + kQuantizePrefetchBytes, _MM_HINT_T0);
      const __m512 a = _mm512_abs_ps(load16<D>(block + i));
      not_finite |= _mm512_cmp_ps_mask(a, largest, _CMP_NLE_UQ);
      block_max = _mm512_max_ps(block_max, a);
    }
    if (not_finite && first_bad < 0) first_bad = b;
    const float m = _mm512_reduce_max_ps(block_max);
    absmax[b] = m;
    const __m512 inverse = _mm512_set1_ps(1.0f / nf4_safe_absmax(m));
    uint8_t* dst = packed + b * blocksize / 2;
    for (int64_t i = 0; i < blocksize; i += 16)
      pack16(encode16(_mm512_mul_ps(load16<D>(block + i), inverse)), dst + i / 2);
  }
  if (full_end < block_end) {
    const int64_t bad = nf4_quantize_scalar(D, x, n, blocksize, full_end, block_end, packed, absmax);
    if (first_bad < 0) first_bad = bad;
  }
  return first_bad;
}

// 16 packed bytes -> 32 codes in 16-bit lanes, element order: byte k's high
// nibble in word 2k, its low nibble (with the byte's bit 4 above it) in word
// 2k + 1. The 16-bit lookup reads 5 index bits, so the table holds its 16
// values twice and bit 4 picks the same value.
PK_AVX512 inline __m512i unpack32_words(const uint8_t* src) {
  const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  return _mm512_or_si512(_mm512_srli_epi32(bytes, 4), _mm512_slli_epi32(bytes, 16));
}

// Decode looks up values already scaled and rounded: per block, the 16 code
// values times absmax, rounded to the output dtype once. Every element of the
// block takes one of those 16 values, so the bytes are the scalar path's. For
// 16-bit outputs that is one word permute per 32 elements (4096^2 bf16 into a
// kept buffer, one thread: 3.1 -> 1.6 ms; it was a float permute, a multiply and a
// conversion per 16).
template <DType D, bool Stream>
PK_AVX512 void dequantize_full_blocks(const uint8_t* packed, const float* absmax, int64_t blocksize,
                                      int64_t block_begin, int64_t block_end,
                                      typename Storage<D>::type* out) {
  const __m512 code = _mm512_loadu_ps(kNF4Code);
  for (int64_t b = block_begin; b < block_end; ++b) {
    const __m512 values = _mm512_mul_ps(code, _mm512_set1_ps(absmax[b]));
    const uint8_t* src = packed + b * blocksize / 2;
    auto* dst = out + b * blocksize;
    if constexpr (D == DType::F32) {
      for (int64_t i = 0; i < blocksize; i += 32)
        store32<Stream>(dst + i, _mm512_permutexvar_ps(unpack16(src + i / 2), values),
                        _mm512_permutexvar_ps(unpack16(src + i / 2 + 8), values));
    } else {
      const __m256i half = to_half16<D>(values);
      const __m512i table = _mm512_inserti64x4(_mm512_castsi256_si512(half), half, 1);
      for (int64_t i = 0; i < blocksize; i += 32) {
        const __m512i words = _mm512_permutexvar_epi16(unpack32_words(src + i / 2), table);
        if constexpr (Stream) _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + i), words);
        else _mm512_storeu_si512(dst + i, words);
      }
    }
  }
  if constexpr (Stream) _mm_sfence();
}

// Reused outputs past this size stream to memory: they cannot stay in this
// machine's caches anyway (105 MiB L3 shared by everything), and streaming saves
// the read-for-ownership of every output line (8192^2 bf16 into a kept buffer:
// 17.3 -> 8.3 ms). A fresh allocation is different: the page fault leaves each
// page zeroed in the cache, and streaming past it made the allocating dequantize
// 6-20% slower than bitsandbytes' (normal stores: on par, 0.98-1.07x).
constexpr int64_t kStreamOutputBytes = int64_t(16) << 20;

template <DType D>
PK_AVX512 void dequantize(const uint8_t* packed, const float* absmax, int64_t n,
                          int64_t blocksize, int64_t block_begin, int64_t block_end,
                          typename Storage<D>::type* out, bool reused_output) {
  const int64_t full_end = full_blocks_end(n, blocksize, block_end);
  const bool aligned = reinterpret_cast<uintptr_t>(out) % 64 == 0;
  const bool stream =
      reused_output && aligned && n * int64_t(sizeof(*out)) >= kStreamOutputBytes;
  if (stream)
    dequantize_full_blocks<D, true>(packed, absmax, blocksize, block_begin, full_end, out);
  else
    dequantize_full_blocks<D, false>(packed, absmax, blocksize, block_begin, full_end, out);
  if (full_end < block_end)
    nf4_dequantize_scalar(D, packed, absmax, n, blocksize, full_end, block_end, out);
}

}  // namespace

int64_t nf4_quantize_avx512(DType dtype, const void* x, int64_t n, int64_t blocksize,
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

void nf4_dequantize_avx512(DType dtype, const uint8_t* packed, const float* absmax, int64_t n,
                           int64_t blocksize, int64_t block_begin, int64_t block_end,
                           void* out, bool reused_output) {
  switch (dtype) {
    case DType::F32:
      return dequantize<DType::F32>(packed, absmax, n, blocksize, block_begin, block_end,
                                    static_cast<float*>(out), reused_output);
    case DType::F16:
      return dequantize<DType::F16>(packed, absmax, n, blocksize, block_begin, block_end,
                                    static_cast<uint16_t*>(out), reused_output);
    case DType::BF16:
      return dequantize<DType::BF16>(packed, absmax, n, blocksize, block_begin, block_end,
                                     static_cast<uint16_t*>(out), reused_output);
  }
}

}  // namespace pykernels::cpu

#else  // not x86-64: the dispatcher never selects this path; keep the symbols.
#include "nf4_paths.h"
namespace pykernels::cpu {
int64_t nf4_quantize_avx512(DType d, const void* x, int64_t n, int64_t bs, int64_t b0, int64_t b1,
                            uint8_t* p, float* a) {
  return nf4_quantize_scalar(d, x, n, bs, b0, b1, p, a);
}
void nf4_dequantize_avx512(DType d, const uint8_t* p, const float* a, int64_t n, int64_t bs,
                           int64_t b0, int64_t b1, void* o, bool) {
  nf4_dequantize_scalar(d, p, a, n, bs, b0, b1, o);
}
}  // namespace pykernels::cpu
#endif
