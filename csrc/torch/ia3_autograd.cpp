// Autograd of the IA3 ops, in C++ (why: autograd.h). ia3_scale: out = (v + bias) ⊙ l;
// v, bias and l get gradients (bias: the rows' sum of v's). ia3_nf4_linear:
// (x ⊙ l)·Wᵀ + b over an NF4 W: x, l and b get gradients through W's transpose
// (nf4_linear_grad_input); the NF4 state gets none.
#include <torch/library.h>

#include <tuple>

#include "autograd.h"

namespace pykernels::binding::ia3 {
namespace {

using namespace autograd;

using ScaleBackward = std::tuple<OptTensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                          const OptTensor&, const at::Tensor&,
                                                          bool);

at::Tensor sum_rows(const at::Tensor& t) { return t.reshape({-1, t.size(-1)}).sum(0); }

struct ScaleFunction : public torch::autograd::Function<ScaleFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& v, const OptTensor& bias,
                            const at::Tensor& l) {
    static const auto op =
        op_handle<at::Tensor(const at::Tensor&, const OptTensor&, const at::Tensor&)>(
            "pykernels::ia3_scale");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor out = op.call(v, bias, l);
    ctx->save_for_backward({v, saved_or_undefined(bias), l});
    ctx->saved_data["present"] = present_arguments({true, bias.has_value(), true});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const int64_t present = ctx->saved_data["present"].toInt();
    const bool need_v = needs_grad(ctx, present, 0), need_bias = needs_grad(ctx, present, 1);
    static const auto op = op_handle<ScaleBackward>("pykernels::ia3_scale_backward");
    auto [grad_v, grad_l] = op.call(grads[0], s[0], optional_of(s[1]), s[2], need_v || need_bias);
    variable_list out(3);
    if (need_bias) out[1] = sum_rows(*grad_v);
    if (need_v) out[0] = *grad_v;
    if (needs_grad(ctx, present, 2)) out[2] = grad_l;
    return out;
  }
};

struct NF4LinearFunction : public torch::autograd::Function<NF4LinearFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& packed,
                            const at::Tensor& absmax, int64_t blocksize, int64_t out_features,
                            const OptTensor& bias, const OptTensor& absmax_scale,
                            const OptTensor& absmax_code, const OptTensor& absmax_offset,
                            const at::Tensor& l) {
    static const auto op = op_handle<at::Tensor(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t,
        const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
        const at::Tensor&)>("pykernels::ia3_nf4_linear");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor out = op.call(x, packed, absmax, blocksize, out_features, bias, absmax_scale,
                             absmax_code, absmax_offset, l);
    ctx->save_for_backward({x, packed, absmax, saved_or_undefined(absmax_scale),
                            saved_or_undefined(absmax_code), saved_or_undefined(absmax_offset),
                            l});
    ctx->saved_data["blocksize"] = blocksize;
    // x, packed, absmax, blocksize, out_features, bias, scale, code, offset, l.
    ctx->saved_data["present"] = present_arguments(
        {true, true, true, false, false, bias.has_value(), absmax_scale.has_value(),
         absmax_code.has_value(), absmax_offset.has_value(), true});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const int64_t present = ctx->saved_data["present"].toInt();
    const at::Tensor& grad = grads[0];
    const at::Tensor& x = s[0];
    variable_list out(10);
    if (needs_grad(ctx, present, 5)) out[5] = sum_rows(grad);
    const bool need_x = needs_grad(ctx, present, 0), need_l = needs_grad(ctx, present, 9);
    if (!need_x && !need_l) return out;  // b's alone: no pass over W
    static const auto grad_input = op_handle<at::Tensor(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t,
        const OptTensor&, const OptTensor&, const OptTensor&)>("pykernels::nf4_linear_grad_input");
    static const auto scale_backward = op_handle<ScaleBackward>("pykernels::ia3_scale_backward");
    const at::Tensor g = grad_input.call(grad, s[1], s[2], ctx->saved_data["blocksize"].toInt(),
                                         x.size(-1), optional_of(s[3]), optional_of(s[4]),
                                         optional_of(s[5]));
    auto [grad_x, grad_l] = scale_backward.call(g, x, std::nullopt, s[6], need_x);
    out[0] = grad_x.value_or(at::Tensor());
    if (need_l) out[9] = grad_l;
    return out;
  }
};

at::Tensor ia3_scale_autograd(const at::Tensor& v, const OptTensor& bias, const at::Tensor& l) {
  return ScaleFunction::apply(v, bias, l);
}

at::Tensor ia3_nf4_linear_autograd(const at::Tensor& x, const at::Tensor& packed,
                                   const at::Tensor& absmax, int64_t blocksize,
                                   int64_t out_features, const OptTensor& bias,
                                   const OptTensor& absmax_scale, const OptTensor& absmax_code,
                                   const OptTensor& absmax_offset, const at::Tensor& l) {
  return NF4LinearFunction::apply(x, packed, absmax, blocksize, out_features, bias, absmax_scale,
                                  absmax_code, absmax_offset, l);
}

}  // namespace

TORCH_LIBRARY_IMPL(pykernels, Autograd, m) {
  m.impl("ia3_scale", &ia3_scale_autograd);
  m.impl("ia3_nf4_linear", &ia3_nf4_linear_autograd);
}

}  // namespace pykernels::binding::ia3
