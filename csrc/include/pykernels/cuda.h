// Torch-free CUDA launchers. Each takes device pointers, int64_t sizes and the
// stream to launch on (never the legacy default stream: pass the caller's
// current stream), queues its kernels and returns the launch error, if any.
// They do not synchronize. Formats: pykernels/nf4.h, pykernels/blockwise8.h;
// the bytes written equal the CPU kernels' (pykernels/cpu.h) exactly, except
// where a comment below says which sums run in another order.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "pykernels/bottleneck.h"
#include "pykernels/common.h"
#include "pykernels/dropout.h"

namespace pykernels::cuda {

// ---- NF4 ----
// Quantizes the n-element tensor x (dtype) into nf4_packed_bytes(n) bytes of
// packed codes (4-byte aligned) and nf4_num_blocks(n, blocksize) absmax values.
// *first_bad (one device int64) is set to the first block that holds a NaN or an
// Inf, or to -1; the outputs are unspecified when it is not -1.
cudaError_t nf4_quantize(DType dtype, const void* x, int64_t n, int64_t blocksize,
                         uint8_t* packed, float* absmax, int64_t* first_bad, cudaStream_t stream);

// Decodes n elements into out (dtype). Any alignment works; 16-byte aligned out
// and 8-byte aligned packed take the vectorized path.
cudaError_t nf4_dequantize(DType dtype, const uint8_t* packed, const float* absmax, int64_t n,
                           int64_t blocksize, void* out, cudaStream_t stream);

// ---- 8-bit blockwise, the double-quantization format ----
// lut: kBlockwise8LutSize device bytes built from the 256-entry code table.
cudaError_t blockwise8_build_lut(const float* code, uint8_t* lut, cudaStream_t stream);
cudaError_t blockwise8_quantize(const float* x, int64_t n, int64_t blocksize, const uint8_t* lut,
                                uint8_t* q, float* absmax, cudaStream_t stream);
// offset: one device float, added to every decoded value.
cudaError_t blockwise8_dequantize(const uint8_t* q, const float* absmax, const float* code,
                                  const float* offset, int64_t n, int64_t blocksize, float* out,
                                  cudaStream_t stream);

// ---- NF4 linear: y = x·Wᵀ and dx = dy·W, W [rows, cols] stored as NF4 ----
// W as cpu::NF4Matrix describes it (pykernels/cpu.h), every pointer on the
// device, the double-quant offset included: the kernels read it there, so no
// launch waits for the host to learn it.
struct NF4Matrix {
  const uint8_t* packed = nullptr;
  const float* absmax = nullptr;        // fp32 absmax, or
  const uint8_t* absmax_q = nullptr;    // double quant: 8-bit codes of absmax - offset,
  const float* absmax_scale = nullptr;  //   one scale per 256 blocks,
  const float* absmax_code = nullptr;   //   the 256-entry code table,
  const float* absmax_offset = nullptr;  //  and the offset (one float)
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t blocksize = 64;
};

// The fused kernels take up to this many tokens (their sums live in registers).
constexpr int64_t kNF4MatvecMaxTokens = 16;

// y [tokens, rows] = x [tokens, cols]·Wᵀ (+ bias [rows], nullable), x, bias and y
// in dtype, summed in fp32 straight from the packed codes.
cudaError_t nf4_matvec(DType dtype, const NF4Matrix& w, const void* x, int64_t tokens,
                       const void* bias, void* y, cudaStream_t stream);

// dx [tokens, cols] = dy [tokens, rows]·W. Split over slabs of W's rows: each
// slab's fp32 sums go to `workspace` (nf4_matvec_t_workspace floats), then the
// slabs are added in order, so the result is deterministic.
int64_t nf4_matvec_t_workspace(const NF4Matrix& w, int64_t tokens);
cudaError_t nf4_matvec_t(DType dtype, const NF4Matrix& w, const void* dy, int64_t tokens,
                         float* workspace, void* dx, cudaStream_t stream);

// W[row_begin:row_end, col_begin:col_end] decoded into out (row-major, dtype):
// the values nf4_dequantize gives, the tile a GEMM multiplies. col_scale (fp32
// [w.cols], nullable; IA³'s input scaling): each value, rounded to dtype, times
// col_scale[column], rounded again: ia3_scale's bits on the decoded tile.
cudaError_t nf4_dequantize_tile(DType dtype, const NF4Matrix& w, int64_t row_begin,
                                int64_t row_end, int64_t col_begin, int64_t col_end,
                                const float* col_scale, void* out, cudaStream_t stream);

// ---- LoRA: the products that touch drop(x) (math: csrc/cpu/lora.cpp) ----
// Row-major contiguous buffers: x [rows, cols], a (lora_A) [rank, cols] and out
// in dtype, g [rows, rank] in fp32. drop(x)[t, i] = x[t, i] * d.scale where
// dropout_keep(d, t, i) (pykernels/dropout.h: the CPU's mask), else 0.

// out [rows, rank] = drop(x)·aᵀ: cpu::lora_x_at's bits (the same 16 partial sums
// per output, each in column order, added in the same order).
cudaError_t lora_x_at(DType dtype, const void* x, const void* a, int64_t rows, int64_t cols,
                      int64_t rank, const Dropout& d, void* out, cudaStream_t stream);

// out [rank, cols] = gᵀ·drop(x). Split over slabs of rows as nf4_matvec_t
// (workspace: lora_gt_x_workspace floats): deterministic, but not the CPU's order.
int64_t lora_gt_x_workspace(int64_t rows, int64_t cols, int64_t rank);
cudaError_t lora_gt_x(DType dtype, const float* g, const void* x, int64_t rows, int64_t cols,
                      int64_t rank, const Dropout& d, float* workspace, void* out,
                      cudaStream_t stream);

// out [rows, cols] += scale * (g·a) where dropout_keep(d, t, i) (everywhere when d
// is inactive): cpu::lora_add_g_a's bits. dx += drop'(dxa·A) with scale = d.scale;
// the merge W += s·B·A with d inactive and scale = s.
cudaError_t lora_add_g_a(DType dtype, const float* g, const void* a, int64_t rows, int64_t cols,
                         int64_t rank, float scale, const Dropout& d, void* out,
                         cudaStream_t stream);

// ---- Multi-LoRA (math: csrc/cpu/multi_lora.cpp): a_all [n, rank, cols] in dtype,
// token_adapter [rows] int64 (each token row's adapter, -1: none), device memory ----
// out [rows, rank] = drop(x)·a_all[a]ᵀ row by row (rows of adapter -1 untouched).
cudaError_t multi_lora_x_at(DType dtype, const void* x, const void* a_all,
                            const int64_t* token_adapter, int64_t rows, int64_t cols,
                            int64_t rank, const Dropout& d, void* out, cudaStream_t stream);

// out [rows, cols] += scale * scales[a] * (g·a_all[a]) where kept (scales null: scale alone).
cudaError_t multi_lora_add_g_a(DType dtype, const float* g, const void* a_all,
                               const int64_t* token_adapter, int64_t rows, int64_t cols,
                               int64_t rank, const float* scales, float scale, const Dropout& d,
                               void* out, cudaStream_t stream);

// out_all[a] [rank, cols] = sum over adapter a's rows (order[offsets[a] .. offsets[a + 1]))
// of g[t]ᵀ·drop(x)[t], for every adapter (zeros for one without rows).
cudaError_t multi_lora_gt_x(DType dtype, const float* g, const void* x, const int64_t* order,
                            const int64_t* offsets, int64_t n_adapters, int64_t cols, int64_t rank,
                            const Dropout& d, void* out_all, cudaStream_t stream);

// ---- Bottleneck adapter epilogues (math: csrc/cpu/bottleneck.cpp) ----
// cpu::bottleneck_* on the device, every buffer row-major contiguous in dtype.
// z [rows, m] in place: copied to pre_out when not null, then z = act(z).
cudaError_t bottleneck_activate(DType dtype, Act act, void* z, int64_t rows, int64_t m,
                                void* pre_out, cudaStream_t stream);
// out [rows, d] = residual + scale·(up + bias); up may be out.
cudaError_t bottleneck_epilogue(DType dtype, const void* up, const void* bias,
                                const void* residual, int64_t rows, int64_t d, float scale,
                                void* out, cudaStream_t stream);
// g [rows, m] in place: g = scale·g·act'(pre); a_out = act(pre).
cudaError_t bottleneck_act_backward(DType dtype, Act act, const void* pre, void* g, int64_t rows,
                                    int64_t m, float scale, void* a_out, cudaStream_t stream);

// ---- IA³ (math: csrc/cpu/ia3.cpp, the same bits for ia3_scale) ----
cudaError_t ia3_scale(DType dtype, const void* v, const float* bias, const float* l,
                      int64_t rows, int64_t cols, void* out, cudaStream_t stream);
// dl sums rows in another order than the CPU (per-CTA partials of 32-row tiles, then a
// second pass); dv has the CPU's bits. workspace: ia3_scale_backward_workspace floats.
int64_t ia3_scale_backward_workspace(int64_t rows, int64_t cols);
cudaError_t ia3_scale_backward(DType dtype, const void* g, const void* v, const float* bias,
                               const float* l, int64_t rows, int64_t cols, void* dv, float* dl,
                               float* workspace, cudaStream_t stream);

// ---- prompt tuning (math: csrc/cpu/prompt.cpp, the same bytes) ----
// *first_bad (one device int64, set to a value >= batch * seq by the caller) ends
// as the smallest flat index of an id outside [0, vocab), if any; its row is unspecified.
cudaError_t prompt_embed(int64_t elem_bytes, const int64_t* ids, int64_t batch, int64_t seq,
                         const void* weight, int64_t vocab, int64_t dim, const void* prompt,
                         int64_t n, void* out, int64_t* first_bad, cudaStream_t stream);

}  // namespace pykernels::cuda
