// Native tests of the torch-free NF4 linear kernels (csrc/cpu/nf4_matmul*.cpp):
// on every path this CPU supports, matvec and matvec_t against a double-precision
// product with the weight nf4_dequantize decodes; odd shapes (odd cols, blocks
// spanning rows, blocksize > cols), ranges split at odd places as threads would
// split them, fp32 / fp16 / bf16, plain and double-quantized absmax (which must
// give the bits of plain absmax holding the decoded values); and
// nf4_dequantize_tile equal to the same slice of nf4_dequantize, bit for bit.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "pykernels/blockwise8.h"
#include "pykernels/cpu.h"
#include "pykernels/nf4.h"

#include "check.h"

using namespace pykernels;
using cpu::SimdPath;


static const DType kDTypes[] = {DType::F32, DType::F16, DType::BF16};
static const SimdPath kPaths[] = {SimdPath::Scalar, SimdPath::AVX2, SimdPath::AVX512};

static int64_t size_of(DType d) { return d == DType::F32 ? 4 : 2; }

static float get(DType d, const std::vector<uint8_t>& buf, int64_t i) {
  if (d == DType::F32) {
    float v;
    std::memcpy(&v, &buf[size_t(4 * i)], 4);
    return v;
  }
  uint16_t h;
  std::memcpy(&h, &buf[size_t(2 * i)], 2);
  return d == DType::F16 ? f16_to_float(h) : bf16_to_float(h);
}

static std::vector<uint8_t> random_buffer(DType d, int64_t n, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<uint8_t> buf(size_t(n * size_of(d)));
  for (int64_t i = 0; i < n; ++i) {
    const float v = normal(rng);
    if (d == DType::F32) std::memcpy(&buf[size_t(4 * i)], &v, 4);
    else {
      const uint16_t h = d == DType::F16 ? float_to_f16(v) : float_to_bf16(v);
      std::memcpy(&buf[size_t(2 * i)], &h, 2);
    }
  }
  return buf;
}

// An NF4 weight with both absmax forms: plain holds the decoded double-quant values.
struct Weight {
  int64_t rows, cols, blocksize;
  std::vector<uint8_t> packed, absmax_q;
  std::vector<float> absmax, scale, code, dense;
  cpu::NF4Matrix plain() const {
    cpu::NF4Matrix m;
    m.packed = packed.data();
    m.absmax = absmax.data();
    m.rows = rows, m.cols = cols, m.blocksize = blocksize;
    return m;
  }
  cpu::NF4Matrix double_quant() const {
    cpu::NF4Matrix m = plain();
    m.absmax = nullptr;
    m.absmax_q = absmax_q.data();
    m.absmax_scale = scale.data();
    m.absmax_code = code.data();
    m.absmax_offset = 0.25f;
    return m;
  }
};

static Weight make_weight(int64_t rows, int64_t cols, int64_t blocksize, uint32_t seed) {
  Weight w{rows, cols, blocksize, {}, {}, {}, {}, {}, {}};
  const int64_t n = rows * cols, blocks = nf4_num_blocks(n, blocksize);
  std::mt19937 rng(seed);
  const auto values = random_buffer(DType::F32, n, rng);
  w.packed.resize(size_t(nf4_packed_bytes(n)));
  std::vector<float> raw_absmax(static_cast<size_t>(blocks));
  cpu::nf4_quantize(SimdPath::Scalar, DType::F32, values.data(), n, blocksize, 0, blocks,
                    w.packed.data(), raw_absmax.data());
  // Double quant of absmax - 0.25 with a linear 256-entry code, then decoded.
  for (int i = 0; i < 256; ++i) w.code.push_back(-1.0f + 2.0f * float(i) / 255.0f);
  std::vector<uint8_t> lut(kBlockwise8LutSize);
  cpu::blockwise8_build_lut(w.code.data(), lut.data());
  std::vector<float> centred(raw_absmax);
  for (auto& a : centred) a -= 0.25f;
  const int64_t groups = nf4_num_blocks(blocks, kDoubleQuantBlocksize);
  w.absmax_q.resize(size_t(blocks));
  w.scale.resize(size_t(groups));
  cpu::blockwise8_quantize(centred.data(), blocks, kDoubleQuantBlocksize, lut.data(), 0, groups,
                           w.absmax_q.data(), w.scale.data());
  w.absmax.resize(size_t(blocks));
  cpu::nf4_decode_absmax(w.double_quant(), 0, blocks, w.absmax.data());
  w.dense.resize(size_t(n));
  cpu::nf4_dequantize(SimdPath::Scalar, DType::F32, w.packed.data(), w.absmax.data(), n,
                      blocksize, 0, blocks, w.dense.data());
  return w;
}

