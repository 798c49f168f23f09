// Torch-free CPU kernels. Each works on a [block_begin, block_end) range of
// blocks and owns no threads: the caller (csrc/torch or a native test) splits
// the range across its own workers.
#pragma once
#include <cstdint>

#include "pykernels/bottleneck.h"
#include "pykernels/common.h"
#include "pykernels/dropout.h"

namespace pykernels::cpu {

// Vector instruction sets with a kernel path, best last. The scalar path is the
// reference the others are tested against.
enum class SimdPath : int32_t { Scalar = 0, AVX2 = 1, AVX512 = 2 };

bool simd_path_supported(SimdPath path);  // by this CPU
bool cpu_has_avx512_bf16();               // vdpbf16ps: bf16 pairs multiplied, summed in fp32
bool cpu_has_amx_bf16();                  // AMX tiles: the matmul library's bf16 GEMM is ~5x faster
bool bf16_dots_run(SimdPath path);        // path is AVX-512 and the CPU has BF16 dot products
SimdPath best_simd_path();                // best supported
const char* simd_path_name(SimdPath path);

// ---- NF4 (format: pykernels/nf4.h) ----
// Quantizes blocks [block_begin, block_end) of the n-element tensor x into
// packed codes and per-block absmax. Returns the first block that holds a NaN or
// an Inf (its outputs are then unspecified), or -1.
int64_t nf4_quantize(SimdPath path, DType dtype, const void* x, int64_t n, int64_t blocksize,
                     int64_t block_begin, int64_t block_end, uint8_t* packed, float* absmax);

// Decodes blocks [block_begin, block_end) into out (n elements of dtype).
// reused_output: out is a buffer the caller keeps (its pages mapped), so a large
// one goes to memory with streaming stores; a fresh allocation's pages arrive
// zeroed and cached from the page fault, where ordinary stores are faster.
void nf4_dequantize(SimdPath path, DType dtype, const uint8_t* packed, const float* absmax,
                    int64_t n, int64_t blocksize, int64_t block_begin, int64_t block_end,
                    void* out, bool reused_output = false);

// ---- 8-bit blockwise, the double-quantization format (pykernels/blockwise8.h) ----
// lut: kBlockwise8LutSize bytes built from the 256-entry sorted code table.
void blockwise8_build_lut(const float* code, uint8_t* lut);
void blockwise8_quantize(const float* x, int64_t n, int64_t blocksize, const uint8_t* lut,
                         int64_t block_begin, int64_t block_end, uint8_t* q, float* absmax);
void blockwise8_dequantize(const uint8_t* q, const float* absmax, const float* code,
                           float offset, int64_t n, int64_t blocksize, int64_t block_begin,
                           int64_t block_end, float* out);

// ---- NF4 linear: y = x·Wᵀ and dx = dy·W with W [rows, cols] stored as NF4 ----
// The kernels read the packed codes directly; none materializes a dense W.
//
// W as the kernels see it: the packed codes of the flattened row-major matrix
// and one absmax per block of `blocksize` elements, either fp32 (`absmax`) or
// double-quantized (`absmax_q`: 8-bit codes decoded as
// blockwise8_decode(absmax_code, absmax_q[b], absmax_scale[b / 256], absmax_offset),
// see blockwise8.h). Exactly one of absmax, absmax_q is set. Blocks run over the
// flattened matrix, so one may span two rows when cols % blocksize != 0.
struct NF4Matrix {
  const uint8_t* packed = nullptr;
  const float* absmax = nullptr;
  const uint8_t* absmax_q = nullptr;
  const float* absmax_scale = nullptr;
  const float* absmax_code = nullptr;
  float absmax_offset = 0.0f;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t blocksize = 64;
};

// fp32 absmax of blocks [block_begin, block_end) of w into out.
void nf4_decode_absmax(const NF4Matrix& w, int64_t block_begin, int64_t block_end, float* out);

// W[row_begin:row_end, col_begin:col_end] decoded into out (row-major, dtype),
// the same values nf4_dequantize gives: the tile a matmul library multiplies.
void nf4_dequantize_tile(SimdPath path, DType dtype, const NF4Matrix& w, int64_t row_begin,
                         int64_t row_end, int64_t col_begin, int64_t col_end, void* out);

// Fused dequantize + matrix-vector product for few tokens, accumulating in fp32.
// x [tokens, cols] is first rearranged once per call by nf4_matvec_pack_x into
// fp32 chunks of 32 columns, the 16 even columns first, then the 16 odd ones:
// the order the packed nibbles decode in. When cols is odd, rows alternate
// between starting on a high and a low nibble, and a second copy of x starting
// at column 1 serves the rows that start on a low nibble. Where
// nf4_matvec_bf16_dots(path, dtype, w) (the AVX-512 path on a CPU with BF16 dot
// products, bf16 x, cols and blocksize multiples of 64), x stays bf16 instead:
// steps of 64 columns, the 32 even ones first, then the 32 odd ones.
bool nf4_matvec_bf16_dots(SimdPath path, DType dtype, const NF4Matrix& w);
int64_t nf4_matvec_x_size(int64_t tokens, int64_t cols);  // floats, enough for either layout
void nf4_matvec_pack_x(SimdPath path, DType dtype, const NF4Matrix& w, const void* x,
                       int64_t tokens, float* x_packed);
// y[t, j] = sum_i x[t, i] W[j, i] (+ bias[j]) for rows j in [row_begin, row_end);
// y is [tokens, w.rows] and bias (nullable) [w.rows], both in dtype.
void nf4_matvec(SimdPath path, DType dtype, const NF4Matrix& w, const float* x_packed,
                int64_t tokens, int64_t row_begin, int64_t row_end, const void* bias, void* y);
// dx[t, i] = sum_j dy[t, j] W[j, i] for columns i in [col_begin, col_end).
// dy_t is fp32 [w.rows, tokens] (dy transposed); dx is [tokens, w.cols] in dtype.
void nf4_matvec_t(SimdPath path, DType dtype, const NF4Matrix& w, const float* dy_t,
                  int64_t tokens, int64_t col_begin, int64_t col_end, void* dx);

// ---- LoRA (math: csrc/cpu/lora.cpp; dropout mask: pykernels/dropout.h) ----
// Row-major contiguous buffers: x [rows, cols], a (lora_A) [rank, cols] and every
// out in dtype; g [rows, rank] in fp32. row_map (optional): the kernel's row t is
// row row_map[t] of x, g, the row-indexed out and the dropout hash, so one adapter's
// rows of a mixed batch run in place (multi-LoRA). drop(x)[t, i] = x[t, i] * d.scale where
// dropout_keep(d, t, i), else 0, computed on the fly and never stored. Every
// path gives the same bits whatever the range split (see lora.cpp).

// out[t, k] = sum_i drop(x)[t, i] * a[k, i] (xa = drop(x) A^T), rows [row_begin, row_end).
void lora_x_at(SimdPath path, DType dtype, const void* x, const void* a, int64_t cols,
               int64_t rank, const Dropout& d, int64_t row_begin, int64_t row_end, void* out,
               const int64_t* row_map = nullptr);

// out[k, i] = sum_t g[t, k] * drop(x)[t, i] over all rows (dA = dxa^T drop(x)), for the
// columns [col_begin, col_end) of out [rank, cols].
void lora_gt_x(SimdPath path, DType dtype, const float* g, const void* x, int64_t rows,
               int64_t cols, int64_t rank, const Dropout& d, int64_t col_begin, int64_t col_end,
               void* out, const int64_t* row_map = nullptr);

// out[t, i] += scale * sum_k g[t, k] * a[k, i] where dropout_keep(d, t, i) (every element
// when d is inactive), the sum in fp32 and rounded once, rows [row_begin, row_end) of
// out [rows, cols]. dx += drop'(dxa A) with scale = d.scale; merge W += s B A with
// d inactive and scale = s (unmerge: -s, which undoes the same fp32 delta).
void lora_add_g_a(SimdPath path, DType dtype, const float* g, const void* a, int64_t cols,
                  int64_t rank, float scale, const Dropout& d, int64_t row_begin,
                  int64_t row_end, void* out, const int64_t* row_map = nullptr);

// out[t, k] = alpha * sum_i x[t, i] a[k, i] for bf16 x [rows, cols], a [rank, cols] and
// out [rows, rank], rows [row_begin, row_end): LoRA's down projections without dropout
// (xa = x A^T, dxa = s dy B), with BF16 dot products: only where cpu_has_avx512_bf16().
// Sums in fp32 (pairs of products added before the sum, so not the bits of
// lora_x_at), scaled and rounded once.
void bf16_dots(const uint16_t* x, const uint16_t* a, int64_t cols, int64_t rank, float alpha,
               int64_t row_begin, int64_t row_end, uint16_t* out);
// out[k, i] = alpha * sum_t g[t, k] x[t, i] for bf16 g [rows, rank], x [rows, cols],
// out [rank, cols] (transposed_out: out[i, k], out [cols, rank]), columns
// [col_begin, col_end): the contractions over rows without dropout (dA = dxa^T x,
// dB = s dy^T xa), with BF16 dot products over pairs of rows; where bf16_dots runs.
void bf16_contract_rows(const uint16_t* g, const uint16_t* x, int64_t rows, int64_t cols,
                        int64_t rank, float alpha, bool transposed_out, int64_t col_begin,
                        int64_t col_end, uint16_t* out);
// dst[c, r] = src[r, c] for 16-bit src [rows, cols], dst [cols, rows], rows
// [row_begin, row_end): B^T for bf16_dots (dxa = s dy B); where bf16_dots runs.
void bf16_transpose(const uint16_t* src, int64_t rows, int64_t cols, int64_t row_begin,
                    int64_t row_end, uint16_t* dst);
// out[t, i] = addend[t * stride + i] + alpha * sum_k g[t, k] b[i, k] for bf16
// g [rows, rank], b [cols, rank] (b_transposed: b[k, i], b [rank, cols]),
// out [rows, cols], columns [col_begin, col_end): LoRA's expansions y = b + s xa B^T
// (addend the bias, stride 0), y += s xa B^T and dx += dxa A (addend = out, stride
// cols); addend null: zeros. Where bf16_dots runs.
void bf16_expand(const uint16_t* g, const uint16_t* b, bool b_transposed, const uint16_t* addend,
                 int64_t stride, int64_t rows, int64_t cols, int64_t rank, float alpha,
                 int64_t col_begin, int64_t col_end, uint16_t* out);

// out[a, k] = alpha * sum_b m[a * a_stride + b * b_stride] v[b, k], b < count_b, for fp32
// v [count_b, rank] and out [*, rank], a in [a_begin, a_end): LoRA's fp32 products with
// a rank-r right factor, summed over dy's columns (dxa = s dy B: a_stride = cols,
// b_stride = 1, v = B) or over its rows (dB = s dy^T xa: a_stride = 1, b_stride = cols,
// v = xa). AVX-512, or the scalar reference on any other path.
void f32_rank_rows(SimdPath path, const float* m, int64_t a_stride, int64_t b_stride,
                   int64_t count_b, const float* v, int64_t rank, float alpha, int64_t a_begin,
                   int64_t a_end, float* out);

// keep[(t - row_begin) * cols + i] = 1 if element (t, i) is kept, else 0. Scalar: for
// tests and the ops' float64 path.
void dropout_keep_mask(const Dropout& d, int64_t cols, int64_t row_begin, int64_t row_end,
                       uint8_t* keep);

// ---- Multi-LoRA (math: csrc/cpu/multi_lora.cpp): n adapters stacked, a_all
// [n, rank, cols] in dtype, each batch row (`tokens` token rows) picking one ----
// Groups the token rows by adapter: order lists them adapter by adapter (ascending
// within one), adapter a's at positions [offsets[a], offsets[a + 1]); rows whose id
// is -1 are left out. ids in [-1, n_adapters) (the caller checks). order holds
// batch_rows * tokens entries, offsets n_adapters + 1. Returns offsets[n_adapters].
int64_t multi_lora_segments(const int64_t* ids, int64_t batch_rows, int64_t tokens,
                            int64_t n_adapters, int64_t* order, int64_t* offsets);

// lora_x_at for the rows at positions [pos_begin, pos_end) of order, each with its
// adapter's a_all[a]: out[t] = drop(x)[t] a_all[a]^T, out [T, rank].
void multi_lora_x_at(SimdPath path, DType dtype, const void* x, const void* a_all, int64_t cols,
                     int64_t rank, const Dropout& d, const int64_t* order, const int64_t* offsets,
                     int64_t n_adapters, int64_t pos_begin, int64_t pos_end, void* out);

// lora_add_g_a likewise: out[t] += scale * scales[a] * g[t] a_all[a] where kept
// (scales null: scale alone).
void multi_lora_add_g_a(SimdPath path, DType dtype, const float* g, const void* a_all,
                        int64_t cols, int64_t rank, const float* scales, float scale,
                        const Dropout& d, const int64_t* order, const int64_t* offsets,
                        int64_t n_adapters, int64_t pos_begin, int64_t pos_end, void* out);

// lora_gt_x over one adapter's rows: out_all[adapter] [rank, cols] = sum over them of
// g[t]^T drop(x)[t], columns [col_begin, col_end).
void multi_lora_gt_x(SimdPath path, DType dtype, const float* g, const void* x, int64_t cols,
                     int64_t rank, const Dropout& d, const int64_t* order, const int64_t* offsets,
                     int64_t adapter, int64_t col_begin, int64_t col_end, void* out_all);

// ---- Bottleneck adapter epilogues (math: csrc/cpu/bottleneck.cpp) ----
// out = r + s·(act(h·W_downᵀ + b_down)·W_upᵀ + b_up); the two products run in the
// matmul library, these kernels do the rest in place on their outputs. Every
// buffer is row-major contiguous in dtype, `rows` rows from the pointers given;
// every element is computed in fp32 and rounded once per output.

// z [rows, m] (h·W_downᵀ + b_down, from the product) in place: copied to pre_out
// when not null (the backward's pre-activation), then z = act(z).
void bottleneck_activate(SimdPath path, DType dtype, Act act, void* z, int64_t rows, int64_t m,
                         void* pre_out);
// out [rows, d] = residual + scale·(up + bias); out may alias residual.
void bottleneck_epilogue(SimdPath path, DType dtype, const void* up, const void* bias,
                         const void* residual, int64_t rows, int64_t d, float scale, void* out);
// g [rows, m] (grad_out·W_up) in place: g = scale·g·act'(pre); a_out = act(pre).
void bottleneck_act_backward(SimdPath path, DType dtype, Act act, const void* pre, void* g,
                             int64_t rows, int64_t m, float scale, void* a_out);
// out[j - col_begin] = sum over t of x[t, j] in fp32, rows in order, for the columns
// [col_begin, col_end) of x [rows, cols]: the bias gradients.
void bottleneck_column_sum(SimdPath path, DType dtype, const void* x, int64_t rows, int64_t cols,
                           int64_t col_begin, int64_t col_end, float* out);

// ---- IA³: the elementwise passes around the base matmul (math: csrc/cpu/ia3.cpp) ----
// v, out, g, dv: row-major [rows, cols] in dtype; bias (nullable), l, dl: fp32 [cols].
// out[t, j] = (v[t, j] + bias[j]) * l[j] for rows [row_begin, row_end); out may be v.
void ia3_scale(SimdPath path, DType dtype, const void* v, const float* bias, const float* l,
               int64_t cols, int64_t row_begin, int64_t row_end, void* out);
// For columns [col_begin, col_end): dl[j] = sum_t g[t, j] * (v[t, j] + bias[j]) over
// all rows, and (dv not null) dv[t, j] = g[t, j] * l[j].
void ia3_scale_backward(SimdPath path, DType dtype, const void* g, const void* v,
                        const float* bias, const float* l, int64_t rows, int64_t cols,
                        int64_t col_begin, int64_t col_end, void* dv, float* dl);

// ---- prompt tuning (math: csrc/cpu/prompt.cpp) ----
// out [B, n + seq, dim]: out[b, :n] = prompt [n, dim], out[b, n + s] = weight[ids[b, s]]
// (weight [vocab, dim]; elements of elem_bytes) for b in [batch_begin, batch_end).
// Returns the flat index b * seq + s of the first id outside [0, vocab), or -1.
int64_t prompt_embed(int64_t elem_bytes, const int64_t* ids, int64_t seq, const void* weight,
                     int64_t vocab, int64_t dim, const void* prompt, int64_t n,
                     int64_t batch_begin, int64_t batch_end, void* out);

}  // namespace pykernels::cpu
