// What the ops' C++ autograd Functions share (lora_autograd.cpp,
// nf4_linear_autograd.cpp, ia3_autograd.cpp, bottleneck_autograd.cpp). In C++
// rather than torch.library.register_autograd because the Python registration
// costs ~80 us a layer and step (lora_linear,
// fp32 64x64, 4 rows, one thread: forward + backward 116 us vs 36 us for the two
// ops called directly; 69 us from C++), most of a small layer's step and, on a
// GPU, most of a decoding step's host time. The ops are called through the
// dispatcher, so torch.compile traces them as it traces the ops.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>

#include <initializer_list>
#include <optional>

namespace pykernels::binding::autograd {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

template <class Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// The frozen base (`what`: a dense or NF4 weight, and for LoRA its bias) gets no
// gradient: asking for one raises rather than silently giving none.
inline void check_frozen(const char* op, const char* what, std::initializer_list<OptTensor> base) {
  for (const OptTensor& t : base)
    TORCH_CHECK(!(t.has_value() && t->requires_grad()), op, ": ", what,
                " frozen and get no gradient; call requires_grad_(False) on them before the "
                "forward");
}

// Saved optional tensors come back undefined where they were absent.
inline at::Tensor saved_or_undefined(const OptTensor& t) { return t.value_or(at::Tensor()); }
inline OptTensor optional_of(const at::Tensor& t) {
  return t.defined() ? OptTensor(t) : std::nullopt;
}

// Function::apply gives needs_input_grad's indices (edges) to the tensor arguments
// present only, while backward returns one entry per argument: `present` has bit i
// set where argument i is a tensor that was given (present_arguments builds it,
// one entry per argument: false for an absent optional and for a non-tensor).
inline int64_t present_arguments(std::initializer_list<bool> given) {
  int64_t mask = 0, bit = 1;
  for (bool g : given) {
    if (g) mask |= bit;
    bit <<= 1;
  }
  return mask;
}

inline bool needs_grad(AutogradContext* ctx, int64_t present, int argument) {
  if (!(present >> argument & 1)) return false;
  return ctx->needs_input_grad(
      size_t(__builtin_popcountll(uint64_t(present) & ((uint64_t(1) << argument) - 1))));
}

}  // namespace pykernels::binding::autograd
