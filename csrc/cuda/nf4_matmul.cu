// NF4 linear on CUDA, straight from the packed codes (format: pykernels/nf4.h;
// the CPU twins: csrc/cpu/nf4_matmul.cpp):
//
//   W[j, i] = code[q(g)] * absmax(g >> log2(blocksize)),   g = j * cols + i
//   matvec           y[t, j]  = sum_i x[t, i] W[j, i] (+ bias[j])   few tokens
//   matvec_t         dx[t, i] = sum_j dy[t, j] W[j, i]              few tokens
//   dequantize_tile  W[r0:r1, c0:c1] decoded, for the GEMM of many tokens
//                    (times diag(scale[c0:c1]) for IA³'s input scaling)
//
// absmax(b) is absmax[b], or blockwise8_decode(code, absmax_q[b],
// absmax_scale[b / 256], offset) when double-quantized, decoded where it is
// used with the code table in shared memory. Sums are fp32, rounded once.
//
// Layout of the work:
//   matvec    A warp owns a row of W. When cols % 32 == 0 (and the buffers are
//             16-byte aligned) a lane takes 32 columns at a time: one 16-byte
//             load of codes, which lie in one block (32 aligned elements never
//             straddle one), decoded through the NF4 table in shared memory
//             (lanes reading different codes hit different banks); per token,
//             32 elements of x and an FMA chain over the unscaled codes, scaled
//             by the block's absmax once. The next chunk's codes and absmax
//             load while this one is summed. Other shapes take one element per
//             lane and step. Shuffles join the lanes; lane 0 adds the bias.
//   matvec_t  A warp owns 128 columns, 4 per lane (a 2-byte load of codes per
//             row when cols % 4 == 0, the next row's loading while this one is
//             summed), over a slab of rows; the slabs' fp32 sums are added in
//             slab order (slabs.h): deterministic.
//   Both keep their sums per token in registers: the token count is a template
//   bound (1, 2, 4, 8, 16) with the actual count checked at run time.
//   dequantize_tile  A thread decodes a chunk of 8 elements of a tile row: one
//             4-byte load of codes and a 16-byte store when aligned.
#include <cuda_runtime.h>

#include <type_traits>

#include "chunk.h"
#include "launch.h"
#include "pykernels/blockwise8.h"
#include "pykernels/cuda.h"
#include "pykernels/nf4.h"
#include "slabs.h"

namespace pykernels::cuda {
namespace {

constexpr int kRowChunk = 32;       // matvec: columns per lane and step (16 bytes of codes)
constexpr int kLaneColumns = 4;     // matvec_t: columns per lane (2 bytes of codes per row)
constexpr int kWarpColumns = 32 * kLaneColumns;

// ---- helpers ----

// The fp32 absmax of a block, from whichever form W stores.
struct BlockAbsmax {
  const float* absmax;
  const uint8_t* q;
  const float* scale;
  const float* code;  // double quant: the 256-entry table, in shared memory
  float offset;
  int shift;          // log2(blocksize)

