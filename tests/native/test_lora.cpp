// Native tests of the torch-free LoRA kernels: every SIMD path this CPU supports
// gives the scalar path's bits exactly, for every dtype, odd shapes, ranks above
// the 64-rank chunk, with and without dropout, split into ranges as threads
// would; the scalar path matches a double-precision evaluation of the math; the
// dropout mask has the right keep rate and does not depend on the split; merge
// then unmerge restores an fp32 weight to within 1 ulp of the merged value.
// Run by ctest.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <utility>
#include <vector>

#include "pykernels/cpu.h"
#include "pykernels/dropout.h"

#include "check.h"

using namespace pykernels;
using cpu::SimdPath;


// n elements of one dtype, as raw bytes.
struct Buffer {
  DType dtype;
  std::vector<uint8_t> bytes;
  Buffer(DType t, int64_t n) : dtype(t), bytes(size_t(n) * (t == DType::F32 ? 4 : 2)) {}
  void* data() { return bytes.data(); }
  const void* data() const { return bytes.data(); }
  uint16_t* words() { return reinterpret_cast<uint16_t*>(bytes.data()); }  // 16-bit dtypes
  const uint16_t* words() const { return reinterpret_cast<const uint16_t*>(bytes.data()); }
  float get(int64_t i) const {
    if (dtype == DType::F32) return reinterpret_cast<const float*>(bytes.data())[i];
    const uint16_t h = reinterpret_cast<const uint16_t*>(bytes.data())[i];
    return dtype == DType::F16 ? f16_to_float(h) : bf16_to_float(h);
  }
  void set(int64_t i, float v) {
    if (dtype == DType::F32) reinterpret_cast<float*>(bytes.data())[i] = v;
    else reinterpret_cast<uint16_t*>(bytes.data())[i] = dtype == DType::F16 ? float_to_f16(v)
                                                                               : float_to_bf16(v);
  }
};

static Buffer random_buffer(DType dtype, int64_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, scale);
  Buffer b(dtype, n);
  for (int64_t i = 0; i < n; ++i) b.set(i, normal(rng));
  return b;
}

static const char* name(DType t) {
  return t == DType::F32 ? "f32" : t == DType::F16 ? "f16" : "bf16";
}

struct Shape {
  int64_t rows, cols, rank;
};

