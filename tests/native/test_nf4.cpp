// Native tests of the torch-free NF4 kernels: every SIMD path this CPU supports
// must give the scalar path's bytes exactly, for every dtype, blocksize and the
// awkward inputs (partial blocks, odd counts, zero blocks, values on midpoints,
// NaN/Inf detection). Run by ctest.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "pykernels/blockwise8.h"
#include "pykernels/cpu.h"
#include "pykernels/nf4.h"

#include "check.h"

using namespace pykernels;
using cpu::SimdPath;


// Input of n elements in dtype: normal values, an all-zero block, values that
// land exactly on NF4 midpoints once scaled.
static std::vector<uint16_t> make_input(DType dtype, int64_t n, int64_t blocksize, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> values(static_cast<size_t>(n));
  for (auto& v : values) v = normal(rng);
  if (n > 2 * blocksize)
    for (int64_t i = blocksize; i < 2 * blocksize; ++i) values[size_t(i)] = 0.0f;
  for (int64_t j = 0; j < 15 && j + 1 < n; ++j) values[size_t(j + 1)] = kNF4Midpoint[j];
  if (n > 0) values[0] = 1.0f;  // block 0's absmax is 1: the midpoints stay exact
  std::vector<uint16_t> storage(size_t(n) * (dtype == DType::F32 ? 2 : 1));
  for (int64_t i = 0; i < n; ++i) {
    if (dtype == DType::F32) std::memcpy(&storage[size_t(2 * i)], &values[size_t(i)], 4);
    else if (dtype == DType::F16) storage[size_t(i)] = float_to_f16(values[size_t(i)]);
    else storage[size_t(i)] = float_to_bf16(values[size_t(i)]);
  }
  return storage;
}

static void test_paths_agree() {
  const DType dtypes[] = {DType::F32, DType::F16, DType::BF16};
  const int64_t sizes[] = {1, 2, 31, 64, 65, 127, 1000, 4097, 64 * 70 + 33};
  const int64_t blocksizes[] = {32, 64, 128, 256, 4096};
  for (DType dtype : dtypes)
    for (int64_t blocksize : blocksizes)
      for (int64_t n : sizes) {
        const auto x = make_input(dtype, n, blocksize, uint32_t(n * 7 + blocksize));
        const int64_t blocks = nf4_num_blocks(n, blocksize);
        const int64_t bytes = nf4_packed_bytes(n);
        std::vector<uint8_t> ref_packed(static_cast<size_t>(bytes));
        std::vector<float> ref_absmax(static_cast<size_t>(blocks));
        CHECK(cpu::nf4_quantize(SimdPath::Scalar, dtype, x.data(), n, blocksize, 0, blocks,
                                ref_packed.data(), ref_absmax.data()) == -1,
              "finite input reported bad");
        const size_t out_bytes = size_t(n) * (dtype == DType::F32 ? 4 : 2);
        std::vector<uint8_t> ref_out(out_bytes);
        cpu::nf4_dequantize(SimdPath::Scalar, dtype, ref_packed.data(), ref_absmax.data(), n,
                            blocksize, 0, blocks, ref_out.data());
        for (SimdPath path : {SimdPath::AVX2, SimdPath::AVX512}) {
          if (!cpu::simd_path_supported(path)) continue;
          std::vector<uint8_t> packed(static_cast<size_t>(bytes));
          std::vector<float> absmax(static_cast<size_t>(blocks));
          // Two halves, as two threads would run them.
          const int64_t mid = blocks / 2;
          cpu::nf4_quantize(path, dtype, x.data(), n, blocksize, 0, mid, packed.data(), absmax.data());
          cpu::nf4_quantize(path, dtype, x.data(), n, blocksize, mid, blocks, packed.data(), absmax.data());
          CHECK(packed == ref_packed, "%s packed differs: dtype %d n %lld bs %lld",
                cpu::simd_path_name(path), int(dtype), (long long)n, (long long)blocksize);
          CHECK(std::memcmp(absmax.data(), ref_absmax.data(), absmax.size() * 4) == 0,
                "%s absmax differs", cpu::simd_path_name(path));
          std::vector<uint8_t> out(out_bytes);
          cpu::nf4_dequantize(path, dtype, ref_packed.data(), ref_absmax.data(), n, blocksize, 0,
                              blocks, out.data());
          CHECK(out == ref_out, "%s dequantized values differ: dtype %d n %lld bs %lld",
                cpu::simd_path_name(path), int(dtype), (long long)n, (long long)blocksize);
        }
      }
}

