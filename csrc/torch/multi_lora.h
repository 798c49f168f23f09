// Multi-LoRA ops (math: csrc/cpu/multi_lora.cpp), written once for every device
// in multi_lora.cpp over a device's kernels (the CPU's there, CUDA's in
// multi_lora_cuda.cpp):
//   multi_lora           y = base + s[id] (drop(x) A[id]^T) B[id]^T per batch row, and xa
//   multi_lora_backward  dx (the adapters' part), dA_all, dB_all (zeros for absent adapters)
// The base's output comes in computed (a dense or an NF4 linear): its own op
// gives it, and its gradient, so one op serves every base.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

#include "pykernels/dropout.h"

namespace pykernels::binding::multi_lora {

// The batch's token rows grouped by adapter, on the tensors' device: order [listed]
// (int64 token rows, adapter by adapter), offsets [n + 1] (adapter a's at
// [offsets[a], offsets[a + 1])) and on the host too; token_adapter [T] (int64, -1: none).
struct Segments {
  at::Tensor order, offsets, token_adapter;
  std::vector<int64_t> host_offsets;
  int64_t n_adapters = 0;
  int64_t listed() const { return host_offsets.back(); }
};

// One device's kernels; tensors contiguous, x-like ones [T, cols] in one float
// dtype, g fp32 [T, r], a_all [n, r, cols], scales fp32 [n].
struct Kernels {
  // out[t] = drop(x[t]) a_all[a]^T for each listed row t of adapter a.
  void (*x_at)(const Segments& s, const at::Tensor& x, const at::Tensor& a_all, const Dropout& d,
               const at::Tensor& out);
  // out[t] += scale * (scales ? scales[a] : 1) * g[t] a_all[a] where kept.
  void (*add_g_a)(const Segments& s, const at::Tensor& g, const at::Tensor& a_all,
                  const std::optional<at::Tensor>& scales, float scale, const Dropout& d,
                  const at::Tensor& out);
  // out_all[a] [r, cols] = sum over adapter a's rows of g[t]^T drop(x[t]), for every
  // adapter with rows (the others are left as they are).
  void (*gt_x)(const Segments& s, const at::Tensor& g, const at::Tensor& x, const Dropout& d,
               const at::Tensor& out_all);
};

#ifdef PYKERNELS_WITH_CUDA
extern const Kernels kCudaKernels;  // multi_lora_cuda.cpp
#endif

std::tuple<at::Tensor, at::Tensor> multi_lora(const at::Tensor& x, const at::Tensor& base,
                                              const at::Tensor& lora_A, const at::Tensor& lora_B,
                                              const at::Tensor& scales, const at::Tensor& ids,
                                              double dropout_p, const at::Tensor& seed);

std::tuple<std::optional<at::Tensor>, at::Tensor, at::Tensor> multi_lora_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& scales, const at::Tensor& ids, const at::Tensor& xa,
    double dropout_p, const at::Tensor& seed, bool need_grad_x);

}  // namespace pykernels::binding::multi_lora
