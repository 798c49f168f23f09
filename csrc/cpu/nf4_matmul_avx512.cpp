// Fused NF4 linear kernels on AVX-512 (F, BW, VL, DQ; VBMI, where present, for
// the double-quant absmax): a chunk of 32 elements is two 16-lane vectors.
// Decode: the 16 packed bytes zero-extended to 32-bit lanes; permutexvar reads
// only the low 4 bits of each index, so the byte itself looks up its low nibble
// (odd columns) and byte >> 4 its high one (even columns): three shuffles per
// 32 weights.
#if defined(__x86_64__) || defined(_M_X64)
// GCC 12 reports its own intrinsics' _mm*_undefined_* temporaries as (maybe-)uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include <utility>

#include "nf4_matmul_paths.h"
#include "pykernels/blockwise8.h"

#define PK_MATMUL_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")))

namespace pykernels::cpu {
namespace {

// code[q[i]] for i < n (a multiple of 64) into out, 64 at a time with AVX512-VBMI:
// each byte of the fp32 code from its plane by two 128-entry byte permutes and a
// blend on q's top bit, then the four planes' bytes interleaved (8 then 16 bits,
// within 128-bit lanes). That interleave leaves value 16L + 4k + i of the 64 in
// lane 4L + i of vector k, so the q go in with their dwords transposed (4 x 4) and
// come out in order.
__attribute__((target("avx512f,avx512bw,avx512vbmi"))) void lookup_codes(
    const CodePlanes& planes, const uint8_t* q, int64_t n, float* out) {
  __m512i table[4][4];  // [plane][64-entry quarter]
  for (int p = 0; p < 4; ++p)
    for (int h = 0; h < 4; ++h) table[p][h] = _mm512_load_si512(planes.bytes[p] + 64 * h);
  const __m512i transpose = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  for (int64_t i = 0; i < n; i += 64) {
    const __m512i index = _mm512_permutexvar_epi32(transpose, _mm512_loadu_si512(q + i));
    const __mmask64 upper = _mm512_movepi8_mask(index);  // q >= 128
    __m512i byte[4];
    for (int p = 0; p < 4; ++p)
      byte[p] = _mm512_mask_blend_epi8(upper,
                                       _mm512_permutex2var_epi8(table[p][0], index, table[p][1]),
                                       _mm512_permutex2var_epi8(table[p][2], index, table[p][3]));
    const __m512i low01 = _mm512_unpacklo_epi8(byte[0], byte[1]);
    const __m512i high01 = _mm512_unpackhi_epi8(byte[0], byte[1]);
    const __m512i low23 = _mm512_unpacklo_epi8(byte[2], byte[3]);
    const __m512i high23 = _mm512_unpackhi_epi8(byte[2], byte[3]);
    _mm512_storeu_si512(out + i, _mm512_unpacklo_epi16(low01, low23));
    _mm512_storeu_si512(out + i + 16, _mm512_unpackhi_epi16(low01, low23));
    _mm512_storeu_si512(out + i + 32, _mm512_unpacklo_epi16(high01, high23));
    _mm512_storeu_si512(out + i + 48, _mm512_unpackhi_epi16(high01, high23));
  }
}

struct Avx512 {
  using Vec = __m512;
  using Table = __m512;
  static constexpr int kLanes = 16;
  static constexpr int kVecs = 2;
  static constexpr int kMaxTokens = 8;  // 16 accumulators + weights + x in 32 registers

