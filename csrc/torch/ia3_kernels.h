// One device's IA³ kernels (math: csrc/cpu/ia3.cpp), for the ops in ia3.cpp,
// which are written once for every device. Tensors are 2-D row-major [rows, cols]
// of one dtype (fp32, fp16 or bf16) on that device; bias (undefined when none),
// l and dl are fp32 [cols]; outputs are allocated by the caller.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace pykernels::binding::ia3 {

struct Kernels {
  // out = (v + bias) * l, row-wise; out may be v.
  void (*scale)(const at::Tensor& v, const at::Tensor& bias, const at::Tensor& l,
                const at::Tensor& out);
  // dl = sum over rows of g * (v + bias); dv = g * l when dv is defined.
  void (*scale_backward)(const at::Tensor& g, const at::Tensor& v, const at::Tensor& bias,
                         const at::Tensor& l, const at::Tensor& dv, const at::Tensor& dl);
};

// The ops (ia3.cpp), which the CUDA file registers too.
at::Tensor ia3_scale(const at::Tensor& v, const std::optional<at::Tensor>& bias,
                     const at::Tensor& l);
std::tuple<std::optional<at::Tensor>, at::Tensor> ia3_scale_backward(
    const at::Tensor& grad, const at::Tensor& v, const std::optional<at::Tensor>& bias,
    const at::Tensor& l, bool need_grad_input);
at::Tensor ia3_nf4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                          int64_t blocksize, int64_t out_features,
                          const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& absmax_scale,
                          const std::optional<at::Tensor>& absmax_code,
                          const std::optional<at::Tensor>& absmax_offset, const at::Tensor& l);

#ifdef PYKERNELS_WITH_CUDA
extern const Kernels kCudaKernels;  // ia3_cuda.cpp
#endif

}  // namespace pykernels::binding::ia3
