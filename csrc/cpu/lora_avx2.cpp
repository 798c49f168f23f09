// LoRA kernels on AVX2 + F16C + FMA: lora_tiles.h with 8-lane vectors (x_at's
// 16 partial sums are two vectors), 8 accumulators per tile of the 16 registers.
// Tails go through a small stack buffer; the dropout mask compares unsigned
// through the sign-flip trick (AVX2 has only signed 32-bit compares).
#if defined(__x86_64__) || defined(_M_X64)
// GCC 12 reports its own intrinsics' _mm*_undefined_* temporaries as maybe-uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <cstring>

#include "lora_paths.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,f16c,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,f16c,fma")
#endif

namespace pykernels::cpu {
namespace {

struct Avx2 {
  using F = __m256;
  using Mask = __m256;  // all-ones lanes where kept
  static constexpr int64_t kLanes = 8;
  static constexpr int64_t kXatRows = 4, kXatRanks = 1;
  static constexpr int64_t kGtxVecs = 4, kGtxRanks = 2;
  static constexpr int64_t kAddRows = 4, kAddVecs = 2;

  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F loadf(const float* p) { return _mm256_loadu_ps(p); }
  static void storef(float* p, F v) { _mm256_storeu_ps(p, v); }

  template <DType D> static F load(const Elem<D>* p) {
    if constexpr (D == DType::F32) {
      return _mm256_loadu_ps(p);
    } else {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
      if constexpr (D == DType::F16) return _mm256_cvtph_ps(h);
      else return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
  }

  template <DType D> static F load_n(const Elem<D>* p, int64_t n) {
    Elem<D> buffer[kLanes] = {};
    std::memcpy(buffer, p, size_t(n) * sizeof(Elem<D>));
    return load<D>(buffer);
  }

  // Round to nearest even like float_to_bf16 / float_to_f16, NaN kept quiet.
  template <DType D> static void store(Elem<D>* p, F v) {
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
      const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
      const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      const __m256i r = _mm256_blendv_epi8(rounded, quiet, nan);
      // packus works per 128-bit lane: gather the two low quadwords afterwards.
      const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
    }
  }

  template <DType D> static void store_n(Elem<D>* p, F v, int64_t n) {
    Elem<D> buffer[kLanes];
    store<D>(buffer, v);
    std::memcpy(p, buffer, size_t(n) * sizeof(Elem<D>));
  }

  static __m256i mix(__m256i x) {
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32(int(0x7feb352du)));
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32(int(0x846ca68bu)));
    return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  }

  // h >= threshold (unsigned, threshold >= 1) as h - 2^31 > threshold - 1 - 2^31 (signed).
  static Mask keep(const Dropout& d, DropoutRow key, uint32_t col0) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i col = _mm256_add_epi32(_mm256_set1_epi32(int(col0)), lane);
    const __m256i first = mix(_mm256_xor_si256(col, _mm256_set1_epi32(int(key.a))));
    const __m256i h = mix(_mm256_add_epi32(first, _mm256_set1_epi32(int(key.b))));
    const __m256i flip = _mm256_set1_epi32(int(0x80000000u));
    const __m256i bound = _mm256_set1_epi32(int((d.threshold - 1u) ^ 0x80000000u));
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_xor_si256(h, flip), bound));
  }

  static F keep_scaled(F x, Mask m, F scale) { return _mm256_and_ps(m, _mm256_mul_ps(x, scale)); }
  static F add_where(F o, Mask m, F v) { return _mm256_blendv_ps(o, _mm256_add_ps(o, v), m); }
};

}  // namespace
}  // namespace pykernels::cpu

#include "lora_tiles.h"

namespace pykernels::cpu {

PK_LORA_ENTRY_POINTS(avx2, x_at_any<Avx2>, gt_x_any<Avx2>, add_g_a_any<Avx2>)

}  // namespace pykernels::cpu

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // not x86-64: the dispatcher never selects this path; keep the symbols.
#include "lora_paths.h"
namespace pykernels::cpu {
PK_LORA_ENTRY_POINTS(avx2, lora_x_at_scalar, lora_gt_x_scalar, lora_add_g_a_scalar)
}  // namespace pykernels::cpu
#endif
