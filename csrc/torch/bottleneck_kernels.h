// The bottleneck adapter ops (bottleneck.cpp) over one device's epilogue
// kernels: the CPU's (bottleneck.cpp) and CUDA's (bottleneck_cuda.cpp) fill
// this table; the products go to at::mm on every device.
#pragma once
#include <ATen/core/Tensor.h>

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

}  // namespace pykernels::binding::bottleneck
