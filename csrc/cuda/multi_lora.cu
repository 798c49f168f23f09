// Multi-LoRA on CUDA (math and the CPU twins: csrc/cpu/multi_lora.cpp): each
// token row t runs its own adapter a = token_adapter[t] (-1: none), punica's
// BGMV for the per-row products and SGMV-style segments for the sums over rows.
//
//   x_at     out[t, k]     = sum_i drop(x)[t, i] a_all[a][k, i]          one warp per (t, k)
//   add_g_a  out[t, i]    += scale s[a] sum_k g[t, k] a_all[a][k, i]     one thread per (t, i)
//                            where kept
//   gt_x     out_all[a][k, i] = sum over a's rows of g[t, k] drop(x)[t, i]
//                                                                        one thread per (a, k, i)
// x_at: the lanes of a warp stride over the columns of row t (coalesced), each
// keeping one fp32 partial sum, then a shuffle tree. add_g_a: consecutive threads
// take consecutive columns, so a_all[a][k, :] and out[t, :] are read coalesced;
// the sum over k is one FMA chain from 0, scaled and added once. gt_x: each
// output sums its adapter's rows in segment order (order[offsets[a] ..]): one
// chain, deterministic. The dropout mask is dropout.h's hash of (seed, token
// row, column), the CPU's bit for bit. All index with int64_t, grid-stride.
#include <cuda_runtime.h>

#include "chunk.h"
#include "launch.h"
#include "pykernels/cuda.h"
#include "pykernels/dropout.h"

namespace pykernels::cuda {
namespace {

__device__ __forceinline__ float dropped(const Dropout& d, DropoutRow key, int64_t col, float v) {
  if (!d.active()) return v;
  return dropout_keep(d, key, uint32_t(col)) ? mul_rn(v, d.scale) : 0.0f;
}

template <DType D>
__global__ void __launch_bounds__(kThreads)
multi_x_at_kernel(const Elem<D>* __restrict__ x, const Elem<D>* __restrict__ a_all,
                  const int64_t* __restrict__ token_adapter, int64_t rows, int64_t cols,
                  int64_t rank, Dropout d, Elem<D>* __restrict__ out) {
  const int lane = int(threadIdx.x % 32);
  const int64_t units = rows * rank;
  const int64_t warps = int64_t(gridDim.x) * kWarpsPerCta;
  for (int64_t unit = (int64_t(blockIdx.x) * kThreads + threadIdx.x) / 32; unit < units;
       unit += warps) {
    const int64_t t = unit / rank, k = unit % rank;
    const int64_t adapter = token_adapter[t];
    if (adapter < 0) continue;  // the whole warp: one unit per warp
    const DropoutRow key = dropout_row(d.seed, uint64_t(t));
    const Elem<D>* a_row = a_all + (adapter * rank + k) * cols;
    float acc = 0.0f;
    for (int64_t i = lane; i < cols; i += 32)
      acc = fmaf(dropped(d, key, i, load_as_float<D>(x, t * cols + i)),
                 load_as_float<D>(a_row, i), acc);
#pragma unroll
    for (int width = 16; width >= 1; width /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, width);
    if (lane == 0) store_from_float<D>(out, t * rank + k, acc);
  }
}

template <DType D>
__global__ void __launch_bounds__(kThreads)
multi_add_g_a_kernel(const float* __restrict__ g, const Elem<D>* __restrict__ a_all,
                     const int64_t* __restrict__ token_adapter, int64_t rows, int64_t cols,
                     int64_t rank, const float* __restrict__ scales, float scale, Dropout d,
                     Elem<D>* __restrict__ out) {
  const int64_t items = rows * cols;
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  for (int64_t item = int64_t(blockIdx.x) * kThreads + threadIdx.x; item < items;
       item += stride) {
    const int64_t t = item / cols, i = item % cols;
    const int64_t adapter = token_adapter[t];
    if (adapter < 0) continue;
    if (d.active() && !dropout_keep(d, dropout_row(d.seed, uint64_t(t)), uint32_t(i))) continue;
    const Elem<D>* a = a_all + adapter * rank * cols;
    float sum = 0.0f;
    for (int64_t k = 0; k < rank; ++k)
      sum = fmaf(g[t * rank + k], load_as_float<D>(a, k * cols + i), sum);
    const float s = scales != nullptr ? scale * scales[adapter] : scale;
    store_from_float<D>(out, item, load_as_float<D>(out, item) + s * sum);
  }
}

template <DType D>
__global__ void __launch_bounds__(kThreads)
multi_gt_x_kernel(const float* __restrict__ g, const Elem<D>* __restrict__ x,
                  const int64_t* __restrict__ order, const int64_t* __restrict__ offsets,
                  int64_t n_adapters, int64_t cols, int64_t rank, Dropout d,
                  Elem<D>* __restrict__ out_all) {
  const int64_t items = n_adapters * rank * cols;
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  for (int64_t item = int64_t(blockIdx.x) * kThreads + threadIdx.x; item < items;
       item += stride) {
    const int64_t i = item % cols, k = item / cols % rank, adapter = item / (cols * rank);
    float sum = 0.0f;
    for (int64_t p = offsets[adapter]; p < offsets[adapter + 1]; ++p) {
      const int64_t t = order[p];
      sum = fmaf(g[t * rank + k],
                 dropped(d, dropout_row(d.seed, uint64_t(t)), i, load_as_float<D>(x, t * cols + i)),
                 sum);
    }
    store_from_float<D>(out_all, item, sum);
  }
}

}  // namespace

cudaError_t multi_lora_x_at(DType dtype, const void* x, const void* a_all,
                            const int64_t* token_adapter, int64_t rows, int64_t cols,
                            int64_t rank, const Dropout& d, void* out, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    constexpr DType D = decltype(tag)::value;
    multi_x_at_kernel<D><<<ctas_for(rows * rank, kWarpsPerCta), kThreads, 0, stream>>>(
        static_cast<const Elem<D>*>(x), static_cast<const Elem<D>*>(a_all), token_adapter, rows,
        cols, rank, d, static_cast<Elem<D>*>(out));
    return cudaGetLastError();
  });
}

cudaError_t multi_lora_add_g_a(DType dtype, const float* g, const void* a_all,
                               const int64_t* token_adapter, int64_t rows, int64_t cols,
                               int64_t rank, const float* scales, float scale, const Dropout& d,
                               void* out, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    constexpr DType D = decltype(tag)::value;
    multi_add_g_a_kernel<D><<<ctas_for(rows * cols, kThreads), kThreads, 0, stream>>>(
        g, static_cast<const Elem<D>*>(a_all), token_adapter, rows, cols, rank, scales, scale, d,
        static_cast<Elem<D>*>(out));
    return cudaGetLastError();
  });
}

cudaError_t multi_lora_gt_x(DType dtype, const float* g, const void* x, const int64_t* order,
                            const int64_t* offsets, int64_t n_adapters, int64_t cols, int64_t rank,
                            const Dropout& d, void* out_all, cudaStream_t stream) {
  if (n_adapters == 0 || cols == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    constexpr DType D = decltype(tag)::value;
    multi_gt_x_kernel<D><<<ctas_for(n_adapters * rank * cols, kThreads), kThreads, 0, stream>>>(
        g, static_cast<const Elem<D>*>(x), order, offsets, n_adapters, cols, rank, d,
        static_cast<Elem<D>*>(out_all));
    return cudaGetLastError();
  });
}

}  // namespace pykernels::cuda