static void test_zero_block_and_midpoints() {
  std::vector<float> x(128, 0.0f);
  x[64] = 1.0f;
  for (int j = 0; j < 15; ++j) x[size_t(65 + j)] = kNF4Midpoint[j];
  std::vector<uint8_t> packed(64);
  std::vector<float> absmax(2);
  cpu::nf4_quantize(SimdPath::Scalar, DType::F32, x.data(), 128, 64, 0, 2, packed.data(), absmax.data());
  CHECK(absmax[0] == 0.0f, "zero block absmax %g", absmax[0]);
  for (int i = 0; i < 32; ++i) CHECK(packed[size_t(i)] == 0x77, "zero block byte %d = %d", i, packed[size_t(i)]);
  for (int j = 0; j < 15; ++j)  // on a midpoint: the lower code
    CHECK(nf4_unpack(packed.data(), 65 + j) == j, "midpoint %d coded %d", j, nf4_unpack(packed.data(), 65 + j));
  std::vector<float> out(128, -1.0f);
  cpu::nf4_dequantize(SimdPath::Scalar, DType::F32, packed.data(), absmax.data(), 128, 64, 0, 2, out.data());
  for (int i = 0; i < 64; ++i) CHECK(out[size_t(i)] == 0.0f && !std::signbit(out[size_t(i)]), "zero block decodes to %g", out[size_t(i)]);
}

static void test_not_finite_detected() {
  for (SimdPath path : {SimdPath::Scalar, SimdPath::AVX2, SimdPath::AVX512}) {
    if (!cpu::simd_path_supported(path)) continue;
    for (float bad : {NAN, INFINITY, -INFINITY}) {
      std::vector<float> x(300, 0.5f);
      x[200] = bad;
      std::vector<uint8_t> packed(150);
      std::vector<float> absmax(5);
      const int64_t first_bad = cpu::nf4_quantize(path, DType::F32, x.data(), 300, 64, 0, 5, packed.data(), absmax.data());
      CHECK(first_bad == 3, "%s: bad value in block 3 reported as %lld", cpu::simd_path_name(path), (long long)first_bad);
    }
  }
}

// Blocks whose decoded values are subnormal: every path must round them as the
// scalar path does (AVX512-BF16's conversion would flush them to zero).
static void test_subnormal_blocks_decode_alike() {
  const int64_t n = 64 * 8;
  std::vector<float> x(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) x[size_t(i)] = std::ldexp(float(i % 17) - 8.0f, -130 + int(i / 64));
  std::vector<uint8_t> packed(static_cast<size_t>(n / 2));
  std::vector<float> absmax(8);
  cpu::nf4_quantize(SimdPath::Scalar, DType::F32, x.data(), n, 64, 0, 8, packed.data(), absmax.data());
  for (DType dtype : {DType::BF16, DType::F16, DType::F32}) {
    std::vector<uint8_t> ref(static_cast<size_t>(n * 4)), out(static_cast<size_t>(n * 4));
    cpu::nf4_dequantize(SimdPath::Scalar, dtype, packed.data(), absmax.data(), n, 64, 0, 8, ref.data());
    for (SimdPath path : {SimdPath::AVX2, SimdPath::AVX512}) {
      if (!cpu::simd_path_supported(path)) continue;
      cpu::nf4_dequantize(path, dtype, packed.data(), absmax.data(), n, 64, 0, 8, out.data());
      CHECK(out == ref, "%s: subnormal blocks decode differently, dtype %d", cpu::simd_path_name(path), int(dtype));
    }
  }
}

static void test_half_conversions() {
  // Every fp16 / bf16 bit pattern round-trips through float.
  for (uint32_t h = 0; h < 65536; ++h) {
    const uint16_t bits = uint16_t(h);
    const bool f16_nan = (bits & 0x7c00) == 0x7c00 && (bits & 0x3ff);
    if (!f16_nan) CHECK(float_to_f16(f16_to_float(bits)) == bits, "f16 %04x", h);
    const bool bf16_nan = (bits & 0x7f80) == 0x7f80 && (bits & 0x7f);
    if (!bf16_nan) CHECK(float_to_bf16(bf16_to_float(bits)) == bits, "bf16 %04x", h);
  }
  CHECK(float_to_f16(65520.0f) == 0x7c00, "65520 -> inf");
  CHECK(float_to_f16(65519.0f) == 0x7bff, "65519 -> max half");
  CHECK(float_to_f16(2.9802322387695312e-08f) == 0, "2^-25 ties to zero");
  CHECK(float_to_bf16(1.00390625f) == 0x3f80, "tie to even, down");
  CHECK(float_to_bf16(1.01171875f) == 0x3f82, "tie to even, up");
}

