// CPU implementations of the NF4 and blockwise-8 ops: checks, dtype dispatch,
// at::parallel_for over blocks, and calls into the torch-free kernels.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>

#include "checks.h"
#include "pykernels/blockwise8.h"
#include "pykernels/cpu.h"
#include "simd_choice.h"

namespace pykernels::binding {
namespace {

// ~64k elements per task: below that, thread hand-off costs more than it saves.
int64_t grain_blocks(int64_t blocksize) { return std::max<int64_t>(1, 65536 / blocksize); }

std::tuple<at::Tensor, at::Tensor> nf4_quantize_cpu(const at::Tensor& x_in, int64_t blocksize) {
  constexpr const char* op = "nf4_quantize";
  const DType dtype = float_dtype(op, "x", x_in.scalar_type());
  check_nf4_blocksize(op, blocksize);
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.numel();
  const int64_t blocks = nf4_num_blocks(n, blocksize);
  at::Tensor packed = at::empty({nf4_packed_bytes(n)}, x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({blocks}, x.options().dtype(at::kFloat));
  std::atomic<int64_t> first_bad{-1};
  const cpu::SimdPath path = active_cpu_path();
  at::parallel_for(0, blocks, grain_blocks(blocksize), [&](int64_t begin, int64_t end) {
    const int64_t bad = cpu::nf4_quantize(path, dtype, x.const_data_ptr(), n, blocksize, begin, end,
                                          packed.mutable_data_ptr<uint8_t>(),
                                          absmax.mutable_data_ptr<float>());
    int64_t seen = first_bad.load();
    while (bad >= 0 && (seen < 0 || bad < seen) && !first_bad.compare_exchange_weak(seen, bad)) {
    }
  });
  check_nf4_finite(op, first_bad.load(), n, blocksize);
  return {packed, absmax};
}

void dequantize_into(const at::Tensor& packed_in, const at::Tensor& absmax_in, int64_t blocksize,
                     const at::Tensor& out, bool reused_output) {
  constexpr const char* op = "nf4_dequantize";
  const DType dtype = check_nf4_dequantize_into(op, packed_in, absmax_in, blocksize, out);
  const int64_t n = out.numel();
  const at::Tensor packed = packed_in.contiguous();
  const at::Tensor absmax = absmax_in.contiguous();
  const cpu::SimdPath path = active_cpu_path();
  at::parallel_for(0, nf4_num_blocks(n, blocksize), grain_blocks(blocksize),
                   [&](int64_t begin, int64_t end) {
                     cpu::nf4_dequantize(path, dtype, packed.const_data_ptr<uint8_t>(),
                                         absmax.const_data_ptr<float>(), n, blocksize, begin, end,
                                         out.mutable_data_ptr(), reused_output);
                   });
}

void nf4_dequantize_into_cpu(const at::Tensor& packed, const at::Tensor& absmax,
                             int64_t blocksize, const at::Tensor& out) {
  dequantize_into(packed, absmax, blocksize, out, /*reused_output=*/true);
}

at::Tensor nf4_dequantize_cpu(const at::Tensor& packed, const at::Tensor& absmax,
                              int64_t blocksize, c10::SymIntArrayRef shape,
                              c10::ScalarType dtype) {
  float_dtype("nf4_dequantize", "dtype", dtype);
  at::Tensor out = at::empty(C10_AS_INTARRAYREF_SLOW(shape), packed.options().dtype(dtype));
  dequantize_into(packed, absmax, blocksize, out, /*reused_output=*/false);
  return out;
}

std::tuple<at::Tensor, at::Tensor> blockwise8_quantize_cpu(const at::Tensor& x_in,
                                                           const at::Tensor& code_in,
                                                           int64_t blocksize) {
  constexpr const char* op = "blockwise8_quantize";
  check_blockwise8_quantize(op, x_in, code_in, blocksize);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor code = code_in.contiguous();
  const int64_t n = x.numel();
  const int64_t blocks = nf4_num_blocks(n, blocksize);
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({blocks}, x.options());
  std::vector<uint8_t> lut(kBlockwise8LutSize);
  cpu::blockwise8_build_lut(code.const_data_ptr<float>(), lut.data());
  at::parallel_for(0, blocks, 64, [&](int64_t begin, int64_t end) {
    cpu::blockwise8_quantize(x.const_data_ptr<float>(), n, blocksize, lut.data(), begin, end,
                             q.mutable_data_ptr<uint8_t>(), absmax.mutable_data_ptr<float>());
  });
  return {q, absmax};
}

at::Tensor blockwise8_dequantize_cpu(const at::Tensor& q_in, const at::Tensor& absmax_in,
                                     const at::Tensor& code_in, const at::Tensor& offset,
                                     int64_t blocksize) {
  constexpr const char* op = "blockwise8_dequantize";
  check_blockwise8_dequantize(op, q_in, absmax_in, code_in, offset, blocksize);
  const int64_t n = q_in.numel();
  const at::Tensor q = q_in.contiguous();
  const at::Tensor absmax = absmax_in.contiguous();
  const at::Tensor code = code_in.contiguous();
  const float offset_value = offset.item<float>();
  at::Tensor out = at::empty(q.sizes(), absmax.options());
  at::parallel_for(0, nf4_num_blocks(n, blocksize), 64, [&](int64_t begin, int64_t end) {
    cpu::blockwise8_dequantize(q.const_data_ptr<uint8_t>(), absmax.const_data_ptr<float>(),
                               code.const_data_ptr<float>(), offset_value, n, blocksize, begin,
                               end, out.mutable_data_ptr<float>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pykernels, CPU, m) {
  m.impl("nf4_quantize", &nf4_quantize_cpu);
  m.impl("nf4_dequantize", &nf4_dequantize_cpu);
  m.impl("nf4_dequantize_into", &nf4_dequantize_into_cpu);
  m.impl("blockwise8_quantize", &blockwise8_quantize_cpu);
  m.impl("blockwise8_dequantize", &blockwise8_dequantize_cpu);
}

}  // namespace pykernels::binding
