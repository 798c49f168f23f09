// The LoRA ops over a dense base, for every device (CUDA registers them in
// lora_cuda.cpp), and the CPU's fused kernels:
//   lora_linear           y = x W^T + b + s (drop(x) A^T) B^T, and xa = drop(x) A^T
//   lora_linear_backward  dA, dB and (when asked) dx = dy W + drop'(s (dy B) A)
//   lora_merge_           W += s B A in place (unmerge: scale -s)
//   lora_dropout_mask     the keep mask of a seed, as the kernels draw it (CPU only)
// The base products stay with the matmul library (oneDNN / MKL, cuBLAS) and the
// adapter half (lora_adapter.h, defined here) works in place on their outputs.
// W and b never get gradients: the autograd registration (pykernels/ops/lora.py)
// refuses to differentiate them.
#include "lora_adapter.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "checks.h"
#include "pykernels/cpu.h"
#include "simd_choice.h"

namespace pykernels::binding::lora {
namespace {

// Tasks of ~2^18 multiply-adds: below that, thread hand-off costs more than it saves.
int64_t grain(int64_t work_per_item) {
  return std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(1, work_per_item));
}

DType kernel_dtype(const at::Tensor& t) { return float_dtype("lora", "x", t.scalar_type()); }

// ---- the CPU's fused kernels (lora_adapter.h), split across torch's threads ----

void cpu_x_at(const at::Tensor& x, const at::Tensor& a, const Dropout& d, const at::Tensor& out) {
  const int64_t rows = x.size(0), cols = x.size(1), rank = a.size(0);
  const cpu::SimdPath path = active_cpu_path();
  const DType dtype = kernel_dtype(x);
  at::parallel_for(0, rows, grain(cols * rank), [&](int64_t begin, int64_t end) {
    cpu::lora_x_at(path, dtype, x.const_data_ptr(), a.const_data_ptr(), cols, rank, d, begin, end,
                   out.mutable_data_ptr());
  });
}

void cpu_gt_x(const at::Tensor& g, const at::Tensor& x, const Dropout& d, const at::Tensor& out) {
  const int64_t rows = x.size(0), cols = x.size(1), rank = g.size(1);
  const cpu::SimdPath path = active_cpu_path();
  const DType dtype = kernel_dtype(x);
  constexpr int64_t kBlock = 64;  // columns per unit of work: the kernels' column tile
  at::parallel_for(0, ceil_div(cols, kBlock), grain(rows * kBlock * rank),
                   [&](int64_t begin, int64_t end) {
                     cpu::lora_gt_x(path, dtype, g.const_data_ptr<float>(), x.const_data_ptr(),
                                    rows, cols, rank, d, begin * kBlock,
                                    std::min(cols, end * kBlock), out.mutable_data_ptr());
                   });
}

void cpu_add_g_a(const at::Tensor& g, const at::Tensor& a, float scale, const Dropout& d,
                 const at::Tensor& out) {
  const int64_t rows = out.size(0), cols = out.size(1), rank = a.size(0);
  const cpu::SimdPath path = active_cpu_path();
  const DType dtype = kernel_dtype(out);
  at::parallel_for(0, rows, grain(cols * rank), [&](int64_t begin, int64_t end) {
    cpu::lora_add_g_a(path, dtype, g.const_data_ptr<float>(), a.const_data_ptr(), cols, rank,
                      scale, d, begin, end, out.mutable_data_ptr());
  });
}

constexpr FusedKernels kCpuFusedKernels{cpu_x_at, cpu_gt_x, cpu_add_g_a};

// The fused kernels for t's device and dtype, or nullptr (float64, other devices).
const FusedKernels* fused_kernels(const at::Tensor& t) {
  const auto type = t.scalar_type();
  if (type != at::kFloat && type != at::kHalf && type != at::kBFloat16) return nullptr;
  if (t.is_cpu()) return &kCpuFusedKernels;
#ifdef PYKERNELS_WITH_CUDA
  if (t.is_cuda()) return &kCudaFusedKernels;
#endif
  return nullptr;
}

// Which products run the kernels. With dropout, every product that touches
// drop(x) does: that is the point, drop(x) is never stored. Without dropout the
// products are plain, and the matmul library wins most of them. Measured on
// this machine (1 thread, thread CPU time, 4096x4096, r = 16, T = 2048, bf16 / fp32):
//   xa = x A^T     lora_x_at    5.4 / 11.6 ms   at::mm  1.7 / 5.2 ms (AMX / MKL)
//   dx += dxa A    lora_add_g_a 4.9 / 6.1 ms    addmm_  3.8 / 4.8 ms
//   dA = dxa^T x   lora_gt_x    4.2 / 4.8 ms    at::mm  2.3 / 11.3 ms
// so the kernels run there only for the contractions over rows in fp32 on the
// AVX-512 path (AVX2: 3.1 ms at T = 512, twice AVX-512's), from kContractRows rows
// on (T = 256: 0.60 vs 0.70 ms, T = 512: 1.15 vs 1.47 ms; T = 32: 0.077 vs 0.05 ms). at::mm takes the left operand g^T contiguous from
// that size on: bf16 at T = 2048, 2.3 ms vs 3.6 ms as a transposed view.
// On CUDA every dropout-free product goes to cuBLAS, which takes either layout.
constexpr int64_t kContractRows = 256;
constexpr int64_t kFoldRows = 128;  // see lora_linear

bool fused(const Dropout& d, const at::Tensor& t) {
  return d.active() && fused_kernels(t) != nullptr;
}

// The products with the input and the output gradient without dropout, in bf16
// on a CPU with BF16 dot products: there cpu::bf16_dots (xa = x A^T, dxa = s dy B)
// and cpu::bf16_contract_rows (dA = dxa^T x, dB = s dy^T xa) beat the matmul
// library (4096 columns, rank 16, one core, AMD EPYC (Zen 4), us at T = 32 / 512:
// xa 23 / 350 vs 68 / 740 (at::mm), dA 49 / 450 vs 58 / 570 (at::addmm)). LoRA
// fwd+bwd over the base at T = 512 without x grad, one thread: 1.059 -> 1.045.
bool bf16_dots_win(const Dropout& d, const at::Tensor& x) {
  return !d.active() && x.is_cpu() && x.scalar_type() == at::kBFloat16 &&
         cpu::bf16_dots_run(active_cpu_path());
}

// Where cpu::bf16_expand adds a rank-r product into `out` in place: bf16 without
// dropout, any number of rows (see adapter_add_up).
bool expand_in_place(const Dropout& d, const at::Tensor& out) {
  return out.is_contiguous() && bf16_dots_win(d, out);
}

// alpha g^T x2d for g [rows, rank]: [rank, cols], or its transpose [cols, rank], by
// cpu::bf16_contract_rows.
at::Tensor bf16_contract_rows(const at::Tensor& g, const at::Tensor& x2d, double alpha,
                              bool transposed) {
  const at::Tensor gc = g.contiguous(), x = x2d.contiguous();
  const int64_t rows = x.size(0), cols = x.size(1), rank = gc.size(1);
  at::Tensor out = at::empty(transposed ? at::IntArrayRef{cols, rank} : at::IntArrayRef{rank, cols},
                             x.options());
  const auto* gp = static_cast<const uint16_t*>(gc.const_data_ptr());
  const auto* xp = static_cast<const uint16_t*>(x.const_data_ptr());
  auto* op = static_cast<uint16_t*>(out.mutable_data_ptr());
  constexpr int64_t kStep = 32;  // the kernel's column step
  at::parallel_for(0, ceil_div(cols, kStep), grain(rows * kStep * rank),
                   [&](int64_t begin, int64_t end) {
                     cpu::bf16_contract_rows(gp, xp, rows, cols, rank, float(alpha), transposed,
                                             begin * kStep, std::min(cols, end * kStep), op);
                   });
  return out;
}

// fp32 on the AVX-512 path: cpu::f32_rank_rows takes dxa = s dy B and, below
// kContractRows rows, dB = s dy^T xa from MKL (whose small products pack their
// operands on every call). What the adapter adds to a step over the base (4096
// columns, rank 16, paired, one thread), T = 32: no x grad 1047-1084 -> 923-1003
// us, x grad 759-765 -> 555-674 us. Past kContractRows rows dB's sweep down
// every row would cross a page a row (see bf16_contract_rows); it stays with the
// row-contraction kernel there.
bool f32_rank_rows_win(const at::Tensor& t) {
  return t.is_cpu() && t.scalar_type() == at::kFloat &&
         active_cpu_path() == cpu::SimdPath::AVX512;
}

// alpha m2d v for m2d [rows, cols], v [cols, rank]: [rows, rank]; or, over_rows,
// alpha m2d^T v for v [rows, rank]: [cols, rank]; by cpu::f32_rank_rows.
at::Tensor f32_rank_rows(const at::Tensor& m2d, const at::Tensor& v, double alpha, bool over_rows) {
  const at::Tensor m = m2d.contiguous(), vc = v.contiguous();
  const int64_t rows = m.size(0), cols = m.size(1), rank = vc.size(1);
  const int64_t count_a = over_rows ? cols : rows, count_b = over_rows ? rows : cols;
  at::Tensor out = at::empty({count_a, rank}, m.options());
  const float* mp = m.const_data_ptr<float>();
  const float* vp = vc.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  constexpr int64_t kTile = 8;  // the kernel's tile of a
  at::parallel_for(0, ceil_div(count_a, kTile), grain(kTile * count_b * rank),
                   [&](int64_t begin, int64_t end) {
                     cpu::f32_rank_rows(cpu::SimdPath::AVX512, mp, over_rows ? 1 : cols,
                                        over_rows ? cols : 1, count_b, vp, rank, float(alpha),
                                        begin * kTile, std::min(count_a, end * kTile), op);
                   });
  return out;
}

// alpha x2d a^T [rows, rank] for a [rank, cols], by cpu::bf16_dots.
at::Tensor bf16_dots(const at::Tensor& x2d, const at::Tensor& a, double alpha) {
  const at::Tensor x = x2d.contiguous(), ac = a.contiguous();
  const int64_t rows = x.size(0), cols = x.size(1), rank = ac.size(0);
  at::Tensor out = at::empty({rows, rank}, x.options());
  const auto* xp = static_cast<const uint16_t*>(x.const_data_ptr());
  const auto* ap = static_cast<const uint16_t*>(ac.const_data_ptr());
  auto* op = static_cast<uint16_t*>(out.mutable_data_ptr());
  at::parallel_for(0, rows, grain(cols * rank), [&](int64_t begin, int64_t end) {
    cpu::bf16_dots(xp, ap, cols, rank, float(alpha), begin, end, op);
  });
  return out;
}

// b^T, contiguous, by cpu::bf16_transpose: B^T [16, 4096] in 12 us, where
// at::Tensor::contiguous takes 56.
at::Tensor bf16_transposed(const at::Tensor& b) {
  const at::Tensor bc = b.contiguous();
  const int64_t rows = bc.size(0), cols = bc.size(1);
  at::Tensor out = at::empty({cols, rows}, bc.options());
  const auto* bp = static_cast<const uint16_t*>(bc.const_data_ptr());
  auto* op = static_cast<uint16_t*>(out.mutable_data_ptr());
  constexpr int64_t kBlock = 32;  // the kernel's row step
  at::parallel_for(0, ceil_div(rows, kBlock), grain(kBlock * cols),
                   [&](int64_t begin, int64_t end) {
                     cpu::bf16_transpose(bp, rows, cols, begin * kBlock,
                                         std::min(rows, end * kBlock), op);
                   });
  return out;
}

// addend + alpha g b^T for g [rows, rank], b [cols, rank] (b_transposed: alpha g b,
// b [rank, cols]), by cpu::bf16_expand: into `out` [rows, cols], the addend a bias
// [cols] (broadcast over rows), `out` itself (in place), or none.
void bf16_expand(const at::Tensor& g, const at::Tensor& b, bool b_transposed,
                 const at::Tensor& addend, double alpha, const at::Tensor& out) {
  TORCH_CHECK(out.is_contiguous(), "lora: the output must be contiguous (written in place)");
  const at::Tensor gc = g.contiguous(), bc = b.contiguous();
  const at::Tensor ac = addend.defined() ? addend.contiguous() : at::Tensor();
  const int64_t rows = gc.size(0), cols = out.size(1), rank = gc.size(1);
  const int64_t stride = ac.defined() && ac.dim() == 2 ? cols : 0;
  const auto* gp = static_cast<const uint16_t*>(gc.const_data_ptr());
  const auto* bp = static_cast<const uint16_t*>(bc.const_data_ptr());
  const auto* ap = ac.defined() ? static_cast<const uint16_t*>(ac.const_data_ptr()) : nullptr;
  auto* op = static_cast<uint16_t*>(out.mutable_data_ptr());
  constexpr int64_t kLanes = 16;  // the kernel's column step
  at::parallel_for(0, ceil_div(cols, kLanes), grain(rows * kLanes * rank),
                   [&](int64_t begin, int64_t end) {
                     cpu::bf16_expand(gp, bp, b_transposed, ap, stride, rows, cols, rank,
                                      float(alpha), begin * kLanes, std::min(cols, end * kLanes),
                                      op);
                   });
}

void check_same_dtype(const char* op, const at::Tensor& a, const char* a_name, const at::Tensor& b,
                      const char* b_name) {
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), op, ": ", b_name, " must have ", a_name,
                   "'s dtype ", a.scalar_type(), ", got ", b.scalar_type());
}

