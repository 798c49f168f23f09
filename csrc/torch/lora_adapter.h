// The adapter half of a LoRA linear layer, whatever its base:
//   y = base(x) + s (drop(x) A^T) B^T,   A [r, in], B [out, r], s the scale.
// A binding computes its own base (a dense W in lora.cpp; an NF4 W for QLoRA)
// and calls these on 2-D row-major views x2d [T, in], y2d and dy2d [T, out]:
//   forward   xa = adapter_down(x2d, A, d);  adapter_add_up(y2d, xa, B, s)
//   backward  g = adapter_backward(dy2d, grad_xa, x2d, xa, A, B, s, d)
//             dx2d = <the base's grad input>;  adapter_add_grad_input(dx2d, g.dxa, A, d)
// The adapter writes into the base's output and grad input in place: nothing of
// T x in or T x out is allocated here, and drop(x) is never stored.
//
// The functions serve every device: the dense products go to at::mm / addmm
// (oneDNN or MKL on the CPU, cuBLAS on CUDA), and the products that touch
// drop(x) run a device's FusedKernels (below) for fp32/fp16/bf16 (on the CPU
// also where they beat the matmul library, see lora.cpp). float64, and devices
// without kernels, multiply by a stored mask from the same hash (the op's
// reference and gradcheck path, correct but T x in in memory).
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "pykernels/dropout.h"

namespace pykernels::binding::lora {

// One device's kernels for the products with drop(x) (math: csrc/cpu/lora.cpp).
// Tensors are contiguous, of one dtype (fp32, fp16 or bf16) except g (fp32), on
// that device; out is allocated by the caller.
struct FusedKernels {
  // out [T, r] = drop(x) a^T, for x [T, in] and a [r, in].
  void (*x_at)(const at::Tensor& x, const at::Tensor& a, const Dropout& d, const at::Tensor& out);
  // out [r, in] = g^T drop(x), for g [T, r].
  void (*gt_x)(const at::Tensor& g, const at::Tensor& x, const Dropout& d, const at::Tensor& out);
  // out [T, in] += scale * (g a) where kept (everywhere when d is inactive).
  void (*add_g_a)(const at::Tensor& g, const at::Tensor& a, float scale, const Dropout& d,
                  const at::Tensor& out);
};

#ifdef PYKERNELS_WITH_CUDA
extern const FusedKernels kCudaFusedKernels;  // lora_cuda.cpp
#endif

struct AdapterGrads {
  at::Tensor dxa;     // dL/dxa = s dy B (+ the incoming gradient of xa)  [T, r]
  at::Tensor grad_A;  // dxa^T drop(x)                                     [r, in]
  at::Tensor grad_B;  // s dy^T xa                                         [out, r]
};

// Checks lora_A [r, in], lora_B [out_features, r], their dtype and device
// against x [..., in], dropout_p in [0, 1) and seed (an int64 scalar on the
// CPU); returns the dropout the kernels take.
Dropout check_adapter(const char* op, const at::Tensor& x, const at::Tensor& lora_A,
                      const at::Tensor& lora_B, int64_t out_features, double dropout_p,
                      const at::Tensor& seed);

// Checks a backward's incoming gradients and saved xa against x [..., in]:
// grad_out [..., out], xa and grad_xa (when given) [..., rank], x's dtype and device.
void check_backward_inputs(const char* op, const at::Tensor& x, const at::Tensor& grad_out,
                           const std::optional<at::Tensor>& grad_xa, const at::Tensor& xa,
                           int64_t out, int64_t rank);

// xa = drop(x2d) A^T, in x's dtype.
at::Tensor adapter_down(const at::Tensor& x2d, const at::Tensor& lora_A, const Dropout& d);

// y2d += scale * xa B^T, in place, rounded once.
void adapter_add_up(const at::Tensor& y2d, const at::Tensor& xa, const at::Tensor& lora_B,
                    double scale);

// grad_xa: the gradient flowing into xa itself (undefined when none).
AdapterGrads adapter_backward(const at::Tensor& dy2d, const at::Tensor& grad_xa,
                              const at::Tensor& x2d, const at::Tensor& xa,
                              const at::Tensor& lora_A, const at::Tensor& lora_B, double scale,
                              const Dropout& d);

// dx2d += (mask / (1 - p)) * (dxa A), in place.
void adapter_add_grad_input(const at::Tensor& dx2d, const at::Tensor& dxa,
                            const at::Tensor& lora_A, const Dropout& d);

// The dropout multiplier as a tensor: d.scale where kept, 0 where dropped,
// [rows, cols] in `options` (built on the CPU). For float64 and reference use.
at::Tensor dropout_multiplier(const Dropout& d, int64_t rows, int64_t cols,
                              const at::TensorOptions& options);

// ---- The ops over a dense base (lora.cpp): one implementation for every device,
// registered for the CPU in lora.cpp and for CUDA in lora_cuda.cpp ----
std::tuple<at::Tensor, at::Tensor> lora_linear(const at::Tensor& x, const at::Tensor& weight,
                                               const std::optional<at::Tensor>& bias,
                                               const at::Tensor& lora_A, const at::Tensor& lora_B,
                                               double scale, double dropout_p,
                                               const at::Tensor& seed);
std::tuple<std::optional<at::Tensor>, at::Tensor, at::Tensor> lora_linear_backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_xa, const at::Tensor& x,
    const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
    const at::Tensor& xa, double scale, double dropout_p, const at::Tensor& seed,
    bool need_grad_x);
void lora_merge_(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                 double scale);

}  // namespace pykernels::binding::lora
