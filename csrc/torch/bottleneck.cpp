// The bottleneck adapter ops, for every device (CUDA registers them in
// bottleneck_cuda.cpp), and the CPU's epilogue kernels:
//   bottleneck_adapter           out = r + s·(act(h·W_downᵀ + b_down)·W_upᵀ + b_up),
//                                and the pre-activation [T, m] when asked (training)
//   bottleneck_adapter_backward  dh, dW_down, db_down, dW_up, db_up (dr = dout: Python)
//
// Forward, a tile of rows at a time: the down product (+ b_down) into a
// [rows, m] buffer, the activation in place on it (kernel), the up product
// straight into out's rows, then out = r + s·(out + b_up) in place (kernel). A tile holds as
// many rows as keep its [rows, m] activations within 1 MiB (L2 is 2 MiB per
// core here): 2048 rows at m = 256 in bf16, so the activations never go to
// memory. Smaller tiles, which would keep the up product's [rows, d] in L2 for
// the epilogue, cost more in the products than they save: oneDNN's bf16 GEMMs
// on 64-row tiles take 2.5x the time of one 512-row call (d = 4096, m = 256,
// one thread: 2.9 vs 1.2 ms per product), while the epilogue's own pass over
// [T, d] costs ~0.7 ms. The products use all of torch's threads; the kernels
// split their rows with at::parallel_for.
//
// Backward: the pre-activation is saved, not recomputed. Saving it writes
// [T, m], 1/16 of the h autograd keeps anyway at reduction 16 (256 KiB at
// T = 512, m = 256, bf16); recomputing it would run the down product again:
// 1.2-1.3 ms there on one thread, ~9% of the adapter's forward + backward
// (13.6 ms, bench_bottleneck.py). Every intermediate of the backward is
// [T, m], so it runs over all rows at once: dz = s·(dy·W_up)·act'(pre) and
// a = act(pre) (kernel), then four products and two column sums.
//
// float64 (gradcheck) and devices without kernels run the same steps with ATen
// ops (kCompositeKernels). The steps over one block of rows (forward_rows,
// backward_rows) serve multi_bottleneck too, once per adapter's group of rows.
#include "bottleneck_kernels.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/gelu_backward.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/silu_backward.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/threshold_backward.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>

#include "checks.h"
#include "pykernels/cpu.h"
#include "simd_choice.h"

namespace pykernels::binding::bottleneck {
namespace {

// ---- the CPU's kernels ----

DType dtype_of(const at::Tensor& t) { return float_dtype("bottleneck", "h", t.scalar_type()); }

// Row `row` of a contiguous 2-D tensor.
char* row_ptr(const at::Tensor& t, int64_t row) {
  return static_cast<char*>(t.mutable_data_ptr()) + row * t.size(1) * t.element_size();
}

// Splits t's rows across torch's threads, ~2^16 elements per task at least.
template <class F> void for_rows(const at::Tensor& t, F&& f) {
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, t.size(1)));
  at::parallel_for(0, t.size(0), grain, f);
}

void cpu_activate(Act act, const at::Tensor& z, const at::Tensor& pre_out) {
  const cpu::SimdPath path = active_cpu_path();
  for_rows(z, [&](int64_t begin, int64_t end) {
    cpu::bottleneck_activate(path, dtype_of(z), act, row_ptr(z, begin), end - begin, z.size(1),
                             pre_out.defined() ? row_ptr(pre_out, begin) : nullptr);
  });
}

void cpu_epilogue(const at::Tensor& up, const at::Tensor& bias, const at::Tensor& residual,
                  double scale, const at::Tensor& out) {
  const cpu::SimdPath path = active_cpu_path();
  for_rows(out, [&](int64_t begin, int64_t end) {
    cpu::bottleneck_epilogue(path, dtype_of(out), row_ptr(up, begin), bias.const_data_ptr(),
                             row_ptr(residual, begin), end - begin, out.size(1), float(scale),
                             row_ptr(out, begin));
  });
}

void cpu_act_backward(Act act, const at::Tensor& pre, const at::Tensor& g, double scale,
                      const at::Tensor& a_out) {
  const cpu::SimdPath path = active_cpu_path();
  for_rows(g, [&](int64_t begin, int64_t end) {
    cpu::bottleneck_act_backward(path, dtype_of(g), act, row_ptr(pre, begin), row_ptr(g, begin),
                                 end - begin, g.size(1), float(scale), row_ptr(a_out, begin));
  });
}

