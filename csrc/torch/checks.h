// Argument checks shared by the CPU and CUDA bindings: each names the op, the
// argument and what was expected, and raises the matching Python exception
// (TORCH_CHECK_VALUE -> ValueError, TORCH_CHECK_TYPE -> TypeError).
#pragma once
#include <ATen/core/Tensor.h>

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

}  // namespace pykernels::binding
