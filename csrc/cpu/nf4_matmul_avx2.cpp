// Fused NF4 linear kernels on AVX2 + FMA: a chunk of 32 elements is four 8-lane
// vectors (even columns 0-7 and 8-15 of the chunk, then odd 0-7 and 8-15).
// Decode: the 16-entry table as two 8-entry halves, looked up with
// permutevar8x32 (low 3 bits of the index) and blended on bit 3, which a shift
// by 28 moves into the sign bit blendv reads.
#if defined(__x86_64__) || defined(_M_X64)
// GCC 12 reports its own intrinsics' _mm*_undefined_* temporaries as (maybe-)uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include "nf4_matmul_paths.h"
#include "pykernels/blockwise8.h"

#define PK_MATMUL_TARGET __attribute__((target("avx2,f16c,fma")))

namespace pykernels::cpu {
namespace {

struct Avx2 {
  using Vec = __m256;
  struct Table {
    __m256 low, high;
  };
  static constexpr int kLanes = 8;
  static constexpr int kVecs = 4;
  static constexpr int kMaxTokens = 4;  // 8 accumulators + weights + x in 16 registers

  static PK_MATMUL_TARGET Table table() {
    return {_mm256_loadu_ps(kNF4Code), _mm256_loadu_ps(kNF4Code + 8)};
  }
  static PK_MATMUL_TARGET Vec lookup(const Table& table, __m256i index) {
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(table.low, index),
                            _mm256_permutevar8x32_ps(table.high, index),
                            _mm256_castsi256_ps(_mm256_slli_epi32(index, 28)));
  }
  static PK_MATMUL_TARGET void decode(const Table& table, const uint8_t* bytes, Vec* w) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes));
    const __m256i low_bytes = _mm256_cvtepu8_epi32(raw);
    const __m256i high_bytes = _mm256_cvtepu8_epi32(_mm_unpackhi_epi64(raw, raw));
    w[0] = lookup(table, _mm256_srli_epi32(low_bytes, 4));
    w[1] = lookup(table, _mm256_srli_epi32(high_bytes, 4));
    w[2] = lookup(table, low_bytes);
    w[3] = lookup(table, high_bytes);
  }
  // Lanes holding one of the chunk's first 2 * first_count elements get `first`.
  static PK_MATMUL_TARGET Vec split(float first, float second, int first_count, int v) {
    const __m256i position =
        _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32((v & 1) * 8));
    const __m256i in_first = _mm256_cmpgt_epi32(_mm256_set1_epi32(first_count), position);
    return _mm256_blendv_ps(_mm256_set1_ps(second), _mm256_set1_ps(first),
                            _mm256_castsi256_ps(in_first));
  }
  // Double-quantized absmax, 8 blocks a step: code[q] * scale[b / 256] + offset,
  // rounded after each operation as blockwise8_decode does; code[q] gathered,
  // scale broadcast (blended where the 8 cross a multiple of 256).
  static bool code_planes() { return false; }
  static PK_MATMUL_TARGET void decode_absmax(const NF4Matrix& w, const CodePlanes*, int64_t begin,
                                             int64_t end, float* out) {
    const __m256 offset = _mm256_set1_ps(w.absmax_offset);
    int64_t b = begin;
    for (; b + 8 <= end; b += 8) {
      const __m256i q =
          _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w.absmax_q + b)));
      const __m256 code = _mm256_i32gather_ps(w.absmax_code, q, 4);
      const float* scale = w.absmax_scale + (b >> 8);
      const int64_t first = kDoubleQuantBlocksize - (b & 255);  // lanes on scale[0]
      const __m256 s =
          first >= 8 ? _mm256_set1_ps(scale[0]) : split(scale[0], scale[1], int(first), 0);
      _mm256_storeu_ps(out + (b - begin), _mm256_add_ps(_mm256_mul_ps(code, s), offset));
    }
    nf4_decode_absmax(w, b, end, out + (b - begin));
  }
  static PK_MATMUL_TARGET Vec zero() { return _mm256_setzero_ps(); }
  static PK_MATMUL_TARGET Vec set1(float v) { return _mm256_set1_ps(v); }
  static PK_MATMUL_TARGET Vec load(const float* p) { return _mm256_loadu_ps(p); }
  static PK_MATMUL_TARGET void store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
  static PK_MATMUL_TARGET Vec add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
  static PK_MATMUL_TARGET Vec mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
  static PK_MATMUL_TARGET Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  static PK_MATMUL_TARGET float sum(Vec v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};

}  // namespace
}  // namespace pykernels::cpu

#include "nf4_matmul_simd.h"

namespace pykernels::cpu {

void nf4_matvec_avx2(DType dtype, const NF4Matrix& w, const float* x_packed, int64_t tokens,
                     int64_t row_begin, int64_t row_end, const void* bias, void* y) {
  matvec<Avx2>(dtype, w, x_packed, tokens, row_begin, row_end, bias, y);
}

void nf4_matvec_t_avx2(DType dtype, const NF4Matrix& w, const float* dy_t, int64_t tokens,
                       int64_t col_begin, int64_t col_end, void* dx) {
  matvec_t<Avx2>(dtype, w, dy_t, tokens, col_begin, col_end, dx);
}

}  // namespace pykernels::cpu

#else  // not x86-64: the dispatcher never selects this path; keep the symbols.
#include "nf4_matmul_paths.h"
namespace pykernels::cpu {
void nf4_matvec_avx2(DType d, const NF4Matrix& w, const float* x, int64_t t, int64_t r0,
                     int64_t r1, const void* b, void* y) {
  nf4_matvec_scalar(d, w, x, t, r0, r1, b, y);
}
void nf4_matvec_t_avx2(DType d, const NF4Matrix& w, const float* dy, int64_t t, int64_t c0,
                       int64_t c1, void* dx) {
  nf4_matvec_t_scalar(d, w, dy, t, c0, c1, dx);
}
}  // namespace pykernels::cpu
#endif