// The bias gradients' column sums: at::sum takes 1.74 ms over a bf16 [512, 4096]
// gradient on one thread here, this 0.3 ms.
void cpu_column_sum(const at::Tensor& x, const at::Tensor& out) {
  const cpu::SimdPath path = active_cpu_path();
  constexpr int64_t kColumns = 256;  // fp32 sums per task: in L1 while the rows go by
  at::parallel_for(0, ceil_div(x.size(1), kColumns), 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t c0 = b * kColumns, c1 = std::min(x.size(1), c0 + kColumns);
      cpu::bottleneck_column_sum(path, dtype_of(x), x.const_data_ptr(), x.size(0), x.size(1), c0,
                                 c1, out.mutable_data_ptr<float>() + c0);
    }
  });
}

// Bytes of [rows, m] activations per forward tile (see the top of the file).
constexpr int64_t kCpuTileBytes = int64_t(1) << 20;

constexpr Kernels kCpuKernels{cpu_activate, cpu_epilogue, cpu_act_backward, cpu_column_sum,
                             kCpuTileBytes};

// ---- ATen's ops, for float64 and devices without kernels ----

at::Tensor act_of(Act act, const at::Tensor& z) {
  switch (act) {
    case Act::ReLU: return at::relu(z);
    case Act::GELU: return at::gelu(z);
    case Act::SiLU: return at::silu(z);
  }
  return z;
}

void composite_activate(Act act, const at::Tensor& z, const at::Tensor& pre_out) {
  if (pre_out.defined()) pre_out.copy_(z);
  z.copy_(act_of(act, z));
}

void composite_epilogue(const at::Tensor& up, const at::Tensor& bias, const at::Tensor& residual,
                        double scale, const at::Tensor& out) {
  out.copy_(up.add(bias).mul_(scale).add_(residual));
}

void composite_act_backward(Act act, const at::Tensor& pre, const at::Tensor& g, double scale,
                            const at::Tensor& a_out) {
  at::Tensor dz;
  switch (act) {
    case Act::ReLU: dz = at::threshold_backward(g, pre, 0.0); break;
    case Act::GELU: dz = at::gelu_backward(g, pre); break;
    case Act::SiLU: dz = at::silu_backward(g, pre); break;
  }
  g.copy_(dz.mul_(scale));
  a_out.copy_(act_of(act, pre));
}

constexpr Kernels kCompositeKernels{composite_activate, composite_epilogue,
                                    composite_act_backward, aten_column_sum, 0};

}  // namespace

void aten_column_sum(const at::Tensor& x, const at::Tensor& out) {
  out.copy_(at::sum(x, {0}, false, out.scalar_type()));
}

const Kernels& kernels_for(const at::Tensor& t) {
  const auto type = t.scalar_type();
  if (type == at::kFloat || type == at::kHalf || type == at::kBFloat16) {
    if (t.is_cpu()) return kCpuKernels;
#ifdef PYKERNELS_WITH_CUDA
    if (t.is_cuda()) return kCudaKernels;
#endif
  }
  return kCompositeKernels;
}

// ---- one adapter over a block of rows ----

void forward_rows(const Kernels& k, const Adapter& a, const at::Tensor& h, const at::Tensor& r,
                  const at::Tensor& out, const at::Tensor& pre) {
  const int64_t rows = h.size(0), m = a.w_down.size(0);
  if (rows == 0) return;
  const at::Tensor wdt = a.w_down.t(), wut = a.w_up.t();
  const int64_t tile = k.tile_bytes > 0
                           ? std::max<int64_t>(64, k.tile_bytes / (m * h.element_size()))
                           : rows;
  at::Tensor z_buf = at::empty({std::min(tile, rows), m}, h.options());
  for (int64_t t0 = 0; t0 < rows; t0 += tile) {
    const int64_t n = std::min(tile, rows - t0);
    at::Tensor z = z_buf.narrow(0, 0, n), o = out.narrow(0, t0, n);
    // b_down added by the product, as nn.Linear does: one rounding of h·W_downᵀ + b,
    // so relu's mask is nn.Linear's (a second rounding flips signs near zero).
    at::addmm_out(z, a.b_down, h.narrow(0, t0, n), wdt);
    k.activate(a.act, z, pre.defined() ? pre.narrow(0, t0, n) : at::Tensor());
    at::mm_out(o, z, wut);
    k.epilogue(o, a.b_up, r.narrow(0, t0, n), a.scale, o);
  }
}

