// Native tests of the torch-free multi-LoRA kernels: the segments of a mixed
// batch (rows grouped by adapter, -1 left out); each adapter's rows run through
// the LoRA kernels with the segment as row map give, row by row, the bits of the
// unmapped kernel on that row alone (dropout included: the hash sees the row's
// own index); every SIMD path gives the scalar path's bits. fp32. Run by ctest.
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "pykernels/cpu.h"
#include "pykernels/dropout.h"

#include "check.h"

using namespace pykernels;
using cpu::SimdPath;

static void test_segments() {
  const int64_t ids[] = {2, -1, 0, 2};
  std::vector<int64_t> order(12), offsets(4);
  const int64_t listed = cpu::multi_lora_segments(ids, 4, 3, 3, order.data(), offsets.data());
  const std::vector<int64_t> want_order = {6, 7, 8, 0, 1, 2, 9, 10, 11};
  const std::vector<int64_t> want_offsets = {0, 3, 3, 9};
  CHECK(listed == 9, "listed %lld", (long long)listed);
  CHECK(std::equal(want_offsets.begin(), want_offsets.end(), offsets.begin()), "offsets");
  CHECK(std::equal(want_order.begin(), want_order.end(), order.begin()), "order");
}

static void test_rows_and_paths() {
  const int64_t batch = 7, tokens = 3, rows = batch * tokens, cols = 301, rank = 5, n = 4;
  const int64_t ids[batch] = {3, 0, -1, 3, 1, 0, 3};
  std::mt19937 gen(1);
  std::normal_distribution<float> normal;
  std::vector<float> x(size_t(rows * cols)), a(size_t(n * rank * cols)), g(size_t(rows * rank));
  for (auto* v : {&x, &a, &g})
    for (float& e : *v) e = normal(gen);
  const float scales[n] = {0.5f, 2.0f, 1.0f, 1.5f};
  std::vector<int64_t> order(static_cast<size_t>(rows)), offsets(static_cast<size_t>(n + 1));
  const int64_t listed =
      cpu::multi_lora_segments(ids, batch, tokens, n, order.data(), offsets.data());
  const Dropout d = make_dropout(0.3, 42);
  std::vector<float> ref_xa, ref_dx, ref_da;
  for (SimdPath path : {SimdPath::Scalar, SimdPath::AVX2, SimdPath::AVX512}) {
    if (!cpu::simd_path_supported(path)) continue;
    std::vector<float> xa(size_t(rows * rank), 0.0f), dx(size_t(rows * cols), 0.0f),
        da(size_t(n * rank * cols), 0.0f);
    // Split as threads would: two ranges cutting through a segment.
    for (auto [b, e] : {std::pair<int64_t, int64_t>{0, 5}, {5, listed}}) {
      cpu::multi_lora_x_at(path, DType::F32, x.data(), a.data(), cols, rank, d, order.data(),
                           offsets.data(), n, b, e, xa.data());
      cpu::multi_lora_add_g_a(path, DType::F32, g.data(), a.data(), cols, rank, scales, d.scale,
                              d, order.data(), offsets.data(), n, b, e, dx.data());
    }
    for (int64_t adapter = 0; adapter < n; ++adapter)
      cpu::multi_lora_gt_x(path, DType::F32, g.data(), x.data(), cols, rank, d, order.data(),
                           offsets.data(), adapter, 0, cols, da.data());
    // Row by row: the unmapped kernel on that row alone, with its adapter.
    for (int64_t t = 0; t < rows; ++t) {
      const int64_t adapter = ids[t / tokens];
      std::vector<float> one_xa(size_t(rows * rank), 0.0f), one_dx(size_t(rows * cols), 0.0f);
      if (adapter >= 0) {
        const float* a_row = a.data() + adapter * rank * cols;
        cpu::lora_x_at(path, DType::F32, x.data(), a_row, cols, rank, d, t, t + 1, one_xa.data());
        cpu::lora_add_g_a(path, DType::F32, g.data(), a_row, cols, rank,
                          d.scale * scales[adapter], d, t, t + 1, one_dx.data());
      }
      CHECK(std::memcmp(&one_xa[t * rank], &xa[t * rank], sizeof(float) * rank) == 0,
            "%s: xa row %lld", cpu::simd_path_name(path), (long long)t);
      CHECK(std::memcmp(&one_dx[t * cols], &dx[t * cols], sizeof(float) * cols) == 0,
            "%s: dx row %lld", cpu::simd_path_name(path), (long long)t);
    }
    // An adapter no row picked: zeros.
    CHECK(std::all_of(da.begin() + 2 * rank * cols, da.begin() + 3 * rank * cols,
                      [](float v) { return v == 0.0f; }),
          "%s: dA of an absent adapter", cpu::simd_path_name(path));
    if (ref_xa.empty()) {
      ref_xa = xa, ref_dx = dx, ref_da = da;
    } else {
      CHECK(xa == ref_xa && dx == ref_dx, "%s: not the scalar path's bits",
            cpu::simd_path_name(path));
      CHECK(da == ref_da, "%s: dA not the scalar path's bits", cpu::simd_path_name(path));
    }
  }
}

int main() {
  test_segments();
  test_rows_and_paths();
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("test_multi_lora: all passed\n");
  return 0;
}
