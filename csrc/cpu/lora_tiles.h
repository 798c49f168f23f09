// The LoRA kernels' SIMD bodies (math: lora.cpp), generic over a vector traits
// type V. lora_avx512.cpp and lora_avx2.cpp each include this after setting
// their target pragma and defining V, so each compiles it for its own
// instruction set. Everything here has internal linkage: the two builds never
// meet at link time. Every header these need is included before the pragma.
//
// V gives: F (kLanes fp32 lanes) and Mask; zero, set1, add, mul, fma (rounded
// once); loadf / storef (fp32); load / load_n / store / store_n<D> (dtype, first
// n < kLanes lanes, the rest zero / untouched); keep(d, key, col0), the dropout
// mask of columns col0 .. col0 + kLanes - 1; keep_scaled(x, m, scale) (x * scale
// where kept, else 0); add_where(o, m, v) (o + v where kept, else o); and the
// tile sizes of the kernels below, chosen so the accumulators fill most of the
// registers.
//
// Tiles:
//   x_at     kXatRows rows x kXatRanks ranks of 16-lane partial sums; each vector
//            of A feeds every row of the tile. drop(x) is staged per row in
//            256-column fp32 blocks (L1), hashed once per element; a short last
//            tile repeats its last row, a short rank tile its last rank, and
//            the extra results are dropped.
//   gt_x     kGtxRanks ranks x kGtxVecs vectors of columns over 32 staged rows
//            of drop(x), the sums of the whole column range in scratch (L2).
//   add_g_a  kAddRows rows x kAddVecs vectors of columns, summed over every rank
//            in registers, then scaled, masked and added to out once.

