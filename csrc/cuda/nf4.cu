// NF4 quantize / dequantize on CUDA. Format and rounding rules: pykernels/nf4.h;
// the bytes equal the CPU kernels' (csrc/cpu/nf4.cpp) exactly, because both call
// the same spec functions and every rounding step is explicit (div_rn / mul_rn:
// no FMA contraction, no approximate reciprocal).
//
// Layout of the work:
//   quantize    A "chunk" is 8 consecutive elements: one 16-byte load for
//               fp16/bf16 (two for fp32) and one 4-byte store of packed codes.
//               A quantization block belongs to a group of G = min(blocksize/8, 32)
//               lanes of one warp, so a warp holds 32/G blocks (blocksize < 256)
//               or one block whose lanes take every 32nd chunk. Pass 1 finds the
//               block's absmax (lane max, then shuffles within the group); pass 2
//               re-reads the chunks (cache hits) and encodes them.
//   dequantize  Each thread decodes 16 elements: one 8-byte load of packed codes,
//               one absmax (16 aligned elements never straddle a block, as
//               blocksize >= 32), 16-byte stores. The code table sits in shared
//               memory, where lanes reading different codes do not serialize.
// Both loop grid-stride with int64_t indices, so any n fits in a capped grid.
#include <cuda_runtime.h>

#include <cfloat>

#include "chunk.h"
#include "launch.h"
#include "pykernels/cuda.h"
#include "pykernels/nf4.h"