// Every kernel on one shape: SIMD paths equal the scalar path bit for bit, and
// the scalar path is close to the math done in double.
static void test_shape(DType dtype, Shape s, double p, uint64_t seed) {
  const Dropout d = make_dropout(p, seed);
  const Buffer x = random_buffer(dtype, s.rows * s.cols, uint32_t(s.rows * 31 + s.cols));
  const Buffer a = random_buffer(dtype, s.rank * s.cols, uint32_t(s.rank * 7 + 1), 0.1f);
  std::vector<float> g(size_t(s.rows * s.rank));
  std::mt19937 rng(uint32_t(s.cols));
  std::normal_distribution<float> normal;
  for (auto& v : g) v = normal(rng);
  const Buffer out0 = random_buffer(dtype, s.rows * s.cols, 99);

  auto run = [&](SimdPath path, Buffer& xa, Buffer& ga, Buffer& dx) {
    // Two ranges, as two threads would run them.
    const int64_t rows[3] = {0, s.rows / 2, s.rows}, cols[3] = {0, s.cols / 3, s.cols};
    for (int half = 0; half < 2; ++half) {
      cpu::lora_x_at(path, dtype, x.data(), a.data(), s.cols, s.rank, d, rows[half],
                     rows[half + 1], xa.data());
      cpu::lora_gt_x(path, dtype, g.data(), x.data(), s.rows, s.cols, s.rank, d, cols[half],
                     cols[half + 1], ga.data());
      cpu::lora_add_g_a(path, dtype, g.data(), a.data(), s.cols, s.rank, d.scale, d, rows[half],
                        rows[half + 1], dx.data());
    }
  };
  Buffer xa_ref(dtype, s.rows * s.rank), ga_ref(dtype, s.rank * s.cols), dx_ref = out0;
  run(SimdPath::Scalar, xa_ref, ga_ref, dx_ref);

  for (SimdPath path : {SimdPath::AVX2, SimdPath::AVX512}) {
    if (!cpu::simd_path_supported(path)) continue;
    Buffer xa(dtype, s.rows * s.rank), ga(dtype, s.rank * s.cols), dx = out0;
    run(path, xa, ga, dx);
    const char* pn = cpu::simd_path_name(path);
    CHECK(xa.bytes == xa_ref.bytes, "%s x_at %s %lldx%lld r%lld p%g", pn, name(dtype),
          (long long)s.rows, (long long)s.cols, (long long)s.rank, p);
    CHECK(ga.bytes == ga_ref.bytes, "%s gt_x %s %lldx%lld r%lld p%g", pn, name(dtype),
          (long long)s.rows, (long long)s.cols, (long long)s.rank, p);
    CHECK(dx.bytes == dx_ref.bytes, "%s add_g_a %s %lldx%lld r%lld p%g", pn, name(dtype),
          (long long)s.rows, (long long)s.cols, (long long)s.rank, p);
  }

  // The math in double, from the same inputs and mask.
  std::vector<uint8_t> keep(size_t(s.rows * s.cols));
  cpu::dropout_keep_mask(d, s.cols, 0, s.rows, keep.data());
  auto dropped = [&](int64_t t, int64_t i) {
    return keep[size_t(t * s.cols + i)] ? double(x.get(t * s.cols + i)) * d.scale : 0.0;
  };
  const double tol = dtype == DType::F32 ? 1e-4 : dtype == DType::F16 ? 2e-3 : 1e-2;
  double worst = 0;
  for (int64_t t = 0; t < s.rows; ++t)
    for (int64_t k = 0; k < s.rank; ++k) {
      double sum = 0, size = 0;
      for (int64_t i = 0; i < s.cols; ++i) {
        sum += dropped(t, i) * a.get(k * s.cols + i);
        size += std::fabs(dropped(t, i) * a.get(k * s.cols + i));
      }
      worst = std::fmax(worst, std::fabs(xa_ref.get(t * s.rank + k) - sum) / (size + 1e-30));
    }
  for (int64_t k = 0; k < s.rank; ++k)
    for (int64_t i = 0; i < s.cols; ++i) {
      double sum = 0, size = 0;
      for (int64_t t = 0; t < s.rows; ++t) {
        sum += g[size_t(t * s.rank + k)] * dropped(t, i);
        size += std::fabs(g[size_t(t * s.rank + k)] * dropped(t, i));
      }
      worst = std::fmax(worst, std::fabs(ga_ref.get(k * s.cols + i) - sum) / (size + 1e-30));
    }
  for (int64_t t = 0; t < s.rows; ++t)
    for (int64_t i = 0; i < s.cols; ++i) {
      double sum = 0, size = 0;
      for (int64_t k = 0; k < s.rank; ++k) {
        sum += double(g[size_t(t * s.rank + k)]) * a.get(k * s.cols + i);
        size += std::fabs(double(g[size_t(t * s.rank + k)]) * a.get(k * s.cols + i));
      }
      const double added = keep[size_t(t * s.cols + i)] ? double(d.scale) * sum : 0.0;
      const double want = out0.get(t * s.cols + i) + added;
      const double mag = std::fabs(out0.get(t * s.cols + i)) + double(d.scale) * size;
      worst = std::fmax(worst, std::fabs(dx_ref.get(t * s.cols + i) - want) / (mag + 1e-30));
    }
  CHECK(worst < tol, "scalar vs double %s %lldx%lld r%lld p%g: relative error %g", name(dtype),
        (long long)s.rows, (long long)s.cols, (long long)s.rank, p, worst);
}