Grads backward_rows(const Kernels& k, const Adapter& a, const at::Tensor& g, const at::Tensor& h,
                    const at::Tensor& pre, const at::Tensor& grad_h, bool add_grad_out) {
  const int64_t d = h.size(1), m = a.w_down.size(0);
  at::Tensor dz = at::mm(g, a.w_up);
  at::Tensor activated = at::empty(dz.sizes(), dz.options());
  k.act_backward(a.act, pre, dz, a.scale, activated);
  Grads grads;
  // beta = 0: the uninitialized input is never read.
  grads.w_up = at::addmm(at::empty({d, m}, h.options()), g.t(), activated, 0.0, a.scale);
  // dz^T contiguous first: oneDNN's product with the transposed view took 2.5 ms,
  // the copy and product 1.5 ms (bf16, T = 512, one thread).
  grads.w_down = at::mm(dz.t().contiguous(), h);
  // Column sums in fp32 (float64 stays float64), rounded once.
  const auto sum_options =
      h.options().dtype(h.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  at::Tensor sum_up = at::empty({d}, sum_options), sum_down = at::empty({m}, sum_options);
  k.column_sum(g, sum_up);
  k.column_sum(dz, sum_down);
  grads.b_up = sum_up.mul_(a.scale).to(h.scalar_type());
  grads.b_down = sum_down.to(h.scalar_type());
  // The residual's gradient added by the product (beta = 1): no pass of its own.
  if (grad_h.defined()) {
    at::Tensor dh = grad_h;  // the out= variants take a mutable handle
    if (add_grad_out) at::addmm_out(dh, g, dz, a.w_down);
    else at::mm_out(dh, dz, a.w_down);
  }
  return grads;
}

// ---- argument checks ----

Act parse_act(const char* op, std::string_view name, std::string_view arg) {
  if (name == "relu") return Act::ReLU;
  if (name == "gelu") return Act::GELU;
  if (name == "silu") return Act::SiLU;
  TORCH_CHECK_VALUE(false, op, ": ", arg, " must be 'relu', 'gelu' or 'silu', got '",
                    std::string(name), "'");
  return Act::ReLU;
}

void check_h(const char* op, const at::Tensor& h, int64_t min_dims) {
  TORCH_CHECK_VALUE(h.dim() >= min_dims, op, ": h must have at least ", min_dims,
                    min_dims == 1 ? " dimension" : " dimensions", ", got ", h.sizes());
  const auto type = h.scalar_type();
  TORCH_CHECK_TYPE(type == at::kFloat || type == at::kHalf || type == at::kBFloat16 ||
                       type == at::kDouble,
                   op, ": h must be float32, float16, bfloat16 or float64, got ", type);
}

void check_like(const char* op, const at::Tensor& h, const at::Tensor& t, std::string_view name) {
  const std::string arg(name);
  TORCH_CHECK_TYPE(t.scalar_type() == h.scalar_type(), op, ": ", arg, " must have h's dtype ",
                   h.scalar_type(), ", got ", t.scalar_type());
  check_same_device(op, h, "h", t, arg.c_str());
}

void check_same_shape(const char* op, const at::Tensor& t, const char* name,
                      at::IntArrayRef expected, const char* what) {
  TORCH_CHECK_VALUE(t.sizes() == expected, op, ": ", name, " must have ", what, "'s shape ",
                    expected, ", got ", t.sizes());
}

AdapterNames AdapterNames::of(int64_t index) {
  const std::string i = index < 0 ? "" : "[" + std::to_string(index) + "]";
  return {"w_down" + i, "b_down" + i, "w_up" + i, "b_up" + i};
}

int64_t check_weights(const char* op, const at::Tensor& h, const at::Tensor& w_down,
                      const at::Tensor& w_up, const AdapterNames& names) {
  const int64_t d = h.size(-1);
  TORCH_CHECK_VALUE(w_down.dim() == 2 && w_down.size(1) == d && w_down.size(0) >= 1, op, ": ",
                    names.w_down, " must be [bottleneck_dim, d] = [m, ", d,
                    "] (d: h's last dimension) with m >= 1, got ", w_down.sizes());
  const int64_t m = w_down.size(0);
  TORCH_CHECK_VALUE(w_up.dim() == 2 && w_up.size(0) == d && w_up.size(1) == m, op, ": ",
                    names.w_up, " must be [d, bottleneck_dim] = [", d, ", ", m, "], got ",
                    w_up.sizes());
  check_like(op, h, w_down, names.w_down);
  check_like(op, h, w_up, names.w_up);
  return m;
}

namespace {

void check_vector(const char* op, const at::Tensor& h, const at::Tensor& t,
                  const std::string& name, int64_t n, const char* what) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, op, ": ", name, " must be [", n, "] (", what,
                    "), got ", t.sizes());
  check_like(op, h, t, name);
}

}  // namespace

