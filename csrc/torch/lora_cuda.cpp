// The LoRA ops on CUDA. The ops are lora.cpp's, written once for every device:
// the base and every dropout-free product go to at::mm / at::addmm (cuBLAS),
// and what touches drop(x), plus the merge, runs the fused kernels this file
// provides (pykernels/cuda.h, launched on the current stream of the tensors'
// device). lora_dropout_mask stays CPU-only: its seed and its mask live there.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "lora_adapter.h"
#include "pykernels/cuda.h"

namespace pykernels::binding::lora {
namespace {

DType dtype_of(const at::Tensor& t) { return float_dtype("lora", "x", t.scalar_type()); }

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void cuda_x_at(const at::Tensor& x, const at::Tensor& a, const Dropout& d, const at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(x.device());
  C10_CUDA_CHECK(cuda::lora_x_at(dtype_of(x), x.const_data_ptr(), a.const_data_ptr(), x.size(0),
                                 x.size(1), a.size(0), d, out.mutable_data_ptr(),
                                 current_stream()));
}

void cuda_gt_x(const at::Tensor& g, const at::Tensor& x, const Dropout& d, const at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0), cols = x.size(1), rank = g.size(1);
  // From the caching allocator: no synchronization, reused by the next call.
  at::Tensor workspace =
      at::empty({cuda::lora_gt_x_workspace(rows, cols, rank)}, x.options().dtype(at::kFloat));
  C10_CUDA_CHECK(cuda::lora_gt_x(dtype_of(x), g.const_data_ptr<float>(), x.const_data_ptr(), rows,
                                 cols, rank, d, workspace.mutable_data_ptr<float>(),
                                 out.mutable_data_ptr(), current_stream()));
}

void cuda_add_g_a(const at::Tensor& g, const at::Tensor& a, float scale, const Dropout& d,
                  const at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(out.device());
  C10_CUDA_CHECK(cuda::lora_add_g_a(dtype_of(out), g.const_data_ptr<float>(), a.const_data_ptr(),
                                    out.size(0), out.size(1), a.size(0), scale, d,
                                    out.mutable_data_ptr(), current_stream()));
}

}  // namespace

const FusedKernels kCudaFusedKernels{cuda_x_at, cuda_gt_x, cuda_add_g_a};

TORCH_LIBRARY_IMPL(pykernels, CUDA, m) {
  m.impl("lora_linear", &lora_linear);
  m.impl("lora_linear_backward", &lora_linear_backward);
  m.impl("lora_merge_", &lora_merge_);
}

}  // namespace pykernels::binding::lora
