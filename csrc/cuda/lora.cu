// LoRA's products that touch drop(x), on CUDA. The math and the CPU twins:
// csrc/cpu/lora.cpp; the dropout mask is dropout.h's hash of (seed, row,
// column), so a CUDA mask is the CPU's bit for bit.
//
//   x_at     out[t, k]  = sum_i drop(x)[t, i] a[k, i]        xa = drop(x) A^T     [T, r]
//   gt_x     out[k, i]  = sum_t g[t, k] drop(x)[t, i]        dA = dxa^T drop(x)   [r, in]
//   add_g_a  out[t, i] += scale * sum_k g[t, k] a[k, i]      dx += drop'(dxa A),  W += s B A
//                         where kept
//
// Layout of the work:
//   x_at     The CPU's order exactly: output (t, k) is 16 fp32 partial sums,
//            partial p taking columns i = p (mod 16) in ascending order by FMA,
//            then added pairwise 8, 4, 2, 1 apart (lora_paths.h). A pair of
//            lanes owns one row and 8 ranks: the even lane partials 0-7, the odd
//            lane 8-15, so each step of 16 columns is one chunk of x per lane
//            (its mask bits hashed once for the 8 ranks) and one chunk of each
//            rank's row of A. One shuffle joins the pair; the rest is in registers.
//            Columns past the end count as zeros, as on the CPU's vector paths.
//   gt_x     Not the CPU's order: one chain over all T rows per output would
//            leave most of the GPU idle. A thread sums one chunk of 8 columns for
//            8 ranks over a slab of rows; the slabs' fp32 sums are added in slab
//            order (slabs.h), so the result is still deterministic.
//   add_g_a  The CPU's order exactly: an FMA chain over k from 0, then one
//            multiply by scale and one add. A thread owns a chunk of 8 columns in
//            8 rows, so each chunk of A serves 8 rows; the lanes of a warp share
//            their rows, so each g[t, k] is one broadcast load.
// All loop over int64_t indices, grid-stride, so any size fits a capped grid.
#include <cuda_runtime.h>

#include "chunk.h"
#include "launch.h"
#include "pykernels/cuda.h"
#include "pykernels/dropout.h"
#include "slabs.h"