void check_float(const char* op, const char* arg, const at::Tensor& t) {
  const auto type = t.scalar_type();
  TORCH_CHECK_TYPE(type == at::kFloat || type == at::kHalf || type == at::kBFloat16 ||
                       type == at::kDouble,
                   op, ": ", arg, " must be float32, float16, bfloat16 or float64, got ", type);
}

// lora_A [r, in] and lora_B [out, r] with the dtype and device of `like`.
void check_lora_weights(const char* op, const at::Tensor& like, const char* like_name, int64_t in,
                        int64_t out, const at::Tensor& lora_A, const at::Tensor& lora_B) {
  TORCH_CHECK_VALUE(lora_A.dim() == 2 && lora_A.size(1) == in && lora_A.size(0) >= 1, op,
                    ": lora_A must be [r, in_features] = [r, ", in, "] with r >= 1, got ",
                    lora_A.sizes());
  const int64_t rank = lora_A.size(0);
  TORCH_CHECK_VALUE(lora_B.dim() == 2 && lora_B.size(0) == out && lora_B.size(1) == rank, op,
                    ": lora_B must be [out_features, r] = [", out, ", ", rank,
                    "] (r from lora_A), got ", lora_B.sizes());
  check_same_dtype(op, like, like_name, lora_A, "lora_A");
  check_same_dtype(op, like, like_name, lora_B, "lora_B");
  check_same_device(op, like, like_name, lora_A, "lora_A");
  check_same_device(op, like, like_name, lora_B, "lora_B");
}

