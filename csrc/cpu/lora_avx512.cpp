// LoRA kernels on AVX-512 (F, BW, VL, DQ): lora_tiles.h with 16-lane vectors,
// 16 accumulators per tile. Tails use masked loads and stores; the dropout hash
// runs on 16 columns at once (two 32-bit multiplies per round).
#if defined(__x86_64__) || defined(_M_X64)
// GCC 12 reports its own intrinsics' _mm*_undefined_* temporaries as maybe-uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

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

// ---- f32_rank_rows: out[a, k] = alpha * sum_b m[a * a_stride + b * b_stride] v[b, k] ----
//
// fp32 products whose right factor has rows of `rank` floats: dxa = s dy B (a a
// row of dy, b its columns, v = B) and dB = s dy^T xa (a a column of dy, b its
// rows, v = xa). A tile is kRankRowsTile values of a by up to 32 ranks (a second
// vector only where the rank group passes 16): each b loads v's row once and
// broadcasts m once per a. 4096 columns, rank 16, one core here, in a training
// step: dxa at T = 512 1.54 ms with MKL's sgemm, 1.0 ms this way.
namespace {

constexpr int64_t kRankRowsTile = 8;

template <int V, bool Whole>
void rank_rows_tile(const float* m, int64_t a_stride, int64_t b_stride, int64_t count_b,
                    const float* v, int64_t rank, int64_t k0, const __mmask16* lanes, int64_t a0,
                    int64_t na, float alpha, float* out) {
  const float* a_rows[kRankRowsTile];  // a short tile repeats its last a
  for (int64_t i = 0; i < kRankRowsTile; ++i)
    a_rows[i] = m + std::min(a0 + i, a0 + na - 1) * a_stride;
  __m512 acc[kRankRowsTile][V];
  for (auto& row : acc)
    for (auto& sum : row) sum = _mm512_setzero_ps();
  for (int64_t b = 0; b < count_b; ++b) {
    __m512 vb[V];
    for (int s = 0; s < V; ++s)
      vb[s] = Whole ? _mm512_loadu_ps(v + b * rank + k0 + 16 * s)
                    : _mm512_maskz_loadu_ps(lanes[s], v + b * rank + k0 + 16 * s);
    for (int64_t i = 0; i < kRankRowsTile; ++i) {
      const __m512 mi = _mm512_set1_ps(a_rows[i][b * b_stride]);
      for (int s = 0; s < V; ++s) acc[i][s] = _mm512_fmadd_ps(mi, vb[s], acc[i][s]);
    }
  }
  const __m512 scale = _mm512_set1_ps(alpha);
  for (int64_t i = 0; i < na; ++i)
    for (int s = 0; s < V; ++s)
      _mm512_mask_storeu_ps(out + (a0 + i) * rank + k0 + 16 * s, lanes[s],
                            _mm512_mul_ps(acc[i][s], scale));
}

}  // namespace

void f32_rank_rows_avx512(const float* m, int64_t a_stride, int64_t b_stride, int64_t count_b,
                          const float* v, int64_t rank, float alpha, int64_t a_begin,
                          int64_t a_end, float* out) {
  for (int64_t k0 = 0; k0 < rank; k0 += 32) {
    const int64_t nk = std::min<int64_t>(32, rank - k0);
    const __mmask16 lanes[2] = {Avx512::first(std::min<int64_t>(nk, 16)),
                                Avx512::first(std::max<int64_t>(nk - 16, 0))};
    const auto tile = nk > 16 ? (nk == 32 ? rank_rows_tile<2, true> : rank_rows_tile<2, false>)
                              : (nk == 16 ? rank_rows_tile<1, true> : rank_rows_tile<1, false>);
    for (int64_t a0 = a_begin; a0 < a_end; a0 += kRankRowsTile)
      tile(m, a_stride, b_stride, count_b, v, rank, k0, lanes, a0,
           std::min(kRankRowsTile, a_end - a0), alpha, out);
  }
}

