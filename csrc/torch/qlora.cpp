// QLoRA, for the CPU and CUDA alike: a LoRA adapter over an NF4 base,
//   y = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ,   W [out, in] stored as NF4, frozen.
// The base half is the NF4 linear layer (nf4_linear.h: fused kernels for few
// tokens, W decoded one tile at a time for many; never a dense copy of W), the
// adapter half is LoRA's (lora_adapter.h: written into the base's output and
// grad input in place). Both pick their device's kernels, so this file only
// joins them, checks their agreement and registers the ops for both devices.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "checks.h"
#include "lora_adapter.h"
#include "nf4_linear.h"

namespace pykernels::binding {
namespace {

std::tuple<at::Tensor, at::Tensor> qlora_linear(
    const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
    int64_t out_features, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& absmax_scale, const std::optional<at::Tensor>& absmax_code,
    const std::optional<at::Tensor>& absmax_offset, const at::Tensor& lora_A,
    const at::Tensor& lora_B, double scale, double dropout_p, const at::Tensor& seed) {
  constexpr const char* op = "qlora_linear";
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least one dimension");
  const NF4View w = nf4_view(op, packed, absmax, blocksize, out_features, x.size(-1),
                             absmax_scale, absmax_code, absmax_offset);
  const Dropout d = lora::check_adapter(op, x, lora_A, lora_B, out_features, dropout_p, seed);
  const at::Tensor y = nf4_linear_forward(op, x, w, bias);
  const at::Tensor x2d = x.reshape({-1, x.size(-1)});
  const at::Tensor xa = lora::adapter_down(x2d, lora_A, d);
  lora::adapter_add_up(y.view({-1, out_features}), xa, lora_B, scale);
  return {y, xa.view(with_last_dim(x, lora_A.size(0)))};
}

std::tuple<std::optional<at::Tensor>, at::Tensor, at::Tensor> qlora_linear_backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_xa, const at::Tensor& x,
    const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
    const std::optional<at::Tensor>& absmax_scale, const std::optional<at::Tensor>& absmax_code,
    const std::optional<at::Tensor>& absmax_offset, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& xa, double scale, double dropout_p,
    const at::Tensor& seed, bool need_grad_x) {
  constexpr const char* op = "qlora_linear_backward";
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least one dimension");
  const int64_t out_features = lora_B.dim() == 2 ? lora_B.size(0) : -1;
  const Dropout d = lora::check_adapter(op, x, lora_A, lora_B, out_features, dropout_p, seed);
  const NF4View w = nf4_view(op, packed, absmax, blocksize, out_features, x.size(-1),
                             absmax_scale, absmax_code, absmax_offset);
  const int64_t rank = lora_A.size(0);
  lora::check_backward_inputs(op, x, grad_out, grad_xa, xa, out_features, rank);
  const at::Tensor dy2d = grad_out.reshape({-1, out_features});
  const lora::AdapterGrads g =
      lora::adapter_backward(dy2d, grad_xa.value_or(at::Tensor()), x.reshape({-1, x.size(-1)}),
                             xa.reshape({-1, rank}), lora_A, lora_B, scale, d);
  if (!need_grad_x) return {std::nullopt, g.grad_A, g.grad_B};
  const at::Tensor dx = nf4_linear_backward_input(op, grad_out, w);
  lora::adapter_add_grad_input(dx.view({-1, x.size(-1)}), g.dxa, lora_A, d);
  return {dx, g.grad_A, g.grad_B};
}

}  // namespace

TORCH_LIBRARY_IMPL(pykernels, CPU, m) {
  m.impl("qlora_linear", &qlora_linear);
  m.impl("qlora_linear_backward", &qlora_linear_backward);
}

#ifdef PYKERNELS_WITH_CUDA
TORCH_LIBRARY_IMPL(pykernels, CUDA, m) {
  m.impl("qlora_linear", &qlora_linear);
  m.impl("qlora_linear_backward", &qlora_linear_backward);
}
#endif

}  // namespace pykernels::binding
