// 8-bit blockwise quantize / dequantize on CUDA (format: pykernels/blockwise8.h),
// byte for byte what csrc/cpu/blockwise8.cpp writes.
//
// It only ever runs on NF4's absmax vector (n / 64 values), so the kernels are
// plain: the LUT is built with one thread per entry, quantize gives each block
// to one warp (a shuffle max, then one code per lane and step), dequantize is a
// grid-stride elementwise loop with the code table in shared memory.
#include <cuda_runtime.h>

#include "launch.h"
#include "pykernels/blockwise8.h"
#include "pykernels/cuda.h"

namespace pykernels::cuda {
namespace {

constexpr int kCodeSize = 256;

// lut[i] = the first midpoint index j with midpoint(j) >= value(i), scanning
// from 0. The CPU resumes each scan where the previous entry's stopped; since
// the values never decrease, both give the same entries for any code table.
__global__ void __launch_bounds__(kThreads)
blockwise8_lut_kernel(const float* __restrict__ code, uint8_t* __restrict__ lut) {
  __shared__ float midpoints[kCodeSize - 1];
  for (int j = threadIdx.x; j < kCodeSize - 1; j += kThreads)
    midpoints[j] = blockwise8_midpoint(code, j);
  __syncthreads();
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const float value = blockwise8_lut_value(i);
  int j = 0;
  while (j < kCodeSize - 1 && midpoints[j] < value) ++j;
  lut[i] = uint8_t(j);
}

__global__ void __launch_bounds__(kThreads)
blockwise8_quantize_kernel(const float* __restrict__ x, int64_t n, int64_t blocksize,
                           const uint8_t* __restrict__ lut, uint8_t* __restrict__ q,
                           float* __restrict__ absmax) {
  const int lane = int(threadIdx.x % 32);
  const int64_t num_blocks = ceil_div(n, blocksize);
  const int64_t warps = int64_t(gridDim.x) * kWarpsPerCta;
  for (int64_t b = int64_t(blockIdx.x) * kWarpsPerCta + threadIdx.x / 32; b < num_blocks;
       b += warps) {
    const int64_t start = b * blocksize;
    const int64_t end = n - start < blocksize ? n : start + blocksize;
    float block_max = 0.0f;
    for (int64_t i = start + lane; i < end; i += 32) block_max = fmaxf(block_max, fabsf(x[i]));
    for (int offset = 16; offset > 0; offset /= 2)
      block_max = fmaxf(block_max, __shfl_xor_sync(0xffffffffu, block_max, offset));
    if (lane == 0) absmax[b] = block_max;
    const float inverse = div_rn(1.0f, block_max);
    for (int64_t i = start + lane; i < end; i += 32)
      q[i] = block_max == 0.0f ? 0 : lut[blockwise8_lut_index(mul_rn(x[i], inverse))];
  }
}

__global__ void __launch_bounds__(kThreads)
blockwise8_dequantize_kernel(const uint8_t* __restrict__ q, const float* __restrict__ absmax,
                             const float* __restrict__ code, const float* __restrict__ offset,
                             int64_t n, int64_t blocksize, float* __restrict__ out) {
  __shared__ float table[kCodeSize];
  table[threadIdx.x] = code[threadIdx.x];  // kThreads == kCodeSize
  __syncthreads();
  const float shift = *offset;
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride)
    out[i] = blockwise8_decode(table, q[i], absmax[i / blocksize], shift);
}

static_assert(kThreads == kCodeSize, "the dequantize kernel loads one code entry per thread");

}  // namespace

cudaError_t blockwise8_build_lut(const float* code, uint8_t* lut, cudaStream_t stream) {
  blockwise8_lut_kernel<<<kBlockwise8LutSize / kThreads, kThreads, 0, stream>>>(code, lut);
  return cudaGetLastError();
}

cudaError_t blockwise8_quantize(const float* x, int64_t n, int64_t blocksize, const uint8_t* lut,
                                uint8_t* q, float* absmax, cudaStream_t stream) {
  if (blocksize <= 0 || n < 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  const int64_t ctas = ctas_for(ceil_div(n, blocksize), kWarpsPerCta);
  blockwise8_quantize_kernel<<<ctas, kThreads, 0, stream>>>(x, n, blocksize, lut, q, absmax);
  return cudaGetLastError();
}

cudaError_t blockwise8_dequantize(const uint8_t* q, const float* absmax, const float* code,
                                  const float* offset, int64_t n, int64_t blocksize, float* out,
                                  cudaStream_t stream) {
  if (blocksize <= 0 || n < 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  blockwise8_dequantize_kernel<<<ctas_for(n, kThreads), kThreads, 0, stream>>>(
      q, absmax, code, offset, n, blocksize, out);
  return cudaGetLastError();
}

}  // namespace pykernels::cuda