// ---- bf16_dots: out[t, k] = alpha * sum_i x[t, i] a[k, i], BF16 dot products ----
//
// vdpbf16ps multiplies pairs of bf16 lanes exactly and adds both products to an
// fp32 lane: 32 multiply-adds an instruction, where the fp32 tiles above widen
// every element first and do 16. A tile is kDotRows rows of x by kDotRanks rows
// of a, 16 accumulators; a short last tile repeats its last row or rank and drops
// the extra sums. xa = x A^T, 4096 columns, rank 16, one core here (AMD EPYC,
// Zen 4), T = 32 / 512: at::mm (oneDNN) 68 / 740 us, the fp32 tiles 94 / 1200 us,
// this 23 / 330 us.
namespace {

#define PK_BF16_DOTS \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

constexpr int64_t kDotRows = 4, kDotRanks = 4, kDotLanes = 32;

// v rounded to bf16 in one instruction (nearest even, NaN kept quiet; fp32
// denormals, below 1.2e-38, become zeros): Avx512::narrow takes eight.
PK_BF16_DOTS inline __m256i to_bf16(__m512 v) {
  return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
}

// 32 bf16 from p, or the first n (zeros after) when n < 32.
PK_BF16_DOTS inline __m512bh load_pairs(const uint16_t* p, int64_t n) {
  if (n >= kDotLanes) return reinterpret_cast<__m512bh>(_mm512_loadu_si512(p));
  return reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi16(__mmask32((1u << n) - 1), p));
}

PK_BF16_DOTS void dot_tile(const uint16_t* const* x, const uint16_t* const* a, int64_t cols,
                           float (*sums)[kDotRanks]) {
  __m512 acc[kDotRows][kDotRanks];
  for (auto& row : acc)
    for (auto& v : row) v = _mm512_setzero_ps();
  auto step = [&](int64_t i, int64_t n) PK_BF16_DOTS {
    __m512bh xv[kDotRows];
    for (int64_t r = 0; r < kDotRows; ++r) xv[r] = load_pairs(x[r] + i, n);
    for (int64_t k = 0; k < kDotRanks; ++k) {
      const __m512bh av = load_pairs(a[k] + i, n);
      for (int64_t r = 0; r < kDotRows; ++r) acc[r][k] = _mm512_dpbf16_ps(acc[r][k], xv[r], av);
    }
  };
  int64_t i = 0;
  for (; i + kDotLanes <= cols; i += kDotLanes) step(i, kDotLanes);
  if (i < cols) step(i, cols - i);
  for (int64_t r = 0; r < kDotRows; ++r)
    for (int64_t k = 0; k < kDotRanks; ++k) sums[r][k] = _mm512_reduce_add_ps(acc[r][k]);
}

// ---- bf16_contract_rows: out[k, i] = alpha * sum_t g[t, k] x[t, i] ----
//
// The products that contract the rows (dA = dxa^T x, dB^T = s xa^T dy) pair rows
// t and t + 1: their 32-column steps interleaved lane by lane (unpacklo/hi, within
// 128-bit lanes: columns 8L + 0..3 in the low vector, 8L + 4..7 in the high one),
// multiplied by the broadcast pair (g[t, k], g[t + 1, k]). A tile is one step of
// columns by kContractRanks ranks (16 accumulators), summed over every row pair.
// dA at 4096 columns, rank 16, one core here, T = 32 / 512: at::addmm 58 / 570 us,
// the fp32 tiles (lora_gt_x) 58 / 850 us, this 49 / 450 us.
constexpr int64_t kContractRanks = 8;
// Rows a tile sweeps at a time. One column step over every row touches a 4 KiB
// page a row (rows are 8 KiB apart at 4096 columns), and past ~1024 rows the
// TLB no longer holds them from one step to the next: dA at 4096 columns, rank
// 16, one core, T = 1024 / 1536 / 2048 took 0.89 / 3.4 / 6.8 ms in one sweep.
// Blocks of rows go over every column step of the range in turn, and each
// tile's sums wait in fp32 for the next block.
constexpr int64_t kContractBlockRows = 512;  // even: a block holds whole row pairs

