// The NF4 linear ops on CUDA (design: nf4_linear.h): up to kNF4MatvecMaxTokens
// tokens run the fused kernels straight from the packed codes (pykernels/cuda.h),
// more decode W one tile at a time into cuBLAS GEMMs (nf4_tiled.h). The state is
// checked by nf4_view, as on the CPU, so both give the same errors; launches go
// to the current stream of x's device.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "nf4_linear.h"
#include "nf4_tiled.h"
#include "pykernels/cuda.h"

namespace pykernels::binding {
namespace {

// Bytes of W decoded per tile on the many-token path: a 4096 x 4096 bf16 W in
// one tile, 4096 x 11008 in three. Not yet measured on a GPU (bench_lora_cuda.py
// times the paths either side of kNF4MatvecMaxTokens); the GPU has the memory.
constexpr int64_t kTileBytes = int64_t(32) << 20;

// ---- the kernels' view of W ----

// W for the kernels. `offset` keeps the double-quant offset on W's device.
struct DeviceWeight {
  cuda::NF4Matrix matrix;
  at::Tensor offset;
};

DeviceWeight device_weight(const NF4View& w, const std::optional<at::Tensor>& absmax_offset) {
  DeviceWeight d;
  cuda::NF4Matrix& m = d.matrix;
  m.packed = w.packed.const_data_ptr<uint8_t>();
  if (w.double_quant()) {
    d.offset = absmax_offset->to(w.packed.device());
    m.absmax_q = w.absmax.const_data_ptr<uint8_t>();
    m.absmax_scale = w.absmax_scale.const_data_ptr<float>();
    m.absmax_code = w.absmax_code.const_data_ptr<float>();
    m.absmax_offset = d.offset.const_data_ptr<float>();
  } else {
    m.absmax = w.absmax.const_data_ptr<float>();
  }
  m.rows = w.out_features;
  m.cols = w.in_features;
  m.blocksize = w.blocksize;
  return d;
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// The tiled path's decoder: W's rectangle into the start of tile.
auto tile_decoder(DType dtype, const cuda::NF4Matrix& m) {
  return [dtype, &m](int64_t row_begin, int64_t row_end, int64_t col_begin, int64_t col_end,
                     at::Tensor& tile) {
    C10_CUDA_CHECK(cuda::nf4_dequantize_tile(dtype, m, row_begin, row_end, col_begin, col_end,
                                             tile.mutable_data_ptr(), current_stream()));
  };
}

// ---- the ops ----

at::Tensor nf4_linear_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                           int64_t blocksize, int64_t out_features,
                           const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& absmax_scale,
                           const std::optional<at::Tensor>& absmax_code,
                           const std::optional<at::Tensor>& absmax_offset) {
  constexpr const char* op = "nf4_linear";
  const DType dtype = float_dtype(op, "x", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least one dimension (in_features)");
  check_weight_fits(op, "x", x, packed, out_features, x.size(-1));
  const NF4View w = nf4_view(op, packed, absmax, blocksize, out_features, x.size(-1), absmax_scale,
                             absmax_code, absmax_offset);
  check_same_device(op, x, "x", packed, "packed");
  at::Tensor b;
  if (bias) {
    check_bias(op, x, *bias, out_features);
    b = bias->contiguous();
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t tokens = leading_rows(x);
  const at::Tensor x2 = x.reshape({tokens, w.in_features}).contiguous();
  at::Tensor y = at::empty({tokens, out_features}, x.options());
  if (tokens > 0 && out_features > 0) {
    const DeviceWeight d = device_weight(w, absmax_offset);
    if (tokens <= cuda::kNF4MatvecMaxTokens) {
      C10_CUDA_CHECK(cuda::nf4_matvec(dtype, d.matrix, x2.const_data_ptr(), tokens,
                                      b.defined() ? b.const_data_ptr() : nullptr,
                                      y.mutable_data_ptr(), current_stream()));
    } else {
      nf4_forward_tiled(tile_decoder(dtype, d.matrix), out_features, w.in_features, kTileBytes,
                        x2, b, y);
    }
  }
  return y.view(with_last_dim(x, out_features));
}

at::Tensor nf4_linear_grad_input_cuda(const at::Tensor& grad_out, const at::Tensor& packed,
                                      const at::Tensor& absmax, int64_t blocksize,
                                      int64_t in_features,
                                      const std::optional<at::Tensor>& absmax_scale,
                                      const std::optional<at::Tensor>& absmax_code,
                                      const std::optional<at::Tensor>& absmax_offset) {
  constexpr const char* op = "nf4_linear_grad_input";
  const DType dtype = float_dtype(op, "grad_out", grad_out.scalar_type());
  TORCH_CHECK_VALUE(grad_out.dim() >= 1, op,
                    ": grad_out must have at least one dimension (out_features)");
  const int64_t out_features = grad_out.size(-1);
  check_weight_fits(op, "grad_out", grad_out, packed, out_features, in_features);
  const NF4View w = nf4_view(op, packed, absmax, blocksize, out_features, in_features,
                             absmax_scale, absmax_code, absmax_offset);
  check_same_device(op, grad_out, "grad_out", packed, "packed");
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const int64_t tokens = leading_rows(grad_out);
  const at::Tensor dy2 = grad_out.reshape({tokens, out_features}).contiguous();
  at::Tensor dx = at::empty({tokens, in_features}, grad_out.options());
  if (tokens > 0 && in_features > 0) {
    const DeviceWeight d = device_weight(w, absmax_offset);
    if (tokens <= cuda::kNF4MatvecMaxTokens) {
      at::Tensor workspace = at::empty({cuda::nf4_matvec_t_workspace(d.matrix, tokens)},
                                       grad_out.options().dtype(at::kFloat));
      C10_CUDA_CHECK(cuda::nf4_matvec_t(dtype, d.matrix, dy2.const_data_ptr(), tokens,
                                        workspace.mutable_data_ptr<float>(),
                                        dx.mutable_data_ptr(), current_stream()));
    } else {
      nf4_backward_tiled(tile_decoder(dtype, d.matrix), out_features, in_features, kTileBytes,
                         dy2, dx);
    }
  }
  return dx.view(with_last_dim(grad_out, in_features));
}

}  // namespace

TORCH_LIBRARY_IMPL(pykernels, CUDA, m) {
  m.impl("nf4_linear", &nf4_linear_cuda);
  m.impl("nf4_linear_grad_input", &nf4_linear_grad_input_cuda);
}

}  // namespace pykernels::binding