static void test_paths_agree() {
  const Shape shapes[] = {{1, 1, 1},    {3, 17, 1},   {5, 577, 64}, {7, 193, 3},
                          {9, 300, 70}, {70, 33, 16}, {66, 1000, 5}, {4, 256, 8}};
  for (DType dtype : {DType::F32, DType::F16, DType::BF16})
    for (const Shape& s : shapes)
      for (double p : {0.0, 0.1, 0.5}) test_shape(dtype, s, p, 1234567890123ull + uint64_t(s.cols));
}

static void test_dropout_mask() {
  const int64_t rows = 500, cols = 2000;
  const size_t count = size_t(rows * cols);
  std::vector<uint8_t> keep(count), split(count), other(count);
  for (double p : {0.05, 0.1, 0.5, 0.9}) {
    const Dropout d = make_dropout(p, 42);
    cpu::dropout_keep_mask(d, cols, 0, rows, keep.data());
    cpu::dropout_keep_mask(d, cols, 0, 123, split.data());
    cpu::dropout_keep_mask(d, cols, 123, rows, split.data() + 123 * cols);
    CHECK(keep == split, "mask depends on the row split, p %g", p);
    double kept = 0, same_as_next = 0;
    for (size_t i = 0; i < count; ++i) {
      kept += keep[i];
      if (i + 1 < count) same_as_next += keep[i] == keep[i + 1];
    }
    const double n = double(count), rate = kept / n, sigma = std::sqrt(p * (1 - p) / n);
    CHECK(std::fabs(rate - (1 - p)) < 5 * sigma, "keep rate %g for p %g", rate, p);
    // Neighbours agree as often as independent draws would: p^2 + (1-p)^2.
    const double agree = same_as_next / (n - 1), want = p * p + (1 - p) * (1 - p);
    CHECK(std::fabs(agree - want) < 0.005, "neighbour agreement %g, want %g, p %g", agree, want, p);
    cpu::dropout_keep_mask(make_dropout(p, 43), cols, 0, rows, other.data());
    double both = 0;
    for (size_t i = 0; i < count; ++i) both += keep[i] && other[i];
    CHECK(std::fabs(both / n - (1 - p) * (1 - p)) < 0.005, "seeds 42 and 43 correlate, p %g", p);
  }
  const Dropout none = make_dropout(0.0, 42);
  CHECK(!none.active() && none.scale == 1.0f, "p = 0 must keep everything unscaled");
  cpu::dropout_keep_mask(none, cols, 0, rows, keep.data());
  for (uint8_t k : keep) CHECK(k == 1, "p = 0 dropped an element");
  CHECK(make_dropout(0.5, 1).scale == 2.0f, "scale of p = 0.5");
  // Rows past 2^32 get their own keys.
  const DropoutRow low = dropout_row(7, 5), high = dropout_row(7, (1ull << 32) + 5);
  CHECK(low.a != high.a || low.b != high.b, "rows 5 and 2^32 + 5 share a key");
}

static void test_merge_unmerge_fp32() {
  const int64_t out = 67, in = 301, rank = 8;
  Buffer w = random_buffer(DType::F32, out * in, 5);
  const Buffer a = random_buffer(DType::F32, rank * in, 6, 0.1f);
  std::vector<float> b(size_t(out * rank));
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  for (auto& v : b) v = normal(rng);
  w.set(0, 1e-10f);  // a delta of ~1 swamps it: only ulp-level restore is possible
  const Buffer original = w;
  const Dropout none;
  const float scale = 2.0f;
  for (SimdPath path : {SimdPath::Scalar, SimdPath::AVX2, SimdPath::AVX512}) {
    if (!cpu::simd_path_supported(path)) continue;
    Buffer merged = original;
    cpu::lora_add_g_a(path, DType::F32, b.data(), a.data(), in, rank, scale, none, 0, out,
                      merged.data());
    Buffer restored = merged;
    cpu::lora_add_g_a(path, DType::F32, b.data(), a.data(), in, rank, -scale, none, 0, out,
                      restored.data());
    for (int64_t i = 0; i < out * in; ++i) {
      const float m = std::fabs(merged.get(i));
      const float ulp = std::nextafter(m, INFINITY) - m;
      CHECK(std::fabs(restored.get(i) - original.get(i)) <= ulp,
            "%s: element %lld restored to %g from %g (merged %g)", cpu::simd_path_name(path),
            (long long)i, restored.get(i), original.get(i), merged.get(i));
    }
  }
}

