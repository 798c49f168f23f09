// Internal to csrc/cuda: deterministic split sums. A product that sums over many
// rows (lora_gt_x, nf4_matvec_t) splits the rows into slabs so the whole GPU
// works on it; each slab writes its fp32 sums to a workspace [slabs][n] and
// sum_slabs adds the slabs in slab order and rounds once. No atomics: the same
// inputs give the same bits on every run.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "pykernels/common.h"

namespace pykernels::cuda {

constexpr int64_t kSlabThreads = int64_t(1) << 16;    // aimed for: ~500 per SM of an H200
constexpr int64_t kMinSlabRows = 32;                  // fewer: the sums cost more than the rows
constexpr int64_t kMaxSlabs = 1024;                   // a grid dimension (limit 65535)
constexpr int64_t kMaxSlabFloats = int64_t(1) << 21;  // 8 MiB of workspace

// Slabs for a sum over `rows` whose kernel runs `threads_per_slab` threads per slab
// and writes `floats_per_slab` sums per slab: enough to fill the GPU, none under
// kMinSlabRows rows, the workspace within kMaxSlabFloats unless one slab is larger.
inline int64_t slab_count(int64_t rows, int64_t threads_per_slab, int64_t floats_per_slab) {
  int64_t slabs = ceil_div(kSlabThreads, threads_per_slab < 1 ? 1 : threads_per_slab);
  const int64_t limits[] = {ceil_div(rows, kMinSlabRows), kMaxSlabs,
                            kMaxSlabFloats / (floats_per_slab < 1 ? 1 : floats_per_slab)};
  for (const int64_t limit : limits) slabs = slabs < limit ? slabs : limit;
  return slabs < 1 ? 1 : slabs;
}

// out[e] = sum over s of workspace[s * n + e], in s order, rounded to dtype.
cudaError_t sum_slabs(DType dtype, const float* workspace, int64_t slabs, int64_t n, void* out,
                      cudaStream_t stream);

}  // namespace pykernels::cuda