namespace pykernels::cpu {
namespace {

template <class V, DType D> inline typename V::F load_upto(const Elem<D>* p, int64_t n) {
  if (n >= V::kLanes) return V::template load<D>(p);
  if (n <= 0) return V::zero();
  return V::template load_n<D>(p, n);
}

template <class V, DType D> inline void store_upto(Elem<D>* p, typename V::F v, int64_t n) {
  if (n >= V::kLanes) V::template store<D>(p, v);
  else if (n > 0) V::template store_n<D>(p, v, n);
}

// Columns [col0, col0 + n) of one row of drop(x) into dst as fp32, zeros up to `padded`.
template <class V, DType D>
inline void stage_dropped(const Elem<D>* x, int64_t n, int64_t padded, const Dropout& d,
                          DropoutRow key, int64_t col0, float* dst) {
  const typename V::F scale = V::set1(d.scale);
  for (int64_t j = 0; j < padded; j += V::kLanes) {
    typename V::F v = load_upto<V, D>(x + j, n - j);
    if (d.active()) v = V::keep_scaled(v, V::keep(d, key, uint32_t(col0 + j)), scale);
    V::storef(dst + j, v);
  }
}

// ---- x_at: out[t, k] = sum_i drop(x)[t, i] a[k, i] ----
constexpr int64_t kXatCols = 256;

// One rank tile over columns [i_begin, i_end) of a staged block: acc[r][j] += staged[r] * a[j].
template <class V, DType D, bool Tail>
inline void x_at_tile(const float (*staged)[kXatCols], const Elem<D>* const* arow, int64_t i_begin,
                      int64_t i_end, int64_t n,
                      typename V::F (*acc)[V::kXatRanks][kLoraLanes / V::kLanes]) {
  constexpr int64_t L = V::kLanes, S = kLoraLanes / L, R = V::kXatRows, K = V::kXatRanks;
  for (int64_t i = i_begin; i < i_end; i += kLoraLanes) {
    typename V::F xv[R][S];
    for (int64_t r = 0; r < R; ++r)
      for (int64_t s = 0; s < S; ++s) xv[r][s] = V::loadf(staged[r] + i + s * L);
    for (int64_t j = 0; j < K; ++j)
      for (int64_t s = 0; s < S; ++s) {
        const typename V::F av = Tail ? load_upto<V, D>(arow[j] + i + s * L, n - i - s * L)
                                      : V::template load<D>(arow[j] + i + s * L);
        for (int64_t r = 0; r < R; ++r) acc[r][j][s] = V::fma(xv[r][s], av, acc[r][j][s]);
      }
  }
}

// partial: lora_x_at_scratch(rank) floats, [row of the tile][rank][16 lanes].
template <class V, DType D>
void x_at(const Elem<D>* x, const Elem<D>* a, int64_t cols, int64_t rank, const Dropout& d,
          int64_t row_begin, int64_t row_end, Elem<D>* out, float* partial,
          const int64_t* row_map) {
  constexpr int64_t L = V::kLanes, S = kLoraLanes / L, R = V::kXatRows, K = V::kXatRanks;
  static_assert(R <= kLoraMaxTileRows, "x_at tile taller than its scratch");
  alignas(64) float staged[R][kXatCols];
  auto lanes = [&](int64_t r, int64_t k) { return partial + (r * rank + k) * kLoraLanes; };
  for (int64_t t0 = row_begin; t0 < row_end; t0 += R) {
    const int64_t rows = lora_min(R, row_end - t0);
    for (int64_t i = 0; i < R * rank * kLoraLanes; i += L) V::storef(partial + i, V::zero());
    for (int64_t c0 = 0; c0 < cols; c0 += kXatCols) {
      const int64_t n = lora_min(kXatCols, cols - c0);
      const int64_t full = n / kLoraLanes * kLoraLanes;
      for (int64_t r = 0; r < R; ++r) {
        const int64_t t = lora_row(row_map, lora_min(t0 + r, row_end - 1));
        stage_dropped<V, D>(x + t * cols + c0, n, lora_round_up(n, kLoraLanes), d,
                            dropout_row(d.seed, uint64_t(t)), c0, staged[r]);
      }
      for (int64_t k0 = 0; k0 < rank; k0 += K) {
        const Elem<D>* arow[K];
        typename V::F acc[R][K][S];
        for (int64_t j = 0; j < K; ++j) {
          const int64_t k = lora_min(k0 + j, rank - 1);
          arow[j] = a + k * cols + c0;
          for (int64_t r = 0; r < R; ++r)
            for (int64_t s = 0; s < S; ++s) acc[r][j][s] = V::loadf(lanes(r, k) + s * L);
        }
        x_at_tile<V, D, false>(staged, arow, 0, full, n, acc);
        if (full < n) x_at_tile<V, D, true>(staged, arow, full, n, n, acc);
        for (int64_t j = 0; j < K; ++j)
          for (int64_t r = 0; r < R; ++r)
            for (int64_t s = 0; s < S; ++s)
              V::storef(lanes(r, lora_min(k0 + j, rank - 1)) + s * L, acc[r][j][s]);
      }
    }
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t k = 0; k < rank; ++k)
        store_from_float<D>(out, lora_row(row_map, t0 + r) * rank + k,
                            lora_reduce_lanes(lanes(r, k)));
  }
}

// ---- gt_x: out[k, i] = sum_t g[t, k] drop(x)[t, i] ----

// sums: lora_gt_x_scratch(rank, col_begin, col_end) floats, [rank][stride].
// Rows are read whole and in order (kLoraGtxRows at a time, one column tile after
// another), so x streams from memory; the sums stay in L2.
template <class V, DType D>
void gt_x(const float* g, const Elem<D>* x, int64_t rows, int64_t cols, int64_t rank,
          const Dropout& d, int64_t col_begin, int64_t col_end, Elem<D>* out, float* sums,
          const int64_t* row_map) {
  constexpr int64_t L = V::kLanes, C = V::kGtxVecs, K = V::kGtxRanks, kCols = C * L;
  static_assert(kCols <= kLoraMaxTileCols && kLoraMaxTileCols % kCols == 0, "gt_x tile");
  const int64_t stride = lora_gt_x_stride(col_begin, col_end);
  alignas(64) float staged[kLoraGtxRows][kCols];
  for (int64_t i = 0; i < rank * stride; i += L) V::storef(sums + i, V::zero());
  for (int64_t t0 = 0; t0 < rows; t0 += kLoraGtxRows) {
    const int64_t tn = lora_min(kLoraGtxRows, rows - t0);
    for (int64_t c0 = col_begin; c0 < col_end; c0 += kCols) {
      const int64_t n = lora_min(kCols, col_end - c0);
      for (int64_t tt = 0; tt < tn; ++tt) {
        const int64_t t = lora_row(row_map, t0 + tt);
        stage_dropped<V, D>(x + t * cols + c0, n, kCols, d, dropout_row(d.seed, uint64_t(t)), c0,
                            staged[tt]);
      }
      float* tile_sums = sums + (c0 - col_begin);
      for (int64_t k0 = 0; k0 < rank; k0 += K) {
        int64_t k_of[K];
        typename V::F acc[K][C];
        for (int64_t j = 0; j < K; ++j) {
          k_of[j] = lora_min(k0 + j, rank - 1);
          for (int64_t v = 0; v < C; ++v) acc[j][v] = V::zero();
        }
        for (int64_t tt = 0; tt < tn; ++tt) {
          typename V::F xv[C];
          for (int64_t v = 0; v < C; ++v) xv[v] = V::loadf(staged[tt] + v * L);
          const float* g_row = g + lora_row(row_map, t0 + tt) * rank;
          for (int64_t j = 0; j < K; ++j) {
            const typename V::F gv = V::set1(g_row[k_of[j]]);
            for (int64_t v = 0; v < C; ++v) acc[j][v] = V::fma(gv, xv[v], acc[j][v]);
          }
        }
        // Each 32-row tile sums from zero and is then added to the total: a
        // two-level sum, whose rounding grows with T / 32 + 32 instead of T
        // (one chain over 2048 fp32 rows broke the tolerance rule).
        // (ranks past the end repeat the last one: added once)
        for (int64_t j = 0; j < K && k0 + j < rank; ++j)
          for (int64_t v = 0; v < C; ++v) {
            float* sum = tile_sums + k_of[j] * stride + v * L;
            V::storef(sum, V::add(V::loadf(sum), acc[j][v]));
          }
      }
    }
  }
  for (int64_t k = 0; k < rank; ++k)
    for (int64_t c = col_begin; c < col_end; c += L)
      store_upto<V, D>(out + k * cols + c, V::loadf(sums + k * stride + (c - col_begin)),
                       col_end - c);
}

// ---- add_g_a: out[t, i] += scale * sum_k g[t, k] a[k, i] where kept ----
template <class V, DType D, bool Tail>
inline void add_g_a_sums(const float* const* g_row, const Elem<D>* a, int64_t cols, int64_t rank,
                         int64_t n, typename V::F (*acc)[V::kAddVecs]) {
  constexpr int64_t L = V::kLanes, R = V::kAddRows, C = V::kAddVecs;
  for (int64_t k = 0; k < rank; ++k) {
    typename V::F av[C];
    for (int64_t v = 0; v < C; ++v)
      av[v] = Tail ? load_upto<V, D>(a + k * cols + v * L, n - v * L)
                   : V::template load<D>(a + k * cols + v * L);
    for (int64_t r = 0; r < R; ++r) {
      const typename V::F gv = V::set1(g_row[r][k]);
      for (int64_t v = 0; v < C; ++v) acc[r][v] = V::fma(gv, av[v], acc[r][v]);
    }
  }
}

template <class V, DType D>
void add_g_a(const float* g, const Elem<D>* a, int64_t cols, int64_t rank, float scale,
             const Dropout& d, int64_t row_begin, int64_t row_end, Elem<D>* out,
             const int64_t* row_map) {
  constexpr int64_t L = V::kLanes, R = V::kAddRows, C = V::kAddVecs, kCols = C * L;
  const typename V::F vscale = V::set1(scale);
  for (int64_t t0 = row_begin; t0 < row_end; t0 += R) {
    const int64_t rows = lora_min(R, row_end - t0);
    const float* g_row[R];
    DropoutRow key[R];
    for (int64_t r = 0; r < R; ++r) {
      const int64_t t = lora_row(row_map, lora_min(t0 + r, row_end - 1));
      g_row[r] = g + t * rank;
      key[r] = dropout_row(d.seed, uint64_t(t));
    }
    for (int64_t c0 = 0; c0 < cols; c0 += kCols) {
      const int64_t n = lora_min(kCols, cols - c0);
      typename V::F acc[R][C];
      for (int64_t r = 0; r < R; ++r)
        for (int64_t v = 0; v < C; ++v) acc[r][v] = V::zero();
      if (n == kCols) add_g_a_sums<V, D, false>(g_row, a + c0, cols, rank, n, acc);
      else add_g_a_sums<V, D, true>(g_row, a + c0, cols, rank, n, acc);
      for (int64_t r = 0; r < rows; ++r) {
        Elem<D>* o = out + lora_row(row_map, t0 + r) * cols + c0;
        for (int64_t v = 0; v < C && v * L < n; ++v) {
          const typename V::F delta = V::mul(vscale, acc[r][v]);
          const typename V::F now = load_upto<V, D>(o + v * L, n - v * L);
          const typename V::F sum =
              d.active() ? V::add_where(now, V::keep(d, key[r], uint32_t(c0 + v * L)), delta)
                         : V::add(now, delta);
          store_upto<V, D>(o + v * L, sum, n - v * L);
        }
      }
    }
  }
}

// ---- entry points, by dtype ----
template <class V>
void x_at_any(DType dtype, const void* x, const void* a, int64_t cols, int64_t rank,
              const Dropout& d, int64_t row_begin, int64_t row_end, void* out, float* scratch,
              const int64_t* row_map) {
  PK_LORA_DTYPE_SWITCH("lora_x_at", (x_at<V, D>(static_cast<const E*>(x), static_cast<const E*>(a),
                                                cols, rank, d, row_begin, row_end,
                                                static_cast<E*>(out), scratch, row_map)));
}

template <class V>
void gt_x_any(DType dtype, const float* g, const void* x, int64_t rows, int64_t cols,
              int64_t rank, const Dropout& d, int64_t col_begin, int64_t col_end, void* out,
              float* scratch, const int64_t* row_map) {
  PK_LORA_DTYPE_SWITCH("lora_gt_x",
                       (gt_x<V, D>(g, static_cast<const E*>(x), rows, cols, rank, d, col_begin,
                                   col_end, static_cast<E*>(out), scratch, row_map)));
}

template <class V>
void add_g_a_any(DType dtype, const float* g, const void* a, int64_t cols, int64_t rank,
                 float scale, const Dropout& d, int64_t row_begin, int64_t row_end, void* out,
                 const int64_t* row_map) {
  PK_LORA_DTYPE_SWITCH("lora_add_g_a",
                       (add_g_a<V, D>(g, static_cast<const E*>(a), cols, rank, scale, d,
                                      row_begin, row_end, static_cast<E*>(out), row_map)));
}

}  // namespace
}  // namespace pykernels::cpu