void check_seed(const char* op, const at::Tensor& seed) {
  TORCH_CHECK_VALUE(seed.numel() == 1 && seed.scalar_type() == at::kLong && seed.device().is_cpu(),
                    op, ": seed must be one int64 on the CPU, got ", seed.scalar_type(), " ",
                    seed.sizes(), " on ", seed.device());
}

}  // namespace

Dropout check_adapter(const char* op, const at::Tensor& x, const at::Tensor& lora_A,
                      const at::Tensor& lora_B, int64_t out_features, double dropout_p,
                      const at::Tensor& seed) {
  const int64_t in = x.size(-1);
  check_lora_weights(op, x, "x", in, out_features, lora_A, lora_B);
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ",
                    dropout_p);
  check_seed(op, seed);
  TORCH_CHECK_VALUE(dropout_p == 0.0 || in <= int64_t(std::numeric_limits<uint32_t>::max()), op,
                    ": dropout needs in_features below 2^32, got ", in);
  return make_dropout(dropout_p, uint64_t(*seed.const_data_ptr<int64_t>()));
}

void check_backward_inputs(const char* op, const at::Tensor& x, const at::Tensor& grad_out,
                           const std::optional<at::Tensor>& grad_xa, const at::Tensor& xa,
                           int64_t out, int64_t rank) {
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(with_last_dim(x, out)), op,
                    ": grad_out must have the output's shape ", at::IntArrayRef(with_last_dim(x, out)),
                    ", got ", grad_out.sizes());
  TORCH_CHECK_VALUE(xa.sizes() == at::IntArrayRef(with_last_dim(x, rank)), op,
                    ": xa must have shape ", at::IntArrayRef(with_last_dim(x, rank)), ", got ",
                    xa.sizes());
  check_same_dtype(op, x, "x", grad_out, "grad_out");
  check_same_dtype(op, x, "x", xa, "xa");
  check_same_device(op, x, "x", grad_out, "grad_out");
  check_same_device(op, x, "x", xa, "xa");
  if (grad_xa.has_value()) {
    TORCH_CHECK_VALUE(grad_xa->sizes() == xa.sizes(), op, ": grad_xa must have xa's shape ",
                      xa.sizes(), ", got ", grad_xa->sizes());
    check_same_dtype(op, x, "x", *grad_xa, "grad_xa");
    check_same_device(op, x, "x", *grad_xa, "grad_xa");
  }
}

