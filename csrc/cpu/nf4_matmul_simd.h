// The SIMD loops of the fused NF4 linear kernels, written once over an
// instruction set V; nf4_matmul_avx512.cpp and nf4_matmul_avx2.cpp define V and
// PK_MATMUL_TARGET (its target attribute) and include this file.
//
// A chunk is 32 consecutive elements of the flattened W starting on an even
// element: 16 packed bytes, decoded into V::kVecs vectors in x_packed's order
// (even columns, then odd), so no lane shuffle puts codes back in column order.
// A row (matvec) or a row's slice of a column strip (matvec_t) is its first
// element alone if it starts on a low nibble, whole chunks, and the < 32
// elements left one by one.
//
// Where chunks start 32-aligned within their blocks (every row when
// cols % 32 == 0), no chunk straddles two blocks: matvec sums code·x over a
// block and scales the sum once (the bare loops, 4096x4096 at one token on one
// core here: 1.07 ms, against 1.50 ms with a multiply per chunk), matvec_t folds
// the absmax into dy once per block. Elsewhere each chunk is scaled, blending two
// absmax values where a block boundary falls inside it.
//
// V provides: Vec, Table, kLanes, kVecs = 32 / kLanes, kMaxTokens (tokens per
// pass: its accumulators must fit the register file), and static functions
// table(), decode(table, bytes, w), split(first, second, first_count, v),
// decode_absmax (a BlockAbsmax::Decoder) and code_planes() (whether it reads
// them), zero(), set1(), load(), store(),
// add(), mul(), fma(), sum().
#pragma once
#include <algorithm>
#include <type_traits>

#include "nf4_matmul_paths.h"

namespace pykernels::cpu {
namespace {

// matvec: x of one token group, for a span of columns, stays within 32 KB of
// L1 (48 KB per core here) while every row of the range goes by.
constexpr int64_t kXFloats = 8192;
// matvec_t: the accumulators of one column strip (every token, two copies: for
// rows that start on a high and on a low nibble) take 32 KB, within L1.
constexpr int64_t kStripFloats = 8192;

// matvec asks for the packed bytes 2 KiB (a row at 4096 columns) ahead, once a
// block: NF4Linear at one token, 4096x4096 bf16, 2 threads, 0.60 -> 0.47 ms a
// layer with the weights out of cache (16 layers in turn), 0.67 -> 0.41 ms in
// cache; 1 KiB: 0.47 / 0.50, 4 KiB: 0.44 / 0.45.
constexpr int64_t kMatvecPrefetchBytes = 2048;

// Accumulators per token: one or two tokens alone need more than one chain of
// FMAs to hide the FMA latency behind the decode.
constexpr int accumulators(int tokens) { return tokens <= 2 ? 2 : 1; }

template <class V>
struct Chunks {
  typename V::Table table;
  const uint8_t* bytes;  // of chunk 0
  const float* absmax;   // BlockAbsmax::values()
  int64_t offset;        // chunk 0's first element - its first block's first element
  int64_t blocksize;
  int shift;             // log2(blocksize)

  PK_MATMUL_TARGET Chunks(const NF4Matrix& w, const BlockAbsmax& a, int64_t first_element)
      : table(V::table()),
        bytes(w.packed + first_element / 2),
        absmax(a.values()),
        offset(first_element - (a.first_block() << a.shift())),
        blocksize(w.blocksize),
        shift(a.shift()) {}

  bool aligned() const { return (offset & (kChunk - 1)) == 0; }

