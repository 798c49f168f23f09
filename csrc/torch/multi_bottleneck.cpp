// The multi bottleneck adapter ops, for every device (CUDA registers them in
// multi_bottleneck_cuda.cpp): many adapters resident at one site, each batch
// row i of h [rows, ..., d] picking adapter a = ids[i] (punica's SGMV
// semantics, as multi_lora):
//   multi_bottleneck           out[i] = r[i] + s_a·(act_a(h[i]·W_down[a]ᵀ + b_down[a])·W_up[a]ᵀ
//                              + b_up[a]), out[i] = r[i] where a = -1; and the
//                              pre-activations [..., max m] when asked (training)
//   multi_bottleneck_backward  dh, and dW_down, db_down, dW_up, db_up per adapter
//                              (zeros for an adapter no row picked)
//
// The adapters come as lists, not stacks: each keeps its own bottleneck dim m,
// activation and scale, and no weight is copied per call. The batch rows are
// grouped by adapter once, on the host (a counting sort, cpu::multi_lora_segments
// over ids + 1, so group 0 is the rows with no adapter), and each adapter's
// group runs bottleneck.cpp's pipeline (forward_rows, backward_rows: the
// products, the device's epilogue kernels) on its rows. A group of consecutive
// rows runs in place, on views of h, r and out (a batch of one adapter runs as
// bottleneck_adapter does); any other group is gathered into a block and its
// results scattered back: one copy of its rows of h, r and out.
//
// pre [..., max m] holds row t's pre-activation in its first m columns (m of
// t's adapter) and zeros elsewhere: one tensor of a shape the ids do not
// decide, so the fake implementation and torch.compile know it.
#include "multi_bottleneck.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "bottleneck_kernels.h"
#include "checks.h"
#include "pykernels/cpu.h"

namespace pykernels::binding::multi_bottleneck {
namespace {

using bottleneck::Adapter;
using bottleneck::AdapterNames;

// The batch rows grouped by ids + 1 (group 0: id -1, no adapter; group a + 1:
// adapter a), ascending within a group, on the host and on the tensors' device.
struct Groups {
  std::vector<int64_t> order, offsets;  // group g's rows: order[offsets[g], offsets[g + 1])
  at::Tensor device_order;
};

// One group's rows of a [rows, tokens, cols] tensor: a view when they are
// consecutive, else gathered (index on the tensors' device).
class RowSet {
 public:
  RowSet(const Groups& groups, int64_t group) {
    const int64_t first = groups.offsets[size_t(group)];
    count_ = groups.offsets[size_t(group) + 1] - first;
    begin_ = count_ > 0 ? groups.order[size_t(first)] : 0;
    // Ascending rows are consecutive exactly when the last is count - 1 past the first.
    if (count_ > 0 && groups.order[size_t(first + count_ - 1)] - begin_ != count_ - 1)
      index_ = groups.device_order.narrow(0, first, count_);
  }
  int64_t count() const { return count_; }
  // t's rows, [count, ...]: a view when consecutive, else a gathered copy.
  at::Tensor take(const at::Tensor& t) const {
    return index_.defined() ? t.index_select(0, index_) : t.narrow(0, begin_, count_);
  }
  // Where the rows of dst are to be written: dst's own rows when consecutive,
  // else a fresh contiguous block that put() scatters into dst.
  at::Tensor slot(const at::Tensor& dst) const {
    if (!index_.defined()) return dst.narrow(0, begin_, count_);
    std::vector<int64_t> sizes(dst.sizes().begin(), dst.sizes().end());
    sizes[0] = count_;
    return at::empty(sizes, dst.options());
  }
  void put(const at::Tensor& dst, const at::Tensor& slot_written) const {
    if (index_.defined()) dst.index_copy_(0, index_, slot_written);
  }

