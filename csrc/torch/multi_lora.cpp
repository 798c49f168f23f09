// The multi-LoRA ops (multi_lora.h) for every device, and the CPU's kernels.
// fp32 / fp16 / bf16 run a device's Kernels over the segments (no row of x, dy
// or dx is gathered, drop(x) is never stored); float64 and devices without
// kernels take the plain path below: per adapter, the rows gathered, drop(x) as
// a stored multiplier from the same hash (the gradcheck path).
#include "multi_lora.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "checks.h"
#include "lora_adapter.h"
#include "pykernels/cpu.h"
#include "simd_choice.h"

namespace pykernels::binding::multi_lora {
namespace {

constexpr const char* kOp = "multi_lora";

// Tasks of ~2^18 multiply-adds, as the LoRA kernels (lora.cpp).
int64_t grain(int64_t work_per_item) {
  return std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(1, work_per_item));
}

DType kernel_dtype(const at::Tensor& t) { return float_dtype(kOp, "x", t.scalar_type()); }

// ---- the CPU's kernels (csrc/cpu/multi_lora.cpp), split across torch's threads ----

void cpu_x_at(const Segments& s, const at::Tensor& x, const at::Tensor& a_all, const Dropout& d,
              const at::Tensor& out) {
  const int64_t cols = x.size(1), rank = a_all.size(1);
  const cpu::SimdPath path = active_cpu_path();
  at::parallel_for(0, s.listed(), grain(cols * rank), [&](int64_t begin, int64_t end) {
    cpu::multi_lora_x_at(path, kernel_dtype(x), x.const_data_ptr(), a_all.const_data_ptr(), cols,
                         rank, d, s.order.const_data_ptr<int64_t>(), s.host_offsets.data(),
                         s.n_adapters, begin, end, out.mutable_data_ptr());
  });
}

void cpu_add_g_a(const Segments& s, const at::Tensor& g, const at::Tensor& a_all,
                 const std::optional<at::Tensor>& scales, float scale, const Dropout& d,
                 const at::Tensor& out) {
  const int64_t cols = out.size(1), rank = a_all.size(1);
  const cpu::SimdPath path = active_cpu_path();
  const float* s_all = scales.has_value() ? scales->const_data_ptr<float>() : nullptr;
  at::parallel_for(0, s.listed(), grain(cols * rank), [&](int64_t begin, int64_t end) {
    cpu::multi_lora_add_g_a(path, kernel_dtype(out), g.const_data_ptr<float>(),
                            a_all.const_data_ptr(), cols, rank, s_all, scale, d,
                            s.order.const_data_ptr<int64_t>(), s.host_offsets.data(),
                            s.n_adapters, begin, end, out.mutable_data_ptr());
  });
}

void cpu_gt_x(const Segments& s, const at::Tensor& g, const at::Tensor& x, const Dropout& d,
              const at::Tensor& out_all) {
  const int64_t cols = x.size(1), rank = g.size(1);
  const cpu::SimdPath path = active_cpu_path();
  constexpr int64_t kBlock = 64;  // columns per unit of work: the kernels' column tile
  for (int64_t a = 0; a < s.n_adapters; ++a) {
    const int64_t rows = s.host_offsets[a + 1] - s.host_offsets[a];
    if (rows == 0) continue;
    at::parallel_for(0, ceil_div(cols, kBlock), grain(rows * kBlock * rank),
                     [&](int64_t begin, int64_t end) {
                       cpu::multi_lora_gt_x(path, kernel_dtype(x), g.const_data_ptr<float>(),
                                            x.const_data_ptr(), cols, rank, d,
                                            s.order.const_data_ptr<int64_t>(),
                                            s.host_offsets.data(), a, begin * kBlock,
                                            std::min(cols, end * kBlock),
                                            out_all.mutable_data_ptr());
                     });
  }
}

constexpr Kernels kCpuKernels{cpu_x_at, cpu_add_g_a, cpu_gt_x};

const Kernels* kernels_for(const at::Tensor& t) {
  const auto type = t.scalar_type();
  if (type != at::kFloat && type != at::kHalf && type != at::kBFloat16) return nullptr;
  if (t.is_cpu()) return &kCpuKernels;
#ifdef PYKERNELS_WITH_CUDA
  if (t.is_cuda()) return &kCudaKernels;
#endif
  return nullptr;
}

// ---- checks ----

void check_same_dtype(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                      const char* b_name) {
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), kOp, ": ", b_name, " must have ", a_name,
                   "'s dtype ", a.scalar_type(), ", got ", b.scalar_type());
}

