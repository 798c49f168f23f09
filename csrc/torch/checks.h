// Argument checks shared by the CPU and CUDA bindings: each names the op, the
// argument and what was expected, and raises the matching Python exception
// (TORCH_CHECK_VALUE -> ValueError, TORCH_CHECK_TYPE -> TypeError).
#pragma once
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <vector>

#include "pykernels/common.h"
#include "pykernels/nf4.h"

namespace pykernels::binding {

inline DType float_dtype(const char* op, const char* arg, c10::ScalarType type) {
  switch (type) {
    case c10::ScalarType::Float: return DType::F32;
    case c10::ScalarType::Half: return DType::F16;
    case c10::ScalarType::BFloat16: return DType::BF16;
    default:
      TORCH_CHECK_TYPE(false, op, ": ", arg, " must be float32, float16 or bfloat16, got ", type);
  }
  return DType::F32;
}

inline void check_dtype(const char* op, const char* arg, const at::Tensor& t, c10::ScalarType type) {
  TORCH_CHECK_TYPE(t.scalar_type() == type, op, ": ", arg, " must be ", type, ", got ",
                   t.scalar_type());
}

inline void check_numel(const char* op, const char* arg, const at::Tensor& t, int64_t expected,
                        const char* why) {
  TORCH_CHECK_VALUE(t.numel() == expected, op, ": ", arg, " must have ", expected, " elements (",
                    why, "), got ", t.numel());
}

inline void check_same_device(const char* op, const at::Tensor& a, const char* a_name,
                              const at::Tensor& b, const char* b_name) {
  TORCH_CHECK_VALUE(a.device() == b.device(), op, ": ", a_name, " is on ", a.device(), " but ",
                    b_name, " is on ", b.device(), "; move them to one device");
}

inline void check_nf4_blocksize(const char* op, int64_t blocksize) {
  TORCH_CHECK_VALUE(nf4_valid_blocksize(blocksize), op,
                    ": blocksize must be a power of two from ", kNF4MinBlocksize, " to ",
                    kNF4MaxBlocksize, ", got ", blocksize);
}

inline void check_positive_blocksize(const char* op, int64_t blocksize) {
  TORCH_CHECK_VALUE(blocksize > 0, op, ": blocksize must be positive, got ", blocksize);
}

// The checks every NF4 dequantize shares, on any device: returns n.
inline int64_t check_nf4_state(const char* op, const at::Tensor& packed, const at::Tensor& absmax,
                               int64_t blocksize, int64_t n) {
  check_nf4_blocksize(op, blocksize);
  check_dtype(op, "packed", packed, c10::ScalarType::Byte);
  check_dtype(op, "absmax", absmax, c10::ScalarType::Float);
  check_same_device(op, packed, "packed", absmax, "absmax");
  check_numel(op, "packed", packed, nf4_packed_bytes(n), "two 4-bit codes per byte");
  check_numel(op, "absmax", absmax, nf4_num_blocks(n, blocksize), "one per block");
  return n;
}

// nf4_dequantize_into's arguments, on any device: returns out's element type.
inline DType check_nf4_dequantize_into(const char* op, const at::Tensor& packed,
                                       const at::Tensor& absmax, int64_t blocksize,
                                       const at::Tensor& out) {
  const DType dtype = float_dtype(op, "out", out.scalar_type());
  check_nf4_state(op, packed, absmax, blocksize, out.numel());
  check_same_device(op, packed, "packed", out, "out");
  TORCH_CHECK_VALUE(out.is_contiguous(), op, ": out must be contiguous");
  return dtype;
}

// first_bad: the first block of x holding a NaN or an Inf, or -1.
inline void check_nf4_finite(const char* op, int64_t first_bad, int64_t n, int64_t blocksize) {
  TORCH_CHECK_VALUE(first_bad < 0, op, ": x holds NaN or Inf (in elements ", first_bad * blocksize,
                    " to ", std::min(n, (first_bad + 1) * blocksize) - 1,
                    " of the flattened tensor); NF4 can only store finite weights");
}

inline void check_code(const char* op, const at::Tensor& code, const at::Tensor& x,
                       const char* x_name) {
  check_dtype(op, "code", code, at::kFloat);
  check_numel(op, "code", code, 256, "an 8-bit code table");
  check_same_device(op, x, x_name, code, "code");
}

inline void check_blockwise8_quantize(const char* op, const at::Tensor& x, const at::Tensor& code,
                                      int64_t blocksize) {
  check_dtype(op, "x", x, at::kFloat);
  check_code(op, code, x, "x");
  check_positive_blocksize(op, blocksize);
}

// blockwise8_dequantize's arguments; offset may live on any device.
inline void check_blockwise8_dequantize(const char* op, const at::Tensor& q,
                                        const at::Tensor& absmax, const at::Tensor& code,
                                        const at::Tensor& offset, int64_t blocksize) {
  check_dtype(op, "q", q, at::kByte);
  check_dtype(op, "absmax", absmax, at::kFloat);
  check_dtype(op, "offset", offset, at::kFloat);
  check_numel(op, "offset", offset, 1, "one scalar");
  check_code(op, code, q, "q");
  check_same_device(op, q, "q", absmax, "absmax");
  check_positive_blocksize(op, blocksize);
  check_numel(op, "absmax", absmax, nf4_num_blocks(q.numel(), blocksize), "one per block");
}

// Per-row adapter ids of the multi-adapter ops: int64 [rows], one per row of x,
// on x's device, each in [-1, n) (-1: no adapter). Returns them contiguous on
// the host, where the ops group the rows (from a GPU: one sync).
inline at::Tensor check_adapter_ids(const char* op, const at::Tensor& ids, const at::Tensor& x,
                                    const char* x_name, int64_t n) {
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kLong, op, ": ids must be int64, got ",
                   ids.scalar_type());
  TORCH_CHECK_VALUE(ids.dim() == 1 && ids.size(0) == x.size(0), op,
                    ": ids must be [rows], one adapter index per row of ", x_name, " (", x_name,
                    ".size(0) = ", x.size(0), "), got ", ids.sizes());
  check_same_device(op, x, x_name, ids, "ids");
  at::Tensor host_ids = ids.cpu().contiguous();
  const int64_t* id = host_ids.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < host_ids.numel(); ++i)
    TORCH_CHECK_VALUE(id[i] >= -1 && id[i] < n, op, ": ids[", i, "] = ", id[i],
                      " is out of range [-1, ", n, "): adapter indices are in [0, ", n,
                      ") (n_adapters), or -1 for no adapter");
  return host_ids;
}

