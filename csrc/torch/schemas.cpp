// Every op's schema, in one place. Implementations register per backend in the
// op family's own file (nf4.cpp for CPU, nf4_cuda.cpp for CUDA); fake (meta)
// implementations and autograd live in pykernels/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(pykernels, m) {
  // NF4 (format: csrc/include/pykernels/nf4.h)
  m.def("nf4_quantize(Tensor x, int blocksize) -> (Tensor packed, Tensor absmax)");
  m.def(
      "nf4_dequantize(Tensor packed, Tensor absmax, int blocksize, SymInt[] shape, "
      "ScalarType dtype) -> Tensor");
  m.def("nf4_dequantize_into(Tensor packed, Tensor absmax, int blocksize, Tensor(a!) out) -> ()");
  // 8-bit blockwise, for double quantization of NF4's absmax (pykernels/blockwise8.h)
  m.def("blockwise8_quantize(Tensor x, Tensor code, int blocksize) -> (Tensor q, Tensor absmax)");
  m.def(
      "blockwise8_dequantize(Tensor q, Tensor absmax, Tensor code, Tensor offset, int blocksize) "
      "-> Tensor");

  // ---- NF4 linear (nf4_linear.cpp) ----
  // y = x·Wᵀ (+ bias) and its input gradient dx = grad_out·W, W [out_features,
  // in_features] stored as NF4 and never decoded whole. absmax is fp32, or uint8
  // codes with absmax_scale, absmax_code and absmax_offset (double quantization).
  m.def(
      "nf4_linear(Tensor x, Tensor packed, Tensor absmax, int blocksize, int out_features, "
      "Tensor? bias=None, Tensor? absmax_scale=None, Tensor? absmax_code=None, "
      "Tensor? absmax_offset=None) -> Tensor");
  m.def(
      "nf4_linear_grad_input(Tensor grad_out, Tensor packed, Tensor absmax, int blocksize, "
      "int in_features, Tensor? absmax_scale=None, Tensor? absmax_code=None, "
      "Tensor? absmax_offset=None) -> Tensor");

  // ---- LoRA (lora.cpp; math in csrc/cpu/lora.cpp, dropout hash in pykernels/dropout.h) ----
  // y = x·Wᵀ + b + scale·(drop(x)·Aᵀ)·Bᵀ with lora_A [r, in], lora_B [out, r]; dropout
  // drops x before A only, its mask a hash of (seed, row, column), seed one int64 on
  // the CPU. Also returns xa = drop(x)·Aᵀ [..., r], what the backward needs of the
  // forward. weight and bias are frozen: the backward gives no gradient for them.
  m.def(
      "lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
      "float scale, float dropout_p, Tensor seed) -> (Tensor out, Tensor xa)");
  m.def(
      "lora_linear_backward(Tensor grad_out, Tensor? grad_xa, Tensor x, Tensor weight, "
      "Tensor lora_A, Tensor lora_B, Tensor xa, float scale, float dropout_p, Tensor seed, "
      "bool need_grad_x) -> (Tensor? grad_x, Tensor grad_A, Tensor grad_B)");
  // weight += scale·lora_B·lora_A in place, summed in fp32 and rounded once; scale -s unmerges.
  m.def("lora_merge_(Tensor(a!) weight, Tensor lora_A, Tensor lora_B, float scale) -> ()");
  // The keep mask (bool [rows, cols], on the CPU) lora_linear draws for this seed and p.
  m.def("lora_dropout_mask(Tensor seed, int rows, int cols, float p) -> Tensor");

  // ---- QLoRA (qlora.cpp): LoRA over an NF4 base, the base as in nf4_linear ----
  m.def(
      "qlora_linear(Tensor x, Tensor packed, Tensor absmax, int blocksize, int out_features, "
      "Tensor? bias, Tensor? absmax_scale, Tensor? absmax_code, Tensor? absmax_offset, "
      "Tensor lora_A, Tensor lora_B, float scale, float dropout_p, Tensor seed) "
      "-> (Tensor out, Tensor xa)");
  m.def(
      "qlora_linear_backward(Tensor grad_out, Tensor? grad_xa, Tensor x, Tensor packed, "
      "Tensor absmax, int blocksize, Tensor? absmax_scale, Tensor? absmax_code, "
      "Tensor? absmax_offset, Tensor lora_A, Tensor lora_B, Tensor xa, float scale, "
      "float dropout_p, Tensor seed, bool need_grad_x) "
      "-> (Tensor? grad_x, Tensor grad_A, Tensor grad_B)");
}