at::Tensor dropout_multiplier(const Dropout& d, int64_t rows, int64_t cols,
                              const at::TensorOptions& options) {
  at::Tensor keep = at::empty({rows, cols}, at::TensorOptions().dtype(at::kByte));
  at::parallel_for(0, rows, grain(cols * 16), [&](int64_t begin, int64_t end) {
    cpu::dropout_keep_mask(d, cols, begin, end, keep.mutable_data_ptr<uint8_t>() + begin * cols);
  });
  return keep.to(options).mul_(double(d.scale));
}

namespace {

// drop(x) stored: only where no kernel runs (float64, other devices).
at::Tensor dropped(const at::Tensor& x2d, const Dropout& d) {
  if (!d.active()) return x2d;
  return x2d.mul(dropout_multiplier(d, x2d.size(0), x2d.size(1), x2d.options()));
}

// alpha g^T drop(x) [r, cols] for g [rows, r]: the product contracting the rows.
at::Tensor contract_rows(const at::Tensor& g, const at::Tensor& x2d, double alpha,
                         const Dropout& d) {
  if (bf16_dots_win(d, x2d)) return bf16_contract_rows(g, x2d, alpha, false);
  const int64_t rows = x2d.size(0), cols = x2d.size(1), rank = g.size(1);
  const bool large = rows >= kContractRows;
  const bool kernel_wins = large && x2d.is_cpu() && x2d.scalar_type() == at::kFloat &&
                           active_cpu_path() == cpu::SimdPath::AVX512;
  if (!fused(d, x2d) && !kernel_wins) {
    const at::Tensor gt = large ? g.t().contiguous() : g.t();
    return at::addmm(at::empty({rank, cols}, x2d.options()), gt, dropped(x2d, d), 0.0, alpha);
  }
  const at::Tensor g32 =
      (alpha == 1.0 ? g.to(at::kFloat) : g.to(at::kFloat).mul(alpha)).contiguous();
  const at::Tensor x = x2d.contiguous();
  at::Tensor out = at::empty({rank, cols}, x.options());
  fused_kernels(x)->gt_x(g32, x, d, out);
  return out;
}

}  // namespace

