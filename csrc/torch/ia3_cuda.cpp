// The IA³ ops on CUDA: ia3.cpp's ops with this file's kernel table
// (pykernels/cuda.h, launched on the current stream of the tensors' device);
// ia3_nf4_linear runs the NF4 linear layer's CUDA kernels (nf4_linear.h), l
// folded into the decoded tiles of W as on the CPU.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "ia3_kernels.h"
#include "pykernels/cuda.h"

namespace pykernels::binding::ia3 {
namespace {

DType dtype_of(const at::Tensor& t) { return float_dtype("ia3", "v", t.scalar_type()); }

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

const float* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<float>() : nullptr;
}

void cuda_scale(const at::Tensor& v, const at::Tensor& bias, const at::Tensor& l,
                const at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(v.device());
  C10_CUDA_CHECK(cuda::ia3_scale(dtype_of(v), v.const_data_ptr(), data_or_null(bias),
                                 l.const_data_ptr<float>(), v.size(0), v.size(1),
                                 out.mutable_data_ptr(), current_stream()));
}

void cuda_scale_backward(const at::Tensor& g, const at::Tensor& v, const at::Tensor& bias,
                         const at::Tensor& l, const at::Tensor& dv, const at::Tensor& dl) {
  const c10::cuda::CUDAGuard guard(v.device());
  const int64_t rows = g.size(0), cols = g.size(1);
  // From the caching allocator: no synchronization, reused by the next call.
  at::Tensor workspace = at::empty({cuda::ia3_scale_backward_workspace(rows, cols)},
                                   g.options().dtype(at::kFloat));
  C10_CUDA_CHECK(cuda::ia3_scale_backward(
      dtype_of(g), g.const_data_ptr(), v.const_data_ptr(), data_or_null(bias),
      l.const_data_ptr<float>(), rows, cols, dv.defined() ? dv.mutable_data_ptr() : nullptr,
      dl.mutable_data_ptr<float>(), workspace.mutable_data_ptr<float>(), current_stream()));
}

}  // namespace

const Kernels kCudaKernels{cuda_scale, cuda_scale_backward};

TORCH_LIBRARY_IMPL(pykernels, CUDA, m) {
  m.impl("ia3_scale", &ia3_scale);
  m.impl("ia3_scale_backward", &ia3_scale_backward);
  m.impl("ia3_nf4_linear", &ia3_nf4_linear);
}

}  // namespace pykernels::binding::ia3
