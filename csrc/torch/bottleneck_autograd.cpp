// Autograd of bottleneck_adapter, in C++ (why: autograd.h): h, w_down, b_down,
// w_up and b_up get gradients from bottleneck_adapter_backward, which needs the
// saved pre-activation (save_pre); a separate residual's gradient is grad_out.
#include <ATen/core/grad_mode.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "autograd.h"

namespace pykernels::binding::bottleneck {
namespace {

using namespace autograd;

struct BottleneckFunction : public torch::autograd::Function<BottleneckFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& h,
                               const OptTensor& residual, const at::Tensor& w_down,
                               const at::Tensor& b_down, const at::Tensor& w_up,
                               const at::Tensor& b_up, c10::string_view act, double scale,
                               bool save_pre) {
    static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(
        const at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&,
        const at::Tensor&, const at::Tensor&, c10::string_view, double, bool)>(
        "pykernels::bottleneck_adapter");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, pre] = op.call(h, residual, w_down, b_down, w_up, b_up, act, scale, save_pre);
    ctx->save_for_backward({h, pre, w_down, w_up});
    ctx->saved_data["act"] = std::string(act);
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["residual_is_h"] = !residual.has_value();
    ctx->saved_data["present"] =
        present_arguments({true, residual.has_value(), true, true, true, true});
    ctx->mark_non_differentiable({pre});
    ctx->set_materialize_grads(false);
    return {out, pre};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // h, residual, w_down, b_down, w_up, b_up; none for act, scale, save_pre.
    variable_list out(9);
    const at::Tensor& grad_out = grads[0];
    if (!grad_out.defined()) return out;
    const bool residual_is_h = ctx->saved_data["residual_is_h"].toBool();
    const int64_t present = ctx->saved_data["present"].toInt();
    auto needs = [&](int argument) { return needs_grad(ctx, present, argument); };
    if (!residual_is_h && needs(1)) out[1] = grad_out;
    bool any = false;
    for (int i : {0, 2, 3, 4, 5}) any = any || needs(i);
    if (!any) return out;
    const variable_list s = ctx->get_saved_variables();
    static const auto op = op_handle<std::tuple<OptTensor, at::Tensor, at::Tensor, at::Tensor,
                                                at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
        const at::Tensor&, c10::string_view, double, bool, bool)>(
        "pykernels::bottleneck_adapter_backward");
    const std::string act = ctx->saved_data["act"].toStringRef();
    auto [grad_h, grad_w_down, grad_b_down, grad_w_up, grad_b_up] =
        op.call(grad_out.contiguous(), s[0], s[1], s[2], s[3], act,
                ctx->saved_data["scale"].toDouble(), needs(0), residual_is_h);
    out[0] = grad_h.value_or(at::Tensor());
    const at::Tensor weights[] = {grad_w_down, grad_b_down, grad_w_up, grad_b_up};
    for (int i = 2; i < 6; ++i)
      if (needs(i)) out[size_t(i)] = weights[i - 2];
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> bottleneck_adapter_autograd(
    const at::Tensor& h, const OptTensor& residual, const at::Tensor& w_down,
    const at::Tensor& b_down, const at::Tensor& w_up, const at::Tensor& b_up,
    c10::string_view act, double scale, bool save_pre) {
  // Here, not in forward: Function::apply runs forward with grad mode off.
  const bool wants_grad = h.requires_grad() || w_down.requires_grad() ||
                          b_down.requires_grad() || w_up.requires_grad() || b_up.requires_grad();
  TORCH_CHECK(!(at::GradMode::is_enabled() && wants_grad) || save_pre,
              "bottleneck_adapter: call with save_pre=True when a gradient is needed "
              "(pykernels.ops.bottleneck_adapter does)");
  const variable_list out =
      BottleneckFunction::apply(h, residual, w_down, b_down, w_up, b_up, act, scale, save_pre);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(pykernels, Autograd, m) {
  m.impl("bottleneck_adapter", &bottleneck_adapter_autograd);
}

}  // namespace pykernels::binding::bottleneck