  __device__ float operator()(int64_t block) const {
    if (absmax != nullptr) return absmax[block];
    return blockwise8_decode(code, q[block], scale[block / kDoubleQuantBlocksize], offset);
  }
  __device__ float of_element(int64_t g) const { return (*this)(g >> shift); }
};

// Fills the CTA's shared tables (the NF4 codes; the 8-bit code when W is
// double-quantized) and returns W's absmax reader. Every thread of the CTA calls it.
__device__ BlockAbsmax load_tables(const NF4Matrix& w, float* nf4_table, float* code8) {
  if (threadIdx.x < 16) nf4_table[threadIdx.x] = nf4_code_table()[threadIdx.x];
  const bool double_quant = w.absmax == nullptr;
  if (double_quant) code8[threadIdx.x] = w.absmax_code[threadIdx.x];  // kThreads == 256
  __syncthreads();
  return {w.absmax, w.absmax_q, w.absmax_scale, code8, double_quant ? *w.absmax_offset : 0.0f,
          __ffsll(w.blocksize) - 1};
}

static_assert(kThreads == 256, "load_tables loads the 8-bit code table one entry per thread");

// The packed codes of elements [g, g + 32) and [g, g + 4), g even and, for the
// 16-byte load, a multiple of 32 from a 16-byte aligned start.
__device__ __forceinline__ uint4 codes32(const uint8_t* packed, int64_t g) {
  return *reinterpret_cast<const uint4*>(packed + g / 2);
}
__device__ __forceinline__ uint32_t codes4(const uint8_t* packed, int64_t g) {
  return *reinterpret_cast<const uint16_t*>(packed + g / 2);
}

// v rounded to D and back: the value a buffer of D holds.
template <DType D>
__device__ __forceinline__ float round_to(float v) {
  Elem<D> stored;
  store_from_float<D>(&stored, 0, v);
  return load_as_float<D>(&stored, 0);
}

// Element e of a 32-bit word of packed codes (byte e / 2, the even element high).
__device__ __forceinline__ uint32_t code_of(uint32_t word, int e) {
  return (word >> (8 * (e / 2) + 4 * (1 - e % 2))) & 0xfu;
}

// ---- kernels ----

template <DType D, int kTokens>
__global__ void __launch_bounds__(kThreads)
nf4_matvec_kernel(NF4Matrix w, const Elem<D>* __restrict__ x, int64_t tokens,
                  const Elem<D>* __restrict__ bias, bool vectorized, Elem<D>* __restrict__ y) {
  __shared__ float table[16];
  __shared__ float code8[256];
  const BlockAbsmax block_absmax = load_tables(w, table, code8);
  const int lane = int(threadIdx.x % 32);
  const int64_t warps = int64_t(gridDim.x) * kWarpsPerCta;
  for (int64_t j = int64_t(blockIdx.x) * kWarpsPerCta + threadIdx.x / 32; j < w.rows; j += warps) {
    const int64_t start = j * w.cols;
    float acc[kTokens] = {};
    if (vectorized) {
      // Loads one chunk ahead (unrolling the loop instead took 6x the compile time).
      constexpr int64_t kStep = 32 * kRowChunk;
      int64_t i = int64_t(kRowChunk) * lane;
      uint4 q{};
      float next_absmax = 0.0f;
      if (i < w.cols) {
        q = codes32(w.packed, start + i);
        next_absmax = block_absmax.of_element(start + i);
      }
      for (; i < w.cols; i += kStep) {
        const uint32_t words[4] = {q.x, q.y, q.z, q.w};
        float code[kRowChunk];
#pragma unroll
        for (int e = 0; e < kRowChunk; ++e) code[e] = table[code_of(words[e / 8], e % 8)];
        const float absmax = next_absmax;
        if (i + kStep < w.cols) {
          q = codes32(w.packed, start + i + kStep);
          next_absmax = block_absmax.of_element(start + i + kStep);
        }
#pragma unroll
        for (int t = 0; t < kTokens; ++t) {
          if (t >= tokens) break;
          float sum = 0.0f;
#pragma unroll
          for (int c = 0; c < kRowChunk; c += kChunk) {
            float v[kChunk];
            load_chunk<D>(x + t * w.cols, i + c, w.cols, true, v);
#pragma unroll
            for (int k = 0; k < kChunk; ++k) sum = fmaf(v[k], code[c + k], sum);
          }
          acc[t] = fmaf(sum, absmax, acc[t]);
        }
      }
    } else {
      for (int64_t i = lane; i < w.cols; i += 32) {
        const int64_t g = start + i;
        const float weight = nf4_decode(table, nf4_unpack(w.packed, g), block_absmax.of_element(g));
#pragma unroll
        for (int t = 0; t < kTokens; ++t)
          if (t < tokens) acc[t] = fmaf(load_as_float<D>(x, t * w.cols + i), weight, acc[t]);
      }
    }
#pragma unroll
    for (int t = 0; t < kTokens; ++t)
      for (int offset = 16; offset > 0; offset /= 2)
        acc[t] += __shfl_xor_sync(0xffffffffu, acc[t], offset);
    if (lane == 0) {
      const float b = bias != nullptr ? load_as_float<D>(bias, j) : 0.0f;
#pragma unroll
      for (int t = 0; t < kTokens; ++t)
        if (t < tokens) store_from_float<D>(y, t * w.rows + j, add_rn(acc[t], b));
    }
  }
}

// Warp item = (slab, column tile); the slab's rows are [slab * slab_rows, ...)
// and its sums go to workspace[slab] ([tokens, cols]).
template <DType D, int kTokens>
__global__ void __launch_bounds__(kThreads)
nf4_matvec_t_kernel(NF4Matrix w, const Elem<D>* __restrict__ dy, int64_t tokens, int64_t slabs,
                    int64_t slab_rows, bool vectorized, float* __restrict__ workspace) {
  __shared__ float table[16];
  __shared__ float code8[256];
  const BlockAbsmax block_absmax = load_tables(w, table, code8);
  const int lane = int(threadIdx.x % 32);
  const int64_t tiles = ceil_div(w.cols, kWarpColumns);
  const int64_t warps = int64_t(gridDim.x) * kWarpsPerCta;
  for (int64_t item = int64_t(blockIdx.x) * kWarpsPerCta + threadIdx.x / 32; item < tiles * slabs;
       item += warps) {
    const int64_t slab = item / tiles;
    const int64_t c = item % tiles * kWarpColumns + int64_t(kLaneColumns) * lane;
    const int64_t j_end = (slab + 1) * slab_rows < w.rows ? (slab + 1) * slab_rows : w.rows;
    const int64_t j_begin = slab * slab_rows;
    // The vector path (4 elements from an even index, in one block) loads one row ahead.
    const bool fast = vectorized && c < w.cols;
    uint32_t word = 0;
    float absmax = 0.0f;
    if (fast && j_begin < j_end) {
      word = codes4(w.packed, j_begin * w.cols + c);
      absmax = block_absmax.of_element(j_begin * w.cols + c);
    }
    float acc[kTokens][kLaneColumns] = {};
    for (int64_t j = j_begin; j < j_end; ++j) {
      const int64_t g = j * w.cols + c;
      float weight[kLaneColumns];
      if (fast) {
#pragma unroll
        for (int e = 0; e < kLaneColumns; ++e)
          weight[e] = nf4_decode(table, code_of(word, e), absmax);
        if (j + 1 < j_end) {
          word = codes4(w.packed, g + w.cols);
          absmax = block_absmax.of_element(g + w.cols);
        }
      } else {
#pragma unroll
        for (int e = 0; e < kLaneColumns; ++e)
          weight[e] = c + e < w.cols ? nf4_decode(table, nf4_unpack(w.packed, g + e),
                                                  block_absmax.of_element(g + e))
                                     : 0.0f;
      }
#pragma unroll
      for (int t = 0; t < kTokens; ++t) {
        if (t >= tokens) break;
        const float d = load_as_float<D>(dy, t * w.rows + j);
#pragma unroll
        for (int e = 0; e < kLaneColumns; ++e) acc[t][e] = fmaf(d, weight[e], acc[t][e]);
      }
    }
    float* sums = workspace + slab * tokens * w.cols;
#pragma unroll
    for (int t = 0; t < kTokens; ++t) {
      if (t >= tokens) break;
#pragma unroll
      for (int e = 0; e < kLaneColumns; ++e)
        if (c + e < w.cols) sums[t * w.cols + c + e] = acc[t][e];
    }
  }
}

template <DType D>
__global__ void __launch_bounds__(kThreads)
nf4_dequantize_tile_kernel(NF4Matrix w, int64_t row_begin, int64_t rows, int64_t col_begin,
                           int64_t width, const float* __restrict__ col_scale, bool vectorized,
                           Elem<D>* __restrict__ out) {
  __shared__ float table[16];
  __shared__ float code8[256];
  const BlockAbsmax block_absmax = load_tables(w, table, code8);
  const int64_t chunks = ceil_div(width, kChunk);
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  for (int64_t item = int64_t(blockIdx.x) * kThreads + threadIdx.x; item < rows * chunks;
       item += stride) {
    const int64_t r = item / chunks, c = item % chunks * kChunk;
    const int64_t g = (row_begin + r) * w.cols + col_begin + c;
    float v[kChunk];
    if (vectorized && c + kChunk <= width) {  // g % 8 == 0: one block, 4 bytes of codes
      const uint32_t word = *reinterpret_cast<const uint32_t*>(w.packed + g / 2);
      const float absmax = block_absmax.of_element(g);
#pragma unroll
      for (int e = 0; e < kChunk; ++e) v[e] = nf4_decode(table, code_of(word, e), absmax);
    } else {
#pragma unroll
      for (int e = 0; e < kChunk; ++e)
        v[e] = c + e < width ? nf4_decode(table, nf4_unpack(w.packed, g + e),
                                          block_absmax.of_element(g + e))
                             : 0.0f;
    }
    if (col_scale != nullptr) {  // ia3_scale's bits on the decoded tile: round, scale, round
#pragma unroll
      for (int e = 0; e < kChunk; ++e)
        if (c + e < width) v[e] = mul_rn(round_to<D>(v[e]), col_scale[col_begin + c + e]);
    }
    store_chunk<D>(out + r * width, c, width, vectorized, v);
  }
}

// ---- launchers ----

bool valid(const NF4Matrix& w) {
  return nf4_valid_blocksize(w.blocksize) && w.rows >= 0 && w.cols >= 0 &&
         (w.absmax != nullptr) != (w.absmax_q != nullptr);
}

// f(std::integral_constant<int, kTokens>) for the smallest bound that holds `tokens`.
template <class F>
cudaError_t dispatch_tokens(int64_t tokens, F&& f) {
  if (tokens <= 1) return f(std::integral_constant<int, 1>{});
  if (tokens <= 2) return f(std::integral_constant<int, 2>{});
  if (tokens <= 4) return f(std::integral_constant<int, 4>{});
  if (tokens <= 8) return f(std::integral_constant<int, 8>{});
  return f(std::integral_constant<int, 16>{});
}

int64_t matvec_t_slabs(const NF4Matrix& w, int64_t tokens) {
  return slab_count(w.rows, ceil_div(w.cols, kWarpColumns) * 32, tokens * w.cols);
}

}  // namespace

cudaError_t nf4_matvec(DType dtype, const NF4Matrix& w, const void* x, int64_t tokens,
                       const void* bias, void* y, cudaStream_t stream) {
  if (!valid(w) || tokens < 0 || tokens > kNF4MatvecMaxTokens) return cudaErrorInvalidValue;
  if (tokens == 0 || w.rows == 0) return cudaSuccess;
  const bool vectorized = w.cols % kRowChunk == 0 && aligned(w.packed, 16) && aligned(x, 16);
  return dispatch_dtype(dtype, [&](auto dt) {
    constexpr DType D = decltype(dt)::value;
    return dispatch_tokens(tokens, [&](auto bound) {
      nf4_matvec_kernel<D, decltype(bound)::value>
          <<<ctas_for(w.rows, kWarpsPerCta), kThreads, 0, stream>>>(
              w, static_cast<const Elem<D>*>(x), tokens, static_cast<const Elem<D>*>(bias),
              vectorized, static_cast<Elem<D>*>(y));
      return cudaGetLastError();
    });
  });
}

int64_t nf4_matvec_t_workspace(const NF4Matrix& w, int64_t tokens) {
  return matvec_t_slabs(w, tokens) * tokens * w.cols;
}

cudaError_t nf4_matvec_t(DType dtype, const NF4Matrix& w, const void* dy, int64_t tokens,
                         float* workspace, void* dx, cudaStream_t stream) {
  if (!valid(w) || tokens < 0 || tokens > kNF4MatvecMaxTokens) return cudaErrorInvalidValue;
  if (tokens == 0 || w.cols == 0) return cudaSuccess;
  const int64_t slabs = matvec_t_slabs(w, tokens);
  const bool vectorized = w.cols % kLaneColumns == 0 && aligned(w.packed, 2);
  const int64_t warps = slabs * ceil_div(w.cols, kWarpColumns);
  const cudaError_t err = dispatch_dtype(dtype, [&](auto dt) {
    constexpr DType D = decltype(dt)::value;
    return dispatch_tokens(tokens, [&](auto bound) {
      nf4_matvec_t_kernel<D, decltype(bound)::value>
          <<<ctas_for(warps, kWarpsPerCta), kThreads, 0, stream>>>(
              w, static_cast<const Elem<D>*>(dy), tokens, slabs, ceil_div(w.rows, slabs),
              vectorized, workspace);
      return cudaGetLastError();
    });
  });
  if (err != cudaSuccess) return err;
  return sum_slabs(dtype, workspace, slabs, tokens * w.cols, dx, stream);
}

cudaError_t nf4_dequantize_tile(DType dtype, const NF4Matrix& w, int64_t row_begin,
                                int64_t row_end, int64_t col_begin, int64_t col_end,
                                const float* col_scale, void* out, cudaStream_t stream) {
  if (!valid(w) || row_begin < 0 || row_begin > row_end || row_end > w.rows || col_begin < 0 ||
      col_begin > col_end || col_end > w.cols)
    return cudaErrorInvalidValue;
  const int64_t rows = row_end - row_begin, width = col_end - col_begin;
  if (rows == 0 || width == 0) return cudaSuccess;
  // Every chunk starts on an element index that is a multiple of 8, and every
  // tile row 16-byte aligned in out.
  const bool vectorized = w.cols % kChunk == 0 && col_begin % kChunk == 0 &&
                          width % kChunk == 0 && aligned(w.packed, 4) && aligned(out, 16);
  return dispatch_dtype(dtype, [&](auto dt) {
    constexpr DType D = decltype(dt)::value;
    nf4_dequantize_tile_kernel<D><<<ctas_for(rows * ceil_div(width, kChunk), kThreads), kThreads,
                                    0, stream>>>(w, row_begin, rows, col_begin, width, col_scale,
                                                 vectorized, static_cast<Elem<D>*>(out));
    return cudaGetLastError();
  });
}

}  // namespace pykernels::cuda