at::Tensor adapter_down(const at::Tensor& x2d, const at::Tensor& lora_A, const Dropout& d) {
  if (bf16_dots_win(d, x2d)) return bf16_dots(x2d, lora_A, 1.0);
  if (!fused(d, x2d)) return at::mm(dropped(x2d, d), lora_A.t());
  const at::Tensor x = x2d.contiguous();
  at::Tensor xa = at::empty({x.size(0), lora_A.size(0)}, x.options());
  fused_kernels(x)->x_at(x, lora_A.contiguous(), d, xa);
  return xa;
}

void adapter_add_up(const at::Tensor& y2d, const at::Tensor& xa, const at::Tensor& lora_B,
                    double scale) {
  // bf16: cpu::bf16_expand in place (4096 columns, rank 16, one core, warm: T = 1
  // 14 vs 35 us, T = 32 43 vs 64, T = 128 141 vs 126, T = 512 530 vs 470; but in a
  // step they run cold after the base GEMM, where the matmul library's took 240 us
  // at T = 32 and 940 at T = 512 against ~700). What the adapter adds to a step of
  // LoRA over the base (paired, one thread) with y and dx this way at every T,
  // against oneDNN's addmm_ from 129 rows on: T = 512 no x grad 3.2-3.7 -> 2.9-3.2
  // ms, x grad 4.5 -> 3.1-3.3 ms; T = 2048 no x grad 11.6-12.1 -> 8.6-11.8 ms.
  if (expand_in_place(Dropout{}, y2d))
    bf16_expand(xa, lora_B, false, y2d, scale, y2d);
  else
    y2d.addmm_(xa, lora_B.t(), 1.0, scale);
}

