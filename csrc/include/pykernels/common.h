// Shared by every torch-free kernel, host and device: the float formats the
// kernels read and write, and the conversions between them.
//
// Conversions round to nearest, ties to even, like torch's .to(dtype); they are
// written with integer operations so the scalar path, the SIMD paths and the CUDA
// kernels produce the same bits on every machine.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define PK_HD __host__ __device__ __forceinline__
#else
#define PK_HD inline
#endif

namespace pykernels {

// Element type of a float buffer, as the kernels see it.
enum class DType : int32_t { F32 = 0, F16 = 1, BF16 = 2 };

PK_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}

PK_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
#endif
}

PK_HD float bf16_to_float(uint16_t h) { return bits_float(uint32_t(h) << 16); }

PK_HD uint16_t float_to_bf16(float x) {
  uint32_t u = float_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

PK_HD float f16_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1f) return bits_float(sign | 0x7f800000u | (mantissa << 13));
  if (exponent != 0) return bits_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
  if (mantissa == 0) return bits_float(sign);
  // Subnormal half: mantissa * 2^-24, exact in fp32.
  const float magnitude = float(mantissa) * 5.9604644775390625e-8f;
  return sign ? -magnitude : magnitude;
}

PK_HD uint16_t float_to_f16(float x) {
  const uint32_t u = float_bits(x);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint16_t(sign | 0x7e00u);  // NaN
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (a < 0x38800000u) {                                   // below 2^-14: half subnormal
    if (a <= 0x33000000u) return sign;                     // <= 2^-25 rounds to zero
    const uint32_t exponent = a >> 23;
    const uint32_t mantissa = (a & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - exponent;                // 14..24
    uint32_t r = mantissa >> shift;
    const uint32_t rest = mantissa & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1u);
    if (rest > half || (rest == half && (r & 1u))) ++r;
    return uint16_t(sign | r);
  }
  uint32_t r = a - 0x38000000u;  // rebias exponent 127 -> 15
  r += 0xfffu + ((r >> 13) & 1u);
  return uint16_t(sign | (r >> 13));
}

PK_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// fp32 arithmetic rounded once per operation, never fused into an FMA nor
// replaced by an approximation: where the format's bits depend on it (scaling,
// bnb's LUT index, double-quant decode) host and device use these.
PK_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;  // the CPU sources build with -ffp-contract=off
#endif
}

PK_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

PK_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

template <DType D> struct Storage;
template <> struct Storage<DType::F32> { using type = float; };
template <> struct Storage<DType::F16> { using type = uint16_t; };
template <> struct Storage<DType::BF16> { using type = uint16_t; };

template <DType D> PK_HD float load_as_float(const typename Storage<D>::type* p, int64_t i) {
  if constexpr (D == DType::F32) return p[i];
  else if constexpr (D == DType::F16) return f16_to_float(p[i]);
  else return bf16_to_float(p[i]);
}

template <DType D> PK_HD void store_from_float(typename Storage<D>::type* p, int64_t i, float v) {
  if constexpr (D == DType::F32) p[i] = v;
  else if constexpr (D == DType::F16) p[i] = float_to_f16(v);
  else p[i] = float_to_bf16(v);
}

}  // namespace pykernels