// ---- Multi-LoRA (multi_lora.cpp; math in csrc/cpu/multi_lora.cpp) ----
// Many adapters stacked in one layer, each batch row picking one (punica's BGMV /
// SGMV): out = base + scales[id]·(drop(x)·lora_A[id]ᵀ)·lora_B[id]ᵀ per row of x
// [rows, ..., in], ids [rows] int64 in [-1, n) (-1: base only), lora_A [n, r, in],
// lora_B [n, out, r], scales [n] fp32. base: the base layer's output for x. Dropout
// as lora_linear's (mask by token row of x flattened). Also returns xa [..., r]
// (zeros where id = -1). The backward gives the adapters' part of grad_x and
// grad_A / grad_B for every adapter (zeros for those no row picked).
TORCH_LIBRARY_FRAGMENT(pykernels, m) {
  m.def(
      "multi_lora(Tensor x, Tensor base, Tensor lora_A, Tensor lora_B, Tensor scales, "
      "Tensor ids, float dropout_p, Tensor seed) -> (Tensor out, Tensor xa)");
  m.def(
      "multi_lora_backward(Tensor grad_out, Tensor x, Tensor lora_A, Tensor lora_B, "
      "Tensor scales, Tensor ids, Tensor xa, float dropout_p, Tensor seed, bool need_grad_x) "
      "-> (Tensor? grad_x, Tensor grad_A, Tensor grad_B)");
}

// ---- Bottleneck adapters (bottleneck.cpp; kernels csrc/cpu/bottleneck.cpp) ----
// out = residual + scale·(act(h·w_downᵀ + b_down)·w_upᵀ + b_up), w_down [m, d],
// w_up [d, m], act one of 'relu', 'gelu' (exact erf), 'silu', residual h when None.
// With save_pre the pre-activation h·w_downᵀ + b_down [..., m] comes back for the
// backward, else pre is empty. The backward gives dh (when asked; plus grad_out
// itself with add_grad_out, for residual None), dw_down, db_down, dw_up, db_up; a
// separate residual's gradient is grad_out itself.
TORCH_LIBRARY_FRAGMENT(pykernels, m) {
  m.def(
      "bottleneck_adapter(Tensor h, Tensor? residual, Tensor w_down, Tensor b_down, Tensor w_up, "
      "Tensor b_up, str act, float scale, bool save_pre) -> (Tensor out, Tensor pre)");
  m.def(
      "bottleneck_adapter_backward(Tensor grad_out, Tensor h, Tensor pre, Tensor w_down, "
      "Tensor w_up, str act, float scale, bool need_grad_h, bool add_grad_out) -> (Tensor? grad_h, "
      "Tensor grad_w_down, Tensor grad_b_down, Tensor grad_w_up, Tensor grad_b_up)");
}

// ---- Multi bottleneck adapters (multi_bottleneck.cpp, over bottleneck.cpp's pipeline) ----
// Many adapters at one site, each batch row of h [rows, ..., d] picking one by
// ids (int64 [rows] in [-1, n); -1: out = residual): bottleneck_adapter's math
// with adapter ids[i]'s w_down[a] [m_a, d], b_down[a], w_up[a] [d, m_a], b_up[a],
// scales[a] and acts[a]; the adapters may differ in m, act and scale. With
// save_pre, pre [..., max m] holds each row's pre-activation in its first m_a
// columns (zeros elsewhere). The backward gives dh (as bottleneck_adapter's) and
// each adapter's weight and bias gradients, zeros for an adapter no row picked.
TORCH_LIBRARY_FRAGMENT(pykernels, m) {
  m.def(
      "multi_bottleneck(Tensor h, Tensor? residual, Tensor[] w_down, Tensor[] b_down, "
      "Tensor[] w_up, Tensor[] b_up, float[] scales, str[] acts, Tensor ids, bool save_pre) "
      "-> (Tensor out, Tensor pre)");
  m.def(
      "multi_bottleneck_backward(Tensor grad_out, Tensor h, Tensor pre, Tensor[] w_down, "
      "Tensor[] w_up, float[] scales, str[] acts, Tensor ids, bool need_grad_h, "
      "bool add_grad_out) -> (Tensor? grad_h, Tensor[] grad_w_down, Tensor[] grad_b_down, "
      "Tensor[] grad_w_up, Tensor[] grad_b_up)");
}

// ---- IA³ (ia3.cpp) and prompt tuning (prompt.cpp) ----
TORCH_LIBRARY_FRAGMENT(pykernels, m) {
  // out = (v + bias) ⊙ l over v's last dim, l any float dtype used in fp32: IA³'s
  // output scaling as an epilogue on y = x·Wᵀ, or its input scaling of x.
  m.def("ia3_scale(Tensor v, Tensor? bias, Tensor l) -> Tensor");
  // grad_input = grad ⊙ l (when asked), grad_l = Σ_rows grad ⊙ (v + bias) in l's dtype.
  m.def(
      "ia3_scale_backward(Tensor grad, Tensor v, Tensor? bias, Tensor l, bool need_grad_input) "
      "-> (Tensor? grad_input, Tensor grad_l)");
  // (x ⊙ l)·Wᵀ + bias, W [out_features, in] stored as in nf4_linear; l folded into W's tiles.
  m.def(
      "ia3_nf4_linear(Tensor x, Tensor packed, Tensor absmax, int blocksize, int out_features, "
      "Tensor? bias, Tensor? absmax_scale, Tensor? absmax_code, Tensor? absmax_offset, "
      "Tensor l) -> Tensor");
  // out [B, n + S, D]: out[b, :n] = prompt [n, D], out[b, n:] = weight[input_ids[b]];
  // input_ids int64 [B, S], weight [V, D] in prompt's dtype.
  m.def("prompt_embed(Tensor input_ids, Tensor weight, Tensor prompt) -> Tensor");
}