// Rows of a flattened [..., features] tensor.
inline int64_t leading_rows(const at::Tensor& t) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) rows *= t.size(d);
  return rows;
}

// t's sizes with the last one replaced.
inline std::vector<int64_t> with_last_dim(const at::Tensor& t, int64_t last) {
  std::vector<int64_t> sizes(t.sizes().begin(), t.sizes().end());
  sizes.back() = last;
  return sizes;
}

// The packed size ties the features an activation brings to the weight's shape:
// say so in terms of that activation.
inline void check_weight_fits(const char* op, const char* arg, const at::Tensor& t,
                              const at::Tensor& packed, int64_t out_features,
                              int64_t in_features) {
  TORCH_CHECK_VALUE(packed.numel() == nf4_packed_bytes(out_features * in_features), op, ": ", arg,
                    " gives a [", out_features, ", ", in_features,
                    "] weight (out_features, in_features), which packs into ",
                    nf4_packed_bytes(out_features * in_features), " bytes, but packed has ",
                    packed.numel(), "; check ", arg, "'s last dimension (shape ", t.sizes(), ")");
}

inline void check_bias(const char* op, const at::Tensor& x, const at::Tensor& bias,
                       int64_t out_features) {
  check_dtype(op, "bias", bias, x.scalar_type());
  TORCH_CHECK_VALUE(bias.dim() == 1 && bias.size(0) == out_features, op,
                    ": bias must have shape [", out_features, "] (out_features), got ",
                    bias.sizes());
  check_same_device(op, x, "x", bias, "bias");
}

}  // namespace pykernels::binding