// sum_j product(j) for j < n in double, and the sum of |product(j)|.
struct ExactSum {
  double sum = 0, magnitude = 0;
};
template <class Product>
static ExactSum exact_sum(int64_t n, Product&& product) {
  ExactSum e;
  for (int64_t j = 0; j < n; ++j) {
    const double p = product(j);
    e.sum += p;
    e.magnitude += std::fabs(p);
  }
  return e;
}

// One bf16 rounding of want, plus fp32 summation error on the sum of |products|.
static bool within_bf16(double got, double want, double magnitude) {
  return std::fabs(got - want) <= std::fabs(want) / 256 + magnitude * 1e-6;
}

// bf16_dots (where the CPU has BF16 dot products) against double-precision sums
// on odd shapes (tails of columns, rows and ranks), in two row ranges: each
// output within one bf16 rounding of alpha * the exact sum, plus fp32 summation
// error on the sum of |products|.
static void test_bf16_dots() {
  if (!cpu::cpu_has_avx512_bf16()) return;
  const Shape shapes[] = {{1, 1, 1}, {3, 31, 3}, {5, 33, 17}, {9, 100, 16}, {32, 4096, 16},
                          {6, 64, 5}};
  uint32_t seed = 7;
  for (const Shape& s : shapes) {
    const Buffer x = random_buffer(DType::BF16, s.rows * s.cols, seed++);
    const Buffer a = random_buffer(DType::BF16, s.rank * s.cols, seed++);
    Buffer out(DType::BF16, s.rows * s.rank);
    const float alpha = 0.7f;
    const int64_t mid = s.rows / 2;
    cpu::bf16_dots(x.words(), a.words(), s.cols, s.rank, alpha, 0, mid, out.words());
    cpu::bf16_dots(x.words(), a.words(), s.cols, s.rank, alpha, mid, s.rows, out.words());
    for (int64_t t = 0; t < s.rows; ++t)
      for (int64_t k = 0; k < s.rank; ++k) {
        const ExactSum e = exact_sum(s.cols, [&](int64_t i) {
          return double(x.get(t * s.cols + i)) * a.get(k * s.cols + i);
        });
        const double want = alpha * e.sum, got = out.get(t * s.rank + k);
        CHECK(within_bf16(got, want, alpha * e.magnitude),
              "bf16_dots %lldx%lld r%lld: [%lld, %lld] %g vs %g",
              (long long)s.rows, (long long)s.cols, (long long)s.rank, (long long)t, (long long)k,
              got, want);
      }
  }
}

