// The bottleneck adapter ops on CUDA: bottleneck.cpp's ops (products through
// cuBLAS, all rows in one tile) over this file's epilogue kernels
// (pykernels/cuda.h), launched on the current stream of the tensors' device.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "bottleneck_kernels.h"
#include "checks.h"
#include "pykernels/cuda.h"

namespace pykernels::binding::bottleneck {

std::tuple<at::Tensor, at::Tensor> bottleneck_adapter(
    const at::Tensor& h, const std::optional<at::Tensor>& residual, const at::Tensor& w_down,
    const at::Tensor& b_down, const at::Tensor& w_up, const at::Tensor& b_up,
    c10::string_view act_name, double scale, bool save_pre);
std::tuple<std::optional<at::Tensor>, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
bottleneck_adapter_backward(const at::Tensor& grad_out, const at::Tensor& h, const at::Tensor& pre,
                            const at::Tensor& w_down, const at::Tensor& w_up,
                            c10::string_view act_name, double scale, bool need_grad_h,
                            bool add_grad_out);

namespace {

DType dtype_of(const at::Tensor& t) { return float_dtype("bottleneck", "h", t.scalar_type()); }

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void cuda_activate(Act act, const at::Tensor& z, const at::Tensor& pre_out) {
  const c10::cuda::CUDAGuard guard(z.device());
  C10_CUDA_CHECK(cuda::bottleneck_activate(
      dtype_of(z), act, z.mutable_data_ptr(), z.size(0), z.size(1),
      pre_out.defined() ? pre_out.mutable_data_ptr() : nullptr, current_stream()));
}

void cuda_epilogue(const at::Tensor& up, const at::Tensor& bias, const at::Tensor& residual,
                   double scale, const at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(out.device());
  C10_CUDA_CHECK(cuda::bottleneck_epilogue(dtype_of(out), up.const_data_ptr(),
                                           bias.const_data_ptr(), residual.const_data_ptr(),
                                           out.size(0), out.size(1), float(scale),
                                           out.mutable_data_ptr(), current_stream()));
}

void cuda_act_backward(Act act, const at::Tensor& pre, const at::Tensor& g, double scale,
                       const at::Tensor& a_out) {
  const c10::cuda::CUDAGuard guard(g.device());
  C10_CUDA_CHECK(cuda::bottleneck_act_backward(dtype_of(g), act, pre.const_data_ptr(),
                                               g.mutable_data_ptr(), g.size(0), g.size(1),
                                               float(scale),
                                               a_out.mutable_data_ptr(), current_stream()));
}

}  // namespace

const Kernels kCudaKernels{cuda_activate, cuda_epilogue, cuda_act_backward, aten_column_sum, 0};

TORCH_LIBRARY_IMPL(pykernels, CUDA, m) {
  m.impl("bottleneck_adapter", &bottleneck_adapter);
  m.impl("bottleneck_adapter_backward", &bottleneck_adapter_backward);
}

}  // namespace pykernels::binding::bottleneck
