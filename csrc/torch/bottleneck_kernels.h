// The bottleneck adapter pipeline (bottleneck.cpp) over one device's epilogue
// kernels: the CPU's (bottleneck.cpp) and CUDA's (bottleneck_cuda.cpp) fill
// the Kernels table; the products go to at::mm on every device. The pipeline
// runs one adapter over a block of rows: bottleneck_adapter gives it every row,
// multi_bottleneck (multi_bottleneck.cpp) each adapter's group of rows.
#pragma once
#include <ATen/core/Tensor.h>

#include <string>
#include <string_view>

#include "pykernels/bottleneck.h"

namespace pykernels::binding::bottleneck {

// Tensors are 2-D, contiguous, one dtype (fp32, fp16, bf16), on the device.
struct Kernels {
  // z [rows, m] in place: copied to pre_out when defined; z = act(z).
  void (*activate)(Act act, const at::Tensor& z, const at::Tensor& pre_out);
  // out [rows, d] = residual + scale·(up + bias); up may be out itself.
  void (*epilogue)(const at::Tensor& up, const at::Tensor& bias, const at::Tensor& residual,
                   double scale, const at::Tensor& out);
  // g [rows, m] in place: g = scale·g·act'(pre); a_out = act(pre).
  void (*act_backward)(Act act, const at::Tensor& pre, const at::Tensor& g, double scale,
                       const at::Tensor& a_out);
  // out (fp32; float64 for float64 x) [cols] = x [rows, cols] summed over rows.
  void (*column_sum)(const at::Tensor& x, const at::Tensor& out);
  // Bytes of [rows, m] activations per forward tile (0: every row in one tile).
  int64_t tile_bytes;
};

// column_sum with at::sum: where it is fast (CUDA) or no kernel runs.
void aten_column_sum(const at::Tensor& x, const at::Tensor& out);

#ifdef PYKERNELS_WITH_CUDA
extern const Kernels kCudaKernels;
#endif

// The kernels for t's device and dtype (ATen's ops for float64 and devices without kernels).
const Kernels& kernels_for(const at::Tensor& t);

// ---- one adapter over a block of rows ----

// w_down [m, d], b_down [m], w_up [d, m], b_up [d] of h's dtype and device,
// detached (the ops' autograd is their own); the biases contiguous.
struct Adapter {
  at::Tensor w_down, b_down, w_up, b_up;
  Act act;
  double scale;
};

// out [rows, d] = r + s·(act(h·W_downᵀ + b_down)·W_upᵀ + b_up) and, when pre is
// defined, pre [rows, m] = h·W_downᵀ + b_down. h, r, out, pre 2-D, contiguous;
// r may be h; out must not overlap h or r.
void forward_rows(const Kernels& k, const Adapter& a, const at::Tensor& h, const at::Tensor& r,
                  const at::Tensor& out, const at::Tensor& pre);

// The adapter's weight gradients over a block: g = dout [rows, d], h [rows, d],
// pre [rows, m], 2-D and contiguous; grad_h [rows, d] (contiguous, not
// overlapping g), when defined, gets dout's gradient to h (plus g itself with
// add_grad_out: the residual's, when the residual is h). a's biases are not read.
struct Grads {
  at::Tensor w_down, b_down, w_up, b_up;
};
Grads backward_rows(const Kernels& k, const Adapter& a, const at::Tensor& g, const at::Tensor& h,
                    const at::Tensor& pre, const at::Tensor& grad_h, bool add_grad_out);

// ---- argument checks, naming the op and the argument ----

Act parse_act(const char* op, std::string_view name, std::string_view arg = "act");
// h [..., d] (at least min_dims dimensions) in a float dtype the ops take.
void check_h(const char* op, const at::Tensor& h, int64_t min_dims);
void check_like(const char* op, const at::Tensor& h, const at::Tensor& t, std::string_view name);
void check_same_shape(const char* op, const at::Tensor& t, const char* name,
                      at::IntArrayRef expected, const char* what);

// The argument names of one adapter: "w_down", or "w_down[2]" for adapter 2 of a list.
struct AdapterNames {
  std::string w_down, b_down, w_up, b_up;
  static AdapterNames of(int64_t index);  // index < 0: the single adapter's names
};
// w_down [m, d], w_up [d, m] against h [..., d] (checked already); returns m.
int64_t check_weights(const char* op, const at::Tensor& h, const at::Tensor& w_down,
                      const at::Tensor& w_up, const AdapterNames& names);
void check_biases(const char* op, const at::Tensor& h, const at::Tensor& b_down,
                  const at::Tensor& b_up, int64_t m, const AdapterNames& names);

}  // namespace pykernels::binding::bottleneck
