// The NF4 format, defined once for host and device code.
//
// NF4 (QLoRA, Dettmers et al. 2023) stores a weight as 4-bit codes into a fixed
// 16-value table, one fp32 absmax per block of `blocksize` consecutive elements of
// the flattened row-major tensor. This header is the single spec the CPU kernels,
// the CUDA kernels and (by a test) pykernels/reference.py agree on. It follows
// bitsandbytes 0.50 bit for bit:
//
//   encode  absmax = max |x| over the block (fp32, whatever the input dtype);
//           scaled = x * (1 / max(absmax, 1e-38))   for a full block,
//                    x / max(absmax, 1e-38)         for the last, partial block;
//           code   = number of midpoints m_j with scaled > m_j (strict: a value
//                    exactly on a midpoint takes the lower code).
//           The stored absmax of a full block is the raw max (0 for an all-zero
//           block); a partial block stores max(absmax, 1e-38). Either way an
//           all-zero block encodes as code 7 (0.0) and decodes to exact zeros.
//   decode  value = table[code] * absmax in fp32, then rounded to the output dtype.
//   packing two codes per byte, the even element in the HIGH nibble; for an odd
//           element count the low nibble of the last byte is code 7.
//
// Double quantization (bitsandbytes compress_statistics=True) quantizes
// absmax - mean(absmax) with an 8-bit "dynamic" code (256 values, passed in as a
// table) in blocks of 256; see blockwise8.h.
#pragma once
#include "pykernels/common.h"

namespace pykernels {

constexpr int64_t kNF4MinBlocksize = 32;
constexpr int64_t kNF4MaxBlocksize = 4096;
constexpr int64_t kNF4DefaultBlocksize = 64;
constexpr uint8_t kNF4ZeroCode = 7;
constexpr float kNF4AbsmaxFloor = 1e-38f;

// The tables, as values written once. Host code reads the constexpr arrays
// kNF4Code / kNF4Midpoint; CUDA device code reads copies in constant memory
// (host code cannot read __constant__ data and device code cannot index host
// arrays), so spec functions go through nf4_code_table() / nf4_midpoint_table().
#define PK_NF4_CODE_VALUES                                                                   \
  -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,                  \
      -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,             \
      0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f, \
      0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f
constexpr float kNF4Code[16] = {PK_NF4_CODE_VALUES};

// (code[j] + code[j + 1]) / 2 in fp32, j = 0..14; index 15 pads the table to 16
// entries for 16-lane lookups and is never compared against.
#define PK_NF4_MID(j) ((kNF4Code[j] + kNF4Code[(j) + 1]) * 0.5f)
#define PK_NF4_MIDPOINT_VALUES                                                               \
  PK_NF4_MID(0), PK_NF4_MID(1), PK_NF4_MID(2), PK_NF4_MID(3), PK_NF4_MID(4), PK_NF4_MID(5),  \
      PK_NF4_MID(6), PK_NF4_MID(7), PK_NF4_MID(8), PK_NF4_MID(9), PK_NF4_MID(10),            \
      PK_NF4_MID(11), PK_NF4_MID(12), PK_NF4_MID(13), PK_NF4_MID(14), 2.0f
constexpr float kNF4Midpoint[16] = {PK_NF4_MIDPOINT_VALUES};

#if defined(__CUDACC__)
__constant__ const float kNF4CodeDevice[16] = {PK_NF4_CODE_VALUES};
__constant__ const float kNF4MidpointDevice[16] = {PK_NF4_MIDPOINT_VALUES};
#endif
#undef PK_NF4_MIDPOINT_VALUES
#undef PK_NF4_MID
#undef PK_NF4_CODE_VALUES

PK_HD const float* nf4_code_table() {
#if defined(__CUDA_ARCH__)
  return kNF4CodeDevice;
#else
  return kNF4Code;
#endif
}

PK_HD const float* nf4_midpoint_table() {
#if defined(__CUDA_ARCH__)
  return kNF4MidpointDevice;
#else
  return kNF4Midpoint;
#endif
}

PK_HD bool nf4_valid_blocksize(int64_t blocksize) {
  return blocksize >= kNF4MinBlocksize && blocksize <= kNF4MaxBlocksize &&
         (blocksize & (blocksize - 1)) == 0;
}

// Number of absmax entries (blocks) and packed bytes for n elements.
PK_HD int64_t nf4_num_blocks(int64_t n, int64_t blocksize) { return ceil_div(n, blocksize); }
PK_HD int64_t nf4_packed_bytes(int64_t n) { return ceil_div(n, 2); }

// The stored absmax of a block (see the quirk above).
PK_HD float nf4_stored_absmax(float block_max, bool partial_block) {
  return partial_block && !(block_max > kNF4AbsmaxFloor) ? kNF4AbsmaxFloor : block_max;
}

PK_HD float nf4_safe_absmax(float block_max) {
  return block_max > kNF4AbsmaxFloor ? block_max : kNF4AbsmaxFloor;
}

// Code of an already scaled value: how many midpoints lie strictly below it.
PK_HD uint8_t nf4_encode(float scaled) {
  uint8_t code = 0;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int j = 0; j < 15; ++j) code += scaled > nf4_midpoint_table()[j];
  return code;
}

// Decode through `table`, a copy of the code table (CUDA kernels keep one in
// shared memory: lanes index it with different codes, which constant memory
// would serialize).
PK_HD float nf4_decode(const float* table, uint8_t code, float absmax) {
  return table[code] * absmax;
}

PK_HD float nf4_decode(uint8_t code, float absmax) {
  return nf4_decode(nf4_code_table(), code, absmax);
}

PK_HD uint8_t nf4_pack(uint8_t even_code, uint8_t odd_code) {
  return uint8_t((even_code << 4) | odd_code);
}

// Code of element i from the packed bytes.
PK_HD uint8_t nf4_unpack(const uint8_t* packed, int64_t i) {
  const uint8_t byte = packed[i >> 1];
  return (i & 1) ? (byte & 0x0f) : (byte >> 4);
}

}  // namespace pykernels