  static PK_MATMUL_TARGET Table table() { return _mm512_loadu_ps(kNF4Code); }
  static PK_MATMUL_TARGET void decode(Table table, const uint8_t* bytes, Vec* w) {
    const __m512i b =
        _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
    w[0] = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);
    w[1] = _mm512_permutexvar_ps(b, table);
  }
  // Lanes holding one of the chunk's first 2 * first_count elements get `first`.
  static PK_MATMUL_TARGET Vec split(float first, float second, int first_count, int) {
    return _mm512_mask_blend_ps(__mmask16((1u << first_count) - 1), _mm512_set1_ps(second),
                                _mm512_set1_ps(first));
  }
  static bool code_planes() {
    static const bool vbmi = __builtin_cpu_supports("avx512vbmi");
    return vbmi;
  }
  // Double-quantized absmax: code[q] * scale[b / 256] + offset, rounded after each
  // operation as blockwise8_decode does, 16 blocks a step: code[q] looked up 64 at
  // a time from the code planes (where given), else gathered; scale broadcast
  // (blended where the 16 cross a multiple of 256). 4096x4096, every block's
  // absmax, one core: 103 us gathered, 54 from the planes.
  static PK_MATMUL_TARGET void decode_absmax(const NF4Matrix& w, const CodePlanes* planes,
                                             int64_t begin, int64_t end, float* out) {
    const __m512 offset = _mm512_set1_ps(w.absmax_offset);
    const int64_t looked_up = planes != nullptr ? (end - begin) / 64 * 64 : 0;
    if (looked_up > 0) lookup_codes(*planes, w.absmax_q + begin, looked_up, out);
    int64_t b = begin;
    for (; b + 16 <= end; b += 16) {
      const __m512 code =
          b - begin < looked_up
              ? _mm512_loadu_ps(out + (b - begin))
              : _mm512_i32gather_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(
                                        reinterpret_cast<const __m128i*>(w.absmax_q + b))),
                                    w.absmax_code, 4);
      const float* scale = w.absmax_scale + (b >> 8);
      const int64_t first = kDoubleQuantBlocksize - (b & 255);  // lanes on scale[0]
      const __m512 s = first >= 16 ? _mm512_set1_ps(scale[0])
                                   : split(scale[0], scale[1], int(first), 0);
      _mm512_storeu_ps(out + (b - begin), _mm512_add_ps(_mm512_mul_ps(code, s), offset));
    }
    nf4_decode_absmax(w, b, end, out + (b - begin));
  }
  static PK_MATMUL_TARGET Vec zero() { return _mm512_setzero_ps(); }
  static PK_MATMUL_TARGET Vec set1(float v) { return _mm512_set1_ps(v); }
  static PK_MATMUL_TARGET Vec load(const float* p) { return _mm512_loadu_ps(p); }
  static PK_MATMUL_TARGET void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
  static PK_MATMUL_TARGET Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
  static PK_MATMUL_TARGET Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
  static PK_MATMUL_TARGET Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  static PK_MATMUL_TARGET float sum(Vec v) { return _mm512_reduce_add_ps(v); }
};

}  // namespace
}  // namespace pykernels::cpu

#include "nf4_matmul_simd.h"

// ---- bf16 x with BF16 dot products (AVX512-BF16) ----
//
// Where nf4_matvec_bf16_dots holds, every row starts a 64-column step inside one
// block. A step is 32 packed bytes widened to 16-bit lanes: byte k looks up its
// low nibble (column 2k + 1) and, shifted, its high one (column 2k) among the 16
// code values rounded to bf16 (held twice: the 16-bit lookup reads 5 index bits);
// vdpbf16ps multiplies pairs of lanes by x (packed as the step's 32 even columns,
// then its 32 odd ones) and adds both products to fp32 lanes. A block's sum is
// scaled by its absmax once. Three shuffles, a shift and two dot products per 64
// weights, against six shuffles, two shifts and four FMAs on the fp32 path: the
// loops alone, 4096x4096 at one token, one core here (AMD EPYC, Zen 4), 0.37 ms
// against 0.72 in cache; NF4Linear, 2 threads: 0.56 -> 0.30 ms.
// The codes' bf16 rounding (at most 2^-9 of a weight) is the size of the one
// that a bf16 dequantize gives each weight.
#define PK_BF16_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,f16c,fma")))

namespace pykernels::cpu {
namespace {

// x of one token group, for a span of columns, stays within 32 KB of L1.
constexpr int64_t kXBf16 = 16384;

PK_BF16_TARGET inline __m512bh as_bf16(__m512i v) { return reinterpret_cast<__m512bh>(v); }

PK_BF16_TARGET __m512i bf16_code_table() {
  const __m512 code = _mm512_loadu_ps(kNF4Code);
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(code, code));
}

// sums[tt] += x[tt] . w over `steps` steps from `bytes`; the first starts
// `in_block` steps into the block of absmax[0]. OneStepBlocks: blocksize 64 (the
// default), one step a block, so the loop needs no run lengths.
template <int TT, bool OneStepBlocks>
__attribute__((noinline)) PK_BF16_TARGET void dot_steps(const uint8_t* bytes, const float* absmax,
                                                         int64_t in_block, int64_t per_block,
                                                         int64_t steps, const uint16_t* x,
                                                         int64_t stride, float* sums) {
  constexpr int K = accumulators(TT);
  const __m512i table = bf16_code_table();
  __m512 acc[TT][K];
  for (int tt = 0; tt < TT; ++tt)
    for (int k = 0; k < K; ++k) acc[tt][k] = _mm512_setzero_ps();
  int64_t s = 0;
  for (int64_t run = OneStepBlocks ? 1 : std::min(steps, per_block - in_block); s < steps;
       run = OneStepBlocks ? 1 : std::min(per_block, steps - s)) {
    __m512 block[TT];
    for (int tt = 0; tt < TT; ++tt) block[tt] = _mm512_setzero_ps();
    for (const int64_t end = s + run; s < end; ++s) {
      const uint8_t* p = bytes + s * (kBf16Step / 2);
      __builtin_prefetch(p + kMatvecPrefetchBytes);
      const __m512i nibbles =
          _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
      const __m512bh even = as_bf16(_mm512_permutexvar_epi16(_mm512_srli_epi16(nibbles, 4), table));
      const __m512bh odd = as_bf16(_mm512_permutexvar_epi16(nibbles, table));
#pragma GCC unroll 8
      for (int tt = 0; tt < TT; ++tt) {
        const uint16_t* xs = x + tt * stride + s * kBf16Step;
        block[tt] = _mm512_dpbf16_ps(block[tt], even, as_bf16(_mm512_loadu_si512(xs)));
        block[tt] =
            _mm512_dpbf16_ps(block[tt], odd, as_bf16(_mm512_loadu_si512(xs + kBf16Step / 2)));
      }
    }
    const __m512 scale = _mm512_set1_ps(*absmax++);
    for (int tt = 0; tt < TT; ++tt) {
      acc[tt][0] = _mm512_fmadd_ps(block[tt], scale, acc[tt][0]);
      if constexpr (K == 2) std::swap(acc[tt][0], acc[tt][1]);  // two chains of FMAs
    }
  }
  for (int tt = 0; tt < TT; ++tt) {
    __m512 total = acc[tt][0];
    for (int k = 1; k < K; ++k) total = _mm512_add_ps(total, acc[tt][k]);
    sums[tt] += _mm512_reduce_add_ps(total);
  }
}

}  // namespace