// The tile's raw sums over the row pairs, added to sums (when `accumulate`) or
// written there: sums[k] holds acc[k][0] in its first 16 floats, acc[k][1] after.
PK_BF16_DOTS void contract_tile(const uint32_t* g_pairs, int64_t pairs, int64_t rank,
                                const int64_t* ranks, const uint16_t* x, int64_t rows,
                                int64_t cols, int64_t n, bool accumulate,
                                float (*sums)[kDotLanes]) {
  __m512 acc[kContractRanks][2];
#pragma GCC unroll 8
  for (int64_t k = 0; k < kContractRanks; ++k) {
    acc[k][0] = accumulate ? _mm512_loadu_ps(sums[k]) : _mm512_setzero_ps();
    acc[k][1] = accumulate ? _mm512_loadu_ps(sums[k] + 16) : _mm512_setzero_ps();
  }
  static const uint16_t kZeroRow[kDotLanes] = {};  // the partner of an odd last row
  for (int64_t p = 0; p < pairs; ++p) {
    const uint16_t* second = 2 * p + 1 < rows ? x + (2 * p + 1) * cols : kZeroRow;
    const __m512i a = reinterpret_cast<__m512i>(load_pairs(x + 2 * p * cols, n));
    const __m512i b = reinterpret_cast<__m512i>(load_pairs(second, n));
    const __m512bh low = reinterpret_cast<__m512bh>(_mm512_unpacklo_epi16(a, b));
    const __m512bh high = reinterpret_cast<__m512bh>(_mm512_unpackhi_epi16(a, b));
    const uint32_t* gp = g_pairs + p * rank;
#pragma GCC unroll 8
    for (int64_t k = 0; k < kContractRanks; ++k) {
      const __m512bh gk = reinterpret_cast<__m512bh>(_mm512_set1_epi32(int(gp[ranks[k]])));
      acc[k][0] = _mm512_dpbf16_ps(acc[k][0], low, gk);
      acc[k][1] = _mm512_dpbf16_ps(acc[k][1], high, gk);
    }
  }
#pragma GCC unroll 8  // acc stays in registers only if no loop indexes it at run time
  for (int64_t k = 0; k < kContractRanks; ++k) {
    _mm512_storeu_ps(sums[k], acc[k][0]);
    _mm512_storeu_ps(sums[k] + 16, acc[k][1]);
  }
}

// A tile's raw sums, alpha times, as bf16 in column order: words[k][c].
PK_BF16_DOTS void tile_words(const float (*sums)[kDotLanes], float alpha,
                             uint16_t (*words)[kDotLanes]) {
  // Columns 8L + 0..3 sit in lanes 4L..4L + 3 of the low vector, 8L + 4..7 in the
  // same lanes of the high one.
  const __m512i first16 = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i last16 =
      _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  const __m512 scale = _mm512_set1_ps(alpha);
  for (int64_t k = 0; k < kContractRanks; ++k) {
    const __m512 low = _mm512_loadu_ps(sums[k]), high = _mm512_loadu_ps(sums[k] + 16);
    const __m512 lo = _mm512_permutex2var_ps(low, first16, high);
    const __m512 hi = _mm512_permutex2var_ps(low, last16, high);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(words[k]), to_bf16(_mm512_mul_ps(lo, scale)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(words[k] + 16),
                        to_bf16(_mm512_mul_ps(hi, scale)));
  }
}

// dst[c * dst_stride + r] = src[r * src_stride + c] for r < rows <= 8, c < n <= 32,
// 16-bit words: four 8 x 8 transposes, one per 128-bit lane (unpacking 16, 32 and
// 64 bits), then one store of the rows a column.
inline void transpose_tile(const uint16_t* src, int64_t src_stride, int64_t rows, int64_t n,
                           uint16_t* dst, int64_t dst_stride) {
  const __mmask32 columns = n >= 32 ? ~__mmask32(0) : __mmask32((1u << n) - 1);
  __m512i r[8], t[8], u[8], v[8];
  for (int k = 0; k < 8; ++k)
    r[k] = k < rows ? _mm512_maskz_loadu_epi16(columns, src + k * src_stride)
                    : _mm512_setzero_si512();
  for (int q = 0; q < 4; ++q) {  // t[2q], t[2q + 1]: rows 2q, 2q + 1 of columns 0-3, 4-7
    t[2 * q] = _mm512_unpacklo_epi16(r[2 * q], r[2 * q + 1]);
    t[2 * q + 1] = _mm512_unpackhi_epi16(r[2 * q], r[2 * q + 1]);
  }
  for (int h = 0; h < 2; ++h) {  // u[4h + m]: rows 4h..4h + 3 of columns 2m, 2m + 1
    u[4 * h] = _mm512_unpacklo_epi32(t[4 * h], t[4 * h + 2]);
    u[4 * h + 1] = _mm512_unpackhi_epi32(t[4 * h], t[4 * h + 2]);
    u[4 * h + 2] = _mm512_unpacklo_epi32(t[4 * h + 1], t[4 * h + 3]);
    u[4 * h + 3] = _mm512_unpackhi_epi32(t[4 * h + 1], t[4 * h + 3]);
  }
  for (int m = 0; m < 4; ++m) {  // v[c]: the 8 rows of column c (of each lane's 8)
    v[2 * m] = _mm512_unpacklo_epi64(u[m], u[m + 4]);
    v[2 * m + 1] = _mm512_unpackhi_epi64(u[m], u[m + 4]);
  }
  const __mmask8 row_mask = __mmask8((1u << rows) - 1);
  for (int c = 0; c < 8; ++c) {
    const __m128i lanes[4] = {
        _mm512_extracti32x4_epi32(v[c], 0), _mm512_extracti32x4_epi32(v[c], 1),
        _mm512_extracti32x4_epi32(v[c], 2), _mm512_extracti32x4_epi32(v[c], 3)};
    for (int l = 0; l < 4; ++l)
      if (8 * l + c < n) _mm_mask_storeu_epi16(dst + (8 * l + c) * dst_stride, row_mask, lanes[l]);
  }
}

}  // namespace