static void test_blockwise8_roundtrip() {
  std::vector<float> code(256);
  for (int i = 0; i < 256; ++i) code[size_t(i)] = -1.0f + 2.0f * float(i) / 255.0f;  // any sorted table
  std::vector<uint8_t> lut(kBlockwise8LutSize);
  cpu::blockwise8_build_lut(code.data(), lut.data());
  std::vector<float> x(600);
  for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(float(i)) * 3.0f;
  for (size_t i = 256; i < 512; ++i) x[i] = 0.0f;
  std::vector<uint8_t> q(600);
  std::vector<float> absmax(3), out(600);
  cpu::blockwise8_quantize(x.data(), 600, 256, lut.data(), 0, 3, q.data(), absmax.data());
  cpu::blockwise8_dequantize(q.data(), absmax.data(), code.data(), 0.0f, 600, 256, 0, 3, out.data());
  for (size_t i = 0; i < x.size(); ++i) {
    const float step = absmax[i / 256] * 2.0f / 255.0f;
    CHECK(std::fabs(out[i] - x[i]) <= step * 0.51f + 1e-6f, "blockwise8 error at %zu: %g vs %g", i, out[i], x[i]);
  }
}

// Values a few ulps around every midpoint and every 1/16 step of [-1, 1] (the
// AVX-512 encoder's cell edges), plus a fine sweep: every path codes them as the
// scalar path does. Each block starts with 1.0, so the values are scaled by 1.
static void test_encode_near_edges() {
  std::vector<float> edges(kNF4Midpoint, kNF4Midpoint + 15);
  for (int c = 0; c <= 32; ++c) edges.push_back(-1.0f + float(c) / 16.0f);
  std::vector<float> values;
  for (float edge : edges) {
    float below = edge, above = edge;
    for (int step = 0; step < 8; ++step) {
      values.push_back(below);
      values.push_back(above);
      below = std::nextafter(below, -2.0f);
      above = std::nextafter(above, 2.0f);
    }
  }
  for (int i = 0; i <= 100000; ++i) values.push_back(-1.0f + 2.0f * float(i) / 100000.0f);
  const int64_t blocksize = 256;
  std::vector<float> x;
  for (size_t i = 0; i < values.size(); ++i) {
    if (x.size() % blocksize == 0) x.push_back(1.0f);
    x.push_back(std::fmin(1.0f, std::fmax(-1.0f, values[i])));
  }
  const int64_t n = int64_t(x.size()), blocks = nf4_num_blocks(n, blocksize);
  std::vector<uint8_t> ref(size_t(nf4_packed_bytes(n))), packed(ref.size());
  std::vector<float> absmax(static_cast<size_t>(blocks));
  cpu::nf4_quantize(SimdPath::Scalar, DType::F32, x.data(), n, blocksize, 0, blocks, ref.data(), absmax.data());
  for (SimdPath path : {SimdPath::AVX2, SimdPath::AVX512}) {
    if (!cpu::simd_path_supported(path)) continue;
    cpu::nf4_quantize(path, DType::F32, x.data(), n, blocksize, 0, blocks, packed.data(), absmax.data());
    for (int64_t i = 0; i < n; ++i)
      CHECK(nf4_unpack(packed.data(), i) == nf4_unpack(ref.data(), i), "%s codes %.9g as %d, scalar as %d",
            cpu::simd_path_name(path), x[size_t(i)], nf4_unpack(packed.data(), i), nf4_unpack(ref.data(), i));
  }
}

int main() {
  test_half_conversions();
  test_zero_block_and_midpoints();
  test_not_finite_detected();
  test_paths_agree();
  test_encode_near_edges();
  test_subnormal_blocks_decode_alike();
  test_blockwise8_roundtrip();
  std::printf("simd paths:");
  for (SimdPath path : {SimdPath::Scalar, SimdPath::AVX2, SimdPath::AVX512})
    if (cpu::simd_path_supported(path)) std::printf(" %s", cpu::simd_path_name(path));
  std::printf("\n%s (%d failures)\n", failures ? "FAILED" : "passed", failures);
  return failures ? 1 : 0;
}
