// Internal to csrc/cpu: what the NF4 linear kernels (nf4_matmul*.cpp) share.
//
// x_packed layout (nf4_matvec_pack_x): per copy, per token, padded_cols(cols)
// floats; column r of a copy sits at chunk_position(r): chunks of 32 columns,
// the 16 even columns first, then the 16 odd ones. Copy 0 starts at column 0,
// copy 1 (only when cols is odd) at column 1. The transposed kernel keeps its
// accumulators in the same layout.
#pragma once
#include <cstring>
#include <memory>
#include <vector>

#include "pykernels/cpu.h"
#include "pykernels/nf4.h"

namespace pykernels::cpu {

constexpr int64_t kChunk = 32;  // columns per chunk: 16 packed bytes
constexpr int64_t kBf16Step = 64;  // columns per step of the bf16 dot kernel: 32 packed bytes

inline int64_t chunk_position(int64_t r) {
  return (r & ~int64_t(31)) | ((r & 1) << 4) | ((r & 31) >> 1);
}
inline int64_t padded_cols(int64_t cols) { return ceil_div(cols, kChunk) * kChunk; }
inline int64_t x_copies(int64_t cols) { return 1 + (cols & 1); }

inline float load_value(DType dtype, const void* p, int64_t i) {
  switch (dtype) {
    case DType::F16: return load_as_float<DType::F16>(static_cast<const uint16_t*>(p), i);
    case DType::BF16: return load_as_float<DType::BF16>(static_cast<const uint16_t*>(p), i);
    case DType::F32: break;
  }
  return static_cast<const float*>(p)[i];
}

inline void store_value(DType dtype, void* p, int64_t i, float v) {
  switch (dtype) {
    case DType::F16: return store_from_float<DType::F16>(static_cast<uint16_t*>(p), i, v);
    case DType::BF16: return store_from_float<DType::BF16>(static_cast<uint16_t*>(p), i, v);
    case DType::F32: break;
  }
  static_cast<float*>(p)[i] = v;
}

// The double-quant code table as four byte planes, plane p holding byte p of
// every entry's fp32 bits: what a decoder that looks codes up with byte permutes
// reads (built once per BlockAbsmax, 1 KiB).
struct CodePlanes {
  alignas(64) uint8_t bytes[4][256];
};

// The fp32 absmax of the blocks under elements [begin, end) of w: a pointer
// into w.absmax, or decoded into a buffer this object owns when double-quantized.
// at(g) is the absmax of element g's block (a shift: blocksize is a power of two).
// The SIMD paths pass their own double-quant decoder (same bits, 16 blocks a step,
// or 64 from the code planes where they ask for them).
class BlockAbsmax {
 public:
  // decode(w, planes, block_begin, block_end, out); planes is null unless asked for.
  using Decoder = void (*)(const NF4Matrix&, const CodePlanes*, int64_t, int64_t, float*);
  static void decode_scalar(const NF4Matrix& w, const CodePlanes*, int64_t begin, int64_t end,
                            float* out) {
    nf4_decode_absmax(w, begin, end, out);
  }
  explicit BlockAbsmax(const NF4Matrix& w, Decoder decode = decode_scalar, bool planes = false)
      : w_(w), decode_(decode), shift_(__builtin_ctzll(uint64_t(w.blocksize))) {
    if (!planes || w.absmax_q == nullptr) return;
    planes_ = std::make_unique<CodePlanes>();
    for (int i = 0; i < 256; ++i) {
      uint32_t bits;
      std::memcpy(&bits, &w.absmax_code[i], sizeof bits);
      for (int p = 0; p < 4; ++p) planes_->bytes[p][i] = uint8_t(bits >> (8 * p));
    }
  }
  void load(int64_t begin, int64_t end) {
    first_ = begin >> shift_;
    const int64_t last = end > begin ? ((end - 1) >> shift_) + 1 : first_;
    if (w_.absmax != nullptr) {
      values_ = w_.absmax + first_;
      return;
    }
    buffer_.resize(size_t(last - first_));
    decode_(w_, planes_.get(), first_, last, buffer_.data());
    values_ = buffer_.data();
  }
  const float* values() const { return values_; }  // from the block of `begin`
  int64_t first_block() const { return first_; }
  int shift() const { return shift_; }  // log2(blocksize)
  float at(int64_t g) const { return values_[(g >> shift_) - first_]; }
  float weight(int64_t g) const { return nf4_decode(nf4_unpack(w_.packed, g), at(g)); }

 private:
  const NF4Matrix& w_;
  const Decoder decode_;
  const int shift_;
  std::unique_ptr<CodePlanes> planes_;  // null unless asked for
  std::vector<float> buffer_;
  const float* values_ = nullptr;
  int64_t first_ = 0;
};

#define PK_NF4_MATMUL_PATH(suffix)                                                          \
  void nf4_matvec_##suffix(DType dtype, const NF4Matrix& w, const float* x_packed,         \
                           int64_t tokens, int64_t row_begin, int64_t row_end,              \
                           const void* bias, void* y);                                      \
  void nf4_matvec_t_##suffix(DType dtype, const NF4Matrix& w, const float* dy_t,           \
                             int64_t tokens, int64_t col_begin, int64_t col_end, void* dx);
PK_NF4_MATMUL_PATH(scalar)
PK_NF4_MATMUL_PATH(avx2)
PK_NF4_MATMUL_PATH(avx512)
#undef PK_NF4_MATMUL_PATH
// x_bf16 in nf4_matvec_pack_x's bf16 layout; where nf4_matvec_bf16_dots holds.
void nf4_matvec_bf16_avx512(const NF4Matrix& w, const uint16_t* x_bf16, int64_t tokens,
                            int64_t row_begin, int64_t row_end, const void* bias, void* y);

}  // namespace pykernels::cpu