// The checked ids, on the host, and the dropout.
struct Checked {
  at::Tensor host_ids;
  Dropout dropout;
};

// x [rows, ..., in] against the stacked adapters, scales, ids, dropout and seed.
// Reads ids once (on the CPU; from a GPU it waits for them): the segments are
// built from the same host copy.
Checked check_inputs(const at::Tensor& x, const at::Tensor& lora_A, const at::Tensor& lora_B,
                     const at::Tensor& scales, const at::Tensor& ids, double dropout_p,
                     const at::Tensor& seed) {
  const auto type = x.scalar_type();
  TORCH_CHECK_TYPE(type == at::kFloat || type == at::kHalf || type == at::kBFloat16 ||
                       type == at::kDouble,
                   kOp, ": x must be float32, float16, bfloat16 or float64, got ", type);
  TORCH_CHECK_VALUE(x.dim() >= 2, kOp, ": x must be [rows, ..., in_features], got ", x.sizes());
  const int64_t in = x.size(-1);
  TORCH_CHECK_VALUE(lora_A.dim() == 3 && lora_A.size(2) == in && lora_A.size(1) >= 1, kOp,
                    ": lora_A must be [n_adapters, r, in_features] with in_features = ", in,
                    " and r >= 1, got ", lora_A.sizes());
  const int64_t n = lora_A.size(0), rank = lora_A.size(1);
  TORCH_CHECK_VALUE(lora_B.dim() == 3 && lora_B.size(0) == n && lora_B.size(2) == rank, kOp,
                    ": lora_B must be [n_adapters, out_features, r] = [", n, ", out_features, ",
                    rank, "] (n_adapters and r from lora_A), got ", lora_B.sizes());
  check_same_dtype(x, "x", lora_A, "lora_A");
  check_same_dtype(x, "x", lora_B, "lora_B");
  check_same_device(kOp, x, "x", lora_A, "lora_A");
  check_same_device(kOp, x, "x", lora_B, "lora_B");
  TORCH_CHECK_VALUE(scales.dim() == 1 && scales.size(0) == n, kOp,
                    ": scales must be [n_adapters] = [", n, "], got ", scales.sizes());
  check_dtype(kOp, "scales", scales, at::kFloat);
  check_same_device(kOp, x, "x", scales, "scales");
  at::Tensor host_ids = check_adapter_ids(kOp, ids, x, "x", n);
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, kOp,
                    ": dropout_p must be in [0, 1), got ", dropout_p);
  TORCH_CHECK_VALUE(seed.numel() == 1 && seed.scalar_type() == at::kLong && seed.device().is_cpu(),
                    kOp, ": seed must be one int64 on the CPU, got ", seed.scalar_type(), " ",
                    seed.sizes(), " on ", seed.device());
  TORCH_CHECK_VALUE(dropout_p == 0.0 || in <= int64_t(std::numeric_limits<uint32_t>::max()), kOp,
                    ": dropout needs in_features below 2^32, got ", in);
  return {host_ids, make_dropout(dropout_p, uint64_t(*seed.const_data_ptr<int64_t>()))};
}

void check_like(const at::Tensor& x, const at::Tensor& t, const char* name, int64_t last) {
  const auto expected = with_last_dim(x, last);
  TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(expected), kOp, ": ", name,
                    " must have shape ", at::IntArrayRef(expected), ", got ", t.sizes());
  check_same_dtype(x, "x", t, name);
  check_same_device(kOp, x, "x", t, name);
}