namespace pykernels::cuda {
namespace {

constexpr int kPartials = 16;  // x_at: partial sums per output (cpu's kLoraLanes)
constexpr int kUnitRanks = 8;  // x_at and gt_x: ranks per thread
constexpr int kAddRows = 8;    // add_g_a: rows per thread

// ---- helpers ----

// drop(x) of a chunk: v * scale where kept (rounded once), 0 where dropped.
__device__ __forceinline__ void drop_chunk(const Dropout& d, DropoutRow key, int64_t col,
                                           float (&v)[kChunk]) {
  if (!d.active()) return;
#pragma unroll
  for (int k = 0; k < kChunk; ++k)
    v[k] = dropout_keep(d, key, uint32_t(col + k)) ? mul_rn(v[k], d.scale) : 0.0f;
}

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// ---- kernels ----

template <DType D>
__global__ void __launch_bounds__(kThreads)
lora_x_at_kernel(const Elem<D>* __restrict__ x, const Elem<D>* __restrict__ a, int64_t rows,
                 int64_t cols, int64_t rank, Dropout d, bool vectorized,
                 Elem<D>* __restrict__ out) {
  const int half = threadIdx.x & 1;  // partials [8 * half, 8 * half + 8)
  const int lane = int(threadIdx.x % 32);
  const int64_t groups = ceil_div(rank, kUnitRanks);
  const int64_t units = rows * groups;
  const int64_t stride = int64_t(gridDim.x) * kThreads / 2;
  // Whole warps loop together (the shuffle below wants every lane): a pair past
  // the end redoes the last unit and writes nothing.
  for (int64_t unit = (int64_t(blockIdx.x) * kThreads + threadIdx.x) / 2; unit - lane / 2 < units;
       unit += stride) {
    const bool active = unit < units;
    const int64_t u = active ? unit : units - 1;
    const int64_t t = u / groups, k0 = u % groups * kUnitRanks;
    const DropoutRow key = dropout_row(d.seed, uint64_t(t));
    const Elem<D>* a_row[kUnitRanks];
#pragma unroll
    for (int j = 0; j < kUnitRanks; ++j)  // a short group repeats its last rank
      a_row[j] = a + min64(k0 + j, rank - 1) * cols;
    float acc[kUnitRanks][kChunk] = {};
    for (int64_t i0 = 0; i0 < cols; i0 += kPartials) {
      const int64_t i = i0 + half * kChunk;
      float v[kChunk];
      load_chunk<D>(x + t * cols, i, cols, vectorized, v);
      drop_chunk(d, key, i, v);
#pragma unroll
      for (int j = 0; j < kUnitRanks; ++j) {
        float w[kChunk];
        load_chunk<D>(a_row[j], i, cols, vectorized, w);
#pragma unroll
        for (int k = 0; k < kChunk; ++k) acc[j][k] = fmaf(v[k], w[k], acc[j][k]);
      }
    }
#pragma unroll
    for (int j = 0; j < kUnitRanks; ++j) {
      float p[kChunk];
#pragma unroll
      for (int k = 0; k < kChunk; ++k)  // partial k + partial k + 8
        p[k] = acc[j][k] + __shfl_xor_sync(0xffffffffu, acc[j][k], 1);
#pragma unroll
      for (int width = kChunk / 2; width >= 1; width /= 2)
#pragma unroll
        for (int k = 0; k < width; ++k) p[k] = p[k] + p[k + width];
      if (active && half == 0 && k0 + j < rank) store_from_float<D>(out, t * rank + k0 + j, p[0]);
    }
  }
}

// blockIdx.y: the slab of rows [slab * slab_rows, ...) whose sums go to workspace[slab].
template <DType D>
__global__ void __launch_bounds__(kThreads)
lora_gt_x_kernel(const float* __restrict__ g, const Elem<D>* __restrict__ x, int64_t rows,
                 int64_t cols, int64_t rank, Dropout d, int64_t slab_rows, bool vectorized,
                 float* __restrict__ workspace) {
  const int64_t chunks = ceil_div(cols, kChunk);
  const int64_t items = chunks * ceil_div(rank, kUnitRanks);
  const int64_t t_begin = int64_t(blockIdx.y) * slab_rows;
  const int64_t t_end = min64(rows, t_begin + slab_rows);
  float* sums = workspace + int64_t(blockIdx.y) * rank * cols;
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  for (int64_t item = int64_t(blockIdx.x) * kThreads + threadIdx.x; item < items; item += stride) {
    const int64_t i = item % chunks * kChunk, k0 = item / chunks * kUnitRanks;
    float acc[kUnitRanks][kChunk] = {};
    for (int64_t t = t_begin; t < t_end; ++t) {
      float v[kChunk];
      load_chunk<D>(x + t * cols, i, cols, vectorized, v);
      drop_chunk(d, dropout_row(d.seed, uint64_t(t)), i, v);
#pragma unroll
      for (int j = 0; j < kUnitRanks; ++j) {
        const float gk = k0 + j < rank ? g[t * rank + k0 + j] : 0.0f;
#pragma unroll
        for (int k = 0; k < kChunk; ++k) acc[j][k] = fmaf(gk, v[k], acc[j][k]);
      }
    }
#pragma unroll
    for (int j = 0; j < kUnitRanks; ++j)
      if (k0 + j < rank)
        store_chunk<DType::F32>(sums + (k0 + j) * cols, i, cols, vectorized, acc[j]);
  }
}

template <DType D>
__global__ void __launch_bounds__(kThreads)
lora_add_g_a_kernel(const float* __restrict__ g, const Elem<D>* __restrict__ a, int64_t rows,
                    int64_t cols, int64_t rank, float scale, Dropout d, bool vectorized,
                    Elem<D>* __restrict__ out) {
  const int64_t chunks = ceil_div(cols, kChunk);
  const int64_t items = chunks * ceil_div(rows, kAddRows);
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  for (int64_t item = int64_t(blockIdx.x) * kThreads + threadIdx.x; item < items; item += stride) {
    const int64_t i = item % chunks * kChunk, t0 = item / chunks * kAddRows;
    const float* g_row[kAddRows];
#pragma unroll
    for (int r = 0; r < kAddRows; ++r) g_row[r] = g + min64(t0 + r, rows - 1) * rank;
    float acc[kAddRows][kChunk] = {};
    for (int64_t k = 0; k < rank; ++k) {
      float w[kChunk];
      load_chunk<D>(a + k * cols, i, cols, vectorized, w);
#pragma unroll
      for (int r = 0; r < kAddRows; ++r) {
        const float gk = g_row[r][k];
#pragma unroll
        for (int c = 0; c < kChunk; ++c) acc[r][c] = fmaf(gk, w[c], acc[r][c]);
      }
    }
#pragma unroll
    for (int r = 0; r < kAddRows; ++r) {
      const int64_t t = t0 + r;
      if (t >= rows) break;
      const DropoutRow key = dropout_row(d.seed, uint64_t(t));
      float o[kChunk];
      load_chunk<D>(out + t * cols, i, cols, vectorized, o);
#pragma unroll
      for (int c = 0; c < kChunk; ++c)
        if (!d.active() || dropout_keep(d, key, uint32_t(i + c)))
          o[c] = add_rn(o[c], mul_rn(scale, acc[r][c]));
      store_chunk<D>(out + t * cols, i, cols, vectorized, o);
    }
  }
}

// ---- launchers ----

bool valid_sizes(int64_t rows, int64_t cols, int64_t rank) {
  return rows >= 0 && cols >= 0 && rank >= 1;
}

// Every row of each buffer starts 16-byte aligned, so whole chunks take vector accesses.
bool rows_aligned(int64_t cols, const void* p, const void* q) {
  return cols % kChunk == 0 && aligned(p, 16) && aligned(q, 16);
}

int64_t gt_x_slabs(int64_t rows, int64_t cols, int64_t rank) {
  return slab_count(rows, ceil_div(cols, kChunk) * ceil_div(rank, kUnitRanks), rank * cols);
}

}  // namespace

cudaError_t lora_x_at(DType dtype, const void* x, const void* a, int64_t rows, int64_t cols,
                      int64_t rank, const Dropout& d, void* out, cudaStream_t stream) {
  if (!valid_sizes(rows, cols, rank)) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  const int64_t threads = 2 * rows * ceil_div(rank, kUnitRanks);
  return dispatch_dtype(dtype, [&](auto dt) {
    constexpr DType D = decltype(dt)::value;
    lora_x_at_kernel<D><<<ctas_for(threads, kThreads), kThreads, 0, stream>>>(
        static_cast<const Elem<D>*>(x), static_cast<const Elem<D>*>(a), rows, cols, rank, d,
        rows_aligned(cols, x, a), static_cast<Elem<D>*>(out));
    return cudaGetLastError();
  });
}

int64_t lora_gt_x_workspace(int64_t rows, int64_t cols, int64_t rank) {
  return gt_x_slabs(rows, cols, rank) * rank * cols;
}

cudaError_t lora_gt_x(DType dtype, const float* g, const void* x, int64_t rows, int64_t cols,
                      int64_t rank, const Dropout& d, float* workspace, void* out,
                      cudaStream_t stream) {
  if (!valid_sizes(rows, cols, rank)) return cudaErrorInvalidValue;
  if (cols == 0) return cudaSuccess;
  const int64_t slabs = gt_x_slabs(rows, cols, rank);
  const int64_t items = ceil_div(cols, kChunk) * ceil_div(rank, kUnitRanks);
  const dim3 grid(unsigned(ctas_for(items, kThreads)), unsigned(slabs));
  const cudaError_t err = dispatch_dtype(dtype, [&](auto dt) {
    constexpr DType D = decltype(dt)::value;
    lora_gt_x_kernel<D><<<grid, kThreads, 0, stream>>>(
        g, static_cast<const Elem<D>*>(x), rows, cols, rank, d, ceil_div(rows, slabs),
        rows_aligned(cols, x, workspace), workspace);
    return cudaGetLastError();
  });
  if (err != cudaSuccess) return err;
  return sum_slabs(dtype, workspace, slabs, rank * cols, out, stream);
}

cudaError_t lora_add_g_a(DType dtype, const float* g, const void* a, int64_t rows, int64_t cols,
                         int64_t rank, float scale, const Dropout& d, void* out,
                         cudaStream_t stream) {
  if (!valid_sizes(rows, cols, rank)) return cudaErrorInvalidValue;
  if (rows == 0 || cols == 0) return cudaSuccess;
  const int64_t items = ceil_div(cols, kChunk) * ceil_div(rows, kAddRows);
  return dispatch_dtype(dtype, [&](auto dt) {
    constexpr DType D = decltype(dt)::value;
    lora_add_g_a_kernel<D><<<ctas_for(items, kThreads), kThreads, 0, stream>>>(
        g, static_cast<const Elem<D>*>(a), rows, cols, rank, scale, d, rows_aligned(cols, a, out),
        static_cast<Elem<D>*>(out));
    return cudaGetLastError();
  });
}

}  // namespace pykernels::cuda