// f32_rank_rows on every path against double-precision sums, in both of LoRA's
// forms (dxa: a over dy's rows, the sum along them; dB: a over its columns, the
// sum down them), ranks under, at and over the 16 and 32 of a tile's vectors,
// short last tiles of a, a in two ranges: within fp32 summation error of the
// sum of |products|, plus one rounding.
static void test_f32_rank_rows() {
  const Shape shapes[] = {{1, 1, 1}, {3, 31, 3}, {9, 100, 16}, {17, 70, 17}, {5, 33, 32},
                          {12, 40, 45}, {32, 4096, 16}};
  uint32_t seed = 23;
  for (const Shape& s : shapes)
    for (bool over_rows : {false, true})
      for (SimdPath path : {SimdPath::Scalar, SimdPath::AVX512}) {
        if (!cpu::simd_path_supported(path)) continue;
        // dxa: out [rows, rank] = alpha dy [rows, cols] v [cols, rank];
        // dB:  out [cols, rank] = alpha dy^T v [rows, rank].
        const int64_t count_a = over_rows ? s.cols : s.rows, count_b = over_rows ? s.rows : s.cols;
        const int64_t a_stride = over_rows ? 1 : s.cols, b_stride = over_rows ? s.cols : 1;
        const Buffer dy = random_buffer(DType::F32, s.rows * s.cols, seed++);
        const Buffer v = random_buffer(DType::F32, count_b * s.rank, seed++);
        Buffer out(DType::F32, count_a * s.rank);
        const float alpha = 0.7f;
        const float* m = static_cast<const float*>(dy.data());
        const float* vp = static_cast<const float*>(v.data());
        float* op = static_cast<float*>(out.data());
        const int64_t mid = count_a / 3;
        for (const auto& [begin, end] : {std::pair<int64_t, int64_t>{0, mid}, {mid, count_a}})
          cpu::f32_rank_rows(path, m, a_stride, b_stride, count_b, vp, s.rank, alpha, begin, end,
                             op);
        for (int64_t a = 0; a < count_a; ++a)
          for (int64_t k = 0; k < s.rank; ++k) {
            const ExactSum e = exact_sum(count_b, [&](int64_t b) {
              return double(m[a * a_stride + b * b_stride]) * vp[b * s.rank + k];
            });
            const double want = alpha * e.sum, got = out.get(a * s.rank + k);
            CHECK(std::fabs(got - want) <= alpha * e.magnitude * (count_b + 2) * 0x1p-24,
                  "f32_rank_rows %s %lldx%lld r%lld%s: [%lld, %lld] %g vs %g",
                  cpu::simd_path_name(path), (long long)s.rows, (long long)s.cols,
                  (long long)s.rank, over_rows ? " over rows" : "", (long long)a, (long long)k, got,
                  want);
          }
      }
}

// bf16_transpose: every word moved exactly, on shapes with row tails of the 8-row
// tile and column tails of the 32-column one, in two row ranges.
static void test_bf16_transpose() {
  if (!cpu::cpu_has_avx512_bf16()) return;
  const std::pair<int64_t, int64_t> shapes[] = {{1, 1}, {7, 3}, {9, 33}, {4096, 16}, {13, 70}};
  uint32_t seed = 19;
  for (const auto& [rows, cols] : shapes) {
    const Buffer src = random_buffer(DType::BF16, rows * cols, seed++);
    Buffer dst(DType::BF16, rows * cols);
    const int64_t mid = rows / 3;
    cpu::bf16_transpose(src.words(), rows, cols, 0, mid, dst.words());
    cpu::bf16_transpose(src.words(), rows, cols, mid, rows, dst.words());
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c)
        CHECK(dst.words()[c * rows + r] == src.words()[r * cols + c],
              "bf16_transpose %lldx%lld: [%lld, %lld]", (long long)rows, (long long)cols,
              (long long)r, (long long)c);
  }
}

// bf16_contract_rows likewise: odd row counts (the last row pairs with zeros),
// column tails, ranks that are not a multiple of the tile, both output layouts,
// the columns in two ranges, rows over one block of 512 (the last block a
// single row, or part of one).
static void test_bf16_contract_rows() {
  if (!cpu::cpu_has_avx512_bf16()) return;
  const Shape shapes[] = {{1, 1, 1},   {3, 31, 3},     {5, 33, 17},    {8, 100, 16},
                          {64, 4096, 16}, {7, 70, 9}, {1025, 70, 9}, {1300, 33, 17}};
  uint32_t seed = 11;
  for (const Shape& s : shapes)
    for (bool transposed : {false, true}) {
      const Buffer g = random_buffer(DType::BF16, s.rows * s.rank, seed++);
      const Buffer x = random_buffer(DType::BF16, s.rows * s.cols, seed++);
      Buffer out(DType::BF16, s.rank * s.cols);
      const float alpha = 1.3f;
      const int64_t mid = s.cols / 3;
      for (const auto& [begin, end] : {std::pair<int64_t, int64_t>{0, mid}, {mid, s.cols}})
        cpu::bf16_contract_rows(g.words(), x.words(), s.rows, s.cols, s.rank, alpha, transposed,
                                begin, end, out.words());
      for (int64_t k = 0; k < s.rank; ++k)
        for (int64_t i = 0; i < s.cols; ++i) {
          const ExactSum e = exact_sum(s.rows, [&](int64_t t) {
            return double(g.get(t * s.rank + k)) * x.get(t * s.cols + i);
          });
          const double want = alpha * e.sum;
          const double got = out.get(transposed ? i * s.rank + k : k * s.cols + i);
          CHECK(within_bf16(got, want, alpha * e.magnitude),
                "bf16_contract_rows %lldx%lld r%lld%s: [%lld, %lld] %g vs %g", (long long)s.rows,
                (long long)s.cols, (long long)s.rank, transposed ? " transposed" : "",
                (long long)k, (long long)i, got, want);
        }
    }
}

