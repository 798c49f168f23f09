// The NF4 linear layer, torch side, for every device: y = x·Wᵀ (+ bias) and
// dx = dy·W for a weight W [out_features, in_features] stored as NF4, never
// decoded whole.
//
//   few tokens   a device's fused kernels read the packed codes (CPU:
//                csrc/cpu/nf4_matmul*.cpp, rows or columns split across threads;
//                CUDA: csrc/cuda/nf4_matmul.cu);
//   many tokens  W is decoded one tile at a time into a reused buffer in x's
//                dtype and each tile goes to at::mm (nf4_tiled.h): oneDNN / MKL
//                on the CPU, cuBLAS on CUDA. Extra memory: one tile.
//
// The logic (checks, shapes, which path, IA³'s input scale) is written once, in
// nf4_linear.cpp; a device brings its kernels as an NF4Kernels table (the CPU's
// in nf4_linear.cpp, CUDA's in nf4_linear_cuda.cpp), with the token count where
// the paths hand over and the tile size measured there. Other bindings that run
// an NF4 base layer (QLoRA, IA³) call these functions directly.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

#include "pykernels/common.h"

namespace pykernels::binding {

// A checked NF4 weight [out_features, in_features], its tensors held contiguous
// on one device.
struct NF4View {
  at::Tensor packed;         // uint8 [ceil(out * in / 2)]
  at::Tensor absmax;         // fp32 [blocks], or uint8 codes when double-quantized
  at::Tensor absmax_scale;   // double quant: fp32 [ceil(blocks / 256)], else undefined
  at::Tensor absmax_code;    // double quant: fp32 [256], else undefined
  at::Tensor absmax_offset;  // double quant: fp32 [1] on packed's device, else undefined
  int64_t blocksize = 0;
  int64_t out_features = 0;
  int64_t in_features = 0;

  bool double_quant() const { return absmax_scale.defined(); }
};

// W as a device's kernels take it (cpu::NF4Matrix, cuda::NF4Matrix): pointers
// into w, valid while w lives, and the double-quant offset in the form M holds
// it (a float on the CPU, a device pointer on CUDA).
template <class M>
M nf4_matrix(const NF4View& w, decltype(M::absmax_offset) offset) {
  M m;
  m.packed = w.packed.const_data_ptr<uint8_t>();
  if (w.double_quant()) {
    m.absmax_q = w.absmax.const_data_ptr<uint8_t>();
    m.absmax_scale = w.absmax_scale.const_data_ptr<float>();
    m.absmax_code = w.absmax_code.const_data_ptr<float>();
    m.absmax_offset = offset;
  } else {
    m.absmax = w.absmax.const_data_ptr<float>();
  }
  m.rows = w.out_features;
  m.cols = w.in_features;
  m.blocksize = w.blocksize;
  return m;
}

// One device's NF4 kernels. Tensors are contiguous, on the device, in one float
// dtype (fp32, fp16 or bf16); outputs are allocated by the caller, and nothing
// is called with zero tokens or an empty W.
struct NF4Kernels {
  // The largest token count the fused kernels take (forward or backward) on w.
  int64_t (*fused_max_tokens)(DType dtype, const NF4View& w, bool backward);
  int64_t tile_bytes;  // bytes of W decoded per tile on the many-token path
  // y [T, out] = x2 [T, in]·Wᵀ (+ bias [out] when defined), fused.
  void (*matvec)(DType dtype, const NF4View& w, const at::Tensor& x2, const at::Tensor& bias,
                 at::Tensor& y);
  // dx [T, in] = dy2 [T, out]·W, fused.
  void (*matvec_t)(DType dtype, const NF4View& w, const at::Tensor& dy2, at::Tensor& dx);
  // W[row_begin:row_end, col_begin:col_end] into the start of tile, row-major in
  // tile's dtype; with in_scale (fp32 [in_features], else null) each decoded
  // value, rounded to the dtype, is multiplied by in_scale[column] and rounded
  // again: the tile of W·diag(in_scale), the bits ia3_scale gives on it.
  void (*decode_tile)(DType dtype, const NF4View& w, int64_t row_begin, int64_t row_end,
                      int64_t col_begin, int64_t col_end, const float* in_scale,
                      at::Tensor& tile);
};

#ifdef PYKERNELS_WITH_CUDA
extern const NF4Kernels kCudaNF4Kernels;  // nf4_linear_cuda.cpp
#endif

// Checks the NF4 state (errors name `op` and the argument) and returns its view.
// absmax_scale, absmax_code and absmax_offset come all together (double
// quantization, absmax then holds uint8 codes) or not at all. The offset is
// kept as a tensor on packed's device: the kernels read it there, so no call
// waits for the device to hand it to the host.
NF4View nf4_view(const char* op, const at::Tensor& packed, const at::Tensor& absmax,
                 int64_t blocksize, int64_t out_features, int64_t in_features,
                 const std::optional<at::Tensor>& absmax_scale,
                 const std::optional<at::Tensor>& absmax_code,
                 const std::optional<at::Tensor>& absmax_offset);

// y = x·Wᵀ (+ bias): x [..., in_features] fp32/fp16/bf16, bias [out_features]
// in x's dtype -> [..., out_features] in x's dtype. in_scale (fp32 [in_features],
// IA³'s input scaling, undefined when none) makes it (x ⊙ in_scale)·Wᵀ (+ bias):
// x is scaled on the fused path (a few rows cost less than touching W again),
// the decoded tiles of W on the tiled one (while they are in cache).
at::Tensor nf4_linear_forward(const char* op, const at::Tensor& x, const NF4View& w,
                              const std::optional<at::Tensor>& bias,
                              const at::Tensor& in_scale = at::Tensor());

// dx = dy·W: dy [..., out_features] -> [..., in_features] in dy's dtype.
at::Tensor nf4_linear_backward_input(const char* op, const at::Tensor& dy, const NF4View& w);

// ---- The ops (nf4_linear.cpp), registered for the CPU there and for CUDA in
// nf4_linear_cuda.cpp ----
at::Tensor nf4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                      int64_t blocksize, int64_t out_features,
                      const std::optional<at::Tensor>& bias,
                      const std::optional<at::Tensor>& absmax_scale,
                      const std::optional<at::Tensor>& absmax_code,
                      const std::optional<at::Tensor>& absmax_offset);
at::Tensor nf4_linear_grad_input(const at::Tensor& grad_out, const at::Tensor& packed,
                                 const at::Tensor& absmax, int64_t blocksize, int64_t in_features,
                                 const std::optional<at::Tensor>& absmax_scale,
                                 const std::optional<at::Tensor>& absmax_code,
                                 const std::optional<at::Tensor>& absmax_offset);

}  // namespace pykernels::binding
