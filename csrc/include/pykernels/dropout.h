// Dropout masks from a counter-based hash, defined once for host and device code.
//
// Element (row, col) of a [rows, cols] input is kept or dropped by a pure
// function of (seed, row, col): no mask is stored, the backward regenerates the
// forward's mask exactly, and CPU and CUDA kernels agree bit for bit.
//
//   row key    s = mix(seed_lo ^ mix(seed_hi ^ 0x9e3779b9))
//              a = mix(s ^ row_lo),  b = mix(a ^ row_hi ^ 0x85ebca6b)
//   bits       h = mix(mix(col ^ a) + b)          (32-bit, wrapping)
//   keep       h >= threshold,  threshold = floor(p * 2^32)  (0: keep everything)
//   value      x * scale for a kept element, 0 for a dropped one,
//              scale = (float)(1 / (1 - p)) rounded once from double.
//
// mix is the "lowbias32" integer finalizer (C. Wellons): xor-shift / multiply
// rounds with good avalanche, a bijection on 32 bits, cheap in SIMD (two 32-bit
// multiplies). Two rounds per element, the column entering before both: rows
// differ by their key pair, seeds by the row keys. P(keep) = 1 - threshold/2^32,
// within 2^-32 of 1 - p.
#pragma once
#include "pykernels/common.h"

namespace pykernels {

struct Dropout {
  uint64_t seed = 0;
  uint32_t threshold = 0;  // drop when bits < threshold; 0 keeps every element
  float scale = 1.0f;      // applied to kept elements
  PK_HD bool active() const { return threshold != 0; }
};

// p in [0, 1); the caller checks the range.
PK_HD Dropout make_dropout(double p, uint64_t seed) {
  Dropout d;
  d.seed = seed;
  if (p > 0.0) {
    const double t = p * 4294967296.0;
    d.threshold = t >= 4294967295.0 ? 4294967295u : uint32_t(t);
    d.scale = float(1.0 / (1.0 - p));
  }
  return d;
}

PK_HD uint32_t dropout_mix(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

struct DropoutRow {
  uint32_t a, b;
};

PK_HD DropoutRow dropout_row(uint64_t seed, uint64_t row) {
  const uint32_t s = dropout_mix(uint32_t(seed) ^ dropout_mix(uint32_t(seed >> 32) ^ 0x9e3779b9u));
  const uint32_t a = dropout_mix(s ^ uint32_t(row));
  return {a, dropout_mix(a ^ uint32_t(row >> 32) ^ 0x85ebca6bu)};
}

PK_HD uint32_t dropout_bits(DropoutRow key, uint32_t col) {
  return dropout_mix(dropout_mix(col ^ key.a) + key.b);
}

PK_HD bool dropout_keep(const Dropout& d, DropoutRow key, uint32_t col) {
  return dropout_bits(key, col) >= d.threshold;
}

}  // namespace pykernels