 private:
  int64_t begin_ = 0, count_ = 0;
  at::Tensor index_;
};

// Checks every argument but the per-op ones and returns the adapters (b_down,
// b_up: none for the backward, which reads no bias).
std::vector<Adapter> check_adapters(const char* op, const at::Tensor& h, at::TensorList w_down,
                                    std::optional<at::TensorList> b_down, at::TensorList w_up,
                                    std::optional<at::TensorList> b_up,
                                    c10::ArrayRef<double> scales,
                                    const c10::List<std::string>& acts) {
  bottleneck::check_h(op, h, 2);
  const int64_t n = int64_t(w_down.size());
  const auto check_count = [&](int64_t got, const char* name) {
    TORCH_CHECK_VALUE(got == n, op, ": ", name, " must hold one entry per adapter (", n,
                      ", as w_down), got ", got);
  };
  check_count(int64_t(w_up.size()), "w_up");
  if (b_down) check_count(int64_t(b_down->size()), "b_down");
  if (b_up) check_count(int64_t(b_up->size()), "b_up");
  check_count(int64_t(scales.size()), "scales");
  check_count(int64_t(acts.size()), "acts");
  std::vector<Adapter> adapters;
  for (int64_t a = 0; a < n; ++a) {
    const AdapterNames names = AdapterNames::of(a);
    const int64_t m = bottleneck::check_weights(op, h, w_down[a], w_up[a], names);
    if (b_down) bottleneck::check_biases(op, h, (*b_down)[a], (*b_up)[a], m, names);
    const std::string act_arg = "acts[" + std::to_string(a) + "]";
    const auto bias = [&](const std::optional<at::TensorList>& list) {
      return list ? (*list)[a].detach().contiguous() : at::Tensor();
    };
    adapters.push_back({w_down[a].detach(), bias(b_down), w_up[a].detach(), bias(b_up),
                        bottleneck::parse_act(op, acts.get(size_t(a)), act_arg), scales[a]});
  }
  return adapters;
}

// Checks ids (check_adapter_ids) and groups the rows by them.
Groups group_rows(const char* op, const at::Tensor& h, const at::Tensor& ids, int64_t n) {
  const at::Tensor host_ids = check_adapter_ids(op, ids, h, "h", n);
  const int64_t rows = host_ids.numel();
  const int64_t* id = host_ids.const_data_ptr<int64_t>();
  std::vector<int64_t> shifted(id, id + rows);
  for (int64_t& s : shifted) ++s;
  Groups g;
  g.order.resize(size_t(rows));
  g.offsets.resize(size_t(n + 2));
  cpu::multi_lora_segments(shifted.data(), rows, 1, n + 1, g.order.data(), g.offsets.data());
  g.device_order = at::from_blob(g.order.data(), {rows}, at::TensorOptions().dtype(at::kLong))
                       .to(h.device(), /*non_blocking=*/false, /*copy=*/true);
  return g;
}

int64_t max_bottleneck_dim(const std::vector<Adapter>& adapters) {
  int64_t m = 0;
  for (const Adapter& a : adapters) m = std::max(m, a.w_down.size(0));
  return m;
}

// The token rows of each batch row of h [rows, ..., d] (they share the row's id).
int64_t tokens_per_row(const at::Tensor& h) {
  int64_t tokens = 1;
  for (int64_t i = 1; i + 1 < h.dim(); ++i) tokens *= h.size(i);
  return tokens;
}

// t [rows, ..., cols] contiguous, viewed as [rows, tokens, cols].
at::Tensor by_batch_row(const at::Tensor& t, int64_t tokens, int64_t cols) {
  return t.view({t.size(0), tokens, cols});
}

at::Tensor flat(const at::Tensor& t) { return t.view({-1, t.size(-1)}); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> multi_bottleneck(
    const at::Tensor& h, const std::optional<at::Tensor>& residual, at::TensorList w_down,
    at::TensorList b_down, at::TensorList w_up, at::TensorList b_up, c10::ArrayRef<double> scales,
    const c10::List<std::string>& acts, const at::Tensor& ids, bool save_pre) {
  constexpr const char* op = "multi_bottleneck";
  const std::vector<Adapter> adapters =
      check_adapters(op, h, w_down, b_down, w_up, b_up, scales, acts);
  if (residual.has_value()) {
    bottleneck::check_same_shape(op, *residual, "residual", h.sizes(), "h");
    bottleneck::check_like(op, h, *residual, "residual");
  }
  const int64_t n = int64_t(adapters.size()), d = h.size(-1), tokens = tokens_per_row(h);
  const Groups groups = group_rows(op, h, ids, n);

  // Detached: the products write into buffers (out= variants); this op's autograd
  // is its own (ops/multi_bottleneck.py).
  const at::Tensor h3 = by_batch_row(h.detach().contiguous(), tokens, d);
  const at::Tensor r3 =
      residual.has_value() ? by_batch_row(residual->detach().contiguous(), tokens, d) : h3;
  const int64_t max_m = max_bottleneck_dim(adapters);
  at::Tensor out = at::empty(h.sizes(), h.options());
  at::Tensor pre = at::zeros(save_pre ? with_last_dim(h, max_m) : std::vector<int64_t>{0, max_m},
                             h.options());
  const at::Tensor out3 = by_batch_row(out, tokens, d);
  const at::Tensor pre3 = save_pre ? by_batch_row(pre, tokens, max_m) : at::Tensor();
  const bottleneck::Kernels& k = bottleneck::kernels_for(h);

  const RowSet unadapted(groups, 0);
  if (unadapted.count() > 0) {
    at::Tensor o = unadapted.slot(out3);
    o.copy_(unadapted.take(r3));
    unadapted.put(out3, o);
  }
  for (int64_t a = 0; a < n; ++a) {
    const RowSet rows(groups, a + 1);
    if (rows.count() == 0) continue;
    const Adapter& adapter = adapters[size_t(a)];
    const int64_t m = adapter.w_down.size(0);
    at::Tensor o = rows.slot(out3), p_slot, p;
    if (save_pre) {  // pre's columns [0, m) of these rows: written through a block if strided
      p_slot = rows.slot(pre3.narrow(2, 0, m));
      p = p_slot.is_contiguous() ? p_slot : at::empty(p_slot.sizes(), p_slot.options());
    }
    const at::Tensor hb = rows.take(h3);
    const at::Tensor rb = residual.has_value() ? rows.take(r3) : hb;
    bottleneck::forward_rows(k, adapter, flat(hb), flat(rb), flat(o),
                             save_pre ? flat(p) : at::Tensor());
    rows.put(out3, o);
    if (save_pre) {
      if (!p.is_same(p_slot)) p_slot.copy_(p);
      rows.put(pre3.narrow(2, 0, m), p_slot);
    }
  }
  return {out, pre};
}

std::tuple<std::optional<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
           std::vector<at::Tensor>, std::vector<at::Tensor>>
multi_bottleneck_backward(const at::Tensor& grad_out, const at::Tensor& h, const at::Tensor& pre,
                          at::TensorList w_down, at::TensorList w_up,
                          c10::ArrayRef<double> scales, const c10::List<std::string>& acts,
                          const at::Tensor& ids, bool need_grad_h, bool add_grad_out) {
  constexpr const char* op = "multi_bottleneck_backward";
  const std::vector<Adapter> adapters =
      check_adapters(op, h, w_down, std::nullopt, w_up, std::nullopt, scales, acts);
  const int64_t n = int64_t(adapters.size()), d = h.size(-1), tokens = tokens_per_row(h);
  const int64_t max_m = max_bottleneck_dim(adapters);
  bottleneck::check_same_shape(op, grad_out, "grad_out", h.sizes(), "h");
  bottleneck::check_like(op, h, grad_out, "grad_out");
  bottleneck::check_same_shape(op, pre, "pre", with_last_dim(h, max_m),
                               "the bottleneck [..., max m]");
  bottleneck::check_like(op, h, pre, "pre");
  const Groups groups = group_rows(op, h, ids, n);

  const at::Tensor g3 = by_batch_row(grad_out.detach().contiguous(), tokens, d);
  const at::Tensor h3 = by_batch_row(h.detach().contiguous(), tokens, d);
  const at::Tensor pre3 = by_batch_row(pre.detach().contiguous(), tokens, max_m);
  at::Tensor grad_h = need_grad_h ? at::empty(h.sizes(), h.options()) : at::Tensor();
  const at::Tensor grad_h3 = need_grad_h ? by_batch_row(grad_h, tokens, d) : at::Tensor();
  const bottleneck::Kernels& k = bottleneck::kernels_for(h);

  const RowSet unadapted(groups, 0);
  if (need_grad_h && unadapted.count() > 0) {  // the residual's gradient only
    at::Tensor gh = unadapted.slot(grad_h3);
    if (add_grad_out) gh.copy_(unadapted.take(g3));
    else gh.zero_();
    unadapted.put(grad_h3, gh);
  }
  std::vector<at::Tensor> grad_w_down, grad_b_down, grad_w_up, grad_b_up;
  for (int64_t a = 0; a < n; ++a) {
    const RowSet rows(groups, a + 1);
    const Adapter& adapter = adapters[size_t(a)];
    const int64_t m = adapter.w_down.size(0);
    if (rows.count() == 0) {
      grad_w_down.push_back(at::zeros(adapter.w_down.sizes(), h.options()));
      grad_b_down.push_back(at::zeros({m}, h.options()));
      grad_w_up.push_back(at::zeros(adapter.w_up.sizes(), h.options()));
      grad_b_up.push_back(at::zeros({d}, h.options()));
      continue;
    }
    const at::Tensor gh = need_grad_h ? rows.slot(grad_h3) : at::Tensor();
    const bottleneck::Grads grads = bottleneck::backward_rows(
        k, adapter, flat(rows.take(g3)), flat(rows.take(h3)),
        flat(rows.take(pre3.narrow(2, 0, m)).contiguous()),
        need_grad_h ? flat(gh) : at::Tensor(), add_grad_out);
    if (need_grad_h) rows.put(grad_h3, gh);
    grad_w_down.push_back(grads.w_down);
    grad_b_down.push_back(grads.b_down);
    grad_w_up.push_back(grads.w_up);
    grad_b_up.push_back(grads.b_up);
  }
  std::optional<at::Tensor> maybe_grad_h;
  if (need_grad_h) maybe_grad_h = grad_h;
  return {maybe_grad_h, grad_w_down, grad_b_down, grad_w_up, grad_b_up};
}

TORCH_LIBRARY_IMPL(pykernels, CPU, m) {
  m.impl("multi_bottleneck", &multi_bottleneck);
  m.impl("multi_bottleneck_backward", &multi_bottleneck_backward);
}

}  // namespace pykernels::binding::multi_bottleneck