Segments make_segments(const at::Tensor& host_ids, int64_t tokens, int64_t n_adapters,
                       const at::Device& device) {
  const int64_t rows = host_ids.numel();
  Segments s;
  s.n_adapters = n_adapters;
  s.host_offsets.resize(size_t(n_adapters + 1));
  at::Tensor order = at::empty({rows * tokens}, at::TensorOptions().dtype(at::kLong));
  const int64_t listed =
      cpu::multi_lora_segments(host_ids.const_data_ptr<int64_t>(), rows, tokens, n_adapters,
                               order.mutable_data_ptr<int64_t>(), s.host_offsets.data());
  const at::Tensor offsets =
      at::from_blob(s.host_offsets.data(), {n_adapters + 1}, at::TensorOptions().dtype(at::kLong));
  s.order = order.narrow(0, 0, listed).to(device);
  s.offsets = offsets.to(device, /*non_blocking=*/false, /*copy=*/true);
  s.token_adapter = host_ids.repeat_interleave(tokens).to(device);
  return s;
}

// Per token: scales[id] (0 where id = -1), [T, 1] fp32.
at::Tensor token_scales(const at::Tensor& scales, const at::Tensor& token_adapter) {
  const at::Tensor has = token_adapter.ge(0);
  return scales.index_select(0, token_adapter.clamp_min(0)).mul(has).unsqueeze(1);
}

// A row list of one adapter, for the plain path.
at::Tensor rows_of(const Segments& s, int64_t a) {
  return s.order.narrow(0, s.host_offsets[a], s.host_offsets[a + 1] - s.host_offsets[a]);
}

at::Tensor drop_multiplier(const Dropout& d, const at::Tensor& x2d) {
  return lora::dropout_multiplier(d, x2d.size(0), x2d.size(1), x2d.options()).to(x2d.device());
}