void bf16_contract_rows_avx512(const uint16_t* g, const uint16_t* x, int64_t rows, int64_t cols,
                               int64_t rank, float alpha, bool transposed_out, int64_t col_begin,
                               int64_t col_end, uint16_t* out) {
  const int64_t pairs = (rows + 1) / 2;
  std::vector<uint32_t> g_pairs(size_t(pairs * rank));  // (g[2p, k], g[2p + 1, k]), low word first
  for (int64_t p = 0; p < pairs; ++p)
    for (int64_t k = 0; k < rank; ++k) {
      const uint32_t second = 2 * p + 1 < rows ? g[(2 * p + 1) * rank + k] : 0;
      g_pairs[size_t(p * rank + k)] = g[2 * p * rank + k] | second << 16;
    }
  const int64_t groups = ceil_div(rank, kContractRanks);
  const int64_t blocks = std::max<int64_t>(1, ceil_div(rows, kContractBlockRows));
  using TileSums = float[kContractRanks][kDotLanes];
  // Every tile's sums between row blocks; one tile's when a single block does.
  std::vector<TileSums> held(blocks > 1 ? size_t(ceil_div(col_end - col_begin, kDotLanes) * groups)
                                        : 1);
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t r0 = b * kContractBlockRows, nr = std::min(kContractBlockRows, rows - r0);
    for (int64_t i = col_begin; i < col_end; i += kDotLanes) {
      const int64_t n = std::min(kDotLanes, col_end - i);
      for (int64_t k0 = 0; k0 < rank; k0 += kContractRanks) {
        int64_t ranks[kContractRanks];
        for (int64_t k = 0; k < kContractRanks; ++k) ranks[k] = std::min(k0 + k, rank - 1);
        TileSums& sums =
            held[blocks > 1 ? size_t((i - col_begin) / kDotLanes * groups + k0 / kContractRanks)
                            : 0];
        contract_tile(g_pairs.data() + r0 / 2 * rank, ceil_div(nr, 2), rank, ranks,
                      x + r0 * cols + i, nr, cols, n, b > 0, sums);
        if (b + 1 < blocks) continue;
        uint16_t words[kContractRanks][kDotLanes];
        tile_words(sums, alpha, words);
        const int64_t nk = std::min(kContractRanks, rank - k0);
        if (transposed_out) {
          // Scalar stores took 25 us of dB's ~75 at T = 32, 4096 columns, rank 16.
          transpose_tile(words[0], kDotLanes, nk, n, out + i * rank + k0, rank);
        } else {
          for (int64_t k = 0; k < nk; ++k)
            std::copy(words[k], words[k] + n, out + (k0 + k) * cols + i);
        }
      }
    }
  }
}

void bf16_dots_avx512(const uint16_t* x, const uint16_t* a, int64_t cols, int64_t rank,
                      float alpha, int64_t row_begin, int64_t row_end, uint16_t* out) {
  for (int64_t t0 = row_begin; t0 < row_end; t0 += kDotRows)
    for (int64_t k0 = 0; k0 < rank; k0 += kDotRanks) {
      const uint16_t* xrow[kDotRows];
      const uint16_t* arow[kDotRanks];
      for (int64_t r = 0; r < kDotRows; ++r) xrow[r] = x + std::min(t0 + r, row_end - 1) * cols;
      for (int64_t k = 0; k < kDotRanks; ++k) arow[k] = a + std::min(k0 + k, rank - 1) * cols;
      float sums[kDotRows][kDotRanks];
      dot_tile(xrow, arow, cols, sums);
      for (int64_t r = 0; r < std::min(kDotRows, row_end - t0); ++r)
        for (int64_t k = 0; k < std::min(kDotRanks, rank - k0); ++k)
          store_from_float<DType::BF16>(out, (t0 + r) * rank + k0 + k, alpha * sums[r][k]);
    }
}

