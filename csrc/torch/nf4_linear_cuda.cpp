// The NF4 linear layer's CUDA kernel table (design: nf4_linear.h; the ops are
// nf4_linear.cpp's, written once for every device and registered here for
// CUDA): up to kNF4MatvecMaxTokens tokens the fused kernels run straight from
// the packed codes (pykernels/cuda.h), more decode W one tile at a time for
// cuBLAS. Launches go to the current stream of the tensors' device; the
// double-quant offset is read by the kernels on the device.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "nf4_linear.h"
#include "pykernels/cuda.h"

namespace pykernels::binding {
namespace {

// Bytes of W decoded per tile on the many-token path: a 4096 x 4096 bf16 W in
// one tile, 4096 x 11008 in three. Not yet measured on a GPU (bench_lora_cuda.py
// times the paths either side of kNF4MatvecMaxTokens); the GPU has the memory.
constexpr int64_t kTileBytes = int64_t(32) << 20;

cuda::NF4Matrix cuda_matrix(const NF4View& w) {
  return nf4_matrix<cuda::NF4Matrix>(
      w, w.double_quant() ? w.absmax_offset.const_data_ptr<float>() : nullptr);
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// The fused kernels keep their per-token sums in registers, up to the bound.
int64_t cuda_fused_max_tokens(DType, const NF4View&, bool) { return cuda::kNF4MatvecMaxTokens; }

void cuda_matvec(DType dtype, const NF4View& w, const at::Tensor& x2, const at::Tensor& bias,
                 at::Tensor& y) {
  const c10::cuda::CUDAGuard guard(x2.device());
  C10_CUDA_CHECK(cuda::nf4_matvec(dtype, cuda_matrix(w), x2.const_data_ptr(), x2.size(0),
                                  bias.defined() ? bias.const_data_ptr() : nullptr,
                                  y.mutable_data_ptr(), current_stream()));
}

void cuda_matvec_t(DType dtype, const NF4View& w, const at::Tensor& dy2, at::Tensor& dx) {
  const c10::cuda::CUDAGuard guard(dy2.device());
  const cuda::NF4Matrix m = cuda_matrix(w);
  const int64_t tokens = dy2.size(0);
  // From the caching allocator: no synchronization, reused by the next call.
  at::Tensor workspace = at::empty({cuda::nf4_matvec_t_workspace(m, tokens)},
                                   dy2.options().dtype(at::kFloat));
  C10_CUDA_CHECK(cuda::nf4_matvec_t(dtype, m, dy2.const_data_ptr(), tokens,
                                    workspace.mutable_data_ptr<float>(), dx.mutable_data_ptr(),
                                    current_stream()));
}

void cuda_decode_tile(DType dtype, const NF4View& w, int64_t row_begin, int64_t row_end,
                      int64_t col_begin, int64_t col_end, const float* in_scale,
                      at::Tensor& tile) {
  const c10::cuda::CUDAGuard guard(tile.device());
  C10_CUDA_CHECK(cuda::nf4_dequantize_tile(dtype, cuda_matrix(w), row_begin, row_end, col_begin,
                                           col_end, in_scale, tile.mutable_data_ptr(),
                                           current_stream()));
}

}  // namespace

const NF4Kernels kCudaNF4Kernels{cuda_fused_max_tokens, kTileBytes, cuda_matvec, cuda_matvec_t,
                                 cuda_decode_tile};

TORCH_LIBRARY_IMPL(pykernels, CUDA, m) {
  m.impl("nf4_linear", &nf4_linear);
  m.impl("nf4_linear_grad_input", &nf4_linear_grad_input);
}

}  // namespace pykernels::binding
