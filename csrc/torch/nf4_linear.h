// The NF4 linear layer, torch side (CPU): y = x·Wᵀ (+ bias) and dx = dy·W for a
// weight W [out_features, in_features] stored as NF4, never decoded whole.
//
//   few tokens   the fused kernels (csrc/cpu/nf4_matmul*.cpp) read the packed
//                codes: rows split across threads (forward), columns (backward);
//   many tokens  W is decoded one tile at a time into a reused buffer in x's
//                dtype and each tile goes to at::mm: row tiles for the forward
//                (y[:, rows] = x·tileᵀ), column tiles for the backward
//                (dx[:, cols] = dy·tile). Every output element comes from one
//                GEMM over the full inner dimension, so nothing accumulates in
//                low precision across tiles. Extra memory: one tile.
//
// The token count where one path hands over to the other and the tile size are
// measured: nf4_linear.cpp. Other bindings that run an NF4 base layer (QLoRA)
// call these functions directly.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

#include "pykernels/cpu.h"

namespace pykernels::binding {

// A checked NF4 weight [out_features, in_features], its tensors held contiguous.
struct NF4View {
  at::Tensor packed;        // uint8 [ceil(out * in / 2)]
  at::Tensor absmax;        // fp32 [blocks], or uint8 codes when double-quantized
  at::Tensor absmax_scale;  // double quant: fp32 [ceil(blocks / 256)], else undefined
  at::Tensor absmax_code;   // double quant: fp32 [256], else undefined
  float absmax_offset = 0.0f;
  int64_t blocksize = 0;
  int64_t out_features = 0;
  int64_t in_features = 0;

  bool double_quant() const { return absmax_scale.defined(); }
  cpu::NF4Matrix matrix() const;  // the kernels' view; valid while this lives
};

// Checks the NF4 state (errors name `op` and the argument) and returns its view.
// absmax_scale, absmax_code and absmax_offset come all together (double
// quantization, absmax then holds uint8 codes) or not at all.
NF4View nf4_view(const char* op, const at::Tensor& packed, const at::Tensor& absmax,
                 int64_t blocksize, int64_t out_features, int64_t in_features,
                 const std::optional<at::Tensor>& absmax_scale,
                 const std::optional<at::Tensor>& absmax_code,
                 const std::optional<at::Tensor>& absmax_offset);

// y = x·Wᵀ (+ bias): x [..., in_features] fp32/fp16/bf16, bias [out_features]
// in x's dtype -> [..., out_features] in x's dtype. in_scale (fp32 [in_features],
// IA³'s input scaling, undefined when none) makes it (x ⊙ in_scale)·Wᵀ (+ bias),
// folded into the decoded tiles of W.
at::Tensor nf4_linear_forward(const char* op, const at::Tensor& x, const NF4View& w,
                              const std::optional<at::Tensor>& bias,
                              const at::Tensor& in_scale = at::Tensor());

// dx = dy·W: dy [..., out_features] -> [..., in_features] in dy's dtype.
at::Tensor nf4_linear_backward_input(const char* op, const at::Tensor& dy, const NF4View& w);

}  // namespace pykernels::binding
