// LoRA kernels on AVX-512 (F, BW, VL, DQ): lora_tiles.h with 16-lane vectors,
// 16 accumulators per tile. Tails use masked loads and stores; the dropout hash
// runs on 16 columns at once (two 32-bit multiplies per round).
#if defined(__x86_64__) || defined(_M_X64)
// GCC 12 reports its own intrinsics' _mm*_undefined_* temporaries as maybe-uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "lora_paths.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,f16c,fma"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")
#endif

namespace pykernels::cpu {
namespace {

struct Avx512 {
  using F = __m512;
  using Mask = __mmask16;
  static constexpr int64_t kLanes = 16;
  static constexpr int64_t kXatRows = 8, kXatRanks = 2;
  static constexpr int64_t kGtxVecs = 4, kGtxRanks = 4;
  static constexpr int64_t kAddRows = 8, kAddVecs = 2;

  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F loadf(const float* p) { return _mm512_loadu_ps(p); }
  static void storef(float* p, F v) { _mm512_storeu_ps(p, v); }

  static Mask first(int64_t n) { return Mask((1u << n) - 1u); }

  template <DType D> static F widen(__m256i h) {
    if constexpr (D == DType::F16) return _mm512_cvtph_ps(h);
    else return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }

  // Round to nearest even like float_to_bf16 / float_to_f16, NaN kept quiet.
  template <DType D> static __m256i narrow(F v) {
    if constexpr (D == DType::F16) {
      return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {
      const __m512i u = _mm512_castps_si512(v);
      const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
      const __m512i bias = _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd);
      __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
      const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
      return _mm512_cvtepi32_epi16(r);
    }
  }

  template <DType D> static F load(const Elem<D>* p) {
    if constexpr (D == DType::F32) return _mm512_loadu_ps(p);
    else return widen<D>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }

  template <DType D> static F load_n(const Elem<D>* p, int64_t n) {
    if constexpr (D == DType::F32) return _mm512_maskz_loadu_ps(first(n), p);
    else return widen<D>(_mm256_maskz_loadu_epi16(first(n), p));
  }

  template <DType D> static void store(Elem<D>* p, F v) {
    if constexpr (D == DType::F32) _mm512_storeu_ps(p, v);
    else _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), narrow<D>(v));
  }

  template <DType D> static void store_n(Elem<D>* p, F v, int64_t n) {
    if constexpr (D == DType::F32) _mm512_mask_storeu_ps(p, first(n), v);
    else _mm256_mask_storeu_epi16(p, first(n), narrow<D>(v));
  }

  static __m512i mix(__m512i x) {
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32(int(0x7feb352du)));
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32(int(0x846ca68bu)));
    return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  }

  static Mask keep(const Dropout& d, DropoutRow key, uint32_t col0) {
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i col = _mm512_add_epi32(_mm512_set1_epi32(int(col0)), lane);
    const __m512i first = mix(_mm512_xor_si512(col, _mm512_set1_epi32(int(key.a))));
    const __m512i h = mix(_mm512_add_epi32(first, _mm512_set1_epi32(int(key.b))));
    return _mm512_cmpge_epu32_mask(h, _mm512_set1_epi32(int(d.threshold)));
  }

  static F keep_scaled(F x, Mask m, F scale) { return _mm512_maskz_mul_ps(m, x, scale); }
  static F add_where(F o, Mask m, F v) { return _mm512_mask_add_ps(o, m, o, v); }
};

}  // namespace
}  // namespace pykernels::cpu

#include "lora_tiles.h"

namespace pykernels::cpu {

PK_LORA_ENTRY_POINTS(avx512, x_at_any<Avx512>, gt_x_any<Avx512>, add_g_a_any<Avx512>)

}  // namespace pykernels::cpu

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // not x86-64: the dispatcher never selects this path; keep the symbols.
#include "lora_paths.h"
namespace pykernels::cpu {
PK_LORA_ENTRY_POINTS(avx512, lora_x_at_scalar, lora_gt_x_scalar, lora_add_g_a_scalar)
}  // namespace pykernels::cpu
#endif