void nf4_matvec_bf16_avx512(const NF4Matrix& w, const uint16_t* x_bf16, int64_t tokens,
                            int64_t row_begin, int64_t row_end, const void* bias, void* y) {
  const int64_t cols = w.cols, per_block = w.blocksize / kBf16Step;
  std::vector<float> sums(size_t((row_end - row_begin) * tokens), 0.0f);  // [row][token]
  BlockAbsmax absmax(w, Avx512::decode_absmax, Avx512::code_planes());
  for (int64_t t0 = 0; t0 < tokens; t0 += Avx512::kMaxTokens) {
    const int64_t group = std::min<int64_t>(Avx512::kMaxTokens, tokens - t0);
    const int64_t span = std::max(kBf16Step, kXBf16 / group / kBf16Step * kBf16Step);  // columns
    for (int64_t c0 = 0; c0 < cols; c0 += span)
      for (int64_t j = row_begin; j < row_end; ++j) {
        const int64_t first = j * cols + c0, width = std::min(span, cols - c0);
        absmax.load(first, first + width);
        with_token_count<Avx512::kMaxTokens>(group, [&](auto tt) PK_BF16_TARGET {
          const auto steps = per_block == 1 ? dot_steps<tt, true> : dot_steps<tt, false>;
          steps(w.packed + first / 2, absmax.values(), (first & (w.blocksize - 1)) / kBf16Step,
                per_block, width / kBf16Step, x_bf16 + t0 * cols + c0, cols,
                &sums[size_t((j - row_begin) * tokens + t0)]);
        });
      }
  }
  for (int64_t j = row_begin; j < row_end; ++j) {
    const float b = bias != nullptr ? load_value(DType::BF16, bias, j) : 0.0f;
    for (int64_t t = 0; t < tokens; ++t)
      store_value(DType::BF16, y, t * w.rows + j, sums[size_t((j - row_begin) * tokens + t)] + b);
  }
}

void nf4_matvec_avx512(DType dtype, const NF4Matrix& w, const float* x_packed, int64_t tokens,
                       int64_t row_begin, int64_t row_end, const void* bias, void* y) {
  matvec<Avx512>(dtype, w, x_packed, tokens, row_begin, row_end, bias, y);
}

void nf4_matvec_t_avx512(DType dtype, const NF4Matrix& w, const float* dy_t, int64_t tokens,
                         int64_t col_begin, int64_t col_end, void* dx) {
  matvec_t<Avx512>(dtype, w, dy_t, tokens, col_begin, col_end, dx);
}

}  // namespace pykernels::cpu

#else  // not x86-64: the dispatcher never selects this path; keep the symbols.
#include "nf4_matmul_paths.h"
namespace pykernels::cpu {
void nf4_matvec_bf16_avx512(const NF4Matrix&, const uint16_t*, int64_t, int64_t, int64_t,
                            const void*, void*) {}
void nf4_matvec_avx512(DType d, const NF4Matrix& w, const float* x, int64_t t, int64_t r0,
                       int64_t r1, const void* b, void* y) {
  nf4_matvec_scalar(d, w, x, t, r0, r1, b, y);
}
void nf4_matvec_t_avx512(DType d, const NF4Matrix& w, const float* dy, int64_t t, int64_t c0,
                         int64_t c1, void* dx) {
  nf4_matvec_t_scalar(d, w, dy, t, c0, c1, dx);
}
}  // namespace pykernels::cpu
#endif