void check_biases(const char* op, const at::Tensor& h, const at::Tensor& b_down,
                  const at::Tensor& b_up, int64_t m, const AdapterNames& names) {
  check_vector(op, h, b_down, names.b_down, m, "bottleneck_dim");
  check_vector(op, h, b_up, names.b_up, h.size(-1), "d");
}

// ---- the ops ----

std::tuple<at::Tensor, at::Tensor> bottleneck_adapter(
    const at::Tensor& h, const std::optional<at::Tensor>& residual, const at::Tensor& w_down,
    const at::Tensor& b_down, const at::Tensor& w_up, const at::Tensor& b_up,
    c10::string_view act_name, double scale, bool save_pre) {
  constexpr const char* op = "bottleneck_adapter";
  const Act act = parse_act(op, act_name);
  check_h(op, h, 1);
  const AdapterNames names = AdapterNames::of(-1);
  const int64_t m = check_weights(op, h, w_down, w_up, names);
  const int64_t d = h.size(-1);
  check_biases(op, h, b_down, b_up, m, names);
  if (residual.has_value()) {
    check_same_shape(op, *residual, "residual", h.sizes(), "h");
    check_like(op, h, *residual, "residual");
  }

  // The products write into buffers (out= variants), which autograd refuses for
  // inputs that require grad (also on parallel_for's threads, where no dispatch
  // guard reaches): this op's autograd is its own (ops/bottleneck.py).
  const at::Tensor h2d = h.detach().reshape({-1, d}).contiguous();
  const at::Tensor r2d =
      residual.has_value() ? residual->detach().reshape({-1, d}).contiguous() : h2d;
  const int64_t rows = h2d.size(0);
  const Adapter a{w_down.detach(), b_down.detach().contiguous(), w_up.detach(),
                  b_up.detach().contiguous(), act, scale};
  at::Tensor out = at::empty({rows, d}, h.options());
  at::Tensor pre = at::empty({save_pre ? rows : 0, m}, h.options());
  forward_rows(kernels_for(h), a, h2d, r2d, out, save_pre ? pre : at::Tensor());
  return {out.view(h.sizes()), save_pre ? pre.view(with_last_dim(h, m)) : pre};
}

std::tuple<std::optional<at::Tensor>, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
bottleneck_adapter_backward(const at::Tensor& grad_out, const at::Tensor& h, const at::Tensor& pre,
                            const at::Tensor& w_down, const at::Tensor& w_up,
                            c10::string_view act_name, double scale, bool need_grad_h,
                            bool add_grad_out) {
  constexpr const char* op = "bottleneck_adapter_backward";
  const Act act = parse_act(op, act_name);
  check_h(op, h, 1);
  const int64_t m = check_weights(op, h, w_down, w_up, AdapterNames::of(-1));
  const int64_t d = h.size(-1);
  check_same_shape(op, grad_out, "grad_out", h.sizes(), "h");
  check_like(op, h, grad_out, "grad_out");
  check_same_shape(op, pre, "pre", with_last_dim(h, m), "the bottleneck [..., m]");
  check_like(op, h, pre, "pre");

  at::Tensor grad_h = need_grad_h ? at::empty({leading_rows(h), d}, h.options()) : at::Tensor();
  const Grads grads = backward_rows(
      kernels_for(h),
      Adapter{w_down.detach(), at::Tensor(), w_up.detach(), at::Tensor(), act, scale},
      grad_out.detach().reshape({-1, d}).contiguous(), h.detach().reshape({-1, d}).contiguous(),
      pre.detach().reshape({-1, m}).contiguous(), grad_h, add_grad_out);
  std::optional<at::Tensor> maybe_grad_h;
  if (need_grad_h) maybe_grad_h = grad_h.view(h.sizes());
  return {maybe_grad_h, grads.w_down, grads.b_down, grads.w_up, grads.b_up};
}

TORCH_LIBRARY_IMPL(pykernels, CPU, m) {
  m.impl("bottleneck_adapter", &bottleneck_adapter);
  m.impl("bottleneck_adapter_backward", &bottleneck_adapter_backward);
}

}  // namespace pykernels::binding::bottleneck
