// Autograd of the NF4 linear ops, in C++ (why: autograd.h). nf4_linear: x gets
// nf4_linear_grad_input(grad), bias the sum of grad over tokens; the NF4 state
// is frozen. nf4_linear_grad_input is linear in grad_out, its own gradient an
// nf4_linear of the incoming one, so double backward works: both backwards call
// the ops through the dispatcher, where autograd records them when asked to.
#include <torch/library.h>

#include "autograd.h"

namespace pykernels::binding::nf4 {
namespace {

using namespace autograd;

const auto& nf4_linear_op() {
  static const auto op =
      op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                           int64_t, const OptTensor&, const OptTensor&, const OptTensor&,
                           const OptTensor&)>("pykernels::nf4_linear");
  return op;
}

const auto& grad_input_op() {
  static const auto op =
      op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                           int64_t, const OptTensor&, const OptTensor&, const OptTensor&)>(
          "pykernels::nf4_linear_grad_input");
  return op;
}

// The weight both ops read, saved for the backward: the state's tensors, its
// blocksize, and the feature count on the far side of the product.
struct SavedWeight {
  at::Tensor packed, absmax;
  OptTensor absmax_scale, absmax_code, absmax_offset;
  int64_t blocksize, features;

  static void save(const char* op, AutogradContext* ctx, const at::Tensor& packed,
                   const at::Tensor& absmax, const OptTensor& scale, const OptTensor& code,
                   const OptTensor& offset, int64_t blocksize, int64_t features) {
    check_frozen(op, "the NF4 weight's codes and absmax are",
                 {packed, absmax, scale, code, offset});
    ctx->save_for_backward({packed, absmax, saved_or_undefined(scale), saved_or_undefined(code),
                            saved_or_undefined(offset)});
    ctx->saved_data["blocksize"] = blocksize;
    ctx->saved_data["features"] = features;
  }

  static SavedWeight load(AutogradContext* ctx) {
    const variable_list s = ctx->get_saved_variables();
    return {s[0], s[1], optional_of(s[2]), optional_of(s[3]), optional_of(s[4]),
            ctx->saved_data["blocksize"].toInt(), ctx->saved_data["features"].toInt()};
  }
};

struct NF4LinearFunction : public torch::autograd::Function<NF4LinearFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& packed,
                            const at::Tensor& absmax, int64_t blocksize, int64_t out_features,
                            const OptTensor& bias, const OptTensor& absmax_scale,
                            const OptTensor& absmax_code, const OptTensor& absmax_offset) {
    SavedWeight::save("nf4_linear", ctx, packed, absmax, absmax_scale, absmax_code, absmax_offset,
                      blocksize, x.dim() > 0 ? x.size(-1) : 0);
    ctx->saved_data["bias"] = bias.has_value();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return nf4_linear_op().call(x, packed, absmax, blocksize, out_features, bias, absmax_scale,
                                absmax_code, absmax_offset);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const SavedWeight w = SavedWeight::load(ctx);
    const at::Tensor& grad = grads[0];
    variable_list out(9);  // one per forward argument
    if (ctx->needs_input_grad(0))
      out[0] = grad_input_op().call(grad, w.packed, w.absmax, w.blocksize, w.features,
                                    w.absmax_scale, w.absmax_code, w.absmax_offset);
    // Inputs with gradient edges: x, packed, absmax, then bias where given.
    if (ctx->saved_data["bias"].toBool() && ctx->needs_input_grad(3))
      out[5] = grad.reshape({-1, grad.size(-1)}).sum(0);
    return out;
  }
};

struct GradInputFunction : public torch::autograd::Function<GradInputFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& grad_out,
                            const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                            int64_t in_features, const OptTensor& absmax_scale,
                            const OptTensor& absmax_code, const OptTensor& absmax_offset) {
    SavedWeight::save("nf4_linear_grad_input", ctx, packed, absmax, absmax_scale, absmax_code,
                      absmax_offset, blocksize, grad_out.dim() > 0 ? grad_out.size(-1) : 0);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return grad_input_op().call(grad_out, packed, absmax, blocksize, in_features, absmax_scale,
                                absmax_code, absmax_offset);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const SavedWeight w = SavedWeight::load(ctx);
    variable_list out(8);
    if (ctx->needs_input_grad(0))
      out[0] = nf4_linear_op().call(grads[0], w.packed, w.absmax, w.blocksize, w.features,
                                    std::nullopt, w.absmax_scale, w.absmax_code, w.absmax_offset);
    return out;
  }
};

at::Tensor nf4_linear_autograd(const at::Tensor& x, const at::Tensor& packed,
                               const at::Tensor& absmax, int64_t blocksize, int64_t out_features,
                               const OptTensor& bias, const OptTensor& absmax_scale,
                               const OptTensor& absmax_code, const OptTensor& absmax_offset) {
  return NF4LinearFunction::apply(x, packed, absmax, blocksize, out_features, bias, absmax_scale,
                                  absmax_code, absmax_offset);
}

at::Tensor grad_input_autograd(const at::Tensor& grad_out, const at::Tensor& packed,
                               const at::Tensor& absmax, int64_t blocksize, int64_t in_features,
                               const OptTensor& absmax_scale, const OptTensor& absmax_code,
                               const OptTensor& absmax_offset) {
  return GradInputFunction::apply(grad_out, packed, absmax, blocksize, in_features, absmax_scale,
                                  absmax_code, absmax_offset);
}

}  // namespace

TORCH_LIBRARY_IMPL(pykernels, Autograd, m) {
  m.impl("nf4_linear", &nf4_linear_autograd);
  m.impl("nf4_linear_grad_input", &grad_input_autograd);
}

}  // namespace pykernels::binding::nf4