namespace {

// The bf16 pair (p[0], p[1]) in every 32-bit lane (one broadcast load); p[0]
// alone (p[1] may not exist) when `single`.
PK_BF16_DOTS inline __m512bh broadcast_pair(const uint16_t* p, bool single) {
  uint32_t pair = p[0];
  if (!single) std::memcpy(&pair, p, sizeof pair);
  return reinterpret_cast<__m512bh>(_mm512_set1_epi32(int(pair)));
}

// n <= 16 words from p (zeros after), each zero-extended to 32 bits.
PK_BF16_DOTS inline __m512i widen_words(const uint16_t* p, __mmask16 lanes) {
  return _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, p));
}

// ---- bf16_expand: out[t, i] = addend[t * stride + i] + alpha * sum_k g[t, k] b[i, k] ----
//
// LoRA's rank-r expansions: y = b + s xa B^T (stride 0: the base GEMM then
// accumulates onto y), y += s xa B^T and dx += dxa A (addend = out), from B
// [cols, rank] or A [rank, cols] (b_transposed) as stored: 16 columns in the lanes,
// pairs of ranks (b[i, 2j], b[i, 2j + 1]) packed once per 16 columns (gathered
// from B's rows, interleaved from A's), against the broadcast pair (g[t, 2j],
// g[t, 2j + 1]); an odd last rank pairs with zero. 4096 columns, rank 16, one core,
// T = 1 / 32 / 128: 14 / 37 / 113 us (at::addmm 35 / 57 / 126 us; after the base
// GEMM has swept the caches, at::addmm takes 240 us at T = 32, this 67).
// Two blocks of 16 columns a tile, so that each broadcast pair feeds two dot
// products (one a product: 50 us at T = 32; two: 37 us).
constexpr int64_t kExpandBlocks = 2;

template <int64_t R>
PK_BF16_DOTS void expand_rows(const uint16_t* g, const uint32_t* packed, int64_t pairs,
                              int64_t rank, const uint16_t* addend, int64_t stride, float alpha,
                              int64_t t0, int64_t cols, int64_t i0,
                              const __mmask16 (&lanes)[kExpandBlocks], uint16_t* out) {
  __m512 acc[R][kExpandBlocks];
#pragma GCC unroll 8
  for (int64_t r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  auto step = [&](int64_t j, bool single) PK_BF16_DOTS {
    const uint32_t* pj = packed + j * kExpandBlocks * 16;
    const __m512bh b0 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(pj));
    const __m512bh b1 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(pj + 16));
#pragma GCC unroll 8
    for (int64_t r = 0; r < R; ++r) {
      const __m512bh gp = broadcast_pair(g + (t0 + r) * rank + 2 * j, single);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], gp, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], gp, b1);
    }
  };
  for (int64_t j = 0; j < rank / 2; ++j) step(j, false);
  if (rank % 2 == 1) step(pairs - 1, true);
  const __m512 scale = _mm512_set1_ps(alpha);
#pragma GCC unroll 8
  for (int64_t r = 0; r < R; ++r)
    for (int64_t q = 0; q < kExpandBlocks; ++q) {
      const int64_t i = i0 + 16 * q;
      const bool whole = lanes[q] == 0xffff;  // masked loads and stores are slow here
      const uint16_t* from = addend + (t0 + r) * stride + i;
      const __m256i addend_words =
          !addend ? _mm256_setzero_si256()
          : whole ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(from))
                  : _mm256_maskz_loadu_epi16(lanes[q], from);
      const __m256i y = to_bf16(
          _mm512_fmadd_ps(acc[r][q], scale, Avx512::widen<DType::BF16>(addend_words)));
      uint16_t* to = out + (t0 + r) * cols + i;
      if (whole) _mm256_storeu_si256(reinterpret_cast<__m256i*>(to), y);
      else _mm256_mask_storeu_epi16(to, lanes[q], y);
    }
}

}  // namespace

