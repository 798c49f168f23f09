// The IA³ ops for every device (CUDA registers them in ia3_cuda.cpp with its own
// kernel table), and the CPU's kernel table:
//   ia3_scale           out = (v + bias) ⊙ l over the last dim: output scaling's
//                       epilogue on y = x·Wᵀ (bias and scale in one pass over y),
//                       or input scaling of x before a dense matmul
//   ia3_scale_backward  grad_input = grad ⊙ l and grad_l = Σ_rows grad ⊙ (v + bias), one pass
//   ia3_nf4_linear      (x ⊙ l)·Wᵀ + bias with W stored as NF4 (nf4_linear.h, any device):
//                       on the tiled path l is folded into each decoded tile of W
//                       (W·diag(l)), so x is never scaled in memory; the fused path
//                       scales the few rows of x
// l is any float dtype, used in fp32; grad_l comes back in l's dtype. float64
// runs plain ATen math (the gradcheck path).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "checks.h"
#include "ia3_kernels.h"
#include "nf4_linear.h"
#include "pykernels/cpu.h"
#include "simd_choice.h"

namespace pykernels::binding::ia3 {
namespace {

void cpu_scale(const at::Tensor& v, const at::Tensor& bias, const at::Tensor& l,
               const at::Tensor& out) {
  const int64_t rows = v.size(0), cols = v.size(1);
  const DType dtype = float_dtype("ia3_scale", "v", v.scalar_type());
  const cpu::SimdPath path = active_cpu_path();
  const float* b = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  at::parallel_for(0, rows, std::max<int64_t>(1, 65536 / std::max<int64_t>(cols, 1)),
                   [&](int64_t begin, int64_t end) {
                     cpu::ia3_scale(path, dtype, v.const_data_ptr(), b, l.const_data_ptr<float>(),
                                    cols, begin, end, out.mutable_data_ptr());
                   });
}

void cpu_scale_backward(const at::Tensor& g, const at::Tensor& v, const at::Tensor& bias,
                        const at::Tensor& l, const at::Tensor& dv, const at::Tensor& dl) {
  const int64_t rows = g.size(0), cols = g.size(1);
  const DType dtype = float_dtype("ia3_scale_backward", "grad", g.scalar_type());
  const cpu::SimdPath path = active_cpu_path();
  const float* b = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  // Each task owns a slice of columns (its part of dl is written by it alone),
  // in units of 64 so slices start on cache lines.
  constexpr int64_t kUnit = 64;
  at::parallel_for(0, ceil_div(cols, kUnit),
                   std::max<int64_t>(1, 65536 / std::max<int64_t>(rows * kUnit, 1)),
                   [&](int64_t begin, int64_t end) {
                     cpu::ia3_scale_backward(path, dtype, g.const_data_ptr(), v.const_data_ptr(), b,
                                             l.const_data_ptr<float>(), rows, cols, begin * kUnit,
                                             std::min(end * kUnit, cols),
                                             dv.defined() ? dv.mutable_data_ptr() : nullptr,
                                             dl.mutable_data_ptr<float>());
                   });
}

constexpr Kernels kCpuKernels{cpu_scale, cpu_scale_backward};

const Kernels& kernels_for(const at::Tensor& t) {
#ifdef PYKERNELS_WITH_CUDA
  if (t.is_cuda()) return kCudaKernels;
#endif
  TORCH_CHECK_VALUE(t.is_cpu(), "ia3: tensors on ", t.device(), " are not supported");
  return kCpuKernels;
}

bool is_float(c10::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// v [..., features]; l [features] of any float dtype on v's device; bias [features]
// in v's dtype. Returns l as the kernels take it.
void check_args(const char* op, const char* v_name, const at::Tensor& v, const at::Tensor& l,
                const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_TYPE(is_float(v.scalar_type()), op, ": ", v_name,
                   " must be float32, float16, bfloat16 or float64, got ", v.scalar_type());
  TORCH_CHECK_VALUE(v.dim() >= 1, op, ": ", v_name, " must have at least one dimension");
  const int64_t features = v.size(-1);
  TORCH_CHECK_TYPE(is_float(l.scalar_type()), op,
                   ": l (the IA³ vector) must be a float tensor, got ", l.scalar_type());
  TORCH_CHECK_VALUE(l.dim() == 1 && l.size(0) == features, op,
                    ": l (the IA³ vector) must have shape [", features, "] (the last dimension of ",
                    v_name, ", shape ", v.sizes(), "), got ", l.sizes());
  check_same_device(op, v, v_name, l, "l");
  if (bias) {
    check_dtype(op, "bias", *bias, v.scalar_type());
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == features, op,
                      ": bias must have shape [", features, "], got ", bias->sizes());
    check_same_device(op, v, v_name, *bias, "bias");
  }
}

at::Tensor fp32(const std::optional<at::Tensor>& t) {
  return t ? t->to(at::kFloat).contiguous() : at::Tensor();
}

}  // namespace

at::Tensor ia3_scale(const at::Tensor& v, const std::optional<at::Tensor>& bias,
                     const at::Tensor& l) {
  check_args("ia3_scale", "v", v, l, bias);
  if (v.scalar_type() == at::kDouble) return (bias ? v.add(*bias) : v).mul(l.to(at::kDouble));
  const int64_t cols = v.size(-1), rows = leading_rows(v);
  const at::Tensor v2 = v.reshape({rows, cols}).contiguous();
  at::Tensor out = at::empty({rows, cols}, v.options());
  if (out.numel() > 0) kernels_for(v).scale(v2, fp32(bias), fp32(l), out);
  return out.view(v.sizes());
}

std::tuple<std::optional<at::Tensor>, at::Tensor> ia3_scale_backward(
    const at::Tensor& grad, const at::Tensor& v, const std::optional<at::Tensor>& bias,
    const at::Tensor& l, bool need_grad_input) {
  constexpr const char* op = "ia3_scale_backward";
  check_args(op, "v", v, l, bias);
  TORCH_CHECK_VALUE(grad.sizes() == v.sizes(), op, ": grad must have v's shape ", v.sizes(),
                    ", got ", grad.sizes());
  check_dtype(op, "grad", grad, v.scalar_type());
  check_same_device(op, v, "v", grad, "grad");
  if (v.scalar_type() == at::kDouble) {
    const at::Tensor l64 = l.to(at::kDouble);
    const at::Tensor vb = bias ? v.add(*bias) : v;
    std::optional<at::Tensor> dv;
    if (need_grad_input) dv = grad.mul(l64);
    return {dv, grad.mul(vb).reshape({-1, v.size(-1)}).sum(0).to(l.scalar_type())};
  }
  const int64_t cols = v.size(-1), rows = leading_rows(v);
  const at::Tensor g2 = grad.reshape({rows, cols}).contiguous();
  const at::Tensor v2 = v.reshape({rows, cols}).contiguous();
  at::Tensor dv = need_grad_input ? at::empty({rows, cols}, v.options()) : at::Tensor();
  at::Tensor dl = at::empty({cols}, v.options().dtype(at::kFloat));
  if (rows == 0) dl.zero_();
  else if (cols > 0) kernels_for(v).scale_backward(g2, v2, fp32(bias), fp32(l), dv, dl);
  std::optional<at::Tensor> grad_input;
  if (need_grad_input) grad_input = dv.view(v.sizes());
  return {grad_input, dl.to(l.scalar_type())};
}

at::Tensor ia3_nf4_linear(const at::Tensor& x, const at::Tensor& packed,
                              const at::Tensor& absmax, int64_t blocksize, int64_t out_features,
                              const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& absmax_scale,
                              const std::optional<at::Tensor>& absmax_code,
                              const std::optional<at::Tensor>& absmax_offset,
                              const at::Tensor& l) {
  constexpr const char* op = "ia3_nf4_linear";
  float_dtype(op, "x", x.scalar_type());
  check_args(op, "x", x, l, std::nullopt);
  check_weight_fits(op, "x", x, packed, out_features, x.size(-1));
  const NF4View w = nf4_view(op, packed, absmax, blocksize, out_features, x.size(-1), absmax_scale,
                             absmax_code, absmax_offset);
  return nf4_linear_forward(op, x, w, bias, fp32(l));
}

TORCH_LIBRARY_IMPL(pykernels, CPU, m) {
  m.impl("ia3_scale", &ia3_scale);
  m.impl("ia3_scale_backward", &ia3_scale_backward);
  m.impl("ia3_nf4_linear", &ia3_nf4_linear);
}

}  // namespace pykernels::binding::ia3