// bf16_expand likewise, b in either layout, with no addend, a bias (stride 0) and
// in place (the addend is the output, stride cols): odd ranks (the last pairs with
// zero), column tails of the 16 lanes, row counts over and under the 4-row tile,
// the columns in two ranges.
static void test_bf16_expand() {
  if (!cpu::cpu_has_avx512_bf16()) return;
  const Shape shapes[] = {{1, 1, 1}, {3, 31, 3}, {5, 33, 17}, {9, 100, 16}, {32, 4096, 16},
                          {6, 70, 2}};
  enum Addend { kNone, kBias, kInPlace };
  uint32_t seed = 17;
  for (const Shape& s : shapes)
    for (bool b_transposed : {false, true})
    for (Addend mode : {kNone, kBias, kInPlace}) {
      const Buffer g = random_buffer(DType::BF16, s.rows * s.rank, seed++);
      const Buffer b = random_buffer(DType::BF16, s.cols * s.rank, seed++);
      const Buffer bias = random_buffer(DType::BF16, s.cols, seed++);
      const Buffer before = random_buffer(DType::BF16, s.rows * s.cols, seed++);
      Buffer out = before;
      const uint16_t* addend = mode == kBias      ? bias.words()
                               : mode == kInPlace ? out.words()
                                                  : nullptr;
      const int64_t stride = mode == kInPlace ? s.cols : 0;
      const float alpha = 1.7f;
      const int64_t mid = s.cols / 3;
      for (const auto& [begin, end] : {std::pair<int64_t, int64_t>{0, mid}, {mid, s.cols}})
        cpu::bf16_expand(g.words(), b.words(), b_transposed, addend, stride, s.rows, s.cols,
                         s.rank, alpha, begin, end, out.words());
      for (int64_t t = 0; t < s.rows; ++t)
        for (int64_t i = 0; i < s.cols; ++i) {
          const ExactSum e = exact_sum(s.rank, [&](int64_t k) {
            return double(g.get(t * s.rank + k)) *
                   b.get(b_transposed ? k * s.cols + i : i * s.rank + k);
          });
          const double base = mode == kBias      ? bias.get(i)
                              : mode == kInPlace ? before.get(t * s.cols + i)
                                                 : 0.0;
          const double want = base + alpha * e.sum, got = out.get(t * s.cols + i);
          CHECK(within_bf16(got, want, alpha * e.magnitude),
                "bf16_expand %lldx%lld r%lld%s addend %d: [%lld, %lld] %g vs %g",
                (long long)s.rows, (long long)s.cols, (long long)s.rank,
                b_transposed ? " transposed" : "", int(mode), (long long)t, (long long)i, got,
                want);
        }
    }
}

int main() {
  test_paths_agree();
  test_bf16_contract_rows();
  test_f32_rank_rows();
  test_bf16_dots();
  test_bf16_transpose();
  test_bf16_expand();
  test_dropout_mask();
  test_merge_unmerge_fp32();
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("test_lora: all passed\n");
  return 0;
}
