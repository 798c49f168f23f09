// Internal to csrc/cpu: the per-instruction-set NF4 block kernels behind the
// dispatcher in nf4.cpp. All take the same arguments as pykernels::cpu::nf4_*.
// The SIMD paths handle full blocks and hand the last, partial block to the
// scalar path, so the format quirks of partial blocks live in one place.
#pragma once
#include "pykernels/cpu.h"

namespace pykernels::cpu {

#define PK_NF4_PATH(suffix)                                                                \
  int64_t nf4_quantize_##suffix(DType dtype, const void* x, int64_t n, int64_t blocksize,  \
                                int64_t block_begin, int64_t block_end, uint8_t* packed,   \
                                float* absmax);                                            \
  void nf4_dequantize_##suffix(DType dtype, const uint8_t* packed, const float* absmax,    \
                               int64_t n, int64_t blocksize, int64_t block_begin,          \
                               int64_t block_end, void* out, bool reused_output = false);
PK_NF4_PATH(scalar)
PK_NF4_PATH(avx2)
PK_NF4_PATH(avx512)
#undef PK_NF4_PATH

// The SIMD quantize loops ask for their input this far ahead in the absmax pass:
// each block is read, reduced, then encoded, and the hardware prefetcher alone
// kept too few lines in flight for a tensor out of cache (AVX-512, 8192^2 fp32,
// 2 threads: 32 -> 22 ms, 8.3 -> 12.4 GB/s; 512 B ahead: 27 ms, 2-4 KiB: 22-23.5
// ms; the AVX2 path, compute-bound here: 46-47 -> 43.5-44 ms).
constexpr int64_t kQuantizePrefetchBytes = 1024;

// Number of blocks in [block_begin, block_end) that hold blocksize elements.
inline int64_t full_blocks_end(int64_t n, int64_t blocksize, int64_t block_end) {
  const int64_t full = n / blocksize;
  return block_end < full ? block_end : full;
}

}  // namespace pykernels::cpu