  PK_MATMUL_TARGET void codes(int64_t c, typename V::Vec* w) const {
    V::decode(table, bytes + c * (kChunk / 2), w);
  }
  // Codes times absmax, for any chunk.
  PK_MATMUL_TARGET void weights(int64_t c, typename V::Vec* w) const {
    codes(c, w);
    const int64_t g = offset + c * kChunk;
    const float* a = absmax + (g >> shift);
    const int64_t in_block = g & (blocksize - 1);
    if (in_block + kChunk <= blocksize) {
      const typename V::Vec s = V::set1(a[0]);
      for (int v = 0; v < V::kVecs; ++v) w[v] = V::mul(w[v], s);
    } else {
      const int first_count = int(blocksize - in_block) / 2;
      for (int v = 0; v < V::kVecs; ++v) w[v] = V::mul(w[v], V::split(a[0], a[1], first_count, v));
    }
  }
};

// Aligned chunks [0, count) block by block: body(c, n, absmax) for each run of
// n chunks in one block, n a compile-time constant for the whole blocks of
// blocksize 32 and 64 (the default), so their loop unrolls.
template <int N, class Body>
PK_MATMUL_TARGET inline int64_t whole_blocks(int64_t c, int64_t count, int64_t per_block,
                                             const float*& a, Body&& body) {
  const int64_t n = N > 0 ? N : per_block;
  for (; c + n <= count; c += n) body(c, N > 0 ? N : n, *a++);
  return c;
}

template <class V, class Body>
PK_MATMUL_TARGET inline void for_each_block(const Chunks<V>& chunks, int64_t count, Body&& body) {
  if (count == 0) return;
  const int64_t per_block = chunks.blocksize / kChunk;
  const float* a = chunks.absmax + (chunks.offset >> chunks.shift);
  int64_t c = std::min(count, per_block - ((chunks.offset & (chunks.blocksize - 1)) >> 5));
  body(0, c, *a++);
  if (per_block == 1) c = whole_blocks<1>(c, count, per_block, a, body);
  else if (per_block == 2) c = whole_blocks<2>(c, count, per_block, a, body);
  else c = whole_blocks<0>(c, count, per_block, a, body);
  if (c < count) body(c, count - c, *a);
}

// ---- matvec: sums[tt] += x[tt] . w over chunks [0, count), for TT tokens ----

template <class V, int TT, int K>
PK_MATMUL_TARGET inline void add_products(const typename V::Vec* w, const float* x, int64_t stride,
                                          typename V::Vec (&acc)[TT][K]) {
#pragma GCC unroll 16
  for (int tt = 0; tt < TT; ++tt)
#pragma GCC unroll 4
    for (int v = 0; v < V::kVecs; ++v)
      acc[tt][v % K] = V::fma(w[v], V::load(x + tt * stride + v * V::kLanes), acc[tt][v % K]);
}

// noinline: each token count gets the whole register file to itself.
template <class V, int TT>
__attribute__((noinline)) PK_MATMUL_TARGET void dot_tokens(const Chunks<V>& chunks, int64_t count,
                                                           const float* x, int64_t stride,
                                                           float* sums) {
  constexpr int K = accumulators(TT);
  using Vec = typename V::Vec;
  Vec acc[TT][K];
  for (int tt = 0; tt < TT; ++tt)
    for (int k = 0; k < K; ++k) acc[tt][k] = V::zero();
  if (chunks.aligned()) {
    for_each_block(chunks, count, [&](int64_t c, int64_t n, float scale) PK_MATMUL_TARGET {
      __builtin_prefetch(chunks.bytes + c * (kChunk / 2) + kMatvecPrefetchBytes);
      Vec block[TT][K];
      for (int tt = 0; tt < TT; ++tt)
        for (int k = 0; k < K; ++k) block[tt][k] = V::zero();
      for (int64_t i = 0; i < n; ++i) {
        Vec w[V::kVecs];
        chunks.codes(c + i, w);
        add_products<V, TT, K>(w, x + (c + i) * kChunk, stride, block);
      }
      const Vec s = V::set1(scale);
      for (int tt = 0; tt < TT; ++tt)
        for (int k = 0; k < K; ++k) acc[tt][k] = V::fma(block[tt][k], s, acc[tt][k]);
    });
  } else {
    for (int64_t c = 0; c < count; ++c) {
      Vec w[V::kVecs];
      chunks.weights(c, w);
      add_products<V, TT, K>(w, x + c * kChunk, stride, acc);
    }
  }
  for (int tt = 0; tt < TT; ++tt) {
    Vec total = acc[tt][0];
    for (int k = 1; k < K; ++k) total = V::add(total, acc[tt][k]);
    sums[tt] += V::sum(total);
  }
}

// kernel(std::integral_constant<int, group>{}) for 1 <= group <= TT: each token
// count its own compiled loop.
template <int TT, class Kernel>
PK_MATMUL_TARGET inline void with_token_count(int64_t group, Kernel&& kernel) {
  if constexpr (TT > 1)
    if (group < TT) return with_token_count<TT - 1>(group, kernel);
  kernel(std::integral_constant<int, TT>{});
}

template <class V>
PK_MATMUL_TARGET void matvec(DType dtype, const NF4Matrix& w, const float* x_packed,
                             int64_t tokens, int64_t row_begin, int64_t row_end,
                             const void* bias, void* y) {
  const int64_t cols = w.cols;
  const int64_t stride = padded_cols(cols);
  std::vector<float> sums(size_t((row_end - row_begin) * tokens), 0.0f);  // [row][token]
  BlockAbsmax absmax(w, V::decode_absmax, V::code_planes());
  for (int64_t t0 = 0; t0 < tokens; t0 += V::kMaxTokens) {
    const int64_t group = std::min<int64_t>(V::kMaxTokens, tokens - t0);
    const int64_t span = std::max<int64_t>(1, kXFloats / (kChunk * group));  // chunks
    for (int64_t c0 = 0; c0 < cols / kChunk; c0 += span)
      for (int64_t j = row_begin; j < row_end; ++j) {
        const int64_t start = j * cols;
        const int64_t lead = start & 1;  // starts on a low nibble: column 0 alone, x copy 1
        const int64_t c1 = std::min(c0 + span, (cols - lead) / kChunk);
        if (c1 <= c0) continue;
        const int64_t first = start + lead + c0 * kChunk;
        absmax.load(first, first + (c1 - c0) * kChunk);
        with_token_count<V::kMaxTokens>(group, [&](auto tt) PK_MATMUL_TARGET {
          dot_tokens<V, tt>(Chunks<V>(w, absmax, first), c1 - c0,
                            x_packed + (lead * tokens + t0) * stride + c0 * kChunk, stride,
                            &sums[size_t((j - row_begin) * tokens + t0)]);
        });
      }
  }
  for (int64_t j = row_begin; j < row_end; ++j) {
    const int64_t start = j * cols;
    const int64_t lead = start & 1;
    const int64_t tail = lead + (cols - lead) / kChunk * kChunk;
    const float b = bias != nullptr ? load_value(dtype, bias, j) : 0.0f;
    // Only a lead or tail element needs the absmax again (decoding a row's
    // double-quantized absmax twice cost 1034 against 900 us at 4096x4096).
    if (lead || tail < cols) absmax.load(start, start + cols);
    for (int64_t t = 0; t < tokens; ++t) {
      const float* x = x_packed + (lead * tokens + t) * stride;
      float sum = sums[size_t((j - row_begin) * tokens + t)];
      if (lead) sum += x_packed[t * stride] * absmax.weight(start);
      for (int64_t r = tail; r < cols; ++r)
        sum += x[chunk_position(r - lead)] * absmax.weight(start + r);
      store_value(dtype, y, t * w.rows + j, sum + b);
    }
  }
}

// ---- matvec_t: acc[tt] += dy[tt] * w over chunks [0, count), for TT tokens ----

template <class V, int TT>
PK_MATMUL_TARGET inline void axpy_chunk(const typename V::Vec* w, const typename V::Vec* d,
                                        float* acc, int64_t stride) {
#pragma GCC unroll 16
  for (int tt = 0; tt < TT; ++tt)
#pragma GCC unroll 4
    for (int v = 0; v < V::kVecs; ++v) {
      float* p = acc + tt * stride + v * V::kLanes;
      V::store(p, V::fma(w[v], d[tt], V::load(p)));
    }
}

template <class V, int TT>
__attribute__((noinline)) PK_MATMUL_TARGET void axpy_tokens(const Chunks<V>& chunks, int64_t count,
                                                            const float* dy, float* acc,
                                                            int64_t stride) {
  using Vec = typename V::Vec;
  if (chunks.aligned()) {
    for_each_block(chunks, count, [&](int64_t c, int64_t n, float scale) PK_MATMUL_TARGET {
      Vec d[TT];
      for (int tt = 0; tt < TT; ++tt) d[tt] = V::set1(dy[tt] * scale);
      for (int64_t i = 0; i < n; ++i) {
        Vec w[V::kVecs];
        chunks.codes(c + i, w);
        axpy_chunk<V, TT>(w, d, acc + (c + i) * kChunk, stride);
      }
    });
    return;
  }
  Vec d[TT];
  for (int tt = 0; tt < TT; ++tt) d[tt] = V::set1(dy[tt]);
  for (int64_t c = 0; c < count; ++c) {
    Vec w[V::kVecs];
    chunks.weights(c, w);
    axpy_chunk<V, TT>(w, d, acc + c * kChunk, stride);
  }
}

template <class V>
PK_MATMUL_TARGET void matvec_t(DType dtype, const NF4Matrix& w, const float* dy_t,
                               int64_t tokens, int64_t col_begin, int64_t col_end, void* dx) {
  const int64_t cols = w.cols;
  const int64_t strip = std::max(kChunk, kStripFloats / (2 * tokens) / kChunk * kChunk);
  std::vector<float> acc(size_t(2 * tokens * strip));  // [copy][token][strip], x_packed's order
  BlockAbsmax absmax(w, V::decode_absmax, V::code_planes());
  for (int64_t a = col_begin; a < col_end; a += strip) {
    const int64_t width = std::min(strip, col_end - a);
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t j = 0; j < w.rows; ++j) {
      const int64_t start = j * cols + a;
      const int64_t lead = start & 1;
      const int64_t count = (width - lead) / kChunk;
      const int64_t tail = lead + count * kChunk;
      absmax.load(start, start + width);
      const Chunks<V> chunks(w, absmax, start + lead);
      const float* dy = dy_t + j * tokens;
      float* acc_copy = acc.data() + lead * tokens * strip;
      for (int64_t t0 = 0; t0 < tokens; t0 += V::kMaxTokens)
        with_token_count<V::kMaxTokens>(
            std::min<int64_t>(V::kMaxTokens, tokens - t0), [&](auto tt) PK_MATMUL_TARGET {
              axpy_tokens<V, tt>(chunks, count, dy + t0, acc_copy + t0 * strip, strip);
            });
      for (int64_t t = 0; t < tokens; ++t) {
        if (lead) acc[size_t(t * strip)] += dy[t] * absmax.weight(start);
        for (int64_t r = tail; r < width; ++r)
          acc_copy[t * strip + chunk_position(r - lead)] += dy[t] * absmax.weight(start + r);
      }
    }
    for (int64_t t = 0; t < tokens; ++t) {
      const float* copy0 = acc.data() + t * strip;
      const float* copy1 = acc.data() + (tokens + t) * strip;
      for (int64_t r = 0; r < width; ++r) {
        const float v = copy0[chunk_position(r)] + (r > 0 ? copy1[chunk_position(r - 1)] : 0.0f);
        store_value(dtype, dx, t * cols + a + r, v);
      }
    }
  }
}

}  // namespace
}  // namespace pykernels::cpu