namespace pykernels::cuda {
namespace {

// quantize: kChunk (chunk.h) elements per lane and step.
constexpr int kGroup = 16;  // dequantize: elements per thread and step

// ---- helpers ----

// 32-bit word w of 16 converted outputs, in memory order.
template <DType D>
__device__ uint32_t output_word(const typename Storage<D>::type (&s)[kGroup], int w) {
  if constexpr (D == DType::F32) return float_bits(s[w]);
  else return uint32_t(s[2 * w]) | (uint32_t(s[2 * w + 1]) << 16);
}

// Converts 16 decoded values to D and writes them to out[0, 16) with 16-byte stores.
template <DType D>
__device__ void store_group(typename Storage<D>::type* out, const float (&v)[kGroup]) {
  using T = typename Storage<D>::type;
  T s[kGroup];
#pragma unroll
  for (int k = 0; k < kGroup; ++k) store_from_float<D>(s, k, v[k]);
  constexpr int kVectors = kGroup * int(sizeof(T)) / 16;
#pragma unroll
  for (int k = 0; k < kVectors; ++k)
    reinterpret_cast<uint4*>(out)[k] =
        make_uint4(output_word<D>(s, 4 * k), output_word<D>(s, 4 * k + 1),
                   output_word<D>(s, 4 * k + 2), output_word<D>(s, 4 * k + 3));
}

// ---- kernels ----

// first_bad: all ones before the launch (-1 as int64, the largest value unsigned),
// so atomicMin leaves the first bad block, or -1 if there is none.
template <DType D>
__global__ void __launch_bounds__(kThreads)
nf4_quantize_kernel(const typename Storage<D>::type* __restrict__ x, int64_t n, int64_t blocksize,
                    int group_lanes, bool vectorized, uint8_t* __restrict__ packed,
                    float* __restrict__ absmax, unsigned long long* first_bad) {
  const int lane = int(threadIdx.x % 32);
  const int group_lane = lane % group_lanes;
  const int blocks_per_warp = 32 / group_lanes;
  const int64_t lane_stride = int64_t(kChunk) * group_lanes;
  const int64_t num_blocks = nf4_num_blocks(n, blocksize);
  const int64_t warps = int64_t(gridDim.x) * kWarpsPerCta;
  // The loop condition is the same for every lane of a warp, so the shuffles
  // below always see the full warp.
  for (int64_t warp = int64_t(blockIdx.x) * kWarpsPerCta + threadIdx.x / 32;
       warp * blocks_per_warp < num_blocks; warp += warps) {
    const int64_t b = warp * blocks_per_warp + lane / group_lanes;
    const bool active = b < num_blocks;
    const int64_t start = b * blocksize;
    const int64_t end = !active ? start : (n - start < blocksize ? n : start + blocksize);
    const bool partial = end - start < blocksize;

    float block_max = 0.0f;
    bool finite = true;
    for (int64_t i = start + int64_t(kChunk) * group_lane; i < end; i += lane_stride) {
      float v[kChunk];
      load_chunk<D>(x, i, end, vectorized, v);
#pragma unroll
      for (int k = 0; k < kChunk; ++k) {
        const float a = fabsf(v[k]);
        finite &= a <= FLT_MAX;
        block_max = a > block_max ? a : block_max;
      }
    }
    for (int offset = group_lanes / 2; offset > 0; offset /= 2)
      block_max = fmaxf(block_max, __shfl_xor_sync(0xffffffffu, block_max, offset));
    if (!finite) atomicMin(first_bad, static_cast<unsigned long long>(b));
    if (active && group_lane == 0) absmax[b] = nf4_stored_absmax(block_max, partial);

    const float safe = nf4_safe_absmax(block_max);
    const float inverse = div_rn(1.0f, safe);
    for (int64_t i = start + int64_t(kChunk) * group_lane; i < end; i += lane_stride) {
      float v[kChunk];
      load_chunk<D>(x, i, end, vectorized, v);
      uint8_t codes[kChunk];
#pragma unroll
      for (int k = 0; k < kChunk; ++k)
        codes[k] = nf4_encode(partial ? div_rn(v[k], safe) : mul_rn(v[k], inverse));
      if (i + kChunk <= end) {
        uint32_t word = 0;
#pragma unroll
        for (int k = 0; k < kChunk / 2; ++k)
          word |= uint32_t(nf4_pack(codes[2 * k], codes[2 * k + 1])) << (8 * k);
        *reinterpret_cast<uint32_t*>(packed + i / 2) = word;
      } else {  // the tensor's last chunk: whole bytes only, code 7 past the end
#pragma unroll
        for (int k = 0; k < kChunk; k += 2)
          if (i + k < end)
            packed[(i + k) / 2] = nf4_pack(codes[k], i + k + 1 < end ? codes[k + 1] : kNF4ZeroCode);
      }
    }
  }
}

template <DType D>
__global__ void __launch_bounds__(kThreads)
nf4_dequantize_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ absmax,
                      int64_t n, int64_t blocksize, bool vectorized,
                      typename Storage<D>::type* __restrict__ out) {
  __shared__ float table[16];
  if (threadIdx.x < 16) table[threadIdx.x] = nf4_code_table()[threadIdx.x];
  __syncthreads();
  const int block_shift = __ffsll(blocksize) - 1;  // blocksize is a power of two
  const int64_t stride = int64_t(gridDim.x) * kThreads * kGroup;
  for (int64_t i = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * kGroup; i < n; i += stride) {
    const float scale = absmax[i >> block_shift];
    if (vectorized && i + kGroup <= n) {
      const uint2 word = *reinterpret_cast<const uint2*>(packed + i / 2);
      const uint8_t bytes[kGroup / 2] = {uint8_t(word.x), uint8_t(word.x >> 8),
                                         uint8_t(word.x >> 16), uint8_t(word.x >> 24),
                                         uint8_t(word.y), uint8_t(word.y >> 8),
                                         uint8_t(word.y >> 16), uint8_t(word.y >> 24)};
      float v[kGroup];
#pragma unroll
      for (int k = 0; k < kGroup; ++k) v[k] = nf4_decode(table, nf4_unpack(bytes, k), scale);
      store_group<D>(out + i, v);
    } else {
      const int64_t end = n - i < kGroup ? n : i + kGroup;
      for (int64_t j = i; j < end; ++j)
        store_from_float<D>(out, j, nf4_decode(table, nf4_unpack(packed, j), scale));
    }
  }
}

// ---- launchers ----

template <DType D>
cudaError_t launch_quantize(const void* x, int64_t n, int64_t blocksize, uint8_t* packed,
                            float* absmax, int64_t* first_bad, cudaStream_t stream) {
  const int group_lanes = blocksize / kChunk < 32 ? int(blocksize / kChunk) : 32;
  const int64_t warps = ceil_div(nf4_num_blocks(n, blocksize), 32 / group_lanes);
  const auto* input = static_cast<const typename Storage<D>::type*>(x);
  nf4_quantize_kernel<D><<<ctas_for(warps, kWarpsPerCta), kThreads, 0, stream>>>(
      input, n, blocksize, group_lanes, aligned(x, 16), packed, absmax,
      reinterpret_cast<unsigned long long*>(first_bad));
  return cudaGetLastError();
}

template <DType D>
cudaError_t launch_dequantize(const uint8_t* packed, const float* absmax, int64_t n,
                              int64_t blocksize, void* out, cudaStream_t stream) {
  const bool vectorized = aligned(packed, 8) && aligned(out, 16);
  nf4_dequantize_kernel<D><<<ctas_for(n, int64_t(kThreads) * kGroup), kThreads, 0, stream>>>(
      packed, absmax, n, blocksize, vectorized, static_cast<typename Storage<D>::type*>(out));
  return cudaGetLastError();
}

}  // namespace

cudaError_t nf4_quantize(DType dtype, const void* x, int64_t n, int64_t blocksize,
                         uint8_t* packed, float* absmax, int64_t* first_bad, cudaStream_t stream) {
  if (!nf4_valid_blocksize(blocksize) || n < 0 || !aligned(packed, 4))
    return cudaErrorInvalidValue;
  const cudaError_t err = cudaMemsetAsync(first_bad, 0xff, sizeof(int64_t), stream);
  if (err != cudaSuccess || n == 0) return err;
  return dispatch_dtype(dtype, [&](auto d) {
    return launch_quantize<decltype(d)::value>(x, n, blocksize, packed, absmax, first_bad, stream);
  });
}

cudaError_t nf4_dequantize(DType dtype, const uint8_t* packed, const float* absmax, int64_t n,
                           int64_t blocksize, void* out, cudaStream_t stream) {
  if (!nf4_valid_blocksize(blocksize) || n < 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto d) {
    return launch_dequantize<decltype(d)::value>(packed, absmax, n, blocksize, out, stream);
  });
}

}  // namespace pykernels::cuda
