// 8-bit blockwise quantization with a 256-entry code table: the format of
// bitsandbytes' double quantization, which stores NF4's per-block absmax as
// 8-bit codes (blocks of 256) plus one fp32 absmax per 256 and a global offset.
//
// Semantics follow bitsandbytes 0.50's CPU quantizer bit for bit, which maps a
// scaled value to a code through a 65536-entry lookup table over [-1, 1]:
//   absmax = max |x| over the block; an all-zero block stores absmax 0, codes 0;
//   v      = clamp(x * (1 / absmax), -1, 1)
//   i      = uint16((v + 1) * 0.5 * 65535 + 0.5)
//   code   = lut[i], lut[i] = number of midpoints (c[j] + c[j+1]) * 0.5 strictly
//            below -1 + 2i / 65535.
// Decode: c[code] * absmax (+ offset for double quantization), in fp32.
// Every product and sum is rounded separately (no fused multiply-add), so the
// host and the device agree with the peer to the bit.
#pragma once
#include "pykernels/common.h"

namespace pykernels {

constexpr int64_t kDoubleQuantBlocksize = 256;
constexpr int64_t kBlockwise8LutSize = 65536;

PK_HD uint16_t blockwise8_lut_index(float scaled) {
  const float v = scaled < -1.0f ? -1.0f : (scaled > 1.0f ? 1.0f : scaled);
  return uint16_t(add_rn(mul_rn(mul_rn(add_rn(v, 1.0f), 0.5f), 65535.0f), 0.5f));
}

// Value at the centre of lut bin i.
PK_HD float blockwise8_lut_value(int64_t i) {
  return add_rn(-1.0f, div_rn(2.0f * float(i), 65535.0f));
}

PK_HD float blockwise8_midpoint(const float* code, int j) {
  return mul_rn(0.5f, add_rn(code[j], code[j + 1]));
}

PK_HD float blockwise8_decode(const float* code, uint8_t q, float absmax, float offset) {
  return add_rn(mul_rn(code[q], absmax), offset);
}

}  // namespace pykernels
