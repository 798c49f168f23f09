// Native tests of the torch-free IA³ and prompt-tuning kernels: every SIMD path
// this CPU supports gives the scalar path's bits, for every dtype, with and
// without bias and dv, on odd shapes, split into ranges as threads would; the
// forward works in place; the scalar path matches a double-precision evaluation;
// prompt_embed copies the right rows and reports the first bad id. Run by ctest.
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "pykernels/cpu.h"

#include "check.h"

using namespace pykernels;
using cpu::SimdPath;

namespace {

int64_t elem_bytes(DType t) { return t == DType::F32 ? 4 : 2; }

// n elements of dtype, as bytes, filled from rng.
std::vector<uint8_t> random_buffer(DType t, int64_t n, std::mt19937& rng) {
  std::normal_distribution<float> normal;
  std::vector<uint8_t> bytes(size_t(n * elem_bytes(t)));
  for (int64_t i = 0; i < n; ++i) {
    const float v = normal(rng);
    if (t == DType::F32) std::memcpy(bytes.data() + 4 * i, &v, 4);
    else {
      const uint16_t h = t == DType::F16 ? float_to_f16(v) : float_to_bf16(v);
      std::memcpy(bytes.data() + 2 * i, &h, 2);
    }
  }
  return bytes;
}

float get(DType t, const std::vector<uint8_t>& b, int64_t i) {
  if (t == DType::F32) { float v; std::memcpy(&v, b.data() + 4 * i, 4); return v; }
  uint16_t h;
  std::memcpy(&h, b.data() + 2 * i, 2);
  return t == DType::F16 ? f16_to_float(h) : bf16_to_float(h);
}

struct Outputs {
  std::vector<uint8_t> out, dv;
  std::vector<float> dl;
};

// Forward over row ranges of 7, backward over column ranges of 64 (a thread's share).
Outputs run(SimdPath path, DType t, const std::vector<uint8_t>& v, const std::vector<uint8_t>& g,
            const float* bias, const std::vector<float>& l, int64_t rows, int64_t cols,
            bool want_dv) {
  Outputs o{std::vector<uint8_t>(v.size()), std::vector<uint8_t>(want_dv ? v.size() : 0),
            std::vector<float>(size_t(cols))};
  for (int64_t r = 0; r < rows; r += 7)
    cpu::ia3_scale(path, t, v.data(), bias, l.data(), cols, r, std::min(rows, r + 7), o.out.data());
  for (int64_t c = 0; c < cols; c += 64)
    cpu::ia3_scale_backward(path, t, g.data(), v.data(), bias, l.data(), rows, cols, c,
                            std::min(cols, c + 64), want_dv ? o.dv.data() : nullptr, o.dl.data());
  return o;
}

void test_paths_and_math() {
  std::mt19937 rng(1);
  for (DType t : {DType::F32, DType::F16, DType::BF16}) {
    for (auto [rows, cols] : {std::pair<int64_t, int64_t>{1, 1}, {70, 301}, {33, 17}}) {
      const auto v = random_buffer(t, rows * cols, rng), g = random_buffer(t, rows * cols, rng);
      std::vector<float> l(static_cast<size_t>(cols)), bias(static_cast<size_t>(cols));
      std::uniform_real_distribution<float> uniform(0.5f, 1.5f);
      for (auto& x : l) x = uniform(rng);
      for (auto& x : bias) x = uniform(rng) - 1.0f;
      for (const float* b : std::vector<const float*>{nullptr, bias.data()}) {
        for (bool want_dv : {false, true}) {
          const Outputs ref = run(SimdPath::Scalar, t, v, g, b, l, rows, cols, want_dv);
          for (SimdPath p : {SimdPath::AVX2, SimdPath::AVX512}) {
            if (!cpu::simd_path_supported(p)) continue;
            const Outputs o = run(p, t, v, g, b, l, rows, cols, want_dv);
            CHECK(o.out == ref.out && o.dv == ref.dv &&
                      std::memcmp(o.dl.data(), ref.dl.data(), o.dl.size() * 4) == 0,
                  "%s differs from scalar (dtype %d, %lld x %lld)", cpu::simd_path_name(p), int(t),
                  (long long)rows, (long long)cols);
          }
          // The scalar path against double precision.
          const double eps = t == DType::F32 ? 1e-6 : (t == DType::F16 ? 1e-3 : 8e-3);
          for (int64_t j = 0; j < cols; ++j) {
            double dl = 0.0, scale = 0.0;
            for (int64_t r = 0; r < rows; ++r) {
              const double vb = double(get(t, v, r * cols + j)) + (b ? b[j] : 0.0);
              dl += double(get(t, g, r * cols + j)) * vb;
              scale = std::max(scale, std::fabs(double(get(t, g, r * cols + j)) * vb));
              const double out = vb * l[j];
              CHECK(std::fabs(get(t, ref.out, r * cols + j) - out) <= 2 * eps * std::fabs(out) + 1e-30,
                    "out[%lld, %lld]", (long long)r, (long long)j);
            }
            CHECK(std::fabs(ref.dl[size_t(j)] - dl) <= 1e-5 * rows * (scale + 1.0), "dl[%lld]",
                  (long long)j);
          }
        }
      }
      // In place: out may be v.
      auto inplace = v;
      cpu::ia3_scale(SimdPath::Scalar, t, inplace.data(), nullptr, l.data(), cols, 0, rows,
                     inplace.data());
      const Outputs ref = run(SimdPath::Scalar, t, v, g, nullptr, l, rows, cols, false);
      CHECK(inplace == ref.out, "in-place forward differs (dtype %d)", int(t));
    }
  }
}

void test_prompt_embed() {
  const int64_t vocab = 11, dim = 3, n = 2, seq = 4, batch = 2;
  std::vector<float> weight(size_t(vocab * dim)), prompt(size_t(n * dim));
  for (size_t i = 0; i < weight.size(); ++i) weight[i] = float(i);
  for (size_t i = 0; i < prompt.size(); ++i) prompt[i] = -1.0f - float(i);
  std::vector<int64_t> ids = {3, 0, 10, 5, 1, 2, 7, 7};
  std::vector<float> out(size_t(batch * (n + seq) * dim), 99.0f);
  CHECK(cpu::prompt_embed(4, ids.data(), seq, weight.data(), vocab, dim, prompt.data(), n, 0,
                          batch, out.data()) == -1, "no bad id expected");
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t t = 0; t < n + seq; ++t)
      for (int64_t d = 0; d < dim; ++d) {
        const float want = t < n ? prompt[size_t(t * dim + d)]
                                 : weight[size_t(ids[size_t(b * seq + t - n)] * dim + d)];
        CHECK(out[size_t((b * (n + seq) + t) * dim + d)] == want, "out[%lld, %lld, %lld]",
              (long long)b, (long long)t, (long long)d);
      }
  ids[6] = vocab;
  CHECK(cpu::prompt_embed(4, ids.data(), seq, weight.data(), vocab, dim, prompt.data(), n, 0,
                          batch, out.data()) == 6, "first bad id at flat index 6");
  ids[1] = -1;
  CHECK(cpu::prompt_embed(4, ids.data(), seq, weight.data(), vocab, dim, prompt.data(), n, 0,
                          batch, out.data()) == 1, "first bad id at flat index 1");
}

}  // namespace

int main() {
  test_paths_and_math();
  test_prompt_embed();
  if (failures == 0) std::printf("test_ia3: ok\n");
  return failures == 0 ? 0 : 1;
}