double scale_of(const at::Tensor& host_scales, int64_t a) {
  return double(host_scales.const_data_ptr<float>()[a]);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> multi_lora(const at::Tensor& x, const at::Tensor& base,
                                              const at::Tensor& lora_A, const at::Tensor& lora_B,
                                              const at::Tensor& scales, const at::Tensor& ids,
                                              double dropout_p, const at::Tensor& seed) {
  const Checked checked = check_inputs(x, lora_A, lora_B, scales, ids, dropout_p, seed);
  const Dropout& d = checked.dropout;
  const int64_t n = lora_A.size(0), rank = lora_A.size(1), out = lora_B.size(1);
  check_like(x, base, "base", out);
  const at::Tensor x2d = x.reshape({-1, x.size(-1)}).contiguous();
  const int64_t tokens = x.size(0) == 0 ? 0 : x2d.size(0) / x.size(0);
  const Segments s = make_segments(checked.host_ids, tokens, n, x.device());
  at::Tensor y = base.reshape({-1, out}).clone(at::MemoryFormat::Contiguous);
  at::Tensor xa = at::zeros({x2d.size(0), rank}, x.options());
  if (const Kernels* k = kernels_for(x)) {
    k->x_at(s, x2d, lora_A.contiguous(), d, xa);
    // y += s[a] xa B[a]^T: add_g_a's rows of "a" are B[a]^T's, [n, r, out].
    k->add_g_a(s, xa.to(at::kFloat), lora_B.transpose(1, 2).contiguous(), scales.contiguous(),
               1.0f, Dropout{}, y);
  } else {
    const at::Tensor xd = d.active() ? x2d.mul(drop_multiplier(d, x2d)) : x2d;
    const at::Tensor host_scales = scales.cpu();
    for (int64_t a = 0; a < n; ++a) {
      const at::Tensor rows = rows_of(s, a);
      if (rows.numel() == 0) continue;
      const at::Tensor xa_a = at::mm(xd.index_select(0, rows), lora_A[a].t());
      xa.index_copy_(0, rows, xa_a);
      y.index_add_(0, rows, at::mm(xa_a, lora_B[a].t()), scale_of(host_scales, a));
    }
  }
  return {y.view(base.sizes()), xa.view(with_last_dim(x, rank))};
}

std::tuple<std::optional<at::Tensor>, at::Tensor, at::Tensor> multi_lora_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& scales, const at::Tensor& ids, const at::Tensor& xa,
    double dropout_p, const at::Tensor& seed, bool need_grad_x) {
  const Checked checked = check_inputs(x, lora_A, lora_B, scales, ids, dropout_p, seed);
  const Dropout& d = checked.dropout;
  const int64_t n = lora_A.size(0), rank = lora_A.size(1), out = lora_B.size(1);
  check_like(x, grad_out, "grad_out", out);
  check_like(x, xa, "xa", rank);
  const at::Tensor x2d = x.reshape({-1, x.size(-1)}).contiguous();
  const at::Tensor dy = grad_out.reshape({-1, out}).contiguous();
  const at::Tensor xa2d = xa.reshape({-1, rank}).contiguous();
  const int64_t tokens = x.size(0) == 0 ? 0 : x2d.size(0) / x.size(0);
  const Segments s = make_segments(checked.host_ids, tokens, n, x.device());
  at::Tensor grad_A = at::zeros(lora_A.sizes(), lora_A.options());
  at::Tensor grad_B = at::zeros(lora_B.sizes(), lora_B.options());
  at::Tensor dx = need_grad_x ? at::zeros(x2d.sizes(), x2d.options()) : at::Tensor();
  if (const Kernels* k = kernels_for(x)) {
    const at::Tensor bt = lora_B.transpose(1, 2).contiguous();  // [n, r, out]
    const at::Tensor s_tok = token_scales(scales, s.token_adapter);
    // dxa = s[a] dy B[a], in fp32 after dy B[a] is rounded to x's dtype (as xa is).
    at::Tensor dyb = at::zeros({x2d.size(0), rank}, x.options());
    k->x_at(s, dy, bt, Dropout{}, dyb);
    const at::Tensor dxa = dyb.to(at::kFloat).mul_(s_tok);
    k->gt_x(s, dxa, x2d, d, grad_A);
    at::Tensor grad_bt = at::zeros(bt.sizes(), bt.options());
    k->gt_x(s, xa2d.to(at::kFloat).mul_(s_tok), dy, Dropout{}, grad_bt);
    grad_B = grad_bt.transpose(1, 2).contiguous();
    if (need_grad_x) k->add_g_a(s, dxa, lora_A.contiguous(), std::nullopt, d.scale, d, dx);
  } else {
    const at::Tensor mult = d.active() ? drop_multiplier(d, x2d) : at::Tensor();
    const at::Tensor host_scales = scales.cpu();
    for (int64_t a = 0; a < n; ++a) {
      const at::Tensor rows = rows_of(s, a);
      if (rows.numel() == 0) continue;
      const double sa = scale_of(host_scales, a);
      const at::Tensor dy_a = dy.index_select(0, rows);
      const at::Tensor dxa = at::mm(dy_a, lora_B[a]).mul_(sa);
      const at::Tensor m_a = d.active() ? mult.index_select(0, rows) : at::Tensor();
      const at::Tensor x_a = x2d.index_select(0, rows);
      grad_A[a].copy_(at::mm(dxa.t(), d.active() ? x_a.mul(m_a) : x_a));
      grad_B[a].copy_(at::mm(dy_a.t(), xa2d.index_select(0, rows)).mul_(sa));
      if (need_grad_x) {
        const at::Tensor dx_a = at::mm(dxa, lora_A[a]);
        dx.index_add_(0, rows, d.active() ? dx_a.mul(m_a) : dx_a);
      }
    }
  }
  return {need_grad_x ? std::optional<at::Tensor>(dx.view(x.sizes())) : std::nullopt, grad_A,
          grad_B};
}

TORCH_LIBRARY_IMPL(pykernels, CPU, m) {
  m.impl("multi_lora", &multi_lora);
  m.impl("multi_lora_backward", &multi_lora_backward);
}

}  // namespace pykernels::binding::multi_lora