// |got - want| within what fp32 accumulation plus one rounding to dtype allows;
// weight_unit: each weight's own rounding where the kernel rounds the code values
// (the bf16 dot kernel: 2^-9 of a weight, as a bf16 dequantize rounds it).
static bool close(DType d, float got, double want, double magnitude, double weight_unit = 0.0) {
  const double unit = d == DType::F32 ? 0.0 : (d == DType::F16 ? 1.0 / 1024 : 1.0 / 128);
  return std::fabs(double(got) - want) <=
         (1e-5 + weight_unit) * magnitude + unit * std::fabs(want) + 1e-30;
}

static void test_matvec(const Weight& w, int64_t tokens, DType d) {
  std::mt19937 rng(uint32_t(tokens * 131 + w.cols));
  const auto x = random_buffer(d, tokens * w.cols, rng);
  const auto bias = random_buffer(d, w.rows, rng);
  std::vector<float> x_packed(size_t(cpu::nf4_matvec_x_size(tokens, w.cols)));
  std::vector<uint8_t> first;
  for (SimdPath path : kPaths) {
    if (!cpu::simd_path_supported(path)) continue;
    cpu::nf4_matvec_pack_x(path, d, w.plain(), x.data(), tokens, x_packed.data());
    const bool bf16_dots = cpu::nf4_matvec_bf16_dots(path, d, w.plain());
    for (int quant = 0; quant < 2; ++quant) {
      const cpu::NF4Matrix m = quant ? w.double_quant() : w.plain();
      std::vector<uint8_t> y(size_t(tokens * w.rows * size_of(d)));
      const int64_t mid = w.rows / 3;  // two ranges, as two threads
      cpu::nf4_matvec(path, d, m, x_packed.data(), tokens, 0, mid, bias.data(), y.data());
      cpu::nf4_matvec(path, d, m, x_packed.data(), tokens, mid, w.rows, bias.data(), y.data());
      if (quant == 0) first = y;
      else CHECK(first == y, "matvec %s: double quant differs from its decoded absmax", cpu::simd_path_name(path));
      for (int64_t t = 0; t < tokens; ++t)
        for (int64_t j = 0; j < w.rows; ++j) {
          double want = get(d, bias, j), magnitude = std::fabs(want);
          for (int64_t i = 0; i < w.cols; ++i) {
            const double p = double(get(d, x, t * w.cols + i)) * w.dense[size_t(j * w.cols + i)];
            want += p;
            magnitude += std::fabs(p);
          }
          const float got = get(d, y, t * w.rows + j);
          CHECK(close(d, got, want, magnitude, bf16_dots ? 1.0 / 512 : 0.0),
                "matvec %s %lldx%lld bs %lld T %lld dtype %d: y[%lld,%lld] %g vs %g",
                cpu::simd_path_name(path), (long long)w.rows, (long long)w.cols, (long long)w.blocksize,
                (long long)tokens, int(d), (long long)t, (long long)j, got, want);
        }
    }
  }
}

