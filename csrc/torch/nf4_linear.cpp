// The NF4 linear ops for every device (design: nf4_linear.h): the state's
// checks, the choice of path and IA³'s input scale, written once; and the
// CPU's kernel table.
#include "nf4_linear.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>

#include "checks.h"
#include "ia3_kernels.h"
#include "nf4_tiled.h"
#include "pykernels/blockwise8.h"
#include "pykernels/cpu.h"
#include "simd_choice.h"

namespace pykernels::binding {
namespace {

cpu::NF4Matrix cpu_matrix(const NF4View& w) {
  // The offset lives in host memory here: reading it waits for nothing.
  return nf4_matrix<cpu::NF4Matrix>(
      w, w.double_quant() ? *w.absmax_offset.const_data_ptr<float>() : 0.0f);
}

// The fused kernels run up to this many tokens, tiles + at::mm above: where
// the two cross at 4096x4096 on one core of an Intel machine with AMX (ms fused /
// tiled, at the threshold and at the next count measured):
//   bf16 forward  8 (6.7 / 7.9, 10: 8.0 / 7.1)   backward  6 (6.4 / 9.5, 8: 14.4 / 11.1)
//   fp16 forward 16 (12.0 / 12.6, 20: 14.7 / 13.5) backward 6 (9.3 / 10.3, 8: 16.5 / 11.2)
//   fp32 forward 24 (19.7 / 20.6, 32: 23.5 / 21.2) backward 12 (12.5 / 14.3, 16: 18.8 / 15.5)
// The GEMM decides: on a dense W, at::mm does ~830 GFLOP/s a core in bf16 there
// (AMX), ~110 in fp32. Without AMX, where the bf16 forward takes BF16 dot products
// (AMD EPYC, Zen 4: at::mm ~150 GFLOP/s a core in bf16 at these shapes), the
// forward hands over at 16: 12: 3.71 / 4.99, 16: 4.90 / 4.95, 24: 7.32 / 6.11
// (bf16 backward and fp32 forward cross where they do above; fp32's backward
// earlier, 8: 12.5 / 9.5, left at 12 until measured on more machines). The
// backward's fused kernel loads and stores its accumulators per chunk, so it
// hands over earlier than the forward.
int64_t fused_max_tokens(DType dtype, const NF4View& w, bool backward) {
  switch (dtype) {
    case DType::BF16:
      if (backward) return 6;
      return !cpu::cpu_has_amx_bf16() &&
                     cpu::nf4_matvec_bf16_dots(active_cpu_path(), dtype, cpu_matrix(w))
                 ? 16
                 : 8;
    case DType::F16: return backward ? 6 : 16;
    case DType::F32: break;
  }
  return backward ? 12 : 24;
}

// Bytes of W decoded per tile: 8 MiB, 1024 rows of 4096 bf16 (512 fp32). At
// 4096x4096 and 512 bf16 tokens on one core, tiles of 2^18 / 2^20 / 2^22 / 2^23
// elements take 34.0 / 28.0 / 24.8 / 27.5 ms forward and 49.9 / 34.7 / 26.5 /
// 27.7 ms backward (the backward's column tiles decode row by row; wider is
// cheaper), against 20.8 / 21.2 ms for at::mm on a dense W. fp32 slows down
// past 8 MiB (64 tokens, forward: 29.5 ms at 4 MiB, 46.3 ms at 32 MiB). Fewer
// tiles also means fewer thread hand-offs: with 2 threads on a loaded machine
// each tile's parallel regions wait for a scheduler tick (2^18: 1.5 s, 2^22: 61 ms).
constexpr int64_t kTileBytes = int64_t(8) << 20;

// Threads over rows; each decoded row is scaled by in_scale[col_begin:col_end]
// while it is still in cache.
void cpu_decode_tile(DType dtype, const NF4View& w, int64_t row_begin, int64_t row_end,
                     int64_t col_begin, int64_t col_end, const float* in_scale, at::Tensor& tile) {
  const cpu::NF4Matrix m = cpu_matrix(w);
  const cpu::SimdPath path = active_cpu_path();
  const int64_t width = col_end - col_begin;
  char* base = static_cast<char*>(tile.mutable_data_ptr());
  const int64_t row_bytes = width * static_cast<int64_t>(tile.element_size());
  at::parallel_for(row_begin, row_end, std::max<int64_t>(1, 65536 / std::max<int64_t>(width, 1)),
                   [&](int64_t begin, int64_t end) {
                     char* rows = base + (begin - row_begin) * row_bytes;
                     cpu::nf4_dequantize_tile(path, dtype, m, begin, end, col_begin, col_end, rows);
                     if (in_scale)
                       cpu::ia3_scale(path, dtype, rows, nullptr, in_scale + col_begin, width, 0,
                                      end - begin, rows);
                   });
}

// Rows split across threads.
void cpu_matvec(DType dtype, const NF4View& w, const at::Tensor& x2, const at::Tensor& bias,
                at::Tensor& y) {
  const cpu::NF4Matrix m = cpu_matrix(w);
  const int64_t tokens = x2.size(0);
  at::Tensor x_packed =
      at::empty({cpu::nf4_matvec_x_size(tokens, m.cols)}, x2.options().dtype(at::kFloat));
  const cpu::SimdPath path = active_cpu_path();
  cpu::nf4_matvec_pack_x(path, dtype, m, x2.const_data_ptr(), tokens,
                         x_packed.mutable_data_ptr<float>());
  const void* b = bias.defined() ? bias.const_data_ptr() : nullptr;
  at::parallel_for(0, m.rows, std::max<int64_t>(1, 65536 / std::max<int64_t>(m.cols, 1)),
                   [&](int64_t begin, int64_t end) {
                     cpu::nf4_matvec(path, dtype, m, x_packed.const_data_ptr<float>(), tokens,
                                     begin, end, b, y.mutable_data_ptr());
                   });
}

// Columns split across threads, 32 at a time.
void cpu_matvec_t(DType dtype, const NF4View& w, const at::Tensor& dy2, at::Tensor& dx) {
  const cpu::NF4Matrix m = cpu_matrix(w);
  const int64_t tokens = dy2.size(0);
  const at::Tensor dy_t = dy2.to(at::kFloat).t().contiguous();
  const cpu::SimdPath path = active_cpu_path();
  at::parallel_for(0, ceil_div(m.cols, 32), 1, [&](int64_t begin, int64_t end) {
    cpu::nf4_matvec_t(path, dtype, m, dy_t.const_data_ptr<float>(), tokens, begin * 32,
                      std::min(end * 32, m.cols), dx.mutable_data_ptr());
  });
}

constexpr NF4Kernels kCpuNF4Kernels{fused_max_tokens, kTileBytes, cpu_matvec, cpu_matvec_t,
                                    cpu_decode_tile};

const NF4Kernels& kernels_for(const char* op, const at::Tensor& t) {
#ifdef PYKERNELS_WITH_CUDA
  if (t.is_cuda()) return kCudaNF4Kernels;
#endif
  TORCH_CHECK_VALUE(t.is_cpu(), op, ": tensors on ", t.device(), " are not supported");
  return kCpuNF4Kernels;
}

void check_features(const char* op, const char* arg, const at::Tensor& t, int64_t features,
                    const char* name) {
  TORCH_CHECK_VALUE(t.dim() >= 1 && t.size(-1) == features, op, ": ", arg, " must have ", name,
                    " = ", features, " elements in its last dimension, got shape ", t.sizes());
}

}  // namespace

NF4View nf4_view(const char* op, const at::Tensor& packed, const at::Tensor& absmax,
                 int64_t blocksize, int64_t out_features, int64_t in_features,
                 const std::optional<at::Tensor>& absmax_scale,
                 const std::optional<at::Tensor>& absmax_code,
                 const std::optional<at::Tensor>& absmax_offset) {
  check_nf4_blocksize(op, blocksize);
  TORCH_CHECK_VALUE(out_features >= 0 && in_features >= 0, op,
                    ": out_features and in_features must be >= 0, got ", out_features, " and ",
                    in_features);
  const int given = absmax_scale.has_value() + absmax_code.has_value() + absmax_offset.has_value();
  TORCH_CHECK_VALUE(given == 0 || given == 3, op,
                    ": absmax_scale, absmax_code and absmax_offset describe a double-quantized "
                    "absmax and come together; got absmax_scale ",
                    absmax_scale ? "yes" : "no", ", absmax_code ", absmax_code ? "yes" : "no",
                    ", absmax_offset ", absmax_offset ? "yes" : "no");
  const int64_t n = out_features * in_features;
  const int64_t blocks = nf4_num_blocks(n, blocksize);
  check_dtype(op, "packed", packed, at::kByte);
  check_numel(op, "packed", packed, nf4_packed_bytes(n), "two 4-bit codes per byte of the weight");
  check_same_device(op, packed, "packed", absmax, "absmax");
  NF4View v;
  v.packed = packed.contiguous();
  v.absmax = absmax.contiguous();
  v.blocksize = blocksize;
  v.out_features = out_features;
  v.in_features = in_features;
  if (given == 0) {
    TORCH_CHECK_TYPE(absmax.scalar_type() == at::kFloat, op,
                     ": absmax must be float32 (one per block), got ", absmax.scalar_type(),
                     "; a double-quantized absmax (uint8) needs absmax_scale, absmax_code and "
                     "absmax_offset");
    check_numel(op, "absmax", absmax, blocks, "one per block");
    return v;
  }
  TORCH_CHECK_TYPE(absmax.scalar_type() == at::kByte, op,
                   ": absmax must be uint8 (8-bit codes) when double-quantized, got ",
                   absmax.scalar_type());
  check_numel(op, "absmax", absmax, blocks, "one code per block");
  check_dtype(op, "absmax_scale", *absmax_scale, at::kFloat);
  check_numel(op, "absmax_scale", *absmax_scale, ceil_div(blocks, kDoubleQuantBlocksize),
              "one per 256 blocks");
  check_dtype(op, "absmax_code", *absmax_code, at::kFloat);
  check_numel(op, "absmax_code", *absmax_code, 256, "an 8-bit code table");
  check_dtype(op, "absmax_offset", *absmax_offset, at::kFloat);
  check_numel(op, "absmax_offset", *absmax_offset, 1, "one scalar");
  check_same_device(op, packed, "packed", *absmax_scale, "absmax_scale");
  check_same_device(op, packed, "packed", *absmax_code, "absmax_code");
  v.absmax_scale = absmax_scale->contiguous();
  v.absmax_code = absmax_code->contiguous();
  // Any device, as NF4Tensor.absmax_offset may be: one float copied over
  // when it is not on packed's (torch.tensor(...) of a bnb state is on the CPU).
  v.absmax_offset = absmax_offset->to(packed.device());
  return v;
}

at::Tensor nf4_linear_forward(const char* op, const at::Tensor& x, const NF4View& w,
                              const std::optional<at::Tensor>& bias, const at::Tensor& in_scale) {
  const DType dtype = float_dtype(op, "x", x.scalar_type());
  check_features(op, "x", x, w.in_features, "in_features");
  check_same_device(op, x, "x", w.packed, "packed");
  at::Tensor b;
  if (bias) {
    check_bias(op, x, *bias, w.out_features);
    b = bias->contiguous();
  }
  const NF4Kernels& k = kernels_for(op, x);
  const int64_t tokens = leading_rows(x);
  at::Tensor x2 = x.reshape({tokens, w.in_features}).contiguous();
  at::Tensor y = at::empty({tokens, w.out_features}, x.options());
  if (tokens == 0 || w.out_features == 0) return y.view(with_last_dim(x, w.out_features));
  if (tokens <= k.fused_max_tokens(dtype, w, false)) {
    if (in_scale.defined()) x2 = ia3::ia3_scale(x2, std::nullopt, in_scale);
    k.matvec(dtype, w, x2, b, y);
  } else {
    const float* scale = in_scale.defined() ? in_scale.const_data_ptr<float>() : nullptr;
    auto decode = [&](int64_t r0, int64_t r1, int64_t c0, int64_t c1, at::Tensor& tile) {
      k.decode_tile(dtype, w, r0, r1, c0, c1, scale, tile);
    };
    nf4_forward_tiled(decode, w.out_features, w.in_features, k.tile_bytes, x2, b, y);
  }
  return y.view(with_last_dim(x, w.out_features));
}

at::Tensor nf4_linear_backward_input(const char* op, const at::Tensor& dy, const NF4View& w) {
  const DType dtype = float_dtype(op, "grad_out", dy.scalar_type());
  check_features(op, "grad_out", dy, w.out_features, "out_features");
  check_same_device(op, dy, "grad_out", w.packed, "packed");
  const NF4Kernels& k = kernels_for(op, dy);
  const int64_t tokens = leading_rows(dy);
  const at::Tensor dy2 = dy.reshape({tokens, w.out_features}).contiguous();
  at::Tensor dx = at::empty({tokens, w.in_features}, dy.options());
  if (tokens == 0 || w.in_features == 0) return dx.view(with_last_dim(dy, w.in_features));
  if (tokens <= k.fused_max_tokens(dtype, w, true)) {
    k.matvec_t(dtype, w, dy2, dx);
  } else {
    auto decode = [&](int64_t r0, int64_t r1, int64_t c0, int64_t c1, at::Tensor& tile) {
      k.decode_tile(dtype, w, r0, r1, c0, c1, nullptr, tile);
    };
    nf4_backward_tiled(decode, w.out_features, w.in_features, k.tile_bytes, dy2, dx);
  }
  return dx.view(with_last_dim(dy, w.in_features));
}

at::Tensor nf4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                      int64_t blocksize, int64_t out_features,
                      const std::optional<at::Tensor>& bias,
                      const std::optional<at::Tensor>& absmax_scale,
                      const std::optional<at::Tensor>& absmax_code,
                      const std::optional<at::Tensor>& absmax_offset) {
  constexpr const char* op = "nf4_linear";
  float_dtype(op, "x", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least one dimension (in_features)");
  check_weight_fits(op, "x", x, packed, out_features, x.size(-1));
  const NF4View w = nf4_view(op, packed, absmax, blocksize, out_features, x.size(-1), absmax_scale,
                             absmax_code, absmax_offset);
  return nf4_linear_forward(op, x, w, bias);
}

at::Tensor nf4_linear_grad_input(const at::Tensor& grad_out, const at::Tensor& packed,
                                 const at::Tensor& absmax, int64_t blocksize, int64_t in_features,
                                 const std::optional<at::Tensor>& absmax_scale,
                                 const std::optional<at::Tensor>& absmax_code,
                                 const std::optional<at::Tensor>& absmax_offset) {
  constexpr const char* op = "nf4_linear_grad_input";
  float_dtype(op, "grad_out", grad_out.scalar_type());
  TORCH_CHECK_VALUE(grad_out.dim() >= 1, op,
                    ": grad_out must have at least one dimension (out_features)");
  check_weight_fits(op, "grad_out", grad_out, packed, grad_out.size(-1), in_features);
  const NF4View w = nf4_view(op, packed, absmax, blocksize, grad_out.size(-1), in_features,
                             absmax_scale, absmax_code, absmax_offset);
  return nf4_linear_backward_input(op, grad_out, w);
}

TORCH_LIBRARY_IMPL(pykernels, CPU, m) {
  m.impl("nf4_linear", &nf4_linear);
  m.impl("nf4_linear_grad_input", &nf4_linear_grad_input);
}

}  // namespace pykernels::binding
