// Torch-free CPU kernels. Each works on a [block_begin, block_end) range of
// blocks and owns no threads: the caller (csrc/torch or a native test) splits
// the range across its own workers.
#pragma once
#include <cstdint>

#include "pykernels/common.h"

namespace pykernels::cpu {

// Vector instruction sets with a kernel path, best last. The scalar path is the
// reference the others are tested against.
enum class SimdPath : int32_t { Scalar = 0, AVX2 = 1, AVX512 = 2 };

bool simd_path_supported(SimdPath path);  // by this CPU
SimdPath best_simd_path();                // best supported
const char* simd_path_name(SimdPath path);

// ---- NF4 (format: pykernels/nf4.h) ----
// Quantizes blocks [block_begin, block_end) of the n-element tensor x into
// packed codes and per-block absmax. Returns the first block that holds a NaN or
// an Inf (its outputs are then unspecified), or -1.
int64_t nf4_quantize(SimdPath path, DType dtype, const void* x, int64_t n, int64_t blocksize,
                     int64_t block_begin, int64_t block_end, uint8_t* packed, float* absmax);

// Decodes blocks [block_begin, block_end) into out (n elements of dtype).
void nf4_dequantize(SimdPath path, DType dtype, const uint8_t* packed, const float* absmax,
                    int64_t n, int64_t blocksize, int64_t block_begin, int64_t block_end,
                    void* out);

// ---- 8-bit blockwise, the double-quantization format (pykernels/blockwise8.h) ----
// lut: kBlockwise8LutSize bytes built from the 256-entry sorted code table.
void blockwise8_build_lut(const float* code, uint8_t* lut);
void blockwise8_quantize(const float* x, int64_t n, int64_t blocksize, const uint8_t* lut,
                         int64_t block_begin, int64_t block_end, uint8_t* q, float* absmax);
void blockwise8_dequantize(const uint8_t* q, const float* absmax, const float* code,
                           float offset, int64_t n, int64_t blocksize, int64_t block_begin,
                           int64_t block_end, float* out);

}  // namespace pykernels::cpu
