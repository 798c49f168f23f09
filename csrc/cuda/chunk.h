// Internal to csrc/cuda: chunks of 8 consecutive elements of a float buffer, the
// unit most kernels here load and store. A whole chunk of a 16-byte aligned
// buffer moves as one 16-byte access (fp16 / bf16) or two (fp32); anything else
// (a tensor's tail, an unaligned view) goes element by element. Values are fp32
// in registers whatever the buffer's dtype.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "pykernels/common.h"

namespace pykernels::cuda {

constexpr int kChunk = 8;

template <DType D> using Elem = typename Storage<D>::type;

// Elements [i, i + 8) of x as fp32; those at or past `end` read as 0.
// vectorized: x is 16-byte aligned and i is a multiple of 8.
template <DType D>
__device__ __forceinline__ void load_chunk(const Elem<D>* x, int64_t i, int64_t end,
                                           bool vectorized, float (&v)[kChunk]) {
  if (vectorized && i + kChunk <= end) {
    if constexpr (D == DType::F32) {
      const float4 lo = reinterpret_cast<const float4*>(x + i)[0];
      const float4 hi = reinterpret_cast<const float4*>(x + i)[1];
      v[0] = lo.x, v[1] = lo.y, v[2] = lo.z, v[3] = lo.w;
      v[4] = hi.x, v[5] = hi.y, v[6] = hi.z, v[7] = hi.w;
    } else {
      const uint4 w = *reinterpret_cast<const uint4*>(x + i);
      const uint16_t h[kChunk] = {uint16_t(w.x), uint16_t(w.x >> 16), uint16_t(w.y),
                                  uint16_t(w.y >> 16), uint16_t(w.z), uint16_t(w.z >> 16),
                                  uint16_t(w.w), uint16_t(w.w >> 16)};
#pragma unroll
      for (int k = 0; k < kChunk; ++k) v[k] = load_as_float<D>(h, k);
    }
    return;
  }
#pragma unroll
  for (int k = 0; k < kChunk; ++k) v[k] = i + k < end ? load_as_float<D>(x, i + k) : 0.0f;
}

// v rounded to D into elements [i, min(i + 8, end)) of out; vectorized as for load_chunk.
template <DType D>
__device__ __forceinline__ void store_chunk(Elem<D>* out, int64_t i, int64_t end, bool vectorized,
                                            const float (&v)[kChunk]) {
  if (vectorized && i + kChunk <= end) {
    if constexpr (D == DType::F32) {
      reinterpret_cast<float4*>(out + i)[0] = make_float4(v[0], v[1], v[2], v[3]);
      reinterpret_cast<float4*>(out + i)[1] = make_float4(v[4], v[5], v[6], v[7]);
    } else {
      uint16_t h[kChunk];
#pragma unroll
      for (int k = 0; k < kChunk; ++k) store_from_float<D>(h, k, v[k]);
      *reinterpret_cast<uint4*>(out + i) =
          make_uint4(h[0] | uint32_t(h[1]) << 16, h[2] | uint32_t(h[3]) << 16,
                     h[4] | uint32_t(h[5]) << 16, h[6] | uint32_t(h[7]) << 16);
    }
    return;
  }
#pragma unroll
  for (int k = 0; k < kChunk; ++k)
    if (i + k < end) store_from_float<D>(out, i + k, v[k]);
}

}  // namespace pykernels::cuda
