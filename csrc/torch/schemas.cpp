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
