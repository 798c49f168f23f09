// CUDA implementations of the NF4 and blockwise-8 ops: the same checks as the
// CPU ones (checks.h), a device guard, and launches of the torch-free kernels
// (pykernels/cuda.h) on the current stream.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "pykernels/blockwise8.h"
#include "pykernels/cuda.h"

namespace pykernels::binding {
namespace {

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// The flag read back after the launch raises only once the device guard is gone:
// on the H200 (torch 2.11) raising with the guard alive crashed the process
// (NaN test and prompt_embed's bad id, both after a read-back; every raise before
// a guard was fine).
std::tuple<at::Tensor, at::Tensor> nf4_quantize_cuda(const at::Tensor& x_in, int64_t blocksize) {
  constexpr const char* op = "nf4_quantize";
  const DType dtype = float_dtype(op, "x", x_in.scalar_type());
  check_nf4_blocksize(op, blocksize);
  const int64_t n = x_in.numel();
  at::Tensor packed, absmax;
  int64_t first_bad = -1;
  {
    const c10::cuda::CUDAGuard guard(x_in.device());
    const at::Tensor x = x_in.contiguous();
    packed = at::empty({nf4_packed_bytes(n)}, x.options().dtype(at::kByte));
    absmax = at::empty({nf4_num_blocks(n, blocksize)}, x.options().dtype(at::kFloat));
    at::Tensor flag = at::empty({1}, x.options().dtype(at::kLong));
    C10_CUDA_CHECK(cuda::nf4_quantize(dtype, x.const_data_ptr(), n, blocksize,
                                      packed.mutable_data_ptr<uint8_t>(),
                                      absmax.mutable_data_ptr<float>(),
                                      flag.mutable_data_ptr<int64_t>(), current_stream()));
    // Reading the flag waits for the kernel: a NaN or Inf must raise here, as on the CPU.
    first_bad = flag.item<int64_t>();
  }
  check_nf4_finite(op, first_bad, n, blocksize);
  return {packed, absmax};
}

void nf4_dequantize_into_cuda(const at::Tensor& packed_in, const at::Tensor& absmax_in,
                              int64_t blocksize, const at::Tensor& out) {
  constexpr const char* op = "nf4_dequantize";
  const DType dtype = check_nf4_dequantize_into(op, packed_in, absmax_in, blocksize, out);
  const c10::cuda::CUDAGuard guard(out.device());
  const at::Tensor packed = packed_in.contiguous();
  const at::Tensor absmax = absmax_in.contiguous();
  C10_CUDA_CHECK(cuda::nf4_dequantize(dtype, packed.const_data_ptr<uint8_t>(),
                                      absmax.const_data_ptr<float>(), out.numel(), blocksize,
                                      out.mutable_data_ptr(), current_stream()));
}

at::Tensor nf4_dequantize_cuda(const at::Tensor& packed, const at::Tensor& absmax,
                               int64_t blocksize, c10::SymIntArrayRef shape,
                               c10::ScalarType dtype) {
  float_dtype("nf4_dequantize", "dtype", dtype);
  at::Tensor out = at::empty(C10_AS_INTARRAYREF_SLOW(shape), packed.options().dtype(dtype));
  nf4_dequantize_into_cuda(packed, absmax, blocksize, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor> blockwise8_quantize_cuda(const at::Tensor& x_in,
                                                            const at::Tensor& code_in,
                                                            int64_t blocksize) {
  check_blockwise8_quantize("blockwise8_quantize", x_in, code_in, blocksize);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor code = code_in.contiguous();
  const int64_t n = x.numel();
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({nf4_num_blocks(n, blocksize)}, x.options());
  at::Tensor lut = at::empty({kBlockwise8LutSize}, x.options().dtype(at::kByte));
  const cudaStream_t stream = current_stream();
  C10_CUDA_CHECK(cuda::blockwise8_build_lut(code.const_data_ptr<float>(),
                                            lut.mutable_data_ptr<uint8_t>(), stream));
  C10_CUDA_CHECK(cuda::blockwise8_quantize(x.const_data_ptr<float>(), n, blocksize,
                                           lut.const_data_ptr<uint8_t>(),
                                           q.mutable_data_ptr<uint8_t>(),
                                           absmax.mutable_data_ptr<float>(), stream));
  return {q, absmax};
}

at::Tensor blockwise8_dequantize_cuda(const at::Tensor& q_in, const at::Tensor& absmax_in,
                                      const at::Tensor& code_in, const at::Tensor& offset_in,
                                      int64_t blocksize) {
  check_blockwise8_dequantize("blockwise8_dequantize", q_in, absmax_in, code_in, offset_in,
                              blocksize);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous();
  const at::Tensor absmax = absmax_in.contiguous();
  const at::Tensor code = code_in.contiguous();
  // The kernel reads the offset on the device (no sync); the CPU op accepts it
  // from any device, so this one does too.
  const at::Tensor offset = offset_in.to(q.device());
  at::Tensor out = at::empty(q.sizes(), absmax.options());
  C10_CUDA_CHECK(cuda::blockwise8_dequantize(
      q.const_data_ptr<uint8_t>(), absmax.const_data_ptr<float>(), code.const_data_ptr<float>(),
      offset.const_data_ptr<float>(), q.numel(), blocksize, out.mutable_data_ptr<float>(),
      current_stream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pykernels, CUDA, m) {
  m.impl("nf4_quantize", &nf4_quantize_cuda);
  m.impl("nf4_dequantize", &nf4_dequantize_cuda);
  m.impl("nf4_dequantize_into", &nf4_dequantize_into_cuda);
  m.impl("blockwise8_quantize", &blockwise8_quantize_cuda);
  m.impl("blockwise8_dequantize", &blockwise8_dequantize_cuda);
}

}  // namespace pykernels::binding