AdapterGrads adapter_backward(const at::Tensor& dy2d, const at::Tensor& grad_xa,
                              const at::Tensor& x2d, const at::Tensor& xa,
                              const at::Tensor& lora_A, const at::Tensor& lora_B, double scale,
                              const Dropout& d) {
  const int64_t rows = x2d.size(0), rank = lora_A.size(0);
  AdapterGrads g;
  // beta = 0: the uninitialized input is ignored (never read, NaN-safe).
  if (grad_xa.defined())
    g.dxa = at::addmm(grad_xa.reshape({rows, rank}), dy2d, lora_B, 1.0, scale);
  else if (bf16_dots_win(Dropout{}, dy2d))
    g.dxa = bf16_dots(dy2d, bf16_transposed(lora_B), scale);
  else if (f32_rank_rows_win(dy2d))
    g.dxa = f32_rank_rows(dy2d, lora_B, scale, false);
  else
    g.dxa = at::addmm(at::empty({rows, rank}, dy2d.options()), dy2d, lora_B, 0.0, scale);
  g.grad_A = contract_rows(g.dxa, x2d, 1.0, d);
  // dB^T = s xa^T dy has the layout the CPU's row contraction wants; with few rows
  // the transposing copy costs more than it saves (bf16, T = 32: 0.23 vs 0.12 ms).
  if (bf16_dots_win(Dropout{}, dy2d))
    g.grad_B = bf16_contract_rows(xa, dy2d, scale, true);
  else if (rows < kContractRows && f32_rank_rows_win(dy2d))
    g.grad_B = f32_rank_rows(dy2d, xa, scale, true);
  else if (rows >= kContractRows && dy2d.is_cpu())
    g.grad_B = contract_rows(xa, dy2d, scale, Dropout{}).t().contiguous();
  else
    g.grad_B = at::addmm(at::empty(lora_B.sizes(), lora_B.options()), dy2d.t(), xa, 0.0, scale);
  return g;
}

void adapter_add_grad_input(const at::Tensor& dx2d, const at::Tensor& dxa,
                            const at::Tensor& lora_A, const Dropout& d) {
  const at::Tensor& dx = dx2d;
  if (expand_in_place(d, dx)) {
    // As adapter_add_up: T = 1 / 32 / 128 10 / 43 / 140 us vs at::addmm_ 29 / 54 / 126.
    bf16_expand(dxa, lora_A, true, dx, 1.0, dx);
    return;
  }
  if (!fused(d, dx)) {
    if (!d.active()) dx.addmm_(dxa, lora_A);
    else dx.add_(at::mm(dxa, lora_A).mul_(dropout_multiplier(d, dx.size(0), dx.size(1),
                                                            dx.options())));
    return;
  }
  TORCH_CHECK(dx.is_contiguous(), "lora: the grad input must be contiguous (added to in place)");
  fused_kernels(dx)->add_g_a(dxa.to(at::kFloat).contiguous(), lora_A.contiguous(), d.scale, d,
                             dx);
}

namespace {

// x, weight, bias against each other; returns out_features.
int64_t check_base(const char* op, const at::Tensor& x, const at::Tensor& weight,
                   const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least one dimension");
  check_float(op, "x", x);
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be [out_features, in_features], got ",
                    weight.sizes());
  TORCH_CHECK_VALUE(x.size(-1) == weight.size(1), op, ": x's last dimension (", x.size(-1),
                    ") must equal weight's in_features (", weight.size(1), ")");
  check_same_dtype(op, x, "x", weight, "weight");
  check_same_device(op, x, "x", weight, "weight");
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), op,
                      ": bias must be [out_features] = [", weight.size(0), "], got ",
                      bias->sizes());
    check_same_dtype(op, x, "x", *bias, "bias");
    check_same_device(op, x, "x", *bias, "bias");
  }
  return weight.size(0);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> lora_linear(const at::Tensor& x, const at::Tensor& weight,
                                               const std::optional<at::Tensor>& bias,
                                               const at::Tensor& lora_A, const at::Tensor& lora_B,
                                               double scale, double dropout_p,
                                               const at::Tensor& seed) {
  constexpr const char* op = "lora_linear";
  const int64_t out = check_base(op, x, weight, bias);
  const Dropout d = check_adapter(op, x, lora_A, lora_B, out, dropout_p, seed);
  const at::Tensor x2d = x.reshape({-1, x.size(-1)});
  const at::Tensor xa = adapter_down(x2d, lora_A, d);
  at::Tensor y;
  if (x2d.size(0) <= kFoldRows) {
    // Few rows: the adapter's term (and b) first, then the base GEMM accumulates
    // onto it (beta = 1) instead of a pass of its own over y. Over the base's
    // forward, bf16: T = 32 +0.13 ms vs +0.42 ms (of 6.5), T = 128 -0.18 vs +0.29
    // ms; from T = 512 on the separate pass is as fast or faster (+2.8 vs +4.2 ms).
    if (bf16_dots_win(Dropout{}, x2d)) {
      y = at::empty({x2d.size(0), out}, x.options());
      bf16_expand(xa, lora_B, false, bias.value_or(at::Tensor()), scale, y);
    } else
      y = bias.has_value()
              ? at::addmm(*bias, xa, lora_B.t(), 1.0, scale)
              : at::addmm(at::empty({x2d.size(0), out}, x.options()), xa, lora_B.t(), 0.0, scale);
    y.addmm_(x2d, weight.t());
  } else {
    y = bias.has_value() ? at::addmm(*bias, x2d, weight.t()) : at::mm(x2d, weight.t());
    adapter_add_up(y, xa, lora_B, scale);
  }
  return {y.view(with_last_dim(x, out)), xa.view(with_last_dim(x, lora_A.size(0)))};
}