static void test_matvec_t(const Weight& w, int64_t tokens, DType d) {
  std::mt19937 rng(uint32_t(tokens * 17 + w.rows));
  const auto dy = random_buffer(DType::F32, tokens * w.rows, rng);
  std::vector<float> dy_t(size_t(tokens * w.rows));
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t j = 0; j < w.rows; ++j) dy_t[size_t(j * tokens + t)] = get(DType::F32, dy, t * w.rows + j);
  std::vector<uint8_t> first;
  for (SimdPath path : kPaths) {
    if (!cpu::simd_path_supported(path)) continue;
    for (int quant = 0; quant < 2; ++quant) {
      const cpu::NF4Matrix m = quant ? w.double_quant() : w.plain();
      std::vector<uint8_t> dx(size_t(tokens * w.cols * size_of(d)));
      const int64_t mid = w.cols / 2 | 1;  // an odd split: the second range starts on an odd column
      cpu::nf4_matvec_t(path, d, m, dy_t.data(), tokens, 0, std::min(mid, w.cols), dx.data());
      cpu::nf4_matvec_t(path, d, m, dy_t.data(), tokens, std::min(mid, w.cols), w.cols, dx.data());
      if (quant == 0) first = dx;
      else CHECK(first == dx, "matvec_t %s: double quant differs from its decoded absmax", cpu::simd_path_name(path));
      for (int64_t t = 0; t < tokens; ++t)
        for (int64_t i = 0; i < w.cols; ++i) {
          double want = 0, magnitude = 0;
          for (int64_t j = 0; j < w.rows; ++j) {
            const double p = double(dy_t[size_t(j * tokens + t)]) * w.dense[size_t(j * w.cols + i)];
            want += p;
            magnitude += std::fabs(p);
          }
          const float got = get(d, dx, t * w.cols + i);
          CHECK(close(d, got, want, magnitude), "matvec_t %s %lldx%lld bs %lld T %lld dtype %d: dx[%lld,%lld] %g vs %g",
                cpu::simd_path_name(path), (long long)w.rows, (long long)w.cols, (long long)w.blocksize,
                (long long)tokens, int(d), (long long)t, (long long)i, got, want);
        }
    }
  }
}

static void test_tile(const Weight& w, DType d) {
  const int64_t n = w.rows * w.cols;
  std::vector<uint8_t> full(size_t(n * size_of(d)));
  cpu::nf4_dequantize(SimdPath::Scalar, d, w.packed.data(), w.absmax.data(), n, w.blocksize, 0,
                      nf4_num_blocks(n, w.blocksize), full.data());
  const int64_t r0 = w.rows / 3, r1 = w.rows;
  const int64_t col_ranges[][2] = {{0, w.cols}, {w.cols / 5, w.cols}, {1, w.cols / 2 + 33}, {w.cols / 3, w.cols / 3}};
  for (SimdPath path : kPaths) {
    if (!cpu::simd_path_supported(path)) continue;
    for (int quant = 0; quant < 2; ++quant)
      for (const auto& cr : col_ranges) {
        const int64_t c0 = std::min(cr[0], w.cols), c1 = std::min(cr[1], w.cols), width = c1 - c0;
        std::vector<uint8_t> tile(size_t((r1 - r0) * width * size_of(d)));
        cpu::nf4_dequantize_tile(path, d, quant ? w.double_quant() : w.plain(), r0, r1, c0, c1, tile.data());
        bool same = true;
        for (int64_t j = r0; j < r1; ++j)
          same &= std::memcmp(&tile[size_t((j - r0) * width * size_of(d))],
                              &full[size_t((j * w.cols + c0) * size_of(d))], size_t(width * size_of(d))) == 0;
        CHECK(same, "tile %s %lldx%lld bs %lld cols [%lld, %lld) dtype %d differs from nf4_dequantize",
              cpu::simd_path_name(path), (long long)w.rows, (long long)w.cols, (long long)w.blocksize,
              (long long)c0, (long long)c1, int(d));
      }
  }
}

int main() {
  // (rows, cols, blocksize): aligned; odd cols; blocks spanning rows; blocksize > cols; tiny;
  // rows of 64 blocks and more (the AVX-512 double-quant decoder's 64-block step), their
  // starts off the 256-block groups of the double quant.
  const int64_t shapes[][3] = {{37, 256, 64}, {23, 577, 64}, {19, 193, 32}, {13, 100, 64},
                               {9, 96, 4096}, {5, 4096, 4096}, {3, 1, 64}, {6, 31, 32},
                               {2, 320, 128}, {9, 4160, 64}, {3, 8224, 32}};
  const int64_t token_counts[] = {1, 2, 3, 5, 8, 9, 16, 17};
  uint32_t seed = 1;
  for (const auto& s : shapes) {
    const Weight w = make_weight(s[0], s[1], s[2], seed++);
    for (DType d : kDTypes) {
      test_tile(w, d);
      for (int64_t tokens : token_counts) {
        test_matvec(w, tokens, d);
        test_matvec_t(w, tokens, d);
      }
    }
  }
  std::printf("%s (%d failures)\n", failures ? "FAILED" : "passed", failures);
  return failures ? 1 : 0;
}
