// The multi-LoRA ops on CUDA: multi_lora.cpp's implementation over the CUDA
// kernels (pykernels/cuda.h, csrc/cuda/multi_lora.cu), launched on the current
// stream of the tensors' device. The segments are built on the host from the
// ids (the op's range check reads them anyway) and copied over.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "multi_lora.h"
#include "pykernels/cuda.h"

namespace pykernels::binding::multi_lora {
namespace {

DType dtype_of(const at::Tensor& t) { return float_dtype("multi_lora", "x", t.scalar_type()); }

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void cuda_x_at(const Segments& s, const at::Tensor& x, const at::Tensor& a_all, const Dropout& d,
               const at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(x.device());
  C10_CUDA_CHECK(cuda::multi_lora_x_at(dtype_of(x), x.const_data_ptr(), a_all.const_data_ptr(),
                                       s.token_adapter.const_data_ptr<int64_t>(), x.size(0),
                                       x.size(1), a_all.size(1), d, out.mutable_data_ptr(),
                                       current_stream()));
}

void cuda_add_g_a(const Segments& s, const at::Tensor& g, const at::Tensor& a_all,
                  const std::optional<at::Tensor>& scales, float scale, const Dropout& d,
                  const at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(out.device());
  C10_CUDA_CHECK(cuda::multi_lora_add_g_a(
      dtype_of(out), g.const_data_ptr<float>(), a_all.const_data_ptr(),
      s.token_adapter.const_data_ptr<int64_t>(), out.size(0), out.size(1), a_all.size(1),
      scales.has_value() ? scales->const_data_ptr<float>() : nullptr, scale, d,
      out.mutable_data_ptr(), current_stream()));
}

void cuda_gt_x(const Segments& s, const at::Tensor& g, const at::Tensor& x, const Dropout& d,
               const at::Tensor& out_all) {
  const c10::cuda::CUDAGuard guard(x.device());
  C10_CUDA_CHECK(cuda::multi_lora_gt_x(dtype_of(x), g.const_data_ptr<float>(), x.const_data_ptr(),
                                       s.order.const_data_ptr<int64_t>(),
                                       s.offsets.const_data_ptr<int64_t>(), s.n_adapters,
                                       x.size(1), g.size(1), d, out_all.mutable_data_ptr(),
                                       current_stream()));
}

}  // namespace

const Kernels kCudaKernels{cuda_x_at, cuda_add_g_a, cuda_gt_x};

TORCH_LIBRARY_IMPL(pykernels, CUDA, m) {
  m.impl("multi_lora", &multi_lora);
  m.impl("multi_lora_backward", &multi_lora_backward);
}

}  // namespace pykernels::binding::multi_lora