std::tuple<std::optional<at::Tensor>, at::Tensor, at::Tensor> lora_linear_backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_xa, const at::Tensor& x,
    const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
    const at::Tensor& xa, double scale, double dropout_p, const at::Tensor& seed,
    bool need_grad_x) {
  constexpr const char* op = "lora_linear_backward";
  const int64_t out = check_base(op, x, weight, std::nullopt);
  const Dropout d = check_adapter(op, x, lora_A, lora_B, out, dropout_p, seed);
  const int64_t rank = lora_A.size(0);
  check_backward_inputs(op, x, grad_out, grad_xa, xa, out, rank);
  const at::Tensor x2d = x.reshape({-1, x.size(-1)});
  const at::Tensor dy2d = grad_out.reshape({-1, out});
  AdapterGrads g = adapter_backward(dy2d, grad_xa.value_or(at::Tensor()), x2d,
                                    xa.reshape({-1, rank}), lora_A, lora_B, scale, d);
  at::Tensor dx;
  if (need_grad_x) {
    dx = at::mm(dy2d, weight);
    adapter_add_grad_input(dx, g.dxa, lora_A, d);
    dx = dx.view(x.sizes());
  }
  return {need_grad_x ? std::optional<at::Tensor>(dx) : std::nullopt, g.grad_A, g.grad_B};
}

void lora_merge_(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                 double scale) {
  constexpr const char* op = "lora_merge_";
  check_float(op, "weight", weight);
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be [out_features, in_features], got ",
                    weight.sizes());
  TORCH_CHECK_VALUE(weight.is_contiguous(), op,
                    ": weight must be contiguous (it is updated in place)");
  check_lora_weights(op, weight, "weight", weight.size(1), weight.size(0), lora_A, lora_B);
  const FusedKernels* kernels = fused_kernels(weight);
  if (kernels == nullptr) {
    weight.addmm_(lora_B, lora_A, 1.0, scale);
    return;
  }
  // One pass over W: each row's delta summed in fp32 and added with one rounding.
  kernels->add_g_a(lora_B.to(at::kFloat).contiguous(), lora_A.contiguous(), float(scale),
                   Dropout{}, weight);
}

namespace {

at::Tensor lora_dropout_mask_cpu(const at::Tensor& seed, int64_t rows, int64_t cols, double p) {
  constexpr const char* op = "lora_dropout_mask";
  TORCH_CHECK_VALUE(rows >= 0 && cols >= 0, op, ": rows and cols must be >= 0, got ", rows, ", ",
                    cols);
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, op, ": p must be in [0, 1), got ", p);
  check_seed(op, seed);
  const Dropout d = make_dropout(p, uint64_t(*seed.const_data_ptr<int64_t>()));
  at::Tensor keep = at::empty({rows, cols}, at::TensorOptions().dtype(at::kBool));
  at::parallel_for(0, rows, grain(cols * 16), [&](int64_t begin, int64_t end) {
    cpu::dropout_keep_mask(d, cols, begin, end,
                           static_cast<uint8_t*>(keep.mutable_data_ptr()) + begin * cols);
  });
  return keep;
}

}  // namespace

TORCH_LIBRARY_IMPL(pykernels, CPU, m) {
  m.impl("lora_linear", &lora_linear);
  m.impl("lora_linear_backward", &lora_linear_backward);
  m.impl("lora_merge_", &lora_merge_);
  m.impl("lora_dropout_mask", &lora_dropout_mask_cpu);
}

}  // namespace pykernels::binding::lora
