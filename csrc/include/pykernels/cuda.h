// Torch-free CUDA launchers. Each takes device pointers, int64_t sizes and the
// stream to launch on (never the legacy default stream: pass the caller's
// current stream), queues its kernels and returns the launch error, if any.
// They do not synchronize. Formats: pykernels/nf4.h, pykernels/blockwise8.h;
// the bytes written equal the CPU kernels' (pykernels/cpu.h) exactly.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "pykernels/common.h"

namespace pykernels::cuda {

// ---- NF4 ----
// Quantizes the n-element tensor x (dtype) into nf4_packed_bytes(n) bytes of
// packed codes (4-byte aligned) and nf4_num_blocks(n, blocksize) absmax values.
// *first_bad (one device int64) is set to the first block that holds a NaN or an
// Inf, or to -1; the outputs are unspecified when it is not -1.
cudaError_t nf4_quantize(DType dtype, const void* x, int64_t n, int64_t blocksize,
                         uint8_t* packed, float* absmax, int64_t* first_bad, cudaStream_t stream);

// Decodes n elements into out (dtype). Any alignment works; 16-byte aligned out
// and 8-byte aligned packed take the vectorized path.
cudaError_t nf4_dequantize(DType dtype, const uint8_t* packed, const float* absmax, int64_t n,
                           int64_t blocksize, void* out, cudaStream_t stream);

// ---- 8-bit blockwise, the double-quantization format ----
// lut: kBlockwise8LutSize device bytes built from the 256-entry code table.
cudaError_t blockwise8_build_lut(const float* code, uint8_t* lut, cudaStream_t stream);
cudaError_t blockwise8_quantize(const float* x, int64_t n, int64_t blocksize, const uint8_t* lut,
                                uint8_t* q, float* absmax, cudaStream_t stream);
// offset: one device float, added to every decoded value.
cudaError_t blockwise8_dequantize(const uint8_t* q, const float* absmax, const float* code,
                                  const float* offset, int64_t n, int64_t blocksize, float* out,
                                  cudaStream_t stream);

}  // namespace pykernels::cuda
