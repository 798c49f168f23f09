// IA³'s elementwise passes on CUDA; math and CPU twins: csrc/cpu/ia3.cpp.
//   scale           out[t, j] = (v[t, j] + bias[j]) * l[j]          the CPU's bits
//   scale_backward  dv[t, j] = g[t, j] * l[j]                        the CPU's bits
//                   dl[j] = Σ_t g[t, j] * (v[t, j] + bias[j])        another order:
// a CTA is 32 columns × 8 row lanes over one slab of rows (slabs.h); each lane
// sums its rows in fp32, the 8 lanes are added in lane order in shared memory,
// the slabs by sum_slabs in slab order: deterministic, no atomics.
#include <cuda_runtime.h>

#include "chunk.h"
#include "launch.h"
#include "pykernels/cuda.h"
#include "slabs.h"

namespace pykernels::cuda {
namespace {

constexpr int kCols = 32;                    // scale_backward: columns per CTA (one warp wide)
constexpr int kLanes = kThreads / kCols;     // row lanes per CTA

template <DType D>
__global__ void __launch_bounds__(kThreads)
scale_kernel(const Elem<D>* __restrict__ v, const float* __restrict__ bias,
             const float* __restrict__ l, int64_t rows, int64_t cols, Elem<D>* out) {
  const int64_t n = rows * cols;
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride) {
    const int64_t j = i % cols;
    float x = load_as_float<D>(v, i);
    if (bias) x = add_rn(x, bias[j]);
    store_from_float<D>(out, i, mul_rn(x, l[j]));
  }
}

template <DType D>
__global__ void __launch_bounds__(kThreads)
scale_backward_kernel(const Elem<D>* __restrict__ g, const Elem<D>* __restrict__ v,
                      const float* __restrict__ bias, const float* __restrict__ l, int64_t rows,
                      int64_t cols, int64_t slab_rows, Elem<D>* __restrict__ dv,
                      float* __restrict__ workspace) {
  __shared__ float lanes[kLanes][kCols];
  const int cx = threadIdx.x % kCols, ry = threadIdx.x / kCols;
  const int64_t r0 = int64_t(blockIdx.y) * slab_rows;
  const int64_t r1 = r0 + slab_rows < rows ? r0 + slab_rows : rows;
  for (int64_t c0 = int64_t(blockIdx.x) * kCols; c0 < cols; c0 += int64_t(gridDim.x) * kCols) {
    const int64_t j = c0 + cx;
    float acc = 0.0f;
    if (j < cols) {
      const float b = bias ? bias[j] : 0.0f, lj = l[j];
      for (int64_t t = r0 + ry; t < r1; t += kLanes) {
        const float gv = load_as_float<D>(g, t * cols + j);
        acc = __fmaf_rn(gv, add_rn(load_as_float<D>(v, t * cols + j), b), acc);
        if (dv) store_from_float<D>(dv, t * cols + j, mul_rn(gv, lj));
      }
    }
    lanes[ry][cx] = acc;
    __syncthreads();
    if (ry == 0 && j < cols) {
      float sum = lanes[0][cx];
#pragma unroll
      for (int k = 1; k < kLanes; ++k) sum += lanes[k][cx];
      workspace[int64_t(blockIdx.y) * cols + j] = sum;
    }
    __syncthreads();
  }
}

int64_t column_ctas(int64_t cols) { return ctas_for(cols, kCols); }

int64_t backward_slabs(int64_t rows, int64_t cols) {
  return slab_count(rows, column_ctas(cols) * kThreads, cols);
}

}  // namespace

cudaError_t ia3_scale(DType dtype, const void* v, const float* bias, const float* l,
                      int64_t rows, int64_t cols, void* out, cudaStream_t stream) {
  if (rows < 0 || cols < 0) return cudaErrorInvalidValue;
  if (rows * cols == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto d) {
    constexpr DType D = decltype(d)::value;
    scale_kernel<D><<<ctas_for(rows * cols, kThreads), kThreads, 0, stream>>>(
        static_cast<const Elem<D>*>(v), bias, l, rows, cols, static_cast<Elem<D>*>(out));
    return cudaGetLastError();
  });
}

int64_t ia3_scale_backward_workspace(int64_t rows, int64_t cols) {
  return backward_slabs(rows, cols) * cols;
}

cudaError_t ia3_scale_backward(DType dtype, const void* g, const void* v, const float* bias,
                               const float* l, int64_t rows, int64_t cols, void* dv, float* dl,
                               float* workspace, cudaStream_t stream) {
  if (rows < 1 || cols < 0) return cudaErrorInvalidValue;
  if (cols == 0) return cudaSuccess;
  const int64_t slabs = backward_slabs(rows, cols);
  const int64_t slab_rows = ceil_div(rows, slabs);
  const cudaError_t err = dispatch_dtype(dtype, [&](auto d) {
    constexpr DType D = decltype(d)::value;
    const dim3 grid(unsigned(column_ctas(cols)), unsigned(slabs));
    scale_backward_kernel<D><<<grid, kThreads, 0, stream>>>(
        static_cast<const Elem<D>*>(g), static_cast<const Elem<D>*>(v), bias, l, rows, cols,
        slab_rows, static_cast<Elem<D>*>(dv), workspace);
    return cudaGetLastError();
  });
  if (err != cudaSuccess) return err;
  return sum_slabs(DType::F32, workspace, slabs, cols, dl, stream);
}

}  // namespace pykernels::cuda
