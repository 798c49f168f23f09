// Autograd of the LoRA ops over a dense base (lora_linear), an NF4 base
// (qlora_linear) and of many adapters in one layer (multi_lora), in C++ (why:
// autograd.h): x, lora_A and lora_B get gradients from the matching *_backward op;
// the base (W, or the NF4 state, and b) is frozen, and asking for its gradients
// raises. multi_lora's `base` is the base layer's output: its gradient is grad_out.
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "autograd.h"

namespace pykernels::binding::lora {
namespace {

using namespace autograd;
using Grads = std::tuple<OptTensor, at::Tensor, at::Tensor>;  // grad_x, grad_A, grad_B

// The output's gradient, zeros when only xa's was used.
at::Tensor grad_out_or_zeros(const at::Tensor& grad, const at::Tensor& x, int64_t out_features) {
  if (grad.defined()) return grad;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  return at::zeros(shape, x.options());
}

// The inputs' gradients in input order: x first, lora_A and lora_B at a_index
// and a_index + 1, nothing for the rest.
variable_list input_grads(const Grads& grads, size_t inputs, size_t a_index) {
  variable_list out(inputs);
  out[0] = std::get<0>(grads).value_or(at::Tensor());
  out[a_index] = std::get<1>(grads);
  out[a_index + 1] = std::get<2>(grads);
  return out;
}

struct LoRALinearFunction : public torch::autograd::Function<LoRALinearFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x,
                               const at::Tensor& weight, const OptTensor& bias,
                               const at::Tensor& lora_A, const at::Tensor& lora_B, double scale,
                               double dropout_p, const at::Tensor& seed) {
    check_frozen("lora_linear", "the base weight and bias are", {weight, bias});
    static const auto op =
        op_handle<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                     const OptTensor&, const at::Tensor&,
                                                     const at::Tensor&, double, double,
                                                     const at::Tensor&)>("pykernels::lora_linear");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, xa] = op.call(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed);
    ctx->save_for_backward({x, weight, lora_A, lora_B, xa, seed});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->set_materialize_grads(false);  // an unused xa gets no zero-filled gradient
    return {y, xa};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const at::Tensor &x = s[0], &weight = s[1];
    static const auto op = op_handle<Grads(
        const at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&,
        const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double,
        const at::Tensor&, bool)>("pykernels::lora_linear_backward");
    return input_grads(
        op.call(grad_out_or_zeros(grads[0], x, weight.size(0)), optional_of(grads[1]), x,
                weight, s[2], s[3], s[4], ctx->saved_data["scale"].toDouble(),
                ctx->saved_data["dropout_p"].toDouble(), s[5], ctx->needs_input_grad(0)),
        8, 3);
  }
};

struct QLoRALinearFunction : public torch::autograd::Function<QLoRALinearFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x,
                               const at::Tensor& packed, const at::Tensor& absmax,
                               int64_t blocksize, int64_t out_features, const OptTensor& bias,
                               const OptTensor& absmax_scale, const OptTensor& absmax_code,
                               const OptTensor& absmax_offset, const at::Tensor& lora_A,
                               const at::Tensor& lora_B, double scale, double dropout_p,
                               const at::Tensor& seed) {
    check_frozen("qlora_linear", "the base weight and bias are",
                 {packed, absmax, bias, absmax_scale, absmax_code, absmax_offset});
    static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t,
        const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, const at::Tensor&,
        const at::Tensor&, double, double, const at::Tensor&)>("pykernels::qlora_linear");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, xa] = op.call(x, packed, absmax, blocksize, out_features, bias, absmax_scale,
                           absmax_code, absmax_offset, lora_A, lora_B, scale, dropout_p, seed);
    ctx->save_for_backward({x, packed, absmax, saved_or_undefined(absmax_scale),
                            saved_or_undefined(absmax_code), saved_or_undefined(absmax_offset),
                            lora_A, lora_B, xa, seed});
    ctx->saved_data["blocksize"] = blocksize;
    ctx->saved_data["out_features"] = out_features;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->set_materialize_grads(false);
    return {y, xa};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const at::Tensor& x = s[0];
    static const auto op = op_handle<Grads(
        const at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&,
        const at::Tensor&, int64_t, const OptTensor&, const OptTensor&, const OptTensor&,
        const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double,
        const at::Tensor&, bool)>("pykernels::qlora_linear_backward");
    return input_grads(
        op.call(grad_out_or_zeros(grads[0], x, ctx->saved_data["out_features"].toInt()),
                optional_of(grads[1]), x, s[1], s[2], ctx->saved_data["blocksize"].toInt(),
                optional_of(s[3]), optional_of(s[4]), optional_of(s[5]), s[6], s[7], s[8],
                ctx->saved_data["scale"].toDouble(), ctx->saved_data["dropout_p"].toDouble(),
                s[9], ctx->needs_input_grad(0)),
        14, 9);
  }
};