// 32 x 32 blocks through a staging block, so that every line of dst is written
// whole once: dst's rows written 16 bytes at a time, 8 KiB apart (B^T [16, 4096]),
// share one L1 set (25 us; staged, 12 us).
void bf16_transpose_avx512(const uint16_t* src, int64_t rows, int64_t cols, int64_t row_begin,
                           int64_t row_end, uint16_t* dst) {
  alignas(64) uint16_t stage[32][32];
  for (int64_t r0 = row_begin; r0 < row_end; r0 += 32) {
    const int64_t nr = std::min<int64_t>(32, row_end - r0);
    const __mmask32 row_mask = nr >= 32 ? ~__mmask32(0) : __mmask32((1u << nr) - 1);
    for (int64_t c0 = 0; c0 < cols; c0 += 32) {
      const int64_t nc = std::min<int64_t>(32, cols - c0);
      for (int64_t r = 0; r < nr; r += 8)
        transpose_tile(src + (r0 + r) * cols + c0, cols, std::min<int64_t>(8, nr - r), nc,
                       stage[0] + r, 32);
      for (int64_t c = 0; c < nc; ++c)
        _mm512_mask_storeu_epi16(dst + (c0 + c) * rows + r0, row_mask,
                                 _mm512_load_si512(stage[c]));
    }
  }
}

void bf16_expand_avx512(const uint16_t* g, const uint16_t* b, bool b_transposed,
                        const uint16_t* addend, int64_t stride, int64_t rows, int64_t cols,
                        int64_t rank, float alpha, int64_t col_begin, int64_t col_end,
                        uint16_t* out) {
  const int64_t pairs = (rank + 1) / 2;
  // Pair j of block q: words (j * kExpandBlocks + q) * 16 onwards.
  std::vector<uint32_t> packed(size_t(pairs * kExpandBlocks * 16));
  const __m512i lane_rows = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32(int(rank)));
  for (int64_t i0 = col_begin; i0 < col_end; i0 += kExpandBlocks * 16) {
    __mmask16 lanes[kExpandBlocks];
    for (int64_t q = 0; q < kExpandBlocks; ++q) {
      const int64_t i = i0 + 16 * q, n = std::clamp<int64_t>(col_end - i, 0, 16);
      lanes[q] = __mmask16((1u << n) - 1);
      uint32_t* block_pairs = packed.data() + 16 * q;
      const int64_t pair_step = kExpandBlocks * 16;
      if (b_transposed) {  // ranks 2j and 2j + 1 are rows of b: their words interleaved
        for (int64_t j = 0; j < pairs; ++j) {
          __m512i words = widen_words(b + 2 * j * cols + i, lanes[q]);
          if (2 * j + 1 < rank)
            words = _mm512_or_si512(
                words, _mm512_slli_epi32(widen_words(b + (2 * j + 1) * cols + i, lanes[q]), 16));
          _mm512_storeu_si512(block_pairs + j * pair_step, words);
        }
      } else {
        const uint16_t* block = b + i * rank;
        for (int64_t j = 0; j + 1 < rank; j += 2)  // word index lane * rank + j, 2 bytes a word
          _mm512_storeu_si512(
              block_pairs + j / 2 * pair_step,
              _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), lanes[q],
                                          _mm512_add_epi32(lane_rows, _mm512_set1_epi32(int(j))),
                                          block, 2));
        if (rank % 2 == 1) {  // a dword gather would read past b's end on its last row
          uint32_t* last = block_pairs + (pairs - 1) * pair_step;
          for (int64_t l = 0; l < 16; ++l) last[l] = l < n ? block[l * rank + rank - 1] : 0;
        }
      }
    }
    int64_t t = 0;
    for (; t + 4 <= rows; t += 4)
      expand_rows<4>(g, packed.data(), pairs, rank, addend, stride, alpha, t, cols, i0, lanes,
                     out);
    for (; t < rows; ++t)
      expand_rows<1>(g, packed.data(), pairs, rank, addend, stride, alpha, t, cols, i0, lanes,
                     out);
  }
}

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
void bf16_dots_avx512(const uint16_t*, const uint16_t*, int64_t, int64_t, float, int64_t, int64_t,
                      uint16_t*) {}
void bf16_contract_rows_avx512(const uint16_t*, const uint16_t*, int64_t, int64_t, int64_t, float,
                               bool, int64_t, int64_t, uint16_t*) {}
void bf16_transpose_avx512(const uint16_t*, int64_t, int64_t, int64_t, int64_t, uint16_t*) {}
void f32_rank_rows_avx512(const float*, int64_t, int64_t, int64_t, const float*, int64_t, float,
                          int64_t, int64_t, float*) {}
void bf16_expand_avx512(const uint16_t*, const uint16_t*, bool, const uint16_t*, int64_t,
                        int64_t, int64_t, int64_t, float, int64_t, int64_t, uint16_t*) {}
}  // namespace pykernels::cpu
#endif
