// sum_slabs (slabs.h): one thread per chunk of 8 outputs, reading the chunk of
// every slab in order (16-byte loads when n is a multiple of 8).
#include <cuda_runtime.h>

#include "chunk.h"
#include "launch.h"
#include "slabs.h"

namespace pykernels::cuda {
namespace {

template <DType D>
__global__ void __launch_bounds__(kThreads)
sum_slabs_kernel(const float* __restrict__ workspace, int64_t slabs, int64_t n, bool vectorized,
                 Elem<D>* __restrict__ out) {
  const int64_t stride = int64_t(gridDim.x) * kThreads * kChunk;
  for (int64_t i = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * kChunk; i < n; i += stride) {
    float sum[kChunk];
    load_chunk<DType::F32>(workspace, i, n, vectorized, sum);
    for (int64_t s = 1; s < slabs; ++s) {
      float v[kChunk];
      load_chunk<DType::F32>(workspace + s * n, i, n, vectorized, v);
#pragma unroll
      for (int k = 0; k < kChunk; ++k) sum[k] += v[k];
    }
    store_chunk<D>(out, i, n, vectorized, sum);
  }
}

}  // namespace

cudaError_t sum_slabs(DType dtype, const float* workspace, int64_t slabs, int64_t n, void* out,
                      cudaStream_t stream) {
  if (slabs < 1 || n < 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  const bool vectorized = n % kChunk == 0 && aligned(workspace, 16) && aligned(out, 16);
  return dispatch_dtype(dtype, [&](auto d) {
    constexpr DType D = decltype(d)::value;
    sum_slabs_kernel<D><<<ctas_for(n, int64_t(kThreads) * kChunk), kThreads, 0, stream>>>(
        workspace, slabs, n, vectorized, static_cast<Elem<D>*>(out));
    return cudaGetLastError();
  });
}

}  // namespace pykernels::cuda