struct MultiLoRAFunction : public torch::autograd::Function<MultiLoRAFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& base,
                               const at::Tensor& lora_A, const at::Tensor& lora_B,
                               const at::Tensor& scales, const at::Tensor& ids, double dropout_p,
                               const at::Tensor& seed) {
    static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
        const at::Tensor&, const at::Tensor&, double, const at::Tensor&)>("pykernels::multi_lora");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, xa] = op.call(x, base, lora_A, lora_B, scales, ids, dropout_p, seed);
    ctx->save_for_backward({x, lora_A, lora_B, scales, ids, xa, seed});
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->mark_non_differentiable({xa});
    ctx->set_materialize_grads(false);
    return {out, xa};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(8);  // x, base, lora_A, lora_B; none for scales, ids, dropout_p, seed
    const at::Tensor& grad_out = grads[0];
    if (!grad_out.defined()) return out;
    if (ctx->needs_input_grad(1)) out[1] = grad_out;
    const bool need_x = ctx->needs_input_grad(0);
    if (!need_x && !ctx->needs_input_grad(2) && !ctx->needs_input_grad(3)) return out;
    const variable_list s = ctx->get_saved_variables();
    static const auto op =
        op_handle<Grads(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const at::Tensor&, double, const at::Tensor&, bool)>(
            "pykernels::multi_lora_backward");
    const auto [grad_x, grad_A, grad_B] =
        op.call(grad_out, s[0], s[1], s[2], s[3], s[4], s[5],
                ctx->saved_data["dropout_p"].toDouble(), s[6], need_x);
    out[0] = grad_x.value_or(at::Tensor());
    if (ctx->needs_input_grad(2)) out[2] = grad_A;
    if (ctx->needs_input_grad(3)) out[3] = grad_B;
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> lora_linear_autograd(
    const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, double scale, double dropout_p,
    const at::Tensor& seed) {
  const variable_list out =
      LoRALinearFunction::apply(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor> qlora_linear_autograd(
    const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
    int64_t out_features, const OptTensor& bias, const OptTensor& absmax_scale,
    const OptTensor& absmax_code, const OptTensor& absmax_offset, const at::Tensor& lora_A,
    const at::Tensor& lora_B, double scale, double dropout_p, const at::Tensor& seed) {
  const variable_list out = QLoRALinearFunction::apply(
      x, packed, absmax, blocksize, out_features, bias, absmax_scale, absmax_code, absmax_offset,
      lora_A, lora_B, scale, dropout_p, seed);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor> multi_lora_autograd(
    const at::Tensor& x, const at::Tensor& base, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& scales, const at::Tensor& ids, double dropout_p,
    const at::Tensor& seed) {
  const variable_list out =
      MultiLoRAFunction::apply(x, base, lora_A, lora_B, scales, ids, dropout_p, seed);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(pykernels, Autograd, m) {
  m.impl("lora_linear", &lora_linear_autograd);
  m.impl("qlora_linear", &qlora_linear_autograd);
  m.impl("multi_lora", &multi_lora_autograd);
}

}  // namespace pykernels::binding::lora
